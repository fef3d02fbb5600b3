"""The route class every router uses: one resource, one ``Allow``.

Several routes share a path (``/dicomweb/studies`` is QIDO-RS for GET and STOW-RS for POST).
Asked with a method none of them has, Starlette answers 405 from the first route whose path
matched, naming only that route's methods. RFC 9110 §15.5.6 wants the ``Allow`` of a 405 to
list what the resource supports: the methods the OpenAPI document gives its path.
"""

from __future__ import annotations

import re
from functools import lru_cache

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class ResourceRoute(APIRoute):
    """An ``APIRoute`` whose 405 names every method of its path."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            methods = allowed(scope["app"].openapi(), scope["path"]) or sorted(self.methods)
            raise HTTPException(status_code=405, headers={"Allow": ", ".join(methods)})
        await super().handle(scope, receive, send)


def allowed(document: dict[str, object], path: str) -> list[str]:
    """The methods an OpenAPI document gives the resource ``path`` names.

    Of the path templates ``path`` is an instance of, the most specific name the resource:
    a literal segment beats a parameter at the first place they differ, as routers match.
    ``/transfers/uploads`` is the tus endpoint, not a transfer of id ``uploads``.
    """
    paths = document.get("paths")
    matching = [
        (template, operations)
        for template, operations in (paths.items() if isinstance(paths, dict) else ())
        if isinstance(operations, dict) and _template(template).fullmatch(path)
    ]
    if not matching:
        return []
    best = min(_specificity(template) for template, _ in matching)
    methods = {
        method.upper()
        for template, operations in matching
        if _specificity(template) == best
        for method in operations
        if method in _METHODS
    }
    return sorted(methods)


def _specificity(template: str) -> tuple[int, ...]:
    """Per segment 0 for a literal, 1 for a parameter: the smaller, the more specific."""
    return tuple(1 if "{" in segment else 0 for segment in template.split("/"))


@lru_cache(maxsize=256)
def _template(template: str) -> re.Pattern[str]:
    """``/studies/{study}`` as a pattern: each parameter is one path segment."""
    parts = re.split(r"\{[^}]*\}", template)
    return re.compile("[^/]+".join(re.escape(p) for p in parts))
