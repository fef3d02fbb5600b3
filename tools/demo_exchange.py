"""``make demo-exchange``: two gateways on loopback exchange a study, end to end.

With nothing but the ``iex`` command line and the HTTP API, as an operator and a script
would: two gateways (``gw-north`` serving trust ``st-north``, ``gw-south`` serving
``st-south``) start on fresh data directories, are paired (identities, partners, tokens,
agreements), north uploads a generated study and pushes it to south with ``iex send``, then
north pulls it back from south as a prior (``POST /pulls``). Each transfer's final state is
printed; the demo exits 0 only when every one is ``delivered``. Both gateways stop at the end,
and their data directories are removed unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TIMEOUT = 300.0


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Gateway:
    def __init__(self, root: Path, name: str, trust: str) -> None:
        self.name = name
        self.trust = trust
        self.data_dir = root / name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "IEX_NAME": name, "IEX_DATA_DIR": str(self.data_dir)}
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    def iex(self, *args: str, secret: bool = False) -> str:
        """Run ``iex ARGS`` on this gateway's data directory; its output (shown unless
        ``secret``)."""
        say(f"[{self.name}] $ iex {shlex.join(args)}")
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if result.returncode != 0:
            raise SystemExit(f"iex {args[0]} failed on {self.name}:\n{result.stderr}")
        if result.stdout.strip() and not secret:
            say(_indent(result.stdout))
        return result.stdout

    def start(self, log: Path) -> None:
        say(f"[{self.name}] $ iex serve --port {self.port}")
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited at start; see {log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit(f"{self.name} did not start; see {log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def pair(one: Gateway, other: Gateway, folder: Path) -> None:
    """``one`` registers ``other`` from its identity document, then the token ``other``
    issued for it, then their agreement (docs/EXCHANGE.md, "Pairing two gateways")."""
    identity = folder / f"{other.name}.json"
    identity.write_text(other.iex("identity", "export", "--url", other.url, secret=True))
    one.iex("partner", "add", other.name, "--trust", one.trust, "--identity", str(identity))


def give_token(issuer: Gateway, holder: Gateway, folder: Path) -> None:
    token = issuer.iex("token", "issue", "--trust", issuer.trust, "--role", "uploader,reader",
                       "--partner", holder.name, secret=True).strip()  # fmt: skip
    token_file = folder / f"token-for-{holder.name}"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    holder.iex("partner", "add", issuer.name, "--token-file", str(token_file))
    token_file.unlink()


def write_study(folder: Path, patient_id: str) -> str:
    """A small CT study of two series, three slices each; its Study Instance UID."""
    study = generate_uid()
    folder.mkdir()
    for s in range(2):
        series = generate_uid()
        for n in range(3):
            ds = Dataset()
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.PatientName = "Demo^Patient"
            ds.PatientID = patient_id
            ds.StudyDate = "20240301"
            ds.Modality = "CT"
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = n + 1
            ds.Rows = ds.Columns = 128
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.PixelData = bytes((i * 7 + n) % 251 for i in range(128 * 128 * 2))
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(folder / f"s{s}-i{n}.dcm", enforce_file_format=True)
    return study


def wait_pull(c: httpx.Client, location: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        pull: dict[str, Any] = c.get(location).json()
        studies = pull.get("studies", [])
        if studies and all(s.get("state") in ("delivered", "failed", "cancelled") for s in studies):
            return pull
        if time.monotonic() > deadline:
            raise SystemExit(f"the pull did not end in {TIMEOUT:.0f} s: {pull}")
        time.sleep(0.5)


def demo(root: Path, north: Gateway, south: Gateway) -> int:
    say("== two gateways, each with a trust of its own")
    for gw in (north, south):
        gw.iex("trust", "add", gw.trust)
    say("== pairing: identities, partners, tokens, agreements")
    pair(north, south, root)
    pair(south, north, root)
    give_token(north, south, root)
    give_token(south, north, root)
    for gw, other in ((north, south), (south, north)):
        gw.iex("agreement", "add", "--trust", gw.trust, "--partner", other.name,
               "--partner-trust", other.trust, "--allow", "send,receive,pull")  # fmt: skip
    for gw in (north, south):
        gw.start(root / f"{gw.name}.log")
        gw.token = gw.iex("token", "issue", "--trust", gw.trust, "--role", "uploader,reader",
                          "--label", "demo", secret=True).strip()  # fmt: skip
    say("== north stores a generated study")
    study = write_study(root / "study", "DEMO-1")
    env = {**north.env, "IEX_TOKEN": north.token}
    say(f"[{north.name}] $ iex upload study --server {north.url}")
    subprocess.run([sys.executable, "-m", "app.cli", "upload", str(root / "study"),
                    "--server", north.url], env=env, check=True, timeout=TIMEOUT)  # fmt: skip
    say("== north pushes it to south")
    to = f"{south.name}/{south.trust}"
    say(f"[{north.name}] $ iex send --study {study} --to {to} --server {north.url}")
    command = ["send", "--study", study, "--to", to, "--server", north.url]
    sent = subprocess.run([sys.executable, "-m", "app.cli", *command], env=env, timeout=TIMEOUT)
    states: list[tuple[str, str]] = []
    with north.client() as c:
        pushed = c.get("/transfers", params={"direction": "out"}).json()["transfers"]
        states += [(f"push {t['id']} north -> south", t["state"]) for t in pushed]
        if sent.returncode == 0:
            say("== north pulls it back from south as a prior (POST /pulls)")
            body = {"partner": south.name, "partner_trust": south.trust,
                    "query": {"PatientID": "DEMO-1"}, "limit": 10}  # fmt: skip
            answer = c.post("/pulls", json=body)
            if answer.status_code != 202:
                raise SystemExit(f"POST /pulls answered {answer.status_code}: {answer.text}")
            pull = wait_pull(c, answer.headers["location"])
            states += [(f"pull {s['study']} south -> north", s["state"]) for s in pull["studies"]]
    say("== final states")
    for what, state in states:
        say(f"    {what}: {state}")
    return 0 if states and all(state == "delivered" for _, state in states) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="iex-demo-"))
    north = Gateway(root, "gw-north", "st-north")
    south = Gateway(root, "gw-south", "st-south")
    try:
        return demo(root, north, south)
    finally:
        north.stop()
        south.stop()
        if args.keep:
            say(f"data directories and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
