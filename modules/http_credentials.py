"""User names and passwords for --gradio-auth, --gradio-auth-path and --api-auth (A1111's formats), and the checks
on them: HTTP basic credentials and passwords compared in constant time."""
from __future__ import annotations

import base64
import binascii
import hmac


class CredentialsError(ValueError):
    """A credentials flag or file that cannot be used; the message names the flag or file and the entry."""


def parse_credentials(text: str | None, source: str, line_separated: bool = False) -> dict[str, str]:
    """`user:pass,user2:pass2` (and, for a file, one or more entries a line) → {user: pass}.

    Only the first ':' splits, so a password may contain ':'. Blank entries are skipped. An entry without ':', with
    an empty user or password, or a user named twice with different passwords is an error: a typo must not leave a
    server open or let a guessed password in. Messages name `source` and the entry's place, never the password."""
    result: dict[str, str] = {}
    lines = (text or "").splitlines() if line_separated else [text or ""]
    for line_no, line in enumerate(lines, 1):
        for entry_no, entry in enumerate(line.split(","), 1):
            entry = entry.strip()
            if not entry:
                continue
            where = f"{source}, line {line_no} entry {entry_no}" if line_separated else f"{source}, entry {entry_no}"
            user, sep, password = entry.partition(":")
            user = user.strip()
            if not sep:
                raise CredentialsError(f"{where}: expected user:password, found no ':'")
            if not user:
                raise CredentialsError(f"{where}: the user name is empty")
            if not password:
                raise CredentialsError(f"{where}: the password for {user!r} is empty")
            if user in result and result[user] != password:
                raise CredentialsError(f"{where}: user {user!r} is given twice with different passwords")
            result[user] = password
    return result


def gradio_credentials(cmd_opts) -> dict[str, str]:
    """The UI's users: --gradio-auth and the file named by --gradio-auth-path together."""
    result = parse_credentials(getattr(cmd_opts, "gradio_auth", None), "--gradio-auth")
    path = getattr(cmd_opts, "gradio_auth_path", None)
    if path:
        try:
            with open(path, "r", encoding="utf8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialsError(f"--gradio-auth-path {path}: cannot read the file ({e})") from None
        from_file = parse_credentials(text, f"--gradio-auth-path {path}", line_separated=True)
        if not from_file:
            raise CredentialsError(f"--gradio-auth-path {path}: the file holds no user:password entry")
        for user, password in from_file.items():
            if result.get(user, password) != password:
                raise CredentialsError(f"--gradio-auth-path {path}: user {user!r} is also in --gradio-auth "
                                       "with a different password")
            result[user] = password
    return result


def api_credentials(cmd_opts) -> dict[str, str]:
    return parse_credentials(getattr(cmd_opts, "api_auth", None), "--api-auth")


def check_password(credentials: dict[str, str], user: str, password: str) -> bool:
    """Constant time in the password; an unknown user costs the same comparison."""
    expected = credentials.get(user)
    known = expected is not None
    expected_bytes = (expected if known else password + "\0").encode("utf8")
    return hmac.compare_digest(password.encode("utf8"), expected_bytes) and known


def basic_auth_user(authorization: str | None, credentials: dict[str, str]) -> str | None:
    """The user an `Authorization: Basic ...` header proves, or None."""
    if not authorization or not credentials:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user if check_password(credentials, user, password) else None
