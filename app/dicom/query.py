"""QIDO-RS query model (PS3.18 §10.6): what to match, what to return, which page.

Parsing from query parameters lives here too, so the HTTP layer only hands over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class QueryLevel(Enum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True)
class Query:
    level: QueryLevel
    study_uid: str | None = None
    series_uid: str | None = None
    limit: int = 1000
    offset: int = 0
    fuzzy: bool = False
    include_all: bool = False
    include_tags: frozenset[int] = field(default_factory=frozenset)


#: Matching datasets as DICOM JSON, in response order.
QueryResult = list[dict[str, Any]]
