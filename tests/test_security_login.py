"""Login on the server started with --gradio-auth, --gradio-auth-path and --api-auth (conftest's `secured_server`):
every route that runs a job, writes or serves a file refuses an unauthenticated request; the API answers with its
credentials; the browser logs in and uses the page; origins allowed with --cors-allow-origins(-regex) work.

Made-up host names are resolved to 127.0.0.1 by the mapped Chromium: nothing leaves the loopback range."""
import os
import re

import pytest
import requests
from conftest import SECURED_API_AUTH

QUERY = {"page": "lora", "tabname": "txt2img"}
UNAUTHORIZED = (401,)


@pytest.fixture(scope="module")
def server(secured_server):
    return secured_server


@pytest.fixture(scope="module")
def ui_auth(server) -> tuple[str, str]:
    return "alice", server.ui_users["alice"]


@pytest.fixture(scope="module")
def sd1_card(server, ui_auth) -> dict:
    cards = requests.get(server.url + "/sd_extra_networks/cards", params=QUERY, auth=ui_auth, timeout=60).json()
    found = [c for c in cards["items"] if c.get("sd") == "SD1" and not c.get("error")]
    assert found, cards
    return found[0]


def sidecar_of(server, name: str) -> str:
    for root, _, files in os.walk(server.lora_dir):
        if f"{name}.safetensors" in files:
            return os.path.join(root, f"{name}.json")
    raise AssertionError(name)


def read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.fixture
def kept_sidecar(server, sd1_card, ui_auth):
    """The SD1 card's sidecar path; its bytes are put back after the test."""
    path = sidecar_of(server, sd1_card["name"])
    before = read_or_none(path)
    yield path
    if read_or_none(path) != before:
        if before is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(before)
        requests.get(server.url + "/sd_extra_networks/get-single-card", auth=ui_auth, timeout=60,
                      params={**QUERY, "name": sd1_card["name"]})


def _fill_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


GRADIO_ROUTES = [  # gradio's own routes that run jobs, write or serve files, or show the app
    ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/openapi.json"),
    ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data?session_hash=x"),
    ("POST", "/gradio_api/upload"), ("GET", "/gradio_api/upload_progress?upload_id=x"),
    ("POST", "/gradio_api/run/predict"), ("POST", "/gradio_api/api/predict"), ("POST", "/gradio_api/call/predict"),
    ("GET", "/gradio_api/call/predict/x"), ("POST", "/gradio_api/cancel"), ("POST", "/gradio_api/reset"),
    ("POST", "/gradio_api/stream/x"), ("GET", "/gradio_api/heartbeat/x"), ("GET", "/gradio_api/runs"),
    ("POST", "/gradio_api/process_recording"), ("GET", "/gradio_api/run-history/records"),
    ("POST", "/gradio_api/vibe-code"), ("GET", "/monitoring"), ("GET", "/gradio_api/token"),
]


def test_every_route_refuses_an_unauthenticated_request(server, ui_auth, sd1_card, kept_sidecar):
    """Every route of the app (listed by its own OpenAPI document, which needs a login too) and gradio's routes
    answer 401 without credentials, with wrong ones, and with the other flag's credentials; nothing is written."""
    schema = requests.get(server.url + "/openapi.json", auth=ui_auth, timeout=60)
    assert schema.status_code == 200
    routes = [(method.upper(), _fill_path(path)) for path, ops in schema.json()["paths"].items() for method in ops]
    paths = {p for _, p in routes}
    for expected in ("/sd_extra_networks/user-metadata", "/sd_extra_networks/replace-preview",
                     "/sd_extra_networks/thumb", "/sd_extra_networks/cards", "/internal/progress",
                     "/sdapi/v1/txt2img", "/sdapi/v1/options", "/sdapi/v1/train/hypernetwork",
                     "/sdapi/v1/create/hypernetwork", "/sdapi/v1/refresh-loras"):
        assert expected in paths, (expected, sorted(paths))
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")] + GRADIO_ROUTES
    preview = kept_sidecar[:-len(".json")] + ".preview.png"
    routes += [("GET", "/gradio_api/file=" + preview), ("GET", "/sd_extra_networks/thumb?filename=" + preview)]
    before = read_or_none(kept_sidecar)
    wrong = [None, ("alice", "wrong"), ("mallory", server.ui_users["alice"])]
    for method, path in routes:
        other = SECURED_API_AUTH if not path.startswith("/sdapi/") else ui_auth  # the other flag's users
        for auth in [*wrong, other]:
            r = requests.request(method, server.url + path, auth=auth, timeout=60, params=QUERY,
                                 headers={"X-Webui-Request": "1", "Origin": server.url},
                                 json={"description": "written without a login", "data_root": server.data_dir})
            assert r.status_code in UNAUTHORIZED, (method, path, auth, r.status_code, r.text[:200])
    assert read_or_none(kept_sidecar) == before
    # the page itself is public but only as the login form: none of the app's components before a login
    page = requests.get(server.url + "/", timeout=60)
    assert page.status_code == 200 and "txt2img_prompt" not in page.text
    assert "txt2img_prompt" in requests.get(server.url + "/config", auth=None, timeout=60,
                                            cookies=login_cookies(server, *ui_auth)).text


def login_cookies(server, user: str, password: str) -> requests.cookies.RequestsCookieJar:
    r = requests.post(server.url + "/login", data={"username": user, "password": password}, timeout=60)
    assert r.status_code == 200, r.text
    return r.cookies


