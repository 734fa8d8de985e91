"""Cross-origin policy on the session server (no --cors-allow-origins): only the server's own origin may change
anything, whatever name the server is reached by; other origins get no CORS approval, on our routes or gradio's.

Made-up names (`webui.lan`, `evil.test`) are sent as Host/Origin headers to 127.0.0.1, or resolved to 127.0.0.1 by
the mapped Chromium: nothing leaves the loopback range."""
import os
from urllib.parse import urlsplit

import pytest
import requests

TAMPERED_DIR = "/tmp/written-by-another-site"


@pytest.fixture(scope="module")
def port(webui_server) -> int:
    return urlsplit(webui_server.url).port


def sidecar_path(webui_server, name: str) -> str:
    for root, _, files in os.walk(webui_server.lora_dir):
        if f"{name}.safetensors" in files:
            return os.path.join(root, f"{name}.json")
    raise AssertionError(f"{name}.safetensors not found under {webui_server.lora_dir}")


def read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def outdir(sdapi) -> str:
    return sdapi.get("/sdapi/v1/options").json()["outdir_txt2img_samples"]


@pytest.fixture
def guarded_state(webui_server, sdapi, sd1_lora):
    """(outdir before, sidecar path, sidecar bytes before); both are put back afterwards, so a failing test (an
    attack that got through) does not leak into the next one."""
    before_dir = outdir(sdapi)
    sidecar = sidecar_path(webui_server, sd1_lora)
    before_sidecar = read_or_none(sidecar)
    yield before_dir, sidecar, before_sidecar
    if outdir(sdapi) != before_dir:
        sdapi.post("/sdapi/v1/options", json={"outdir_txt2img_samples": before_dir})
    if read_or_none(sidecar) != before_sidecar:
        if before_sidecar is None:
            os.remove(sidecar)
        else:
            with open(sidecar, "wb") as f:
                f.write(before_sidecar)
        sdapi.get("/sd_extra_networks/get-single-card", params={"page": "lora", "tabname": "txt2img",
                                                                "name": sd1_lora})


def post(webui_server, path: str, host: str, origin: str | None, **kwargs) -> requests.Response:
    headers = {"Host": host, **kwargs.pop("headers", {})}
    if origin is not None:
        headers["Origin"] = origin
    return requests.post(webui_server.url + path, headers=headers, auth=webui_server.auth, timeout=60, **kwargs)


FOREIGN = [  # (Host the request was addressed to, Origin of the page that sent it)
    ("127.0.0.1:{port}", "http://localhost:9999"),      # gradio approves any localhost origin on any port
    ("127.0.0.1:{port}", "http://127.0.0.1:{other}"),   # same host, another port
    ("127.0.0.1:{port}", "https://127.0.0.1:{port}"),   # another scheme
    ("webui.lan:{port}", "http://evil.test"),          # gradio approves anything when reached by a LAN name
    ("webui.lan:{port}", "http://webui.lan.evil.test:{port}"),
    ("webui.lan:{port}", "null"),                      # sandboxed frames, file:// pages
]


@pytest.mark.parametrize("host,origin", FOREIGN)
def test_foreign_origin_cannot_change_options_or_sidecars(webui_server, sdapi, sd1_lora, guarded_state, port, host,
                                                          origin):
    host, origin = host.format(port=port), origin.format(port=port, other=port + 1)
    before_dir, sidecar, before_sidecar = guarded_state

    options = post(webui_server, "/sdapi/v1/options", host, origin, json={"outdir_txt2img_samples": TAMPERED_DIR})
    assert options.status_code == 403, options.text
    assert origin in options.json()["detail"]
    metadata = post(webui_server, "/sd_extra_networks/user-metadata", host, origin,
                    params={"page": "lora", "tabname": "txt2img", "name": sd1_lora},
                    json={"description": "written by another site"}, headers={"X-Webui-Request": "1"})
    assert metadata.status_code == 403, metadata.text
    preview = post(webui_server, "/sd_extra_networks/replace-preview", host, origin,
                   params={"page": "lora", "tabname": "txt2img", "name": sd1_lora}, data=b"\x89PNG",
                   headers={"X-Webui-Request": "1"})
    assert preview.status_code == 403, preview.text
    queue = post(webui_server, "/gradio_api/queue/join", host, origin, json={"data": [], "fn_index": 0,
                                                                             "session_hash": "x"})
    assert queue.status_code == 403, queue.text

    assert outdir(sdapi) == before_dir
    assert read_or_none(sidecar) == before_sidecar


