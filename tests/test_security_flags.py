"""The security flags: A1111's credential formats, clear refusals of unusable values (naming the flag or file), the
start-up warning for a server others can reach without a login."""
import argparse
import base64
import os
import subprocess
import sys

import pytest

from modules import http_credentials, http_security
from modules.http_credentials import CredentialsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opts(**kwargs) -> argparse.Namespace:
    base = dict(gradio_auth=None, gradio_auth_path=None, api_auth=None, cors_allow_origins=None,
                cors_allow_origins_regex=None, port=7860)
    return argparse.Namespace(**{**base, **kwargs})


def test_gradio_users_from_flag_and_file(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("carol:pw3\n\n  dave:pw:4 , erin:pw5\n", encoding="utf8")
    got = http_credentials.gradio_credentials(opts(gradio_auth="alice:pw1, bob:pw:2", gradio_auth_path=str(users)))
    assert got == {"alice": "pw1", "bob": "pw:2", "carol": "pw3", "dave": "pw:4", "erin": "pw5"}


@pytest.mark.parametrize("text,problem", [
    ("carol:pw3\nnocolon\n", "line 2 entry 1: expected user:password"),
    ("carol:pw3, :pw\n", "line 1 entry 2: the user name is empty"),
    ("carol:\n", "the password for 'carol' is empty"),
    ("carol:a\ncarol:b\n", "user 'carol' is given twice"),
    ("\n\n", "holds no user:password entry"),
])
def test_bad_auth_file_is_refused_naming_file_and_entry(tmp_path, text, problem):
    users = tmp_path / "users.txt"
    users.write_text(text, encoding="utf8")
    with pytest.raises(CredentialsError) as e:
        http_credentials.gradio_credentials(opts(gradio_auth_path=str(users)))
    assert str(users) in str(e.value) and problem in str(e.value)
    assert "pw3" not in str(e.value)  # never echoes a password


def test_missing_auth_file_and_bad_flags_are_refused(tmp_path):
    missing = str(tmp_path / "nope.txt")
    cases = [(opts(gradio_auth_path=missing), [missing, "cannot read"]),
             (opts(gradio_auth="alice"), ["--gradio-auth", "no ':'"]),
             (opts(api_auth="user:pw,broken"), ["--api-auth", "entry 2"]),
             (opts(cors_allow_origins="localhost:8000"), ["--cors-allow-origins", "localhost:8000"]),
             (opts(cors_allow_origins_regex="http://(a"), ["--cors-allow-origins-regex", "http://(a"])]
    for flags, words in cases:
        with pytest.raises(http_security.SecurityConfigError) as e:
            http_security.check_flags(flags)
        assert all(w in str(e.value) for w in words), (words, str(e.value))


def test_passwords_are_checked_exactly():
    users = {"alice": "pw1", "bob": "pw:2"}
    assert http_credentials.check_password(users, "bob", "pw:2")
    assert not http_credentials.check_password(users, "bob", "pw:")
    assert not http_credentials.check_password(users, "alice", "pw1 ")
    assert not http_credentials.check_password(users, "mallory", "pw1")
    basic = "Basic " + base64.b64encode(b"bob:pw:2").decode()
    assert http_credentials.basic_auth_user(basic, users) == "bob"
    assert http_credentials.basic_auth_user("Bearer x", users) is None
    assert http_credentials.basic_auth_user("Basic !!!", users) is None


def test_exposure_warning():
    listen = http_security.exposure_warning(opts(), "0.0.0.0")
    assert "--gradio-auth" in listen and "/sdapi/v1" in listen and "--api-auth" in listen
    lan = http_security.exposure_warning(opts(api_auth="a:b"), "192.168.1.20")
    assert "192.168.1.20" in lan and "--gradio-auth" in lan and "/sdapi/v1" not in lan
    assert http_security.exposure_warning(opts(), "127.0.0.1") is None
    assert http_security.exposure_warning(opts(), "::1") is None
    assert http_security.exposure_warning(opts(gradio_auth="a:b"), "0.0.0.0") is None


def run_webui(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "webui.py"), "--data-dir", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_webui_refuses_to_start_with_an_unreadable_auth_file(tmp_path):
    missing = str(tmp_path / "users.txt")
    result = run_webui(tmp_path, "--port", "9", "--gradio-auth-path", missing)
    assert result.returncode == 2
    assert missing in result.stderr and "cannot read" in result.stderr, result.stderr
    assert "Running on" not in result.stdout


def test_webui_warns_on_listen_without_login(tmp_path):
    """The warning comes first at start-up; a bad regex then stops this start before any port is bound."""
    result = run_webui(tmp_path, "--listen", "--port", "9", "--cors-allow-origins-regex", "(")
    assert result.returncode == 2
    assert "WARNING: listening on 0.0.0.0:9 without --gradio-auth" in result.stderr, result.stderr
    assert "--cors-allow-origins-regex" in result.stderr
    quiet = run_webui(tmp_path, "--listen", "--port", "9", "--gradio-auth", "a:b", "--cors-allow-origins-regex", "(")
    assert quiet.returncode == 2 and "WARNING" not in quiet.stderr, quiet.stderr


# --- the middlewares in process, on a real gradio mount (no server process) -------------------------------------
@pytest.fixture(scope="module")
def ui_only_app():
    """An app as webui.create_app builds it, with --gradio-auth and no --api-auth: a route under /sdapi/, a page
    route, a WebSocket route, and a gradio Blocks mounted at / with gradio's login."""
    import gradio as gr
    from fastapi import FastAPI, WebSocket

    flags = opts(gradio_auth="alice:pw1")
    app = FastAPI()
    app.add_api_route("/sdapi/v1/thing", lambda: {"ok": True}, methods=["GET", "POST"])
    app.add_api_route("/sd_extra_networks/thing", lambda: {"ok": True}, methods=["GET"])

    async def socket(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app.add_api_websocket_route("/internal/socket", socket)
    with gr.Blocks() as demo:
        gr.Textbox(elem_id="secret_box")
    app = gr.mount_gradio_app(app, demo, path="/", auth=http_security.gradio_auth(flags), footer_links=[])
    http_security.install(app, flags)
    return app


def test_without_api_auth_the_api_takes_the_ui_login(ui_only_app):
    from starlette.testclient import TestClient

    with TestClient(ui_only_app, base_url="http://127.0.0.1:7860") as client:
        assert client.get("/sdapi/v1/thing").status_code == 401
        assert client.get("/sdapi/v1/thing", auth=("alice", "nope")).status_code == 401
        assert client.get("/sdapi/v1/thing", auth=("alice", "pw1")).status_code == 200
        assert client.get("/sd_extra_networks/thing").status_code == 401
        assert client.post("/login", data={"username": "alice", "password": "pw1"}).status_code == 200
        # the browser session (gradio's cookie, checked against gradio's token store) opens both
        assert client.get("/sdapi/v1/thing").status_code == 200
        assert client.get("/sd_extra_networks/thing").status_code == 200
        assert "secret_box" in client.get("/config").text


OWN_WS_ORIGIN = "http://testserver"  # the Host starlette's test client sends on WebSocket handshakes


def test_websocket_handshakes_follow_origin_and_login(ui_only_app):
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    with TestClient(ui_only_app) as client:
        with pytest.raises(WebSocketDisconnect):  # no login
            with client.websocket_connect("/internal/socket", headers={"Origin": OWN_WS_ORIGIN}) as ws:
                ws.receive_text()
        login = {"Authorization": "Basic " + base64.b64encode(b"alice:pw1").decode()}
        with pytest.raises(WebSocketDisconnect):  # logged in, but from another site
            with client.websocket_connect("/internal/socket", headers={**login, "Origin": "http://evil.test"}) as ws:
                ws.receive_text()
        with client.websocket_connect("/internal/socket", headers={**login, "Origin": OWN_WS_ORIGIN}) as ws:
            assert ws.receive_text() == "hello"
