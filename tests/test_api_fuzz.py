"""Generated requests for every operation of the checked-in OpenAPI document.

schemathesis builds requests from ``openapi/openapi.json``, both ones the document allows and
ones it does not (odd UIDs, query strings, headers, bodies), and sends them to a real gateway:
as the admin, without a token, and at the paths of a stored instance. No answer may be a 5xx
or a status the document does not declare. Afterwards the store is intact: what was stored
before reads back byte for byte and the audit trail verifies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode, SerializationContext
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import IexServer, make_instance, multipart_related
from tests.transfer_helpers import split_multipart

SCHEMA = schemathesis.openapi.from_path(
    Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
)
#: Generated cases per operation and pass: bounded, so that the whole test stays near a minute.
EXAMPLES = 15
ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Not checked, because iex's documented conformance contradicts them:
# - positive_data_acceptance: the document types UIDs, dates, frame lists and Accept as plain
#   strings; iex refuses the ones that are not DICOM (400, PS3.5 §9.1, PS3.18 §8.3) or that it
#   cannot satisfy (406), as it should.
# - negative_data_rejection, missing_required_header: a request the document calls invalid
#   may rightly get a documented status outside the 4xx they expect: tus answers a missing or
#   foreign Tus-Resumable with 412 (tus 1.0.0, Tus-Resumable).
# Not applicable: the checks of undeclared methods and of call sequences (unsupported_method,
# use_after_free, ensure_resource_availability, ignored_auth); these cases are single calls of
# declared operations. test_routing.py checks the Allow of a 405, test_security.py the
# credentials of every route.
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schemathesis.serializer(
    "application/dicom", "multipart/related", "application/offset+octet-stream"
)
def _raw_bytes(ctx: SerializationContext, value: Any) -> bytes:
    """Payloads are bytes as generated: DICOM, a multipart body, a tus chunk."""
    data = getattr(value, "data", value)
    return data if isinstance(data, bytes) else str(data).encode()


def _fuzz(
    srv: IexServer,
    *,
    headers: dict[str, str],
    mode: GenerationMode,
    path_parameters: Callable[[list[str]], dict[str, str]] = lambda names: {},
) -> list[str]:
    """Run every operation's generated cases; what failed, one line per operation."""
    failures: list[str] = []
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        names = [p.name for p in operation.path_parameters]
        strategy = operation.as_strategy(
            generation_mode=mode, path_parameters=path_parameters(names) or None
        )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,  # a gateway on a busy machine is slow, not wrong
            derandomize=True,  # the same cases on every run: CI fails for a reason, not a seed
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: Case) -> None:
            response = case.call(base_url=srv.url, headers=headers, timeout=60)
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            check()
        except Unsatisfiable:
            continue  # nothing the document lets vary, as in GET /healthz made invalid
        except (Exception, BaseExceptionGroup) as exc:  # each operation's, not only the first
            failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures


@pytest.mark.slow  # about a minute: some two thousand requests
def test_generated_requests_get_documented_answers_and_leave_the_store_intact(
    make_server: Callable[..., IexServer],
) -> None:
    srv = make_server()
    stored = [make_instance(), make_instance(modality="MR", frames=3)]
    body, ctype = multipart_related(stored)
    with srv.client() as c:
        r = c.post("/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        refs = [u["00081190"]["Value"][0] for u in r.json()["00081199"]["Value"]]
    first = refs[0].rsplit("/dicomweb/", 1)[1].split("/")
    at_stored = dict(zip(("study", "series", "instance"), first[1::2], strict=True))

    failures: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        failures += _fuzz(srv, headers=srv.headers, mode=mode)
        failures += _fuzz(srv, headers={}, mode=mode)
        failures += _fuzz(
            srv,
            headers=srv.headers,
            mode=mode,
            path_parameters=lambda names: {k: v for k, v in at_stored.items() if k in names},
        )
    assert not failures, "\n\n".join(failures)

    with srv.client() as c:
        for data, url in zip(stored, refs, strict=True):
            r = c.get(url, headers={"Accept": ANY_SYNTAX})
            assert r.status_code == 200, r.text
            assert split_multipart(r) == [data]
    assert srv.iex("audit", "verify").startswith("ok: ")
    assert httpx.get(srv.url + "/readyz").status_code == 200
