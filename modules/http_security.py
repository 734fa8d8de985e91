"""Puts the server's origin policy and login check around the app, and says at start-up what is left open."""
from __future__ import annotations

import ipaddress

from modules.http_credentials import api_credentials, gradio_credentials
from modules.http_login import LoginGuard
from modules.http_origins import OriginGuard, OriginPolicy


class SecurityConfigError(ValueError):
    """A security flag that cannot be used; the server must not start open by mistake."""


def check_flags(cmd_opts) -> tuple[dict[str, str], dict[str, str], OriginPolicy]:
    """(UI users, API users, origin policy) from the flags; SecurityConfigError with the flag's problem."""
    try:
        return (gradio_credentials(cmd_opts), api_credentials(cmd_opts),
                OriginPolicy(getattr(cmd_opts, "cors_allow_origins", None),
                             getattr(cmd_opts, "cors_allow_origins_regex", None)))
    except ValueError as e:  # CredentialsError included
        raise SecurityConfigError(str(e)) from None


def gradio_auth(cmd_opts) -> list[tuple[str, str]] | None:
    """The `auth=` list for gradio's mount (its login form and its own route checks), or None."""
    users = gradio_credentials(cmd_opts)
    return list(users.items()) or None


def _mounted_gradio_app(app):
    for route in app.router.routes:
        if type(route).__name__ == "Mount" and getattr(route, "path", None) == "":
            return route.app
    return None


def install(app, cmd_opts) -> None:
    """Adds the middlewares: the origin check outermost, so a refused cross-site write never reaches the login
    check or a route; then the login check. Call after gradio is mounted and before the server starts."""
    ui_users, api_users, policy = check_flags(cmd_opts)
    if ui_users or api_users:
        found: list = []

        def gradio_app():
            if not found:
                found.append(_mounted_gradio_app(app))
            return found[0]

        app.add_middleware(LoginGuard, ui_credentials=ui_users, api_credentials=api_users, gradio_app=gradio_app)
    app.add_middleware(OriginGuard, policy=policy)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(cmd_opts, host: str) -> str | None:
    """The console warning for a server others can reach (--listen or a non-loopback --server-name) without a
    login; None when bound to loopback or protected."""
    if is_loopback(host) or getattr(cmd_opts, "gradio_auth", None) or getattr(cmd_opts, "gradio_auth_path", None):
        return None
    api_open = not getattr(cmd_opts, "api_auth", None)
    return (f"WARNING: listening on {host}:{cmd_opts.port} without --gradio-auth: anyone who can reach this port "
            "can use the UI (generate, train, write sidecars and previews)"
            + (" and the HTTP API /sdapi/v1/* (no --api-auth)" if api_open else "")
            + ". Set --gradio-auth user:password (or --gradio-auth-path FILE)"
            + (" and --api-auth" if api_open else "") + ".")
