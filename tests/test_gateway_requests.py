"""Signed requests between gateways (``app.transfer.gateway_requests``) and the pull store
(``app.transfer.sqlite_pulls``): the formats and the claim of an answer, without servers."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.crypto import exchange
from app.crypto.errors import SignatureInvalid
from app.transfer import canonical_json as cj
from app.transfer.gateway_requests import (
    MAX_REQUEST_SIZE,
    PULL_FORMAT,
    SEARCH_FORMAT,
    Holder,
    PullRequest,
    RequestInvalid,
    SearchRequest,
    read_request,
    sign_request,
    verify_request,
)
from app.transfer.manifest import Endpoint
from app.transfer.pull_store import PulledStudy
from app.transfer.sqlite_pulls import SQLitePulls

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0
REQUESTER = Endpoint("gw-r", "rad-r", "sig-1")
HOLDER = Holder("gw-h", "rad-h")


def _time(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _pull(**changes: Any) -> PullRequest:
    fields: dict[str, Any] = {
        "id": "req-1",
        "time": _time(NOW),
        "requester": REQUESTER,
        "holder": HOLDER,
        "query": {"PatientID": "P-1", "StudyDate": "20200101-"},
        "limit": 10,
    }
    return PullRequest(**{**fields, **changes})


def _open(document: bytes, kind: Any = PULL_FORMAT, now: float = NOW) -> Any:
    return verify_request(read_request(document, kind), KEY.public_key(), gateway="gw-h", now=now)


def _resign(document: bytes, change: Any, context: bytes | None = None) -> bytes:
    """The document with its request changed by ``change`` and signed again (under the
    context of its format, unless ``context`` is given)."""
    inner = json.loads(json.loads(document)["request"])
    change(inner)
    text = cj.encode(inner)
    signature = exchange.sign(KEY, context or f"{inner['format']}\n".encode(), text)
    return cj.encode({"request": text.decode(), "signature": cj.b64(signature)})


def test_a_signed_pull_opens_as_it_was_made() -> None:
    request = _pull(priority="urgent")
    assert _open(sign_request(request, KEY)) == request
    search = SearchRequest("s-1", _time(NOW), REQUESTER, HOLDER, (("PatientID", "P-1"),))
    assert _open(sign_request(search, KEY), SEARCH_FORMAT) == search


def test_the_digest_ignores_the_time_and_key_only() -> None:
    base = _pull()
    assert _pull(time=_time(NOW + 60)).digest() == base.digest()
    assert _pull(requester=Endpoint("gw-r", "rad-r", "sig-2")).digest() == base.digest()
    assert _pull(limit=11).digest() != base.digest()
    assert _pull(query={"PatientID": "P-2"}).digest() != base.digest()
    assert _pull(requester=Endpoint("gw-r", "other", "sig-1")).digest() != base.digest()


def test_a_signature_holds_for_one_kind_and_one_text() -> None:
    document = sign_request(_pull(), KEY)
    with pytest.raises(RequestInvalid, match="format"):
        _open(document, SEARCH_FORMAT)
    # Signed under the pull context, a request calling itself a search does not verify.
    as_search = _resign(document, lambda d: d.update(format=SEARCH_FORMAT), b"iex-pull-request/1\n")
    with pytest.raises(SignatureInvalid):
        _open(as_search, SEARCH_FORMAT)
    outer = json.loads(document)
    outer["request"] = outer["request"].replace("P-1", "P-9")
    with pytest.raises(SignatureInvalid, match="key 'sig-1' of gateway 'gw-r'"):
        _open(cj.encode(outer))
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureInvalid):
        verify_request(
            read_request(document, PULL_FORMAT), other.public_key(), gateway="gw-h", now=NOW
        )


def test_stale_and_misaddressed_requests_are_refused() -> None:
    document = sign_request(_pull(), KEY)
    assert _open(document, now=NOW + 300)
    with pytest.raises(RequestInvalid, match="301 s away from this gateway's clock"):
        _open(document, now=NOW + 301)
    with pytest.raises(RequestInvalid, match="away"):
        _open(document, now=NOW - 3600)
    with pytest.raises(RequestInvalid, match="addressed to gateway 'gw-h', not to this"):
        verify_request(
            read_request(document, PULL_FORMAT), KEY.public_key(), gateway="gw-z", now=NOW
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(limit=0), "limit is 0, outside 1..1000"),
        (lambda d: d.update(limit=True), "limit is not an integer"),
        (lambda d: d.update(query={}), "query holds 0 keys"),
        (lambda d: d.update(query=[]), "query is not an object"),
        (lambda d: d.update(query={"Patient ID": "1"}), "query key is malformed"),
        (lambda d: d.update(query={"PatientID": 1}), "query.PatientID is not a string"),
        (lambda d: d.update(priority="stat"), "priority 'stat'"),
        (lambda d: d.update(id="../x"), "id is not 1-64 letters"),
        (lambda d: d.update(extra=1), "unknown fields: 'extra'"),
        (lambda d: d.pop("holder"), "lacks holder"),
        (lambda d: d.update(time="yesterday"), "time is malformed"),
        (lambda d: d["holder"].update(trust="a/b"), "holder.trust is not 1-64"),
    ],
)
def test_every_field_is_checked(change: Any, message: str) -> None:
    with pytest.raises(RequestInvalid, match=message.replace(".", r"\.")):
        _open(_resign(sign_request(_pull(), KEY), change))


def test_malformed_documents_are_refused_before_any_key_is_looked_up() -> None:
    document = sign_request(_pull(), KEY)
    for bad, message in [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (document.replace(b'{"request"', b'{ "request"'), "canonical"),
        (b'{"request":"{}"}', "lacks signature"),
        (b" " * (MAX_REQUEST_SIZE + 1), "over the limit"),
    ]:
        with pytest.raises(RequestInvalid, match=message):
            read_request(bad, PULL_FORMAT)


def test_search_parameters_are_pairs_of_strings() -> None:
    search = SearchRequest("s-1", _time(NOW), REQUESTER, HOLDER, (("PatientName", ""),))
    document = sign_request(search, KEY)
    assert _open(document, SEARCH_FORMAT).parameters == (("PatientName", ""),)
    for bad in ([["a"]], [["a", 1]], [["a", "b", "c"]], "x", [["a b", "1"]]):
        changed = _resign(document, lambda d, bad=bad: d.update(parameters=bad))
        with pytest.raises(RequestInvalid, match="parameters"):
            _open(changed, SEARCH_FORMAT)


# -- the pull store ----------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLitePulls]:
    s = SQLitePulls(tmp_path / "pulls.sqlite3", key=bytes(range(32)))
    await s.open()
    yield s
    await s.close()


async def test_an_answer_is_claimed_once_completed_once_and_given_again(
    store: SQLitePulls,
) -> None:
    first = await store.claim_answer("gw-r", "req-1", "d1", NOW, NOW - 120)
    assert first.claimed and first.answer.studies is None
    # A copy arriving meanwhile finds it being answered.
    again = await store.claim_answer("gw-r", "req-1", "d1", NOW + 1, NOW + 1 - 120)
    assert not again.claimed and again.answer.studies is None
    studies = (PulledStudy("1.2.3", "t1"), PulledStudy("1.2.4", "t2"))
    done = await store.complete_answer(first.answer, studies)
    assert done is not None and done.studies == studies
    assert await store.complete_answer(first.answer, ()) is None
    later = await store.claim_answer("gw-r", "req-1", "d1", NOW + 2, NOW + 2 - 120)
    assert (later.claimed, later.answer.studies) == (False, studies)
    # Another requester's request id is its own.
    assert (await store.claim_answer("gw-x", "req-1", "d1", NOW, NOW - 120)).claimed


async def test_a_stale_claim_is_taken_over_and_a_released_one_claimed_afresh(
    store: SQLitePulls,
) -> None:
    first = await store.claim_answer("gw-r", "req-2", "d1", NOW, NOW - 120)
    taken = await store.claim_answer("gw-r", "req-2", "d1", NOW + 200, NOW + 200 - 120)
    assert taken.claimed
    # The first claimant can no longer complete it.
    assert await store.complete_answer(first.answer, ()) is None
    await store.release_answer(taken.answer)
    assert (await store.claim_answer("gw-r", "req-2", "d2", NOW + 201, NOW)).claimed


async def test_answers_are_forgotten_after_a_day(store: SQLitePulls) -> None:
    claim = await store.claim_answer("gw-r", "req-3", "d1", NOW, NOW - 120)
    await store.complete_answer(claim.answer, ())
    day_later = NOW + 24 * 3600 + 1
    assert (await store.claim_answer("gw-r", "req-3", "other", day_later, day_later)).claimed
