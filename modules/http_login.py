"""The login check for the whole server, as an ASGI middleware around the app (gradio's mount included).

What protects what:
- `/sdapi/*`: HTTP basic with --api-auth's users; without --api-auth, --gradio-auth's users (HTTP basic) or the
  browser's gradio login session. With neither flag the API is open, as in A1111.
- everything else (gradio's page, queue, uploads and files, `/sd_extra_networks/*`, `/internal/*`, the page's
  scripts, extensions' routes): with --gradio-auth, the gradio login session (its cookie, checked against gradio's
  own token store) or HTTP basic with --gradio-auth's users. Only what the login form itself needs stays public.
Gradio keeps its own checks on its routes; this one runs first, so a gradio route that forgot one is covered too."""
from __future__ import annotations

import json
from typing import Callable

from starlette.requests import cookie_parser

from modules.http_credentials import basic_auth_user

API_PREFIX = "/sdapi/"
# What gradio's login page loads before anyone has logged in: the page (gradio itself serves it without the app's
# config until the login), its scripts, styles, fonts and icons, and the login form's POST.
PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/logout", "/theme.css", "/favicon.ico", "/manifest.json",
                          "/robots.txt"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


def is_public_path(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def gradio_session_user(scope: dict, gradio_app) -> str | None:
    """The user logged in through gradio's form: its `access-token-<id>` cookie (or the `-unsecure-` one gradio sets
    for plain http) looked up in gradio's token store, exactly as gradio's own login_check does."""
    if gradio_app is None:
        return None
    tokens = getattr(gradio_app, "tokens", None)
    cookie_id = getattr(gradio_app, "cookie_id", None)
    if not isinstance(tokens, dict) or cookie_id is None:
        return None
    cookies = cookie_parser(_header(scope, b"cookie") or "")
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = cookies.get(name)
        if token and tokens.get(token) is not None:
            return tokens[token]
    return None


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class LoginGuard:
    """ASGI middleware: refuses with 401 what the user and API credentials (see the module text) do not allow."""

    def __init__(self, app, ui_credentials: dict[str, str], api_credentials: dict[str, str],
                 gradio_app: Callable[[], object | None]):
        self.app = app
        self.ui_credentials = ui_credentials
        self.api_credentials = api_credentials
        self.gradio_app = gradio_app

    def allows(self, scope: dict) -> bool:
        path = scope.get("path", "")
        authorization = _header(scope, b"authorization")
        if path.startswith(API_PREFIX):
            if self.api_credentials:
                return basic_auth_user(authorization, self.api_credentials) is not None
            if not self.ui_credentials:
                return True
        elif not self.ui_credentials or is_public_path(path):
            return True
        return (basic_auth_user(authorization, self.ui_credentials) is not None
                or gradio_session_user(scope, self.gradio_app()) is not None)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        headers = [(b"content-type", b"application/json")]
        if scope["path"].startswith(API_PREFIX):
            # API clients get the basic challenge; page routes do not, so a fetch from the login page cannot pop
            # up the browser's own password dialog.
            headers.append((b"www-authenticate", b'Basic realm="sdapi"'))
        body = json.dumps({"detail": "Not authenticated"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
