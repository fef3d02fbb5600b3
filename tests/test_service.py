"""Operations endpoints, settings from the environment, CORS and compression."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.helpers import IexServer, free_port, make_instance, wait_until


def test_health_ready_and_metrics(server: IexServer) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    httpx.post(
        server.dicomweb + "/studies",
        content=make_instance(),
        headers={"Content-Type": "application/dicom", **server.headers},
    ).raise_for_status()
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'iex_http_requests_total{method="POST",route="/dicomweb/studies",status="200"}' in text
    assert 'iex_http_request_duration_seconds_count{method="GET",route="/readyz"}' in text
    stored = [line for line in text.splitlines() if line.startswith("iex_instances_stored ")]
    assert stored and float(stored[0].split()[1]) >= 1
    assert any(line.startswith("iex_bytes_stored ") for line in text.splitlines())


def test_readyz_fails_when_the_store_is_unwritable(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server()
    (staging,) = [p for p in (srv.data_dir / "staging").iterdir() if p.is_dir()]
    staging.rmdir()
    staging.write_bytes(b"")  # a file where the server's staging directory should be
    try:
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503
        assert "not writable" in r.json()["detail"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        staging.unlink()
        staging.mkdir()


def test_settings_from_environment_and_cors(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_CORS_ORIGINS="https://viewer.example")
    r = httpx.options(
        srv.dicomweb + "/studies",
        headers={
            "Origin": "https://viewer.example",
            "Access-Control-Request-Method": "GET",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"
    r = httpx.get(srv.url + "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_unknown_route_is_a_json_404(server: IexServer) -> None:
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404
    assert r.json()["detail"]


def test_serve_reads_host_port_and_data_dir_from_environment(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "from-env"
    env = {
        **os.environ,
        "IEX_HOST": "127.0.0.1",
        "IEX_PORT": str(port),
        "IEX_DATA_DIR": str(data_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def readyz() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            except httpx.HTTPError:
                return None

        r = wait_until(readyz, message="iex serve to come up from the environment settings")
        assert r.status_code == 200
        assert (data_dir / "index.sqlite3").exists()
    finally:
        proc.terminate()
        proc.wait(15)


def test_public_url_sets_retrieve_urls(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_PUBLIC_URL="https://gateway.example:8443/")
    r = httpx.post(
        srv.dicomweb + "/studies",
        content=make_instance(),
        headers={"Content-Type": "application/dicom", **srv.headers},
    )
    assert r.status_code == 200
    assert r.json()["00081190"]["Value"][0].startswith("https://gateway.example:8443/dicomweb/")
