"""``iex upload``: send a folder, a zip or a tar to a gateway as a resumable (tus 1.0.0)
upload, and show what the gateway stored.

::

    iex upload PATH --server URL [--token T | env IEX_TOKEN] [--trust NAME]
               [--chunk-size N] [--state-file F] [--no-wait] [--ca-cert PEM]

A folder (or a single file that is not a ``.zip`` or ``.tar``) is sent as a tar generated
on the fly, byte for byte the same every time (``app.transfer.sources``). The upload's URL
is kept in a state file (default ``$XDG_CACHE_HOME/iex/uploads.json``, mode 0600, never the
token) under the server and the source's fingerprint, so running the same command again
after a crash or Ctrl-C resumes where the server stands; an upload the server no longer
knows (404, 410) starts again. Once every byte is sent the command waits for the gateway's
report (unless ``--no-wait``) and prints the studies stored, or why the ingest failed.

Exit status: 0 stored (or sent, with ``--no-wait``); 1 the upload or its ingest failed;
2 the command cannot run as given (arguments, path, token, server unreachable or refusing
the credentials); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from app.cli.connection import (
    UsageError,
    add_connection_arguments,
    bearer_token,
    server_url,
    tls_verify,
)
from app.durable import write_atomically
from app.transfer.sources import SourceError, TarSource, UploadSource, open_source, payload_sha256
from app.transfer.tus_client import (
    IngestReport,
    ProtocolError,
    RetriesExhausted,
    TusClient,
    TusError,
    UploadGone,
    UploadRejected,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: State entries older than this are dropped: the server has expired such uploads anyway.
STATE_MAX_AGE = 7 * 24 * 3600.0
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
#: One chunk is held in memory (its checksum precedes it), so its size is bounded.
MAX_CHUNK_SIZE = 1024**3


# -- the state file ---------------------------------------------------------------------------


def default_state_file() -> Path:
    """``$XDG_CACHE_HOME/iex/uploads.json``, the XDG Base Directory default being ``~/.cache``."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return root / "iex" / "uploads.json"


class UploadStateFile:
    """Upload URLs by server and source fingerprint, in a JSON file replaced atomically.

    Commands running at once each hold a lock while they read, change and write it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_path = self.path.with_name(self.path.name + ".lock")
            lock = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise self._unusable(exc) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            before = json.dumps(entries, sort_keys=True)
            yield entries
            now = time.time()
            entries = {
                k: v for k, v in entries.items() if now - v.get("saved_at", now) < STATE_MAX_AGE
            }
            if json.dumps(entries, sort_keys=True) != before:
                data = json.dumps({"version": 1, "uploads": entries}, indent=2, sort_keys=True)
                try:
                    write_atomically(self.path, data.encode() + b"\n", 0o600)
                except OSError as exc:
                    raise self._unusable(exc) from None
        finally:
            os.close(lock)

    def _unusable(self, exc: OSError) -> UsageError:
        return UsageError(f"cannot use the state file {self.path}: {exc.strerror or exc}")

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A cache: losing it costs a fresh upload, never data.
            _say(f"ignoring unreadable state file {self.path}: {exc}")
            return {}
        uploads = document.get("uploads") if isinstance(document, dict) else None
        return {k: v for k, v in (uploads or {}).items() if isinstance(v, dict) and "url" in v}

    def get(self, key: str) -> str | None:
        with self._locked() as entries:
            entry = entries.get(key)
            return str(entry["url"]) if entry else None

    def put(self, key: str, url: str, path: Path, length: int) -> None:
        with self._locked() as entries:
            entries[key] = {
                "url": url,
                "path": os.path.abspath(path),
                "length": length,
                "saved_at": time.time(),
            }

    def remove(self, key: str) -> None:
        with self._locked() as entries:
            entries.pop(key, None)


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """Bytes sent of the total, rate and time left on ``stream``: one line rewritten with
    ``\\r`` on a terminal (at most ten times a second), else a line every 5 percent (logs
    stay readable)."""

    STEP = 5
    REDRAW = 0.1

    def __init__(self, total: int, start: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.start = start
        self.stream = stream
        self.tty = stream.isatty()
        self._began = time.monotonic()
        self._step = -1
        self._drawn_at = -self.REDRAW
        self._drawn = False

    def __call__(self, offset: int, total: int) -> None:
        percent = offset * 100 // total if total else 100
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= self.REDRAW or offset == total:
                self.stream.write(f"\r{self._line(offset, percent):<79}")
                self._drawn_at, self._drawn = now, True
        elif percent // self.STEP > self._step:
            self._step = percent // self.STEP
            self.stream.write(self._line(offset, percent) + "\n")
        self.stream.flush()

    def _line(self, offset: int, percent: int) -> str:
        elapsed = time.monotonic() - self._began
        rate = (offset - self.start) / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {_duration((self.total - offset) / rate)}" if rate > 0 else "ETA --:--"
        return f"{_mb(offset)} of {_mb(self.total)} MB ({percent}%)  {rate / 1e6:.1f} MB/s  " + (
            eta if offset < self.total else "done"
        )

    def finish(self) -> None:
        """End the progress line, so that what is written next starts on its own."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class _Messages(logging.Handler):
    """The client's retry warnings on stderr, below the progress line rather than in it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.progress: Progress | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            self.progress.finish()
        _say(record.getMessage())


_MESSAGES = _Messages()


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# -- the command ------------------------------------------------------------------------------


def _say(text: str) -> None:
    sys.stderr.write(f"iex upload: {text}\n")
    sys.stderr.flush()


def parse_size(text: str) -> int:
    """A chunk size: bytes, or with a binary suffix K, M or G (``8M``, ``512KiB``)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 8M, 512K or 65536")
    size = int(number) * _SIZE_UNITS[unit]
    if not 0 < size <= MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError("the chunk size must be between 1 byte and 1G")
    return size


