"""``iex send``: ask a gateway to push one of its trust's studies to a partner trust, and
follow the transfer until the partner's receipt.

::

    iex send --study UID --to PARTNER/REMOTE_TRUST --server URL
             [--priority routine|urgent] [--token T | env IEX_TOKEN] [--ca-cert PEM]
             [--no-wait]

The gateway does the sending (``POST /transfers``); this command asks for it and then polls
``GET /transfers/{id}``: on a terminal, a progress line on stderr (state, bytes the partner
acknowledged of the total); otherwise a line per change of state (or of the last error), so
logs stay readable. Once delivered it prints the receipt's summary on stdout, tab-separated:
transfer id, study, partner/trust, instances stored. ``--no-wait`` prints the transfer id
and ends once the transfer is queued. Interrupting the command stops only the waiting: the
transfer goes on at the gateway.

Exit status: 0 delivered (queued, with ``--no-wait``); 1 the transfer failed or was
cancelled (the reason on stderr); 2 the command cannot run as given (arguments, token,
server unreachable), or the gateway refused the push (no agreement, no such study, ...)
with its reason; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from app.cli.connection import (
    UsageError,
    add_connection_arguments,
    bearer_token,
    server_url,
    tls_verify,
)
from app.dicom.uids import validate_uid
from app.errors import BadRequest
from app.names import check_name

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Seconds between polls of the transfer.
POLL = 1.0
#: Seconds the gateway may stay unreachable, while polling, before the command gives up
#: waiting (the transfer itself goes on there).
UNREACHABLE_FOR = 300.0
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
#: States after which nothing changes any more (``failed`` only by an explicit retry).
FINAL = frozenset({"delivered", "failed", "cancelled"})


class Refused(Exception):
    """The gateway refused a request for good; the message is its reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Unavailable(Exception):
    """The gateway answered with a 5xx: worth asking again later."""


def _say(text: str) -> None:
    sys.stderr.write(f"iex send: {text}\n")
    sys.stderr.flush()


def destination(text: str) -> tuple[str, str]:
    """``--to PARTNER/REMOTE_TRUST``: the partner gateway and its trust, both names."""
    partner, slash, trust = text.partition("/")
    try:
        if not slash:
            raise BadRequest("it is PARTNER/REMOTE_TRUST, the partner and its trust")
        return check_name(partner, "partner"), check_name(trust, "partner trust")
    except BadRequest as exc:
        raise UsageError(f"--to {text[:140]!r}: {exc.detail}") from None


