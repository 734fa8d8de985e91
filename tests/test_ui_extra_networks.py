"""Card framework pieces that need no server: prompt expressions, training tags, preview paths."""
import os

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


def test_preview_order_is_fixed():
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


def test_lister_finds_previews_and_descriptions(tmp_path):
    (tmp_path / "x.preview.webp").write_bytes(b"")
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "x.description.txt").write_text("hello \xff", encoding="latin-1")
    page = ui_extra_networks.ExtraNetworksPage("Test")
    stem = os.path.join(str(tmp_path), "x")
    assert "x.jpg" in page.find_preview(stem)  # jpg comes before webp in the fixed order
    assert page.find_description(stem).startswith("hello")
    assert page.search_terms_from_path(stem + ".safetensors", [str(tmp_path)]) == \
        os.path.basename(str(tmp_path)) + "/x.safetensors"


def test_lora_training_tags():
    from ui_edit_user_metadata import build_tags

    metadata = {"ss_tag_frequency": {"a": {"red": 3, " blue ": 1}, "b": {"red": 2}}}
    assert build_tags(metadata) == [("red", 5), ("blue", 1)]
    sentences = {"ss_tag_frequency": {"a": {"a photo of a red house by the sea": 2, "the red sky at night": 1}}}
    tags = dict(build_tags(sentences))
    assert tags["red"] == 3 and "a" not in tags and "of" not in tags
