"""The HTTP API of a real server process (A1111 paths and shapes), with the tiny models and demo LoRAs."""
import base64
import io
import json
import os
import re
import shutil

import requests
from PIL import Image

GEN = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "cfg_scale": 7, "sampler_name": "Euler a"}


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _txt2img(sdapi, prompt: str, **kwargs) -> dict:
    response = sdapi.post("/sdapi/v1/txt2img", json={**GEN, "prompt": prompt, **kwargs})
    assert response.status_code == 200, response.text
    return response.json()


def test_routes_need_basic_auth(webui_server):
    for method, path in (("get", "/sdapi/v1/options"), ("get", "/sdapi/v1/sd-models"),
                         ("post", "/sdapi/v1/txt2img"), ("post", "/sdapi/v1/interrupt")):
        response = requests.request(method, webui_server.url + path, timeout=30)
        assert response.status_code == 401, (path, response.status_code)
    wrong = requests.get(webui_server.url + "/sdapi/v1/options", auth=("tester", "nope"), timeout=30)
    assert wrong.status_code == 401


def test_sd_models_lists_both_tiny_models(sdapi):
    models = sdapi.get("/sdapi/v1/sd-models").json()
    titles = " ".join(m["title"] for m in models)
    assert "tiny-sd1" in titles and "tiny-sdxl" in titles
    for m in models:
        assert set(m) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert sdapi.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_samplers_progress_interrupt(sdapi):
    names = [s["name"] for s in sdapi.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names
    progress = sdapi.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state"}
    assert sdapi.post("/sdapi/v1/interrupt").status_code == 200


def test_txt2img_with_lora_differs_and_records_hash(sdapi, sd1_lora):
    plain = _txt2img(sdapi, "a red house")
    with_lora = _txt2img(sdapi, f"a red house <lora:{sd1_lora}:1>")

    image = _decode(plain["images"][0])
    assert image.size == (64, 64)
    assert plain["images"][0] != with_lora["images"][0], "the LoRA did not change the image"

    info = json.loads(with_lora["info"])
    infotext = info["infotexts"][0]
    assert re.search(r'Lora hashes: "' + re.escape(sd1_lora) + r': [0-9a-f]{12}"', infotext), infotext
    assert "Lora hashes" not in json.loads(plain["info"])["infotexts"][0]
    assert with_lora["parameters"]["prompt"] == f"a red house <lora:{sd1_lora}:1>"
    # The PNG carries the same infotext, as A1111 writes it.
    assert _decode(with_lora["images"][0]).info.get("parameters") == infotext


def test_missing_lora_is_a_comment_not_an_error(sdapi, sd1_lora):
    result = _txt2img(sdapi, f"a cat <lora:nope:1> <lora:{sd1_lora}:0.5>")
    info = json.loads(result["info"])
    assert "Lora not found: nope" in info["comments"]
    assert len(result["images"]) == 1
    assert f"{sd1_lora}: " in info["infotexts"][0]


def test_batch_and_unknown_sampler(sdapi):
    result = _txt2img(sdapi, "two", batch_size=2, send_images=True)
    assert len(result["images"]) == 2
    assert len(json.loads(result["info"])["infotexts"]) == 2
    response = sdapi.post("/sdapi/v1/txt2img", json={**GEN, "prompt": "x", "sampler_name": "No such sampler"})
    assert response.status_code == 404


def test_options_round_trip_and_saved(webui_server, sdapi):
    before = sdapi.get("/sdapi/v1/options").json()
    assert "extra_networks_default_multiplier" in before
    assert "lora_add_hashes_to_infotext" in before, "the Lora extension's options are missing"
    try:
        response = sdapi.post("/sdapi/v1/options", json={"extra_networks_default_multiplier": 0.7,
                                                          "extra_networks_add_text_separator": ", "})
        assert response.status_code == 200, response.text
        after = sdapi.get("/sdapi/v1/options").json()
        assert after["extra_networks_default_multiplier"] == 0.7
        assert after["extra_networks_add_text_separator"] == ", "
        with open(os.path.join(webui_server.data_dir, "config.json"), encoding="utf8") as f:
            saved = json.load(f)
        assert saved["extra_networks_default_multiplier"] == 0.7
        bad = sdapi.post("/sdapi/v1/options", json={"extra_networks_card_show_desc": "yes please"})
        assert bad.status_code == 422
    finally:
        sdapi.post("/sdapi/v1/options", json={
            "extra_networks_default_multiplier": before["extra_networks_default_multiplier"],
            "extra_networks_add_text_separator": before["extra_networks_add_text_separator"]})


def test_refresh_loras_picks_up_a_new_file(webui_server, sdapi, sd1_lora):
    source = next(x["path"] for x in sdapi.get("/sdapi/v1/loras").json() if x["name"] == sd1_lora)
    target = os.path.join(webui_server.lora_dir, "api_fresh_copy.safetensors")
    shutil.copy(source, target)
    try:
        assert sdapi.post("/sdapi/v1/refresh-loras").status_code == 200
        names = [x["name"] for x in sdapi.get("/sdapi/v1/loras").json()]
        assert "api_fresh_copy" in names
        refreshed = sdapi.post("/sd_extra_networks/refresh", params={"page": "lora", "tabname": "txt2img"}).json()
        assert "api_fresh_copy" in [c["name"] for c in refreshed["items"]]
    finally:
        os.remove(target)
        sdapi.post("/sdapi/v1/refresh-loras")


def test_card_routes_serve_only_previews_inside_lora_folders(webui_server, sdapi):
    preview = os.path.join(webui_server.lora_dir, "api_preview_test.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(preview)
    try:
        ok = sdapi.get("/sd_extra_networks/thumb", params={"filename": preview, "mtime": "1"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        for forbidden in ("/etc/passwd", os.path.join(webui_server.data_dir, "config.json"),
                          os.path.join(webui_server.lora_dir, "..", "..", "config.json"),
                          os.path.join(webui_server.lora_dir, "x.json")):
            response = sdapi.get("/sd_extra_networks/thumb", params={"filename": forbidden})
            assert response.status_code == 403, forbidden
        missing = sdapi.get("/sd_extra_networks/thumb", params={"filename": os.path.join(webui_server.lora_dir,
                                                                                          "missing.png")})
        assert missing.status_code == 404
    finally:
        os.remove(preview)
    assert sdapi.get("/sd_extra_networks/cards", params={"page": "nope"}).status_code == 404


def test_card_data_is_json_with_prompt_parts(sdapi, sd1_lora, webui_server):
    cards = sdapi.get("/sd_extra_networks/cards", params={"page": "lora", "tabname": "txt2img"}).json()
    card = next(c for c in cards["items"] if c["name"] == sd1_lora)
    assert card["prompt"][0].startswith(f"<lora:{card.get('alias', sd1_lora)}:")
    # the weight part: the sidecar's preferred weight as text (another test's editor save may have set one),
    # else the page's default multiplier option
    sidecar = next((os.path.join(root, f) for root, _, files in os.walk(webui_server.lora_dir) for f in files
                    if f == f"{sd1_lora}.json"), None)
    preferred = 0.0
    if sidecar:
        with open(sidecar, encoding="utf8") as f:
            preferred = float(json.load(f).get("preferred weight") or 0)
    expected = {"opt": "extra_networks_default_multiplier"} if preferred == 0 else \
        (str(int(preferred)) if preferred.is_integer() else repr(preferred))
    assert card["prompt"][1] == expected
    assert cards["opts"]["extra_networks_add_text_separator"] is not None
    meta = sdapi.get("/sd_extra_networks/metadata", params={"page": "lora", "item": sd1_lora})
    assert meta.status_code == 200
    again = sdapi.get("/sd_extra_networks/cards", params={"page": "lora", "tabname": "txt2img"},
                      headers={"If-None-Match": response_etag(sdapi)})
    assert again.status_code == 304 and again.headers["X-Model-Family"] == "SD1"
    single = sdapi.get("/sd_extra_networks/get-single-card", params={"page": "lora", "tabname": "txt2img",
                                                                      "name": sd1_lora}).json()
    assert single["item"]["name"] == sd1_lora


def response_etag(sdapi) -> str:
    return sdapi.get("/sd_extra_networks/cards", params={"page": "lora", "tabname": "txt2img"}).headers["ETag"]


def test_card_editor_writes_need_the_page_header(webui_server, sdapi, sd1_lora):
    url = "/sd_extra_networks/user-metadata"
    params = {"page": "lora", "tabname": "txt2img", "name": sd1_lora}
    data = sdapi.get(url, params=params).json()
    assert data["name"] == sd1_lora and any(f["key"] == "activation text" for f in data["fields"])
    forged = sdapi.post(url, params=params, data='{"notes": "x"}', headers={"Content-Type": "text/plain"})
    assert forged.status_code == 403
    bad = sdapi.post(url, params=params, json={"sd version": "SD9"}, headers={"X-Webui-Request": "1"})
    assert bad.status_code == 400
    forged_preview = sdapi.post("/sd_extra_networks/replace-preview", params=params, data=b"\x89PNG")
    assert forged_preview.status_code == 403


def test_api_auth_credentials_parse():
    from modules.api.api import parse_credentials

    assert parse_credentials("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    assert parse_credentials(None) == {} and parse_credentials("nocolon") == {}