def _detail(response: httpx.Response) -> str:
    """The gateway's reason: ``detail`` of its JSON error, else the start of the body."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("detail"), str):
        return str(document["detail"])
    text = response.text.strip()[:200]
    return f"{response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")


def _view(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("id"), str):
        raise Refused(response.status_code, "the gateway's answer is not a transfer")
    return document


# -- following a transfer ---------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def describe(view: dict[str, Any]) -> str:
    """One line of a transfer's progress: its state, paused or not, bytes acknowledged."""
    state = str(view.get("state"))
    if view.get("paused"):
        state += " (paused)"
    sent = view.get("bytes_sent") or 0
    total = view.get("bytes_total")
    if isinstance(total, int) and total > 0:
        percent = min(100, sent * 100 // total)
        line = f"{state}  {_mb(sent)} of {_mb(total)} MB ({percent}%)"
    elif sent:
        line = f"{state}  {_mb(sent)} MB sent"
    else:
        line = state
    attempts = view.get("attempts") or 0
    if view.get("last_error") and view.get("state") not in FINAL:
        line += f"  attempt {attempts}, last: {view['last_error']}"
    return line


@dataclass
class Watch:
    """What a person sees while the transfer runs: on a terminal one line rewritten with
    ``\\r``; otherwise a line whenever the state, the paused flag or the last error change."""

    stream: TextIO

    def __post_init__(self) -> None:
        self.tty = self.stream.isatty()
        self._last: tuple[Any, ...] | None = None
        self._drawn = False

    def show(self, view: dict[str, Any]) -> None:
        if self.tty:
            self.stream.write(f"\r{describe(view)[:120]:<79}")
            self._drawn = True
        else:
            seen = (view.get("state"), view.get("paused"), view.get("last_error"))
            if seen == self._last:
                return
            self._last = seen
            self.stream.write(f"iex send: {view.get('id')}: {describe(view)}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def receipt_summary(view: dict[str, Any]) -> str:
    """The stdout line of a delivered transfer: id, study, partner/trust, instances stored
    (from the partner's receipt; ``?`` when the receipt does not say)."""
    instances: Any = "?"
    receipt = view.get("receipt")
    if isinstance(receipt, dict) and isinstance(receipt.get("receipt"), str):
        try:
            signed = json.loads(receipt["receipt"])
        except ValueError:
            signed = None
        if isinstance(signed, dict) and isinstance(signed.get("instances"), int):
            instances = signed["instances"]
    return (
        f"{view.get('id')}\t{view.get('study')}\t{view.get('partner')}/"
        f"{view.get('partner_trust')}\t{instances} instances"
    )


class Gateway:
    """The transfers of one gateway, over one HTTP client."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def push(self, study: str, partner: str, partner_trust: str, priority: str) -> dict[str, Any]:
        body = {
            "study": study,
            "partner": partner,
            "partner_trust": partner_trust,
            "priority": priority,
        }
        response = self.http.post("/transfers", json=body)
        if response.status_code != 202:
            raise Refused(response.status_code, _detail(response))
        return _view(response)

    def get(self, transfer_id: str) -> dict[str, Any]:
        response = self.http.get(f"/transfers/{transfer_id}")
        if response.status_code >= 500:
            raise Unavailable(_detail(response))
        if response.status_code != 200:
            raise Refused(response.status_code, _detail(response))
        return _view(response)


def follow(
    gateway: Gateway,
    transfer_id: str,
    watch: Watch,
    *,
    poll: float = POLL,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll until the transfer is final; its last view. A gateway unreachable (or failing
    with 5xx) for a while is waited out: the transfer lives there, not here."""
    unreachable_since: float | None = None
    while True:
        try:
            view = gateway.get(transfer_id)
        except (httpx.TransportError, Unavailable) as exc:
            now = time.monotonic()
            if unreachable_since is None:
                unreachable_since = now
                watch.finish()
                _say(f"the gateway does not answer ({exc}); still trying")
            elif now - unreachable_since > UNREACHABLE_FOR:
                raise
            sleep(poll)
            continue
        unreachable_since = None
        watch.show(view)
        if view.get("state") in FINAL:
            return view
        sleep(poll)


# -- the command --------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    server = server_url(args.server)
    token = bearer_token(args.token)
    verify = tls_verify(args.ca_cert)
    partner, partner_trust = destination(args.to)
    try:
        study = validate_uid(args.study.strip(), "--study")
    except BadRequest as exc:
        raise UsageError(exc.detail) from None
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(
        base_url=server, headers=headers, verify=verify, timeout=TIMEOUT, follow_redirects=False
    ) as http:
        gateway = Gateway(http)
        try:
            view = gateway.push(study, partner, partner_trust, args.priority)
        except httpx.TransportError as exc:
            raise UsageError(f"cannot reach {server}: {exc}") from None
        transfer_id = str(view["id"])
        if args.no_wait:
            sys.stdout.write(f"{transfer_id}\n")
            _say(f"transfer {transfer_id} queued ({view.get('state')}); the gateway sends it")
            return 0
        _say(
            f"transfer {transfer_id}: study {study} to {partner}/{partner_trust} ({args.priority})"
        )
        watch = Watch(sys.stderr)
        try:
            final = follow(gateway, transfer_id, watch)
        except KeyboardInterrupt:
            watch.finish()
            _say(
                f"stopped waiting; transfer {transfer_id} goes on at the gateway "
                f"(GET {server}/transfers/{transfer_id})"
            )
            return EXIT_INTERRUPTED
        except Refused as exc:
            watch.finish()
            _say(f"cannot follow transfer {transfer_id}: the gateway refused ({exc.status}): {exc}")
            return EXIT_FAILED
        except (httpx.TransportError, Unavailable) as exc:
            watch.finish()
            _say(
                f"gave up waiting: the gateway stayed unreachable ({exc}); transfer "
                f"{transfer_id} goes on there"
            )
            return EXIT_FAILED
        finally:
            watch.finish()
    if final.get("state") == "delivered":
        sys.stdout.write(receipt_summary(final) + "\n")
        return 0
    reason = final.get("last_error") or "no reason recorded"
    _say(f"transfer {transfer_id} {final.get('state')}: {reason}")
    return EXIT_FAILED


def _command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except Refused as exc:
        _say(f"the gateway refused the push ({exc.status}): {exc}")
        return EXIT_USAGE


def register(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="push a study to a partner trust and follow it to the receipt",
        description="Ask the gateway to push a study of the token's trust to a partner "
        "trust (an agreement allowing send is needed), then follow the transfer until the "
        "partner's receipt.",
    )
    send.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    send.add_argument(
        "--to",
        required=True,
        metavar="PARTNER/REMOTE_TRUST",
        help="the partner gateway and its trust, e.g. royal-east/radiology",
    )
    add_connection_arguments(send, "the uploader and reader roles")
    send.add_argument(
        "--priority",
        choices=("routine", "urgent"),
        default="routine",
        help="urgent transfers go first (default: routine)",
    )
    send.add_argument(
        "--no-wait", action="store_true", help="print the transfer id once queued, and end"
    )
    send.set_defaults(func=_command)
