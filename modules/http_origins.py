"""The server's cross-origin policy, as an ASGI middleware around the whole app (gradio's mount included).

A request is same-origin when its `Origin` is the scheme, host and port it was addressed to (the `Host` header).
Other origins get nothing unless A1111's --cors-allow-origins / --cors-allow-origins-regex allow them: a
state-changing request (any method but GET, HEAD, OPTIONS) from them is refused with 403 before any route runs, their
CORS preflights are refused, and every `Access-Control-*` header an inner app (gradio's own CORS middleware approves
localhost origins on any port, and any origin when the server is reached by a LAN name) adds is dropped.
Requests without an `Origin` (curl, python requests, API clients) are not cross-site and pass."""
from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
PREFLIGHT_MAX_AGE = "600"


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in, or None for something that is not a host."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.query or parts.username is not None:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS.get(scheme, 0)


def origin_of(origin: str) -> tuple[str, str, int] | None:
    scheme, sep, rest = origin.partition("://")
    return _origin_key(scheme, rest) if sep else None


class OriginPolicy:
    """Which foreign origins may use the server (A1111's two flags); the server's own origin always may."""

    def __init__(self, allow_origins: str | None = None, allow_origin_regex: str | None = None):
        """Raises ValueError naming the flag and the entry for an origin or expression that cannot be used."""
        self.allow_any = False
        self.allowed: set[tuple[str, str, int]] = set()
        for entry in (e.strip() for e in (allow_origins or "").split(",")):
            if entry == "*":  # Starlette's (and so A1111's) "any origin"
                self.allow_any = True
            elif entry:
                key = origin_of(entry.rstrip("/"))
                if key is None:
                    raise ValueError(f"--cors-allow-origins: {entry!r} is not an origin like http://host:port")
                self.allowed.add(key)
        try:
            self.regex = re.compile(allow_origin_regex) if allow_origin_regex else None
        except re.error as e:
            raise ValueError(f"--cors-allow-origins-regex: {allow_origin_regex!r} is not a valid expression ({e})") \
                from None

    def is_same_origin(self, origin: str, scope: dict) -> bool:
        host = _header(scope, b"host")
        if host is None:
            return False
        own = _origin_key(scope.get("scheme", "http"), host)
        return own is not None and origin_of(origin) == own

    def is_allowed_foreign(self, origin: str) -> bool:
        key = origin_of(origin)
        if self.allow_any or (key is not None and key in self.allowed):
            return True
        return self.regex is not None and self.regex.fullmatch(origin) is not None


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _without_cors_headers(headers) -> list:
    return [(k, v) for k, v in headers if not k.lower().startswith(b"access-control-")]


class OriginGuard:
    """ASGI middleware applying an OriginPolicy to every HTTP request and WebSocket handshake."""

    def __init__(self, app, policy: OriginPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        origin = _header(scope, b"origin")
        if origin is None:
            return await self.app(scope, receive, send)
        same = self.policy.is_same_origin(origin, scope)
        allowed = same or self.policy.is_allowed_foreign(origin)
        if scope["type"] == "websocket":
            if not allowed:  # closing before accepting answers the handshake with 403
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)

        method = scope["method"]
        if method == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            return await self._preflight(scope, send, origin, allowed)
        if method not in SAFE_METHODS and not allowed:
            return await _refuse(send, f"cross-origin {method} from {origin} refused: only the server's own origin "
                                       "and origins allowed with --cors-allow-origins(-regex) may change anything")

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                headers = _without_cors_headers(message.get("headers", ()))
                if allowed and not same:
                    headers += _cors_headers(origin)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_policy)

    async def _preflight(self, scope, send, origin: str, allowed: bool) -> None:
        if not allowed:
            return await _refuse(send, f"cross-origin request from {origin} refused")
        headers = _cors_headers(origin) + [
            (b"access-control-allow-methods", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode()),
        ]
        requested = _header(scope, b"access-control-request-headers")
        if requested:
            headers.append((b"access-control-allow-headers", requested.encode("latin-1")))
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers + [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"OK"})


def _cors_headers(origin: str) -> list:
    return [(b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin")]


async def _refuse(send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
