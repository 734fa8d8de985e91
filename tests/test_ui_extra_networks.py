"""Card framework and Lora card page without a server: prompt expressions, preview and description look-ups,
incremental discovery, item caching, same-stem names, the editor's writes, background hashing, gradio options."""
import hashlib
import json
import os
import time

import pytest
from conftest import tiny_lora_bytes

from modules import ui_extra_networks


def test_prompt_expression_parts():
    parts = ui_extra_networks.prompt_parts_from_js('"<lora:a\\"b:" + opts.extra_networks_default_multiplier + ">"')
    assert parts == [{"text": '<lora:a"b:'}, {"opt": "extra_networks_default_multiplier"}, {"text": ">"}]
    assert ui_extra_networks.prompt_parts_from_js('"x" + 0.8') == [{"text": "x"}, {"text": "0.8"}]
    assert ui_extra_networks.prompt_parts_from_js("") == []
    for bad in ('alert(1)', '"a" +', '"a" "b"', 'opts["x"]', '"a" + window.x'):
        assert ui_extra_networks.prompt_parts_from_js(bad) is None, bad


def test_quote_js_is_json():
    assert ui_extra_networks.quote_js('a"b\nc') == '"a\\"b\\nc"'


def test_preview_extension_order_is_fixed():
    extensions = ui_extra_networks.allowed_preview_extensions_with_extra(["PNG", "jxl"])
    assert extensions == ["png", "jpg", "jpeg", "webp", "gif", "jxl"]


def test_servable_preview_needs_folder_and_extension(tmp_path):
    page = ui_extra_networks.ExtraNetworksPage("Test")
    page.allowed_directories_for_previews = lambda: [str(tmp_path / "loras")]
    ui_extra_networks.extra_pages.append(page)
    try:
        inside = str(tmp_path / "loras" / "a.png")
        assert ui_extra_networks.is_servable_preview(inside)
        assert not ui_extra_networks.is_servable_preview(str(tmp_path / "loras" / "a.safetensors"))
        assert not ui_extra_networks.is_servable_preview(str(tmp_path / "other.png"))
        assert not ui_extra_networks.is_servable_preview(str(tmp_path / "loras" / ".." / "x.png"))
        assert not ui_extra_networks.is_servable_preview(str(tmp_path / "loras2" / "x.png"))
    finally:
        ui_extra_networks.extra_pages.remove(page)


