"""QIDO-RS routes (PS3.18 §10.6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicomweb", tags=["QIDO-RS"])
