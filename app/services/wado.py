"""WADO-RS: retrieve studies, series, instances, metadata, frames and bulk data (PS3.18 §10.4)."""

from __future__ import annotations

from app.storage.base import InstanceStore, MetadataIndex


class WadoService:
    def __init__(self, store: InstanceStore, index: MetadataIndex) -> None:
        self._store = store
        self._index = index
