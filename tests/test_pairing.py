"""Pairing two gateways with the real command line: identity export, identity rotation,
partner registration and update with an outbound token, and agreements, beside a running
gateway A (TLS) and the data directory of a gateway B.

Secrets are looked for where they must not be: the private identity keys and the outbound
token in any file of the data directory (or the server log), and the token in any output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.services.keys import open_data_keys
from tests.helpers import IexServer, TlsFiles
from tests.pki import server_tls

URL_A = "https://gw-a.example:8443"
URL_B = "http://gw-b.example:8080"


def _iex(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def _ok(data_dir: Path, *args: str, **env: str) -> str:
    result = _iex(data_dir, *args, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _refused(data_dir: Path, *args: str) -> str:
    """The message of a command that must fail as a usage error, with nothing on stdout."""
    result = _iex(data_dir, *args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert result.stdout == ""
    return result.stderr


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return server_tls(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def gateway(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IexServer]:
    """Gateway A, ``gw-a``, serving TLS, with trusts ``local`` and ``rad-a``."""
    srv = IexServer(
        tmp_path_factory.mktemp("gw-a") / "data", env={"IEX_NAME": "gw-a"}, tls=tls
    ).start()
    srv.iex("trust", "add", "rad-a")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gateway_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data directory of gateway B, ``gw-b``, with trust ``rad-b``: its commands run
    without a server (the first start would only add the trust ``local``)."""
    data_dir = tmp_path_factory.mktemp("gw-b") / "data"
    _ok(data_dir, "trust", "add", "rad-b", IEX_NAME="gw-b")
    return data_dir


def _export(srv: IexServer, *args: str) -> dict[str, Any]:
    out = _ok(srv.data_dir, "identity", "export", *args, **srv.env)
    document: dict[str, Any] = json.loads(out)
    return document


