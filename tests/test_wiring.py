"""``build_services``: the gateway's services on a data directory, used without HTTP."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from pydicom.uid import generate_uid

from app.crypto.errors import KeyUnavailable
from app.dicom.media import DICOM_JSON, parse_accept
from app.dicom.query import QueryLevel
from app.errors import TooManyRequests
from app.filelock import FileLock
from app.services.keys import key_lock
from app.services.security import OPERATOR_TRUST, Credentials, Principal
from app.services.wiring import RUN_DIR, Services, build_services
from app.settings import Settings
from tests.helpers import make_instance

BASE_URL = "http://127.0.0.1:8080/dicomweb"


async def _body(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


async def _admin(services: Services, data_dir: Path) -> Principal:
    token = (data_dir / "admin.token").read_text().strip()
    return await services.security.gate.authenticate(Credentials(token, None, "127.0.0.1"))


async def test_services_store_search_and_retrieve_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)
    study = generate_uid()
    instance = make_instance(study_uid=study, patient_id="WIRING-1")
    async with build_services(settings) as services:
        token_file = data_dir / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        admin = await _admin(services, data_dir)
        assert admin.trust == OPERATOR_TRUST and admin.is_operator
        stored = await services.stow.store_single(admin.trust, _body(instance), None)
        assert [s.study_uid for s in stored.stored] == [study] and not stored.failed
    first_token = token_file.read_text()

    # A second start finds everything the first made: no new keys, token or index.
    async with build_services(settings) as services:
        assert token_file.read_text() == first_token
        admin = await _admin(services, data_dir)
        found = await services.qido.search(
            admin, QueryLevel.STUDY, [("PatientID", "WIRING-1")], BASE_URL
        )
        assert [d["0020000D"]["Value"] for d in found.datasets] == [[study]]
        metadata = await services.wado.metadata(
            admin.trust, study, None, None, parse_accept(DICOM_JSON), BASE_URL
        )
        (dataset,) = orjson.loads(metadata)
        assert dataset["00100020"]["Value"] == ["WIRING-1"]


async def test_unfiltered_searches_are_throttled_by_the_service(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", rate_limit_burst=1, rate_limit_per_minute=1)
    async with build_services(settings) as services:
        admin = await _admin(services, settings.data_dir)
        await services.qido.search(admin, QueryLevel.STUDY, [("limit", "5")], BASE_URL)
        with pytest.raises(TooManyRequests) as refused:
            await services.qido.search(admin, QueryLevel.STUDY, [("PatientID", "*")], BASE_URL)
        assert refused.value.detail.startswith("rate limit for searches without matching keys")
        assert int(refused.value.headers["Retry-After"]) >= 1
        # Matching keys, or a study to search within, bound the search: never throttled.
        await services.qido.search(admin, QueryLevel.STUDY, [("PatientID", "P1")], BASE_URL)
        await services.qido.search(admin, QueryLevel.SERIES, [], BASE_URL, study_uid=generate_uid())


async def test_a_running_gateway_holds_the_keys_and_lets_the_next_process_start(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    async with build_services(settings):
        with pytest.raises(KeyUnavailable), key_lock(settings.data_dir, "rotate keys"):
            pass
        # Ready: the next process serving the directory may take its turn to start.
        startup = FileLock(settings.data_dir / RUN_DIR / "startup.lock")
        assert startup.acquire()
        startup.release()
    with key_lock(settings.data_dir, "rotate keys"):
        pass
