"""DICOMweb servers run as child processes, each on a 127.0.0.1 port with a throwaway
directory: the servers ``bench/compare.py`` compares, and the real peers of the interop tests
(``tests/test_orthanc_interop.py``).

* ``iex serve`` as the other benchmarks start it: a fresh data directory, authentication on
  (the admin token written on first start), log level ``warning``.
* Orthanc with its DICOMweb plugin, both from Debian's packages (installed when absent, with
  the system service kept from starting), run as our own process with a JSON configuration
  in the temporary directory: authentication, HTTP compression, storage compression and the
  DICOM server off, remote access refused, storage and index in the temporary directory;
  optionally with remote DICOMweb servers to act as a client of, and other Orthancs as its
  peers (``OrthancPeers``: ``POST /peers/{name}/store`` sends them studies).

Standard library and httpx only, and no imports of its neighbours: the benchmarks import it
as ``peers`` (with ``bench/`` on the path), the tests as ``bench.peers`` (with the
repository root on the path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ORTHANC = Path("/usr/sbin/Orthanc")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Peer:
    """A running DICOMweb server: where its roots are, what to send, how to stop it."""

    name: str
    #: The server's root URL (Orthanc's REST API is there).
    url: str
    dicomweb: str
    headers: dict[str, str]
    process: subprocess.Popen[bytes]
    version: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until_up(
    process: subprocess.Popen[bytes], url: str, what: str, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200; the one startup wait of every benchmark's server."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text(errors="replace") if log is not None else "(see its output)"
            raise RuntimeError(f"{what} exited during startup:\n{said}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{what} did not start within 60 s")


def start_iex(work: Path, workers: int = 1) -> Peer:
    """``iex serve`` on a free loopback port with an empty data directory under ``work``,
    with ``workers`` processes."""
    data_dir = work / "iex-data"
    data_dir.mkdir(mode=0o700)
    port = free_port()
    log_path = work / "iex.log"
    cmd = [
        sys.executable, "-m", "app.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, "IEX_LOG_LEVEL": "warning"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url + "/healthz", "iex serve", log_path)
    token = (data_dir / "admin.token").read_text().strip()
    return Peer(
        name="iex",
        url=url,
        dicomweb=url + "/dicomweb",
        headers={"Authorization": f"Bearer {token}"},
        process=process,
        version=version("iex"),
        log_path=log_path,
    )


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's library, as ``dpkg -L orthanc-dicomweb`` lists it."""
    listing = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        return None
    libraries = [
        Path(line)
        for line in listing.stdout.splitlines()
        if "DicomWeb" in line and ".so" in Path(line).name and Path(line).is_file()
    ]
    # Prefer the plugins directory's unversioned link, else any version of the library.
    libraries.sort(key=lambda p: (p.name != "libOrthancDicomWeb.so", str(p)))
    return libraries[0] if libraries else None


def ensure_orthanc() -> Path:
    """Install ``orthanc`` and ``orthanc-dicomweb`` with apt when absent; the plugin's path.

    The packages' maintainer scripts would start the system service: a temporary
    ``policy-rc.d`` that denies every start keeps them from it (unless one already exists).
    """
    plugin = dicomweb_plugin()
    if ORTHANC.exists() and plugin is not None:
        return plugin
    if os.geteuid() != 0:
        raise RuntimeError("Orthanc is missing: apt-get install orthanc orthanc-dicomweb (root)")
    print("installing orthanc and orthanc-dicomweb with apt-get ...", flush=True)
    made_policy = not POLICY_RC.exists()
    if made_policy:
        POLICY_RC.write_text("#!/bin/sh\n# iex bench/peers.py: no service starts\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "orthanc", "orthanc-dicomweb"], check=True, env=env
        )
    finally:
        if made_policy:
            POLICY_RC.unlink(missing_ok=True)
    plugin = dicomweb_plugin()
    if not ORTHANC.exists() or plugin is None:
        raise RuntimeError("apt-get installed Orthanc but the binary or plugin is missing")
    return plugin


def orthanc_config(
    work: Path,
    port: int,
    plugin: Path,
    *,
    name: str = "iex-bench",
    servers: dict[str, dict[str, object]] | None = None,
    orthanc_peers: dict[str, str] | None = None,
) -> dict[str, object]:
    """Orthanc's configuration: loopback only, nothing that the iex run does not do either.

    ``servers`` become the plugin's ``DicomWeb.Servers``: the remote DICOMweb servers this
    Orthanc can store to, search and retrieve from (``/dicom-web/servers/{name}/...``).
    ``orthanc_peers`` (name to root URL) become its ``OrthancPeers``.
    """
    dicomweb: dict[str, object] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
    if servers:
        dicomweb["Servers"] = servers
    extra: dict[str, object] = {}
    if orthanc_peers:
        extra["OrthancPeers"] = {peer: {"Url": url + "/"} for peer, url in orthanc_peers.items()}
        # Finished jobs are forgotten beyond this many (10 by default): a caller that queues
        # a store to a peer per study must still find each one's outcome.
        extra["JobsHistorySize"] = 10_000
    return {
        "Name": name,
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "StorageCompression": False,
        "DicomServerEnabled": False,
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "Plugins": [str(plugin)],
        "DicomWeb": dicomweb,
        **extra,
    }


def start_orthanc(
    work: Path,
    plugin: Path,
    *,
    name: str = "iex-bench",
    servers: dict[str, dict[str, object]] | None = None,
    orthanc_peers: dict[str, str] | None = None,
    port: int | None = None,
) -> Peer:
    """Orthanc (the binary, not the system service) on a loopback port (``port``, else a free
    one: two Orthancs that are each other's peers need their ports known before either
    starts), its files in ``work``; ``servers`` and ``orthanc_peers`` as in
    ``orthanc_config``."""
    port = port or free_port()
    config = work / "orthanc.json"
    settings = orthanc_config(
        work, port, plugin, name=name, servers=servers, orthanc_peers=orthanc_peers
    )
    config.write_text(json.dumps(settings, indent=2))
    log_path = work / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC), str(config)], cwd=work, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url + "/system", "Orthanc", log_path)
    system = httpx.get(url + "/system", timeout=5).json()
    dicomweb = httpx.get(url + "/plugins/dicom-web", timeout=5).json()
    return Peer(
        name="orthanc",
        url=url,
        dicomweb=url + "/dicom-web",
        headers={},
        process=process,
        version=f"{system['Version']} (DICOMweb plugin {dicomweb.get('Version', '?')})",
        log_path=log_path,
    )