def _keys(document: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(id, public, active) of every key, signing keys first; stable apart from ``created``."""
    return [(k["id"], k["public"], k["active"]) for k in document["signing_keys"]] + [
        (t["exchange_key"]["id"], t["exchange_key"]["public"], None) for t in document["trusts"]
    ]


def _served_certificate_sha256(srv: IexServer) -> str:
    """The SHA-256 of the certificate the gateway presents, as a partner connecting sees it."""
    context = srv.verify
    assert isinstance(context, ssl.SSLContext)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _files_holding(root: Path, secrets: list[bytes]) -> list[str]:
    """Files under ``root`` that hold any of ``secrets`` as raw bytes, base64 or hex."""
    needles = [n for s in secrets for n in (s, base64.b64encode(s), s.hex().encode())]
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and any(n in path.read_bytes() for n in needles)
    )


def _private_keys(data_dir: Path) -> list[bytes]:
    keys = open_data_keys(data_dir, None)
    private = [k.private for k, _ in keys.signing_keys()]
    private += [keys.exchange_key(t).private for t in ("local", "rad-a")]
    return private


def _owners(data_dir: Path) -> set[tuple[str, str]]:
    """(owner, state) of the identity keys ``iex keys status`` lists."""
    rows = [line.split() for line in _ok(data_dir, "keys", "status").splitlines()[2:]]
    return {(row[1], row[-2]) for row in rows if row[0].startswith(("sig-", "xch-"))}


def test_identity_export(gateway: IexServer, tls: TlsFiles) -> None:
    # Made before any export: by the gateway's start, and by `iex trust add` beside it.
    assert _owners(gateway.data_dir) == {
        ("@signing", "active"),
        ("@exchange:local", "active"),
        ("@exchange:rad-a", "active"),
    }
    first = _export(gateway, "--url", URL_A + "/", "--tls-cert", str(tls.cert))
    assert first["format"] == "iex-identity/1"
    assert (first["gateway"], first["url"]) == ("gw-a", URL_A)
    assert [k["active"] for k in first["signing_keys"]] == [True]
    assert first["signing_keys"][0]["algorithm"] == "Ed25519"
    assert [t["trust"] for t in first["trusts"]] == ["local", "rad-a"]
    assert {t["exchange_key"]["algorithm"] for t in first["trusts"]} == {"X25519"}
    # The fingerprint is of the certificate the gateway serves.
    assert first["tls_sha256"] == _served_certificate_sha256(gateway)

    # IEX_PUBLIC_URL is the default URL, IEX_TLS_CERT the certificate; the keys stay.
    env = {"IEX_PUBLIC_URL": URL_A, "IEX_TLS_CERT": str(tls.cert), "IEX_NAME": "gw-a"}
    output = _ok(gateway.data_dir, "identity", "export", **env)
    second = json.loads(output)
    assert _keys(second) == _keys(first) and second["tls_sha256"] == first["tls_sha256"]
    assert "tls_sha256" not in _export(gateway, "--url", URL_A)  # not serving TLS: none

    gateway.stop()
    gateway.start()
    assert _keys(_export(gateway, "--url", URL_A)) == _keys(first)

    private = _private_keys(gateway.data_dir)
    assert len(private) == 3
    assert _files_holding(gateway.data_dir.parent, private) == []
    for secret in private:
        assert base64.b64encode(secret).decode() not in output and secret.hex() not in output

    for args, message in (
        ((), "give --url"),
        (("--url", "ftp://gw-a.example"), "not an http:// or https:// URL"),
        (("--url", URL_A, "--tls-cert", str(tls.key) + ".missing"), "cannot read the TLS"),
    ):
        assert message in _refused(gateway.data_dir, "identity", "export", *args)


def test_rotate_identity(make_server: Callable[..., IexServer]) -> None:
    srv = make_server(IEX_NAME="gw-r")
    before = _export(srv, "--url", URL_A)
    refused = _iex(srv.data_dir, "keys", "rotate", "--identity")
    assert refused.returncode == 2 and "stop it first" in refused.stderr
    srv.stop()

    rotated = _ok(srv.data_dir, "keys", "rotate", "--identity").splitlines()
    assert rotated[0].startswith("signing key: sig-")
    assert rotated[1].startswith("trust local: exchange key xch-")
    assert _owners(srv.data_dir) == {
        ("@signing", "active"),
        ("@signing", "retired"),
        ("@exchange:local", "active"),
        ("@exchange:local", "retired"),
    }

    srv.start()
    after = _export(srv, "--url", URL_A)
    old = before["signing_keys"][0]
    assert after["signing_keys"][0] == {**old, "active": False}
    new = after["signing_keys"][1]
    assert new["active"] and new["id"] == rotated[0].split(": ")[1] != old["id"]
    old_exchange = before["trusts"][0]["exchange_key"]["id"]
    assert after["trusts"][0]["exchange_key"]["id"] == rotated[1].split()[-1] != old_exchange
    # The old exchange key still opens what was sealed to it.
    keys = open_data_keys(srv.data_dir, None)
    assert keys.exchange_key_by_id(old_exchange).trust == "local"
    assert keys.exchange_key("local").id != old_exchange


def _partner_lines(srv: IexServer) -> list[list[str]]:
    return [line.split("\t") for line in _ok(srv.data_dir, "partner", "list").splitlines()]


def _changes(srv: IexServer) -> list[tuple[str, str, str | None]]:
    """(what, subject, trust) of the command line's records of partner and agreement
    changes, oldest first."""
    with srv.client() as admin:
        r = admin.get(srv.url + "/audit")
    assert r.status_code == 200, r.text
    return [
        (
            rec["EventIdentification"]["EventOutcomeDescription"],
            rec["ParticipantObjectIdentification"][0]["ParticipantObjectID"],
            rec["iex"]["trust"],
        )
        for rec in r.json()
        if rec["iex"]["route"] == "cli"
        and rec["ParticipantObjectIdentification"][0]["ParticipantObjectID"].startswith(
            ("partner:", "agreement:")
        )
    ]


def test_partner_registered_from_its_identity_then_given_a_token(
    gateway: IexServer, gateway_b: Path, tmp_path: Path
) -> None:
    a = gateway
    identity_b = tmp_path / "gw-b.json"
    identity_b.write_text(_ok(gateway_b, "identity", "export", "--url", URL_B, IEX_NAME="gw-b"))
    document_b = json.loads(identity_b.read_text())

    # The name must be the partner's gateway name.
    message = _refused(a.data_dir, "partner", "add", "gw-c", "--trust", "rad-a",
                       "--identity", str(identity_b))  # fmt: skip
    assert "gateway 'gw-b''s, not 'gw-c''s" in message and "register it as gw-b" in message
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**document_b, "signing_keys": []}))
    assert "signing_keys is empty" in _refused(
        a.data_dir, "partner", "add", "gw-b", "--trust", "rad-a", "--identity", str(bad)
    )

    # Registered with its identity alone: no certificate, no token yet.
    _ok(a.data_dir, "partner", "add", "gw-b", "--trust", "rad-a", "--identity", str(identity_b))
    key_ids = ",".join(
        [k["id"] for k in document_b["signing_keys"]]
        + [t["exchange_key"]["id"] for t in document_b["trusts"]]
    )
    assert ["gw-b", "rad-a", "reader", URL_B, "-", "token:no", key_ids] in _partner_lines(a)
    assert json.loads(_ok(a.data_dir, "partner", "show", "gw-b")) == document_b

    # B registers A, issues it a token; A adds that token: an update that keeps the rest.
    identity_a = tmp_path / "gw-a.json"
    identity_a.write_text(_ok(a.data_dir, "identity", "export", "--url", URL_A, **a.env))
    _ok(gateway_b, "partner", "add", "gw-a", "--trust", "rad-b", "--identity", str(identity_a))
    issued = _iex(gateway_b, "token", "issue", "--trust", "rad-b", "--role", "uploader",
                  "--partner", "gw-a", IEX_NAME="gw-b")  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    token_file = tmp_path / "token-from-gw-b"
    token_file.write_text(token + "\n")
    updated = _iex(a.data_dir, "partner", "add", "gw-b", "--token-file", str(token_file))
    assert updated.returncode == 0, updated.stderr
    assert "partner updated" in updated.stderr and "outbound token set" in updated.stderr
    assert ["gw-b", "rad-a", "reader", URL_B, "-", "token:yes", key_ids] in _partner_lines(a)

    # The token is never shown, and no file holds it in the clear.
    outputs = [updated.stdout, updated.stderr]
    for command in (("partner", "list"), ("partner", "show", "gw-b")):
        result = _iex(a.data_dir, *command)
        outputs += [result.stdout, result.stderr]
    secret = token.split("_")[-1]
    assert not [o for o in outputs if secret in o]
    token_file.unlink()
    assert _files_holding(a.data_dir.parent, [token.encode(), secret.encode()]) == []

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    assert "the token file is empty" in _refused(
        a.data_dir, "partner", "add", "gw-b", "--token-file", str(empty)
    )
    assert _changes(a)[-2:] == [
        ("partner registered", "partner:gw-b", "rad-a"),
        ("partner updated", "partner:gw-b", "rad-a"),
    ]


def test_agreements(gateway: IexServer, gateway_b: Path, tmp_path: Path) -> None:
    a = gateway
    # Partner gw-c: gateway B's keys under another name (IEX_NAME names the gateway).
    identity = tmp_path / "gw-c.json"
    identity.write_text(_ok(gateway_b, "identity", "export", "--url", URL_B, IEX_NAME="gw-c"))
    _ok(a.data_dir, "partner", "add", "gw-c", "--trust", "rad-a", "--identity", str(identity))
    _ok(a.data_dir, "partner", "add", "cert-only", "--trust", "local",
        "--cert-sha256", "ee" * 32)  # fmt: skip
    before = _changes(a)

    def agree(*args: str) -> subprocess.CompletedProcess[str]:
        return _iex(a.data_dir, "agreement", *args)

    added = agree("add", "--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad-b",
                  "--allow", "pull,send")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "agreement added: trust rad-a with trust rad-b at partner gw-c" in added.stderr
    _ok(a.data_dir, "agreement", "add", "--trust", "local", "--partner", "cert-only",
        "--partner-trust", "any", "--allow", "receive")  # fmt: skip
    listed = [line.split("\t")[:4] for line in _ok(a.data_dir, "agreement", "list").splitlines()]
    assert listed == [
        ["local", "cert-only", "any", "receive"],
        ["rad-a", "gw-c", "rad-b", "send,pull"],
    ]
    updated = agree("add", "--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad-b",
                    "--allow", "receive", "--allow", "send")  # fmt: skip
    assert updated.returncode == 0 and "agreement updated" in updated.stderr
    only_b = _ok(a.data_dir, "agreement", "list", "--partner", "gw-c").splitlines()
    assert [line.split("\t")[:4] for line in only_b] == [["rad-a", "gw-c", "rad-b", "send,receive"]]
    assert _ok(a.data_dir, "agreement", "list", "--trust", "local", "--partner", "gw-c") == ""

    refusals = [
        (("--trust", "nowhere", "--partner", "gw-c", "--partner-trust", "rad-b",
          "--allow", "send"), "no trust 'nowhere'"),
        (("--trust", "rad-a", "--partner", "nobody", "--partner-trust", "rad-b",
          "--allow", "send"), "no partner 'nobody'"),
        (("--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad/b",
          "--allow", "send"), "a partner trust name is"),
        (("--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad-b",
          "--allow", ","), "at least one of send, receive, pull"),
        (("--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad-b",
          "--allow", "send,steal"), "unknown right 'steal'"),
        (("--trust", "rad-a", "--partner", "gw-c", "--partner-trust", "rad-x",
          "--allow", "pull"), "identity on record lists no trust rad-x (it lists: rad-b)"),
        (("--trust", "local", "--partner", "cert-only", "--partner-trust", "any",
          "--allow", "send"), "partner cert-only has no identity on record; import"),
    ]  # fmt: skip
    for args, message in refusals:
        assert message in _refused(a.data_dir, "agreement", "add", *args), args
    assert "still has agreements (local with any)" in _refused(
        a.data_dir, "partner", "remove", "cert-only"
    )

    removed = agree("remove", "--trust", "local", "--partner", "cert-only",
                    "--partner-trust", "any")  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert "no agreement of trust 'local'" in _refused(
        a.data_dir, "agreement", "remove", "--trust", "local", "--partner", "cert-only",
        "--partner-trust", "any",
    )  # fmt: skip
    _ok(a.data_dir, "partner", "remove", "cert-only")
    assert [line.split("\t")[:3] for line in _ok(a.data_dir, "agreement", "list").splitlines()] == [
        ["rad-a", "gw-c", "rad-b"]
    ]
    assert _changes(a)[len(before) :] == [
        ("agreement added: send,pull", "agreement:gw-c/rad-b", "rad-a"),
        ("agreement added: receive", "agreement:cert-only/any", "local"),
        ("agreement updated: send,receive", "agreement:gw-c/rad-b", "rad-a"),
        ("agreement removed", "agreement:cert-only/any", "local"),
        ("partner removed", "partner:cert-only", None),
    ]
