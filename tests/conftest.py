from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import RUNNING, IexServer


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_servers() -> Iterator[None]:
    """A fixture that failed between starting a gateway and yielding it never stops it;
    no test run leaves a server behind."""
    yield
    for srv in list(RUNNING):
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IexServer]:
    """One gateway shared by the session; tests use fresh UIDs so they do not collide."""
    srv = IexServer(tmp_path_factory.mktemp("shared") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., IexServer]]:
    """Start gateways with their own empty data directory (and optional environment)."""
    started: list[IexServer] = []

    def start(name: str = "data", **env: str) -> IexServer:
        srv = IexServer(tmp_path / name, env=env).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def client(server: IexServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