def test_every_user_logs_in_by_basic_auth_and_form(server):
    for user, password in server.ui_users.items():
        r = requests.get(server.url + "/sd_extra_networks/cards", params=QUERY, auth=(user, password), timeout=60)
        assert r.status_code == 200, (user, r.status_code)
        jar = login_cookies(server, user, password)
        assert requests.get(server.url + "/internal/progress", cookies=jar, timeout=60).status_code == 200
    bad = requests.post(server.url + "/login", data={"username": "alice", "password": "nope"}, timeout=60)
    assert bad.status_code == 400 and not bad.cookies


def test_logout_ends_the_session(server, ui_auth):
    jar = login_cookies(server, *ui_auth)
    assert requests.get(server.url + "/sd_extra_networks/cards", params=QUERY, cookies=jar, timeout=60).ok
    requests.get(server.url + "/logout", cookies=jar, timeout=60, allow_redirects=False)
    r = requests.get(server.url + "/sd_extra_networks/cards", params=QUERY, cookies=jar, timeout=60)
    assert r.status_code == 401


def test_api_answers_with_its_credentials_only(server, ui_auth):
    """--api-auth keeps protecting /sdapi/v1/*: its users run a job; UI users and a browser session do not; the
    passwords are not shown by cmd-flags."""
    txt2img = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 1}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=txt2img, auth=SECURED_API_AUTH, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["images"]) == 1
    jar = login_cookies(server, *ui_auth)
    assert requests.get(server.url + "/sdapi/v1/options", cookies=jar, timeout=60).status_code == 401
    assert requests.get(server.url + "/sdapi/v1/options", auth=ui_auth, timeout=60).status_code == 401
    unauth = requests.post(server.url + "/sdapi/v1/txt2img", json=txt2img, timeout=60)
    assert unauth.status_code == 401 and unauth.headers.get("www-authenticate", "").startswith("Basic")
    flags = requests.get(server.url + "/sdapi/v1/cmd-flags", auth=SECURED_API_AUTH, timeout=60).json()
    assert "gradio_auth" not in flags and "api_auth" not in flags
    assert all(password not in str(flags) for password in ("pw1", "pw:2", "apikey"))


# --- in the browser --------------------------------------------------------------------------------------------
def test_browser_logs_in_and_uses_the_page(chromium, server, sd1_card, kept_sidecar):
    """Log in through gradio's form, then the page works: cards load, a generation runs, the editor saves."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url + "/")
        page.get_by_label("username").fill("bob")
        page.get_by_label("password").fill(server.ui_users["bob"])
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#txt2img_prompt textarea", timeout=90000)

        name = sd1_card["name"]
        page.get_by_role("tab", name="Lora").click()
        page.locator("#txt2img_lora_extra_search").fill(name)
        target = page.locator(f"#txt2img_lora_cards .card[data-name='{name}']")
        target.wait_for(timeout=30000)
        page.locator("#txt2img_prompt textarea").fill("a red house")
        target.click()
        assert f"<lora:{name}:" in page.locator("#txt2img_prompt textarea").input_value()

        target.hover()
        target.locator(".edit-button").click()
        page.wait_for_selector(".extra-network-editor", timeout=10000)
        page.locator(".extra-network-editor input[data-key='activation text']").fill("logged-in words")
        page.locator(".extra-network-editor button:has-text('Save')").click()
        page.wait_for_selector(".extra-network-editor", state="detached", timeout=10000)
        assert b"logged-in words" in read_or_none(kept_sidecar)

        page.get_by_role("tab", name="Generation").click()
        for field, value in (("steps", "2"), ("width", "64"), ("height", "64")):
            page.locator(f"#txt2img_{field} input[type=number]").fill(value)
            page.locator(f"#txt2img_{field} input[type=number]").press("Enter")
        page.locator("#txt2img_generate").click()
        page.wait_for_selector("#txt2img_gallery img", timeout=120000)
        page.wait_for_function("() => document.querySelector('#html_info_txt2img')?.innerText"
                               ".includes('Lora hashes')", timeout=120000)
        assert not errors, errors
    finally:
        context.close()


ALLOWED_WRITE = """async ([server, name, user, password]) => {
    const query = `page=lora&tabname=txt2img&name=${encodeURIComponent(name)}`;
    try {
        const r = await fetch(`${server}/sd_extra_networks/user-metadata?${query}`, {
            method: "POST", body: JSON.stringify({notes: "from " + location.host}),
            headers: {"Content-Type": "application/json", "X-Webui-Request": "1",
                      "Authorization": "Basic " + btoa(user + ":" + password)}});
        return "status " + r.status;
    } catch (e) {
        return "blocked";
    }
}"""


@pytest.mark.parametrize("site,allowed", [("allowed.test", True), ("trusted-abc.test", True),
                                          ("evil.test", False), ("trusted-abc.test.evil.test", False)])
def test_origins_allowed_by_flags_can_use_the_server(chromium_mapped, server, ui_auth, sd1_card, kept_sidecar,
                                                     foreign_page_port, site, allowed):
    """--cors-allow-origins / --cors-allow-origins-regex let another site's page write (with a login); any other
    site is still refused before the write."""
    context = chromium_mapped.new_context()
    page = context.new_page()
    before = read_or_none(kept_sidecar)
    try:
        page.goto(f"http://{site}:{foreign_page_port}/")
        result = page.evaluate(ALLOWED_WRITE, [f"http://webui.lan:{server.port}", sd1_card["name"], *ui_auth])
    finally:
        context.close()
    if allowed:
        assert result == "status 200"
        assert f"from {site}:{foreign_page_port}".encode() in read_or_none(kept_sidecar)
    else:
        assert result == "blocked"
        assert read_or_none(kept_sidecar) == before
