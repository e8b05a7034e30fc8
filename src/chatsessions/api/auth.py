"""Bearer-key authentication: a pure ASGI middleware that sets the caller's tenant.

`BearerAuthMiddleware` checks `Authorization: Bearer <key>` on every request
except the public probes, metrics and docs, before any byte of the body is read,
and puts the key's tenant into the request state that `api.deps.get_tenant` reads;
a missing or wrong key gets 401 problem+json with `WWW-Authenticate: Bearer`.
The lifespan (`main.py`) opens the key source; `api/openapi.py` declares the scheme.

Paths are protected unless listed public: a new route is never open by mistake.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from chatsessions.api.docs import ASSETS
from chatsessions.api.problems import problem_response
from chatsessions.keys import MAX_KEY_CHARS, KeySource
from chatsessions.models import DEFAULT_TENANT

log = logging.getLogger("chatsessions")

KEYS_STATE = "keys"
SECURITY_SCHEME = "BearerAuth"
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
PUBLIC_PREFIXES = (ASSETS + "/",)
_REALM = 'Bearer realm="chatsessions"'


def is_public(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return True
    # Under a public prefix, a dot segment could point anywhere: such a path is not public.
    return path.startswith(PUBLIC_PREFIXES) and not {".", ".."} & set(path.split("/"))


def bearer_token(scope: Scope) -> str | None:
    """The token of the one `Authorization: Bearer` header, or None."""
    values = [value for name, value in scope["headers"] if name == b"authorization"]
    if len(values) != 1 or len(values[0]) > MAX_KEY_CHARS + 16:
        return None
    scheme, _, token = values[0].decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def unauthorized(scope: Scope, token: str | None) -> Response:
    if token is not None:
        detail, challenge = "the API key is not valid", _REALM + ', error="invalid_token"'
    elif any(name == b"authorization" for name, _ in scope["headers"]):
        detail, challenge = "send the API key as Authorization: Bearer <key>", _REALM
    else:
        detail, challenge = "an API key is required", _REALM
    return problem_response(401, detail, kind="unauthorized", headers={"WWW-Authenticate": challenge})


def route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class BearerAuthMiddleware:
    """Sets `state["tenant"]` from the Bearer key, or answers 401 itself.

    `keys_required` comes from the settings, not from the lifespan state, so a
    server that failed to run the lifespan refuses requests instead of running open.
    """

    def __init__(self, app: ASGIApp, *, keys_required: bool) -> None:
        self.app = app
        self.keys_required = keys_required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(route_path(scope)):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = dict(scope.get("state") or {})
        tenant = DEFAULT_TENANT
        if self.keys_required:
            source = state.get(KEYS_STATE)
            if not isinstance(source, KeySource):
                raise RuntimeError("keys are configured but the lifespan did not load them")
            token = bearer_token(scope)
            found = (await source.current()).authenticate(token) if token is not None else None
            if found is None:
                await unauthorized(scope, token)(scope, receive, send)
                return
            tenant = found
        # A copy: some servers hand every request the same lifespan-state dict.
        state["tenant"] = tenant
        scope["state"] = state
        await self.app(scope, receive, send)
