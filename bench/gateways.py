"""Gateways for the exchange benchmark: ``iex serve`` processes paired as an operator pairs
them, and their memory watched phase by phase.

Each gateway is one process (one worker) on a loopback port, with a fresh data directory, its
name (``IEX_NAME``) and a log; the admin token of its first start acts for its trust
``local``. ``pair`` runs the ``iex`` commands of docs/EXCHANGE.md ("Pairing two gateways"):
identity export, partner add, token issue ``--partner``, partner add ``--token-file``,
agreement add. Each command is a Python start of its own (about a second), so each step runs
on both gateways at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from peers import ROOT, free_port, wait_until_up
from stow_memory import SAMPLE_SECONDS

#: The trust that each gateway's admin token acts for: the one its first start makes.
TRUST = "local"


class Gateway:
    """An ``iex serve`` named ``name`` with its data under ``work/name``; not started."""

    def __init__(self, work: Path, name: str) -> None:
        self.name = name
        self.data_dir = work / name
        self.data_dir.mkdir(mode=0o700)
        self.log_path = work / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "IEX_NAME": name, "IEX_LOG_LEVEL": "warning"}
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process; ``wait_up`` waits for it to answer."""
        cmd = [
            sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--data-dir", str(self.data_dir), "--workers", "1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_up(self) -> None:
        assert self.process is not None
        what = f"iex serve ({self.name})"
        wait_until_up(self.process, self.url + "/healthz", what, self.log_path)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def iex(self, *args: str) -> str:
        """``iex ARGS --data-dir`` this gateway's; its standard output."""
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", *args, "--data-dir", str(self.data_dir)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: iex {args[0]} {args[1]} failed: {result.stderr}")
        return result.stdout

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def at_once(*calls: Callable[[], object]) -> None:
    """Run the calls (``iex`` commands, say) each in a thread of its own; raise the first
    failure once all have ended."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    for future in futures:
        future.result()


def start(*gateways: Gateway) -> None:
    """Start every gateway, then wait for each: their startups overlap."""
    for gateway in gateways:
        gateway.launch()
    for gateway in gateways:
        gateway.wait_up()


def introduce(here: Gateway, there: Gateway, url: str, folder: Path) -> None:
    """``here`` registers ``there`` from the identity document ``there`` exports with
    ``url``; for a known partner, an update (a new URL, say)."""
    identity = folder / f"{there.name}-for-{here.name}.json"
    identity.write_text(there.iex("identity", "export", "--url", url))
    here.iex("partner", "add", there.name, "--trust", TRUST, "--identity", str(identity))


def _give_token(issuer: Gateway, holder: Gateway, folder: Path) -> None:
    """``issuer`` issues a token for ``holder``, which adds it for its calls to ``issuer``."""
    token = issuer.iex(
        "token", "issue", "--trust", TRUST, "--role", "uploader,reader", "--partner", holder.name
    ).strip()
    token_file = folder / f"token-for-{holder.name}"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    try:
        holder.iex("partner", "add", issuer.name, "--token-file", str(token_file))
    finally:
        token_file.unlink()


def pair(sender: Gateway, receiver: Gateway, folder: Path) -> None:
    """Pair two running gateways so that ``sender``'s trust may push to ``receiver``'s: the
    identities, partners and tokens both ways, ``send`` at the sender and ``receive`` at the
    receiver."""
    at_once(
        lambda: introduce(sender, receiver, receiver.url, folder),
        lambda: introduce(receiver, sender, sender.url, folder),
    )
    agree = ["agreement", "add", "--trust", TRUST, "--partner-trust", TRUST, "--partner"]
    at_once(
        lambda: _give_token(receiver, sender, folder),
        lambda: _give_token(sender, receiver, folder),
        lambda: sender.iex(*agree, receiver.name, "--allow", "send"),
        lambda: receiver.iex(*agree, sender.name, "--allow", "receive"),
    )


def _status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/PID/status`` (VmRSS, VmHWM, RssFile, ...)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                fields[name] = int(value.split()[0])
    return fields


@dataclass(frozen=True)
class Peak:
    """A phase's peak resident set, KiB: the larger of the sampled peak and the kernel's
    high-water mark; and, at the sampled peak, how much of it was file pages mapped (page
    cache, which the kernel can take back) rather than the process's own memory."""

    kb: int
    sampled_kb: int
    sampled_file_kb: int


class PeakRss(threading.Thread):
    """A process's peak resident set phase by phase: sampled every 50 ms, and the kernel's
    high-water mark (VmHWM). ``reset`` starts a phase: the sampled peak and, through
    ``/proc/PID/clear_refs`` (Linux 4.0 and later), the high-water mark come down to the
    current RSS, so each phase's peak is its own. Where the mark cannot be reset it covers
    the process's whole life, and ``hwm_since_start`` says so."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.hwm_since_start = False
        self._sampled = (0, 0)  # VmRSS and RssFile at the largest VmRSS seen
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stopped.wait(SAMPLE_SECONDS):
            try:
                status = _status(self.pid)
            except OSError:
                return  # the process is gone
            with self._lock:
                if status["VmRSS"] > self._sampled[0]:
                    self._sampled = (status["VmRSS"], status.get("RssFile", 0))

    def reset(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.hwm_since_start = True
        status = _status(self.pid)
        with self._lock:
            self._sampled = (status["VmRSS"], status.get("RssFile", 0))

    def peak(self) -> Peak:
        """The peak since the last ``reset``."""
        hwm = _status(self.pid)["VmHWM"]
        with self._lock:
            rss, file = self._sampled
        return Peak(max(rss, hwm), rss, file)

    def stop(self) -> None:
        self._stopped.set()
        self.join()