async def _resume_or_create(
    client: TusClient,
    state: UploadStateFile,
    key: str,
    source: UploadSource,
    args: argparse.Namespace,
) -> tuple[str, int]:
    """The upload to continue (printing where it resumes) or a new one, recorded before
    its first byte is sent so that an interruption at any point can resume."""
    known = await asyncio.to_thread(state.get, key)
    if known is not None:
        try:
            status = await client.status(known)
        except UploadGone as exc:
            _say(f"the earlier upload is gone ({exc.status}: {exc.detail}); starting again")
        else:
            if status.length == source.length:
                _say(f"resuming at {status.offset} of {source.length} bytes ({known})")
                return known, status.offset
            _say(f"the earlier upload at {known} has another length; starting again")
    _say(f"computing the sha256 of {source.length} bytes")
    metadata = {
        "filename": source.filename,
        "content-type": source.content_type,
        "sha256": await asyncio.to_thread(payload_sha256, source),
    }
    if args.trust:
        metadata["trust"] = args.trust
    url = await client.create(source.length, metadata)
    await asyncio.to_thread(state.put, key, url, args.path, source.length)
    _say(f"uploading {source.length} bytes to {url}")
    return url, 0


async def _run(args: argparse.Namespace) -> int:
    server = server_url(args.server)
    token = bearer_token(args.token)
    verify = tls_verify(args.ca_cert)
    try:
        source = await asyncio.to_thread(open_source, args.path)
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    if isinstance(source, TarSource):
        for skipped in source.skipped:
            _say(f"left out {skipped.name}: {skipped.reason}")
    state = UploadStateFile(args.state_file or default_state_file())
    key = f"{server} {await asyncio.to_thread(source.fingerprint)}"
    async with TusClient(server, token, chunk_size=args.chunk_size, verify=verify) as client:
        try:
            await client.capabilities()
        except RetriesExhausted as exc:
            raise UsageError(f"cannot reach {server}: {exc.__cause__ or exc}") from None
        except ProtocolError as exc:
            raise UsageError(str(exc)) from None
        url, offset = await _resume_or_create(client, state, key, source, args)
        progress = _MESSAGES.progress = Progress(source.length, offset)
        try:
            await client.upload(source, url, on_progress=progress)
        except (UploadGone, SourceError):
            await asyncio.to_thread(state.remove, key)
            raise
        finally:
            progress.finish()
        if args.no_wait:
            await asyncio.to_thread(state.remove, key)
            _say(f"all {source.length} bytes sent; the gateway ingests them now ({url})")
            return 0
        _say("all bytes sent; waiting for the gateway to ingest them")
        report = await client.wait_for_ingest(url, poll=1.0)
        await asyncio.to_thread(state.remove, key)
    return _show(report)


def _show(report: IngestReport) -> int:
    for study in report.studies:
        sys.stdout.write(f"{study.study_uid}\t{len(study.instances)} instances\n")
    for item in report.skipped:
        _say(f"skipped {item.member}: {item.reason}")
    for item in report.failures:
        sop = f" (SOP Instance UID {item.sop_uid})" if item.sop_uid else ""
        _say(f"failed {item.member}{sop}: {item.reason}")
    counts = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in report.counts.items())
    if report.state == "complete":
        _say(f"done: {counts}")
        return 0
    _say(f"the gateway could not ingest the upload: {report.error or report.state} ({counts})")
    return EXIT_FAILED


def _command(args: argparse.Namespace) -> int:
    logger = logging.getLogger("app.transfer")
    if _MESSAGES not in logger.handlers:
        logger.addHandler(_MESSAGES)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        _say("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except (UploadGone, SourceError) as exc:
        # The upload was forgotten (its state entry too): a new one is needed.
        _say(f"{exc}; run the same command again to start a new upload")
        return EXIT_FAILED
    except UploadRejected as exc:
        _say(str(exc))
        return EXIT_USAGE if exc.status in (401, 403) else EXIT_FAILED
    except TusError as exc:
        _say(f"{exc}; run the same command again to resume")
        return EXIT_FAILED
    except OSError as exc:
        _say(str(exc))
        return EXIT_FAILED


def register(commands: Any) -> None:
    upload = commands.add_parser(
        "upload",
        help="send a folder, zip or tar to a gateway (resumable)",
        description="Send PATH as a resumable upload; rerun the same command to resume.",
    )
    upload.add_argument("path", type=Path, help="a folder, a .zip, a .tar or a single file")
    add_connection_arguments(upload, "the uploader role")
    upload.add_argument(
        "--trust", metavar="NAME", help="the trust to store into (must be the token's)"
    )
    upload.add_argument(
        "--chunk-size",
        metavar="N",
        type=parse_size,
        default=8 * 1024 * 1024,
        help="bytes per request, e.g. 8M (the default) or 512K",
    )
    upload.add_argument(
        "--state-file",
        metavar="F",
        type=Path,
        help="where upload URLs are kept to resume (default: ~/.cache/iex/uploads.json)",
    )
    upload.add_argument(
        "--no-wait", action="store_true", help="end once sent; do not wait for the ingest report"
    )
    upload.set_defaults(func=_command)
