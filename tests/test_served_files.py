"""Files the server serves, reads and writes stay inside the Lora folders after symlinks are resolved; the image
routes serve images only; `samples_format` takes image formats only; the card editor refuses non-finite and
out-of-range numbers, opens metadata with absurd counts and always writes strict JSON; a save killed mid-write
leaves nothing behind after the next scan. Over real HTTP on the session server, plus a few direct checks.
"""
import io
import json
import os
import shutil
import time

import pytest
from conftest import tiny_lora_bytes
from PIL import Image

from modules import atomic, ui_extra_networks
from modules.options import Options
from modules.shared_options import options_templates

EDITOR = "/sd_extra_networks/user-metadata"
PAGE_HEADER = {"X-Webui-Request": "1"}


def png_bytes(color=(1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as a browser's JSON.parse does."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def thumb(sdapi, path: str):
    return sdapi.get("/sd_extra_networks/thumb", params={"filename": path, "mtime": "1"})


def cards(sdapi) -> dict:
    response = sdapi.post("/sd_extra_networks/refresh", params={"page": "lora", "tabname": "txt2img"})
    assert response.status_code == 200, response.text
    return {c["name"]: c for c in response.json()["items"]}


@pytest.fixture
def outside(webui_server):
    """A folder outside the Lora folders (next to the server's data, as a user's other files would be)."""
    folder = os.path.join(webui_server.data_dir, "outside-files")
    os.makedirs(folder, exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def links(webui_server, sdapi):
    """links(relpath, target) makes a symlink under the server's Lora folder; removed (and rescanned) afterwards."""
    made: list[str] = []

    def link(relpath: str, target: str) -> str:
        path = os.path.join(webui_server.lora_dir, *relpath.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
        made.append(path)
        return path

    yield link
    for path in made:
        if os.path.islink(path):
            os.unlink(path)
    sdapi.post("/sd_extra_networks/refresh", params={"page": "lora", "tabname": "txt2img"})


# --- item 5: served files -------------------------------------------------------------------------------------------
def test_preview_links_out_of_the_lora_folders_are_not_served(webui_server, sdapi, server_files, links, outside):
    secret = os.path.join(outside, "passwd")
    with open(secret, "w") as f:
        f.write("root:x:0:0:secret\n")
    outside_image = os.path.join(outside, "holiday.png")
    with open(outside_image, "wb") as f:
        f.write(png_bytes((9, 9, 9)))
    server_files("served/linked.safetensors", tiny_lora_bytes(seed=41))
    plain = server_files("served/plain.png", png_bytes())
    to_secret = links("served/linked.png", secret)  # the x.png → /etc/passwd
    to_image = links("served/linked.preview.webp", outside_image)  # an image, but not one of ours
    to_folder = links("served/elsewhere", outside)  # a folder link that holds no Lora

    for path in (to_secret, to_image, os.path.join(to_folder, "holiday.png"), os.path.join(to_folder, "passwd")):
        response = thumb(sdapi, path)
        assert response.status_code == 403, (path, response.status_code)
        assert b"secret" not in response.content
    ok = thumb(sdapi, plain)
    assert ok.status_code == 200 and ok.content == png_bytes()
    assert ok.headers["content-type"] == "image/png" and ok.headers["x-content-type-options"] == "nosniff"
    # The card does not point at a link it may not show: no preview at all (this file has no cover image).
    assert "preview" not in cards(sdapi)["linked"]


def test_a_linked_lora_sub_folder_keeps_its_previews(webui_server, sdapi, server_files, links, outside):
    """A1111 follows folder links in the Lora folder; a linked folder that holds Loras is the user's own."""
    with open(os.path.join(outside, "far.safetensors"), "wb") as f:
        f.write(tiny_lora_bytes(seed=42))
    with open(os.path.join(outside, "far.png"), "wb") as f:
        f.write(png_bytes((5, 6, 7)))
    folder = links("linked_folder", outside)
    card = cards(sdapi)["far"]
    assert "thumb" in card["preview"]
    response = thumb(sdapi, os.path.join(folder, "far.png"))
    assert response.status_code == 200 and response.content == png_bytes((5, 6, 7))


def test_descriptions_and_sidecars_that_link_out_are_not_read(webui_server, sdapi, server_files, links, outside):
    with open(os.path.join(outside, "notes.txt"), "w") as f:
        f.write("SECRET-TEXT")
    with open(os.path.join(outside, "other.json"), "w") as f:
        json.dump({"description": "SECRET-JSON", "activation text": "SECRET-ACT"}, f)
    server_files("linkdesc/ld.safetensors", tiny_lora_bytes(seed=43))
    links("linkdesc/ld.txt", os.path.join(outside, "notes.txt"))
    sidecar = links("linkdesc/ld.json", os.path.join(outside, "other.json"))
    card = cards(sdapi)["ld"]
    assert "SECRET" not in json.dumps(card)
    params = {"page": "lora", "tabname": "txt2img", "name": "ld"}
    opened = sdapi.get(EDITOR, params=params)
    assert opened.status_code == 200 and "SECRET" not in opened.text
    # A save replaces the link with a file of its own; the file the link pointed at is untouched.
    saved = sdapi.post(EDITOR, params=params, json={"notes": "mine"}, headers=PAGE_HEADER)
    assert saved.status_code == 200, saved.text
    assert not os.path.islink(sidecar)
    with open(sidecar, encoding="utf8") as f:
        assert strict_json(f.read()) == {"notes": "mine"}
    with open(os.path.join(outside, "other.json"), encoding="utf8") as f:
        assert json.load(f)["description"] == "SECRET-JSON"


def test_image_routes_serve_images_only_whatever_samples_format_says(tmp_path, monkeypatch):
    from modules import shared

    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("a.safetensors", "a.json", "a.png", "a.avif"):
        (folder / name).write_bytes(b"x")
    page = ui_extra_networks.ExtraNetworksPage("Test")
    page.allowed_directories_for_previews = lambda: [str(folder)]
    ui_extra_networks.extra_pages.append(page)
    try:
        for fmt in ("safetensors", "json"):
            monkeypatch.setitem(shared.opts.data, "samples_format", fmt)  # e.g. a config.json from an old version
            assert not ui_extra_networks.is_servable_preview(str(folder / "a.safetensors"))
            assert not ui_extra_networks.is_servable_preview(str(folder / "a.json"))
            assert ui_extra_networks.is_servable_preview(str(folder / "a.png"))
            assert ui_extra_networks.is_servable_preview(str(folder / "a.avif"))
    finally:
        ui_extra_networks.extra_pages.remove(page)


def test_samples_format_takes_image_formats_only(sdapi):
    before = sdapi.get("/sdapi/v1/options").json()["samples_format"]
    for bad in ("safetensors", "json", "", "png/../x"):
        response = sdapi.post("/sdapi/v1/options", json={"samples_format": bad})
        assert response.status_code == 422, (bad, response.status_code)
        assert "samples_format" in response.text and "not an image format" in response.text
        assert sdapi.get("/sdapi/v1/options").json()["samples_format"] == before
    try:
        assert sdapi.post("/sdapi/v1/options", json={"samples_format": ".WEBP"}).status_code == 200
        assert sdapi.get("/sdapi/v1/options").json()["samples_format"] == "webp"
    finally:
        sdapi.post("/sdapi/v1/options", json={"samples_format": before})
    job = sdapi.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                 "override_settings": {"samples_format": "json"}})
    assert job.status_code == 422 and "not an image format" in job.text


def test_a_bad_samples_format_in_config_json_is_reported_and_not_used(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"samples_format": "safetensors", "enable_pnginfo": False}))
    opts = Options(dict(options_templates))
    opts.load(str(config))
    assert opts.samples_format == "png" and opts.enable_pnginfo is False
    assert "samples_format" in capsys.readouterr().out
    assert json.loads(config.read_text())["samples_format"] == "safetensors"  # the file is left as it is
    with pytest.raises(ValueError, match="not an image format"):
        opts.set("samples_format", "json")


