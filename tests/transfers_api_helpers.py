"""A gateway paired with a partner that is down, for the tests of ``/transfers`` and of
``iex send``.

Gateway A (``gw-a``) serves; gateway B (``gw-b``, trusts ``rad-b`` and ``rad-r``) exists only
as a data directory whose identity A imports, at a URL where nothing listens: a push to it
never arrives. Trust ``local`` of A may send to ``rad-b`` and only receive from ``rad-r``;
trust ``other`` of A has no agreement. Each trust of A holds a study of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import generate_uid

from tests.helpers import IexServer, free_port, iex, make_instance, multipart_related

#: What a push to a partner that is down may show, whichever delivery is configured.
NOT_ARRIVED = {"queued", "packaging", "sending", "failed"}
AGREEMENT_MISSING = (
    "no agreement of trust local with trust {remote} at partner gw-b: nothing crosses "
    "without one (iex agreement add)"
)


@dataclass
class World:
    srv: IexServer
    study: str  # stored in trust local
    theirs: str  # stored in trust other only
    tokens: dict[str, str]

    def client(self, who: str = "local") -> httpx.Client:
        return httpx.Client(
            base_url=self.srv.url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=60,
        )

    def push(self, remote: str = "rad-b", *, who: str = "local", **extra: Any) -> httpx.Response:
        body = {"study": self.study, "partner": "gw-b", "partner_trust": remote, **extra}
        with self.client(who) as c:
            return c.post("/transfers", json=body)

    def queued(self, **extra: Any) -> dict[str, Any]:
        r = self.push(**extra)
        assert r.status_code == 202, r.text
        view: dict[str, Any] = r.json()
        return view

    def audit(self, study: str) -> list[dict[str, Any]]:
        with self.client("admin") as c:
            records: list[dict[str, Any]] = c.get("/audit", params={"study": study}).json()
        return [r for r in records if r["iex"]["route"].split(" ")[1].startswith("/transfers")]


def store_study(srv: IexServer, token: str, study: str) -> None:
    body, ctype = multipart_related([make_instance(study_uid=study) for _ in range(2)])
    with srv.client(token) as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text


@contextmanager
def paired_gateway(root: Path) -> Iterator[World]:
    """Gateway A running, paired with B (down), under ``root``; stopped on exit."""
    gw_b = root / "gw-b"
    b_env = {"IEX_NAME": "gw-b"}
    iex(gw_b, "trust", "add", "rad-b", env=b_env)
    iex(gw_b, "trust", "add", "rad-r", env=b_env)
    identity = root / "gw-b.json"
    # Nothing listens there: the partner is down.
    identity.write_text(
        iex(gw_b, "identity", "export", "--url", f"http://127.0.0.1:{free_port()}", env=b_env)
    )
    srv = IexServer(root / "gw-a", env={"IEX_NAME": "gw-a"}).start()
    try:
        srv.iex("trust", "add", "other")
        srv.iex("partner", "add", "gw-b", "--trust", "local", "--identity", str(identity))
        agree = ["agreement", "add", "--trust", "local", "--partner", "gw-b"]
        srv.iex(*agree, "--partner-trust", "rad-b", "--allow", "send")
        srv.iex(*agree, "--partner-trust", "rad-r", "--allow", "receive")
        tokens = {
            "admin": srv.token,
            "local": srv.issue_token("local", "uploader", "reader"),
            "reader": srv.issue_token("local", "reader"),
            "uploader": srv.issue_token("local", "uploader"),
            "other": srv.issue_token("other", "uploader", "reader"),
        }
        study, theirs = generate_uid(), generate_uid()
        store_study(srv, tokens["local"], study)
        store_study(srv, tokens["other"], theirs)
        yield World(srv, study, theirs, tokens)
    finally:
        srv.stop()