@pytest.mark.parametrize("host,origin", FOREIGN)
def test_foreign_preflight_and_reads_get_no_cors_approval(webui_server, port, host, origin):
    host, origin = host.format(port=port), origin.format(port=port, other=port + 1)
    for path in ("/sdapi/v1/options", "/sd_extra_networks/user-metadata", "/gradio_api/queue/join"):
        r = requests.options(webui_server.url + path, timeout=30, headers={
            "Host": host, "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-webui-request,authorization"})
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert not [k for k in r.headers if k.lower().startswith("access-control-")], (path, r.headers)
    # gradio's own routes answer foreign reads with Access-Control-Allow-Origin on their own: it must be gone
    r = requests.get(webui_server.url + "/config", headers={"Host": host, "Origin": origin}, timeout=30)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}, r.headers


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "webui.lan:{port}", "WebUI.LAN:{port}"])
def test_own_origin_and_no_origin_can_write(webui_server, sdapi, port, host):
    host = host.format(port=port)
    own = f"http://{host}"
    before = outdir(sdapi)
    try:
        for origin, value in ((own, "/tmp/own-origin"), (None, "/tmp/no-origin")):
            r = post(webui_server, "/sdapi/v1/options", host, origin, json={"outdir_txt2img_samples": value})
            assert r.status_code == 200, (origin, r.text)
            assert outdir(sdapi) == value
    finally:
        sdapi.post("/sdapi/v1/options", json={"outdir_txt2img_samples": before})


# --- in the browser --------------------------------------------------------------------------------------------
ATTACK = """async ([server, name, user, password]) => {
    const results = {};
    const attempt = async (key, url, init) => {
        try {
            const r = await fetch(url, init);
            results[key] = "status " + r.status;
        } catch (e) {
            results[key] = "blocked";
        }
    };
    const query = `page=lora&tabname=txt2img&name=${encodeURIComponent(name)}`;
    await attempt("sidecar", `${server}/sd_extra_networks/user-metadata?${query}`, {
        method: "POST", body: JSON.stringify({description: "written by another site"}),
        headers: {"Content-Type": "application/json", "X-Webui-Request": "1"}});
    await attempt("options", `${server}/sdapi/v1/options`, {
        method: "POST", body: JSON.stringify({outdir_txt2img_samples: "%s"}),
        headers: {"Content-Type": "application/json", "Authorization": "Basic " + btoa(user + ":" + password)}});
    await attempt("simple", `${server}/sdapi/v1/options`, {
        method: "POST", mode: "no-cors", body: JSON.stringify({outdir_txt2img_samples: "%s"}),
        headers: {"Content-Type": "text/plain"}});
    return results;
}""" % (TAMPERED_DIR, TAMPERED_DIR)


@pytest.fixture
def mapped_page(chromium_mapped):
    context = chromium_mapped.new_context()
    page = context.new_page()
    yield page
    context.close()


@pytest.mark.parametrize("page_host,server_host", [("127.0.0.1", "127.0.0.1"), ("evil.test", "webui.lan")])
def test_page_on_another_site_cannot_write(mapped_page, webui_server, sdapi, sd1_lora, guarded_state, port,
                                           foreign_page_port, page_host, server_host):
    """A page from another port or another host name tries the writes the issue describes, with the header the
    editor sends and even knowing the API password: the browser's preflight is refused, nothing changes."""
    before_dir, sidecar, before_sidecar = guarded_state
    mapped_page.goto(f"http://{page_host}:{foreign_page_port}/")
    results = mapped_page.evaluate(ATTACK, [f"http://{server_host}:{port}", sd1_lora, *webui_server.auth])
    assert results["sidecar"] == "blocked" and results["options"] == "blocked", results
    assert outdir(sdapi) == before_dir
    assert read_or_none(sidecar) == before_sidecar


def test_page_reached_by_lan_name_saves_sidecar(mapped_page, webui_server, sd1_lora, guarded_state, port):
    """The page itself, opened by a LAN-style name, is same-origin: the editor's save works."""
    sidecar = guarded_state[1]
    mapped_page.goto(f"http://webui.lan:{port}/")
    mapped_page.wait_for_selector("#txt2img_prompt textarea", timeout=90000)
    status = mapped_page.evaluate("""async (name) => {
        const query = `page=lora&tabname=txt2img&name=${encodeURIComponent(name)}`;
        const r = await fetch(`./sd_extra_networks/user-metadata?${query}`, {method: "POST",
            body: JSON.stringify({notes: "saved from webui.lan"}),
            headers: {"Content-Type": "application/json", "X-Webui-Request": "1"}});
        return r.status;
    }""", sd1_lora)
    assert status == 200
    assert b"saved from webui.lan" in read_or_none(sidecar)
