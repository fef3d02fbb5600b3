"""Gateways that exchange studies, for tests: started on loopback with their own data
directory and name, and paired with the ``iex`` commands an operator would run
(``docs/EXCHANGE.md``, "Pairing two gateways")."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import IexServer, free_port


def gateway(root: Path, name: str, *trusts: str, **env: str) -> IexServer:
    """A gateway named ``name`` (not started) with ``trusts`` made, on a port of its own
    chosen now so that its identity can give its URL before it runs."""
    srv = IexServer(root / name, env={"IEX_NAME": name, **env}, port=free_port())
    srv.data_dir.mkdir(parents=True, exist_ok=True)
    for trust in trusts:
        srv.iex("trust", "add", trust)
    return srv


def pair(
    a: IexServer,
    trust_a: str,
    b: IexServer,
    trust_b: str,
    *,
    rights_a: Iterable[str] = ("send", "receive", "pull"),
    rights_b: Iterable[str] = ("send", "receive", "pull"),
    roles: str = "uploader,reader",
    url_b: str | None = None,
) -> None:
    """Pair ``a`` and ``b`` both ways: identities, partners, tokens, then the agreement of
    ``trust_a`` with ``trust_b`` on each side (no agreement for an empty ``rights``).
    ``url_b`` is where ``a`` calls ``b`` (a proxy in front of it, say)."""
    folder = a.data_dir.parent
    for here, trust_here, there in ((a, trust_a, b), (b, trust_b, a)):
        url = url_b if there is b and url_b else there.url
        identity = folder / f"{there.env['IEX_NAME']}.identity.json"
        identity.write_text(there.iex("identity", "export", "--url", url))
        here.iex("partner", "add", there.env["IEX_NAME"], "--trust", trust_here,
                 "--identity", str(identity))  # fmt: skip
    for here, trust_here, there in ((a, trust_a, b), (b, trust_b, a)):
        # ``here`` issues the token that ``there`` calls it with.
        token = here.iex("token", "issue", "--trust", trust_here, "--role", roles,
                         "--partner", there.env["IEX_NAME"]).strip()  # fmt: skip
        token_file = folder / f"token-for-{there.env['IEX_NAME']}"
        token_file.write_text(token + "\n")
        there.iex("partner", "add", here.env["IEX_NAME"], "--token-file", str(token_file))
        token_file.unlink()
    for here, trust_here, there, trust_there, rights in (
        (a, trust_a, b, trust_b, tuple(rights_a)),
        (b, trust_b, a, trust_a, tuple(rights_b)),
    ):
        if rights:
            here.iex("agreement", "add", "--trust", trust_here, "--partner",
                     there.env["IEX_NAME"], "--partner-trust", trust_there,
                     "--allow", ",".join(rights))  # fmt: skip


def api(srv: IexServer, token: str | None = None) -> httpx.Client:
    """A client of the gateway's root (``/transfers``, ``/pulls``...)."""
    return httpx.Client(
        base_url=srv.url,
        headers={"Authorization": f"Bearer {token or srv.token}"},
        verify=srv.verify,
        timeout=60,
    )


FINAL = {"delivered", "failed", "cancelled"}


def wait_transfer(c: httpx.Client, transfer: str, timeout: float = 180) -> dict[str, Any]:
    """The transfer's view once it is final (delivered, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = c.get(f"/transfers/{transfer}")
        assert response.status_code == 200, response.text
        view = response.json()
        if view["state"] in FINAL:
            return view
        time.sleep(0.2)
    raise AssertionError(f"transfer {transfer} did not end within {timeout}s: {view}")