@pytest.mark.parametrize("files, expected", [
    (["x.png", "x.preview.webp", "x.jpg"], "x.preview.webp"),  # every .preview.<ext> before any <stem>.<ext>
    (["x.preview.gif", "x.preview.jpeg"], "x.preview.jpeg"),  # then the fixed extension order
    (["x.webp", "x.jpg"], "x.jpg"),
    (["x.gif"], "x.gif"),
    (["y.png", "x.txt"], None),
])
def test_preview_priority(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    page = ui_extra_networks.ExtraNetworksPage("Test")
    found = page.find_preview_path(os.path.join(str(tmp_path), "x"))
    assert (os.path.basename(found) if found else None) == expected


def test_descriptions_and_search_path(tmp_path):
    (tmp_path / "x.description.txt").write_text("hello \xff", encoding="latin-1")
    page = ui_extra_networks.ExtraNetworksPage("Test")
    stem = os.path.join(str(tmp_path), "x")
    assert page.find_description(stem).startswith("hello")
    (tmp_path / "x.txt").write_text("plain", encoding="utf8")
    page.lister.invalidate(str(tmp_path))
    assert page.find_description(stem) == "plain"  # <stem>.txt before <stem>.description.txt
    assert page.search_terms_from_path(stem + ".safetensors", [str(tmp_path)]) == \
        os.path.basename(str(tmp_path)) + "/x.safetensors"


def test_lora_training_tags():
    from ui_edit_user_metadata import build_tags

    metadata = {"ss_tag_frequency": {"a": {"red": 3, " blue ": 1}, "b": {"red": 2}}}
    assert build_tags(metadata) == [("red", 5), ("blue", 1)]
    sentences = {"ss_tag_frequency": {"a": {"a photo of a red house by the sea": 2, "the red sky at night": 1}}}
    tags = dict(build_tags(sentences))
    assert tags["red"] == 3 and "a" not in tags and "of" not in tags


def test_supported_kwargs_keeps_only_what_the_component_takes():
    class OldHTML:  # gradio 3.41's gr.HTML has neither option
        def __init__(self, value="", elem_id=None):
            pass

    assert ui_extra_networks._supported_kwargs(OldHTML, padding=False, elem_id="x") == {"elem_id": "x"}


# --- discovery ------------------------------------------------------------------------------------------------------
def _write(folder, rel: str, data: bytes) -> str:
    path = os.path.join(str(folder), *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _age_folders(root) -> None:
    """Folder mtimes well in the past, so the quick rescan trusts them (see DirState.settled)."""
    old = time.time() - 60
    for dirpath, _, _ in os.walk(str(root)):
        os.utime(dirpath, (old, old))


def test_missing_name_never_triggers_a_full_rescan(lora_dir):
    import lora_discovery
    import lora_folders

    _write(lora_dir, "a.safetensors", tiny_lora_bytes(seed=1))
    lora_discovery.list_available_networks()
    _age_folders(lora_dir)
    lora_discovery.rescan_changed_folders()  # folders now known as settled
    full_scans = lora_discovery.scan_count
    scanned = []
    real_scan_dir = lora_folders._scan_dir

    def counting_scan_dir(path, st, old=None):
        scanned.append(path)
        return real_scan_dir(path, st, old)

    lora_folders._scan_dir = counting_scan_dir
    try:
        found, missing = lora_discovery.find_networks(["a", "nope"])
        assert list(found) == ["a"] and missing == ["nope"]
        assert scanned == []  # nothing changed: one stat per folder, no listing

        # A file added to a new sub-folder after the last scan is found by name, without a full rescan.
        _write(lora_dir, "sub/later.safetensors", tiny_lora_bytes(seed=2))
        found, missing = lora_discovery.find_networks(["later"])
        assert found["later"].filename.endswith(os.path.join("sub", "later.safetensors")) and not missing
        assert set(scanned) == {str(lora_dir), os.path.join(str(lora_dir), "sub")}
    finally:
        lora_folders._scan_dir = real_scan_dir
    assert lora_discovery.scan_count == full_scans


def test_rescan_reuses_unchanged_records_and_rereads_changed_ones(lora_dir, monkeypatch):
    import lora_discovery
    import network

    a = _write(lora_dir, "a.safetensors", tiny_lora_bytes({"ss_output_name": "alpha"}, seed=1))
    _write(lora_dir, "b.safetensors", tiny_lora_bytes(seed=2))
    lora_discovery.list_available_networks()
    first = dict(lora_discovery.available_networks)
    created = []
    real_init = network.NetworkOnDisk.__init__

    def counting_init(self, *args, **kwargs):
        created.append(args[1])
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(network.NetworkOnDisk, "__init__", counting_init)
    generation = lora_discovery.maps_generation
    lora_discovery.list_available_networks()
    assert created == [] and lora_discovery.maps_generation == generation
    assert all(lora_discovery.available_networks[k] is v for k, v in first.items())
    with open(a, "wb") as f:
        f.write(tiny_lora_bytes({"ss_output_name": "alpha2"}, seed=1))
    os.utime(a, (time.time() + 5, time.time() + 5))
    lora_discovery.list_available_networks()
    assert created == [a]
    assert lora_discovery.available_networks["a"].alias == "alpha2"
    assert lora_discovery.available_networks["b"] is first["b"]


def test_hidden_folders_follow_list_hidden_files(lora_dir, monkeypatch):
    import lora_discovery

    from modules import shared

    _write(lora_dir, ".private/secret.safetensors", tiny_lora_bytes(seed=3))
    lora_discovery.list_available_networks()
    assert "secret" in lora_discovery.available_networks
    monkeypatch.setitem(shared.opts.data, "list_hidden_files", False)
    lora_discovery.list_available_networks()
    assert "secret" not in lora_discovery.available_networks


# --- the Lora page ----------------------------------------------------------------------------------------------------
@pytest.fixture
def lora_page(lora_dir):
    import ui_extra_networks_lora

    page = ui_extra_networks_lora.ExtraNetworksPageLora()
    ui_extra_networks.extra_pages.append(page)
    yield page
    ui_extra_networks.extra_pages.remove(page)
    import lora_hashing
    lora_hashing.stop()


def _items(page) -> dict:
    return {item["name"]: item for item in page.list_items()}


def test_same_stem_files_are_distinct_cards_with_path_names(lora_page, lora_dir):
    import lora_discovery

    one = _write(lora_dir, "chars/twin.safetensors", tiny_lora_bytes({"ss_output_name": "twin"}, seed=1))
    two = _write(lora_dir, "styles/twin.safetensors", tiny_lora_bytes({"ss_output_name": "twin"}, seed=2))
    lora_page.do_refresh()
    items = [i for i in _items(lora_page).values() if i["filename"] in (one, two)]
    assert sorted(i["title"] for i in items) == ["chars/twin", "styles/twin"]
    for item in items:
        inserted = item["prompt_parts"][0]["text"]
        name = inserted[len("<lora:"):-1]
        assert name == item["title"]
        assert lora_discovery.find_network(name).filename == item["filename"]  # the tag finds this very file


def test_items_are_rebuilt_only_when_their_files_change(lora_page, lora_dir):
    import lora_hashing

    a = _write(lora_dir, "f/a.safetensors", tiny_lora_bytes(seed=1))
    _write(lora_dir, "f/b.safetensors", tiny_lora_bytes(seed=2))
    _write(lora_dir, "g/c.safetensors", tiny_lora_bytes(seed=3))
    lora_page.do_refresh()
    assert lora_hashing.wait(60)  # new hashes change the cards: let them arrive first
    body, _, etag = lora_page.cards_json("txt2img")
    first = _items(lora_page)
    lora_page.do_refresh()
    assert lora_page.cards_json("txt2img")[2] == etag  # nothing changed: the same payload and etag
    again = _items(lora_page)
    assert all(again[k] is first[k] for k in first)

    with open(a[:-len(".safetensors")] + ".json", "w", encoding="utf8") as f:
        json.dump({"activation text": "new words"}, f)
    lora_page.do_refresh()
    after = _items(lora_page)
    assert after["a"] is not first["a"] and after["a"]["prompt_parts"][-1] == {"text": " new words"}
    assert after["b"] is first["b"] and after["c"] is first["c"]  # b shares the folder, c does not
    assert lora_page.cards_json("txt2img")[2] != etag


def test_card_data_sort_keys_and_search_terms(lora_page, lora_dir):
    metadata = {"ss_tag_frequency": json.dumps({"1_a": {"otter": 5, "lake": 2}}), "ss_output_name": "ali"}
    path = _write(lora_dir, "card.safetensors", tiny_lora_bytes(metadata, seed=4))
    os.utime(path, (1.6e9, 1.6e9))
    lora_page.do_refresh()
    payload = json.loads(lora_page.cards_json("txt2img")[0])
    card = next(c for c in payload["items"] if c["name"] == "card")
    assert card["sort"]["date_modified"] == 1600000000  # the mtime, not the ctime (A1111 swaps them: 13B-14)
    assert card["sort"]["date_created"] <= card["sort"]["date_modified"] + 1
    assert "default" not in card["sort"]  # Path order is the list order
    assert "otter, lake" in card["terms"] and "ali" in card["terms"]
    assert card["alias"] == "ali" and card["prompt"][0] == "<lora:ali:"


# --- the editor -------------------------------------------------------------------------------------------------------
def test_editor_save_keeps_other_keys_and_refuses_other_folders(lora_page, lora_dir, tmp_path):
    from ui_edit_user_metadata import LoraUserMetadataEditor

    from modules.ui_extra_networks_user_metadata import EditorError

    path = _write(lora_dir, "ed/e.safetensors", tiny_lora_bytes(seed=5))
    sidecar = path[:-len(".safetensors")] + ".json"
    with open(sidecar, "w", encoding="utf8") as f:
        json.dump({"sd version": "SD1", "civitai": {"id": 7}}, f)
    lora_page.do_refresh()
    _items(lora_page)
    editor = LoraUserMetadataEditor(None, "txt2img", lora_page)
    editor.save_user_metadata("e", {"activation text": "hi", "preferred weight": "1.5", "notes": "ü",
                                    "unknown field": "ignored"})
    with open(sidecar, encoding="utf8") as f:
        saved = json.load(f)
    assert saved == {"sd version": "SD1", "civitai": {"id": 7}, "activation text": "hi", "preferred weight": 1.5,
                     "notes": "ü"}
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".") or n.endswith(".tmp")] == []
    with pytest.raises(EditorError):
        editor.save_user_metadata("e", {"sd version": "SD9"})

    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(tiny_lora_bytes(seed=6))
    lora_page.items["intruder"] = {"name": "intruder", "filename": str(outside)}
    with pytest.raises(EditorError, match="outside"):
        editor.save_user_metadata("intruder", {"notes": "x"})
    assert not (tmp_path / "elsewhere" / "x.json").exists()