# --- item 7: editor input ---------------------------------------------------------------------------------------------
def test_editor_refuses_non_finite_and_out_of_range_numbers(webui_server, sdapi, server_files):
    server_files("num/numbers.safetensors", tiny_lora_bytes(seed=44))
    sidecar = server_files("num/numbers.json", json.dumps({"preferred weight": 0.5, "mine": 1}))
    cards(sdapi)
    params = {"page": "lora", "tabname": "txt2img", "name": "numbers"}
    for body in ('{"preferred weight": "nan"}', '{"preferred weight": "inf"}', '{"preferred weight": NaN}',
                 '{"preferred weight": -Infinity}', '{"preferred weight": 1e999}', '{"preferred weight": "1e999"}'):
        response = sdapi.post(EDITOR, params=params, data=body,
                              headers={**PAGE_HEADER, "Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.status_code, response.text)
        assert "Preferred weight" in response.json()["error"] and "finite" in response.json()["error"]
    for value in (2.5, -1, "7"):
        response = sdapi.post(EDITOR, params=params, json={"preferred weight": value}, headers=PAGE_HEADER)
        assert response.status_code == 400 and "out of range" in response.json()["error"], value
    with open(sidecar, encoding="utf8") as f:
        assert strict_json(f.read()) == {"preferred weight": 0.5, "mine": 1}  # nothing was written
    assert sdapi.get(EDITOR, params=params).status_code == 200
    good = sdapi.post(EDITOR, params=params, json={"preferred weight": "1.25"}, headers=PAGE_HEADER)
    assert good.status_code == 200 and good.json()["user_metadata"]["preferred weight"] == 1.25


def test_a_sidecar_with_nan_from_an_older_save_opens_and_is_rewritten_strict(webui_server, sdapi, server_files):
    server_files("num/legacy.safetensors", tiny_lora_bytes(seed=45))
    sidecar = server_files("num/legacy.json",
                           '{"preferred weight": NaN, "civitai": {"score": Infinity}, "activation text": "old"}')
    card = cards(sdapi)["legacy"]
    assert "nan" not in json.dumps(card["prompt"]).lower()  # no `<lora:legacy:nan>` on a click
    params = {"page": "lora", "tabname": "txt2img", "name": "legacy"}
    opened = sdapi.get(EDITOR, params=params)
    assert opened.status_code == 200, opened.text
    weight = next(f for f in opened.json()["fields"] if f["key"] == "preferred weight")
    assert weight["value"] == 0.0
    saved = sdapi.post(EDITOR, params=params, json={"notes": "n"}, headers=PAGE_HEADER)
    assert saved.status_code == 200, saved.text
    with open(sidecar, encoding="utf8") as f:
        data = strict_json(f.read())  # strict: no NaN/Infinity on disk; their text is kept
    assert data == {"preferred weight": "NaN", "civitai": {"score": "Infinity"}, "activation text": "old",
                    "notes": "n"}
    assert sdapi.get(EDITOR, params=params).status_code == 200


def test_metadata_with_huge_counts_opens_in_the_editor_and_the_popup(webui_server, sdapi, server_files):
    metadata = {
        "ss_tag_frequency": '{"1_a": {"huge tag": 1e999, "small tag": 3, "odd": "NaN"}}',
        "ss_dataset_dirs": '{"1_a": {"img_count": 1e999, "n_repeats": 1}}',
        "ss_bucket_info": '{"buckets": {"0": {"resolution": [64, 64], "count": 1e999}}}',
        "ss_training_started_at": "1e999",
    }
    server_files("num/huge.safetensors", tiny_lora_bytes(metadata, seed=46))
    cards(sdapi)
    opened = sdapi.get(EDITOR, params={"page": "lora", "tabname": "txt2img", "name": "huge"})
    assert opened.status_code == 200, opened.text
    data = strict_json(opened.text)
    assert [t[0] for t in data["tags"]][:2] == ["huge tag", "small tag"]
    assert data["tags"][0][1] == 2 ** 53 - 1  # clamped to what the page's numbers hold exactly
    assert any(row[0] == "Dataset size:" for row in data["table"])
    popup = sdapi.get("/sd_extra_networks/metadata", params={"page": "lora", "item": "huge"})
    assert popup.status_code == 200
    shown = strict_json(popup.json()["metadata"])  # the page's JSON.parse must read it
    assert shown["ss_tag_frequency"]["1_a"]["huge tag"] == "Infinity"


# --- item 7: temp files of a killed save -------------------------------------------------------------------------
def test_a_scan_removes_old_temp_files_of_killed_saves_only(webui_server, sdapi, server_files):
    server_files("tmpclean/t.safetensors", tiny_lora_bytes(seed=47))
    old = server_files("tmpclean/.tmp-k1ll3d_x", b'{"half": ')
    fresh = server_files("tmpclean/.tmp-inflight", b"{")
    mine = server_files("tmpclean/.tmpfile-not-ours", b"keep")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(mine, (hour_ago, hour_ago))
    cards(sdapi)  # the pane's Refresh
    assert not os.path.exists(old)
    assert os.path.exists(fresh) and os.path.exists(mine)
    # The Lora scan or the page's own scan removes it, whichever lists the folder first; either says so.
    log = webui_server.log_tail(20000)
    assert "unfinished temporary file" in log and ".tmp-k1ll3d_x" in log


def test_remove_stale_temp_files_leaves_links_folders_and_young_files(tmp_path):
    hour_ago = time.time() - 3600
    (tmp_path / ".tmp-old").write_bytes(b"x")
    (tmp_path / ".tmp-young").write_bytes(b"x")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / "target").write_bytes(b"keep")
    os.symlink(tmp_path / "target", tmp_path / ".tmp-link")
    for name in (".tmp-old", ".tmp-dir", "target"):
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    removed = atomic.remove_stale_temp_files(str(tmp_path))
    assert removed == [str(tmp_path / ".tmp-old")]
    assert sorted(os.listdir(tmp_path)) == [".tmp-dir", ".tmp-link", ".tmp-young", "target"]
