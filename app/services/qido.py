"""QIDO-RS: search for studies, series and instances (PS3.18 §10.6)."""

from __future__ import annotations

from app.storage.base import MetadataIndex


class QidoService:
    def __init__(self, index: MetadataIndex) -> None:
        self._index = index