def test_replace_preview_overwrites_the_shown_preview_or_writes_the_a1111_name(lora_page, lora_dir):
    import io

    from PIL import Image, PngImagePlugin
    from ui_edit_user_metadata import LoraUserMetadataEditor

    path = _write(lora_dir, "pv/p.safetensors", tiny_lora_bytes(seed=7))
    base = path[:-len(".safetensors")]
    lora_page.do_refresh()
    _items(lora_page)
    editor = LoraUserMetadataEditor(None, "txt2img", lora_page)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a boat, Steps: 2")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG", pnginfo=info)
    assert editor.save_preview("p", buf.getvalue()) == base + ".png"  # no preview yet: <stem>.<samples_format>
    with Image.open(base + ".png") as image:
        assert image.info["parameters"] == "a boat, Steps: 2"
    Image.new("RGB", (4, 4)).save(base + ".preview.webp")
    lora_page.lister.invalidate(os.path.dirname(path))
    assert editor.save_preview("p", buf.getvalue()) == base + ".preview.webp"  # the file the card shows
    with Image.open(base + ".preview.webp") as image:
        assert image.format == "WEBP" and image.size == (8, 8)
    assert "p.preview.webp" in lora_page.create_item("p")["preview"]


# --- background hashing -----------------------------------------------------------------------------------------------
def test_background_hashing_hashes_new_files_into_the_cache(lora_page, lora_dir):
    import lora_discovery
    import lora_hashing

    from modules import hashes

    data = tiny_lora_bytes({"ss_output_name": "h"}, seed=8)
    path = _write(lora_dir, "hash/h.safetensors", data)
    lora_discovery.list_available_networks()  # the page started the worker: new records are queued
    assert lora_hashing.wait(60)
    entry = lora_discovery.available_networks["h"]
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n:]).hexdigest()  # kohya's tensor-data hash, computed independently
    assert entry.hash == expected and lora_discovery.available_network_hash_lookup[expected[:12]] is entry
    assert hashes.sha256_from_cache(path, "lora/" + path, use_addnet_hash=True) == expected
    status = lora_hashing.status()
    assert status["done"] == status["total"] >= 1 and not status["running"]
    assert lora_page.background_status()["label"] == "Hashing"


def test_a_file_whose_header_length_overflows_does_not_stop_the_hashing_run(lora_page, lora_dir):
    import lora_discovery
    import lora_hashing

    _write(lora_dir, "hashbad/aa_bad.safetensors", (2**63 + 5).to_bytes(8, "little") + b"{}")  # seek() raises
    data = tiny_lora_bytes({"ss_output_name": "after_bad"}, seed=9)
    _write(lora_dir, "hashbad/zz_good.safetensors", data)
    errors_before = lora_hashing.status()["errors"]
    lora_discovery.list_available_networks()
    assert lora_hashing.wait(60)
    n = int.from_bytes(data[:8], "little")
    assert lora_discovery.available_networks["zz_good"].hash == hashlib.sha256(data[8 + n:]).hexdigest()
    assert lora_hashing.status()["errors"] == errors_before + 1
