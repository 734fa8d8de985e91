"""The Lora cards tab in headless Chromium: drag into the prompt, weight keys, search fields, remembered sort,
dirs and tree views, hidden folders, the metadata popup, copy path, the editor (tag cloud, random prompt, cancel,
replace preview), background hashing and the version filter after a checkpoint switch.

Screenshots go to test-artifacts/. Every test cleans up the files it made (the server is shared).
"""
import json
import os
import time

import pytest
from conftest import ARTIFACTS_DIR, tiny_lora_bytes

PROMPT = "#txt2img_prompt textarea"
NEGATIVE = "#txt2img_neg_prompt textarea"
CARDS = "#txt2img_lora_cards"
SEARCH = "#txt2img_lora_extra_search"
PANE = "window.extraNetworksPanes.get('txt2img_lora_pane')"


def shot(page, name: str) -> None:
    os.makedirs(ARTIFACTS_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS_DIR, f"cards_{name}.png"), full_page=True)


def open_lora_tab(page) -> None:
    page.get_by_role("tab", name="Lora").click()
    page.wait_for_selector(f"{CARDS} .card", timeout=30000)


def card(page, name: str):
    return page.locator(f"{CARDS} .card[data-name={json.dumps(name)}]")


def search(page, text: str) -> None:
    page.locator(SEARCH).fill(text)


def shown_names(page) -> list[str]:
    return page.eval_on_selector_all(f"{CARDS} .card", "cards => cards.map(c => c.dataset.name)")


def refresh_until(page, condition_js: str) -> None:
    """Clicks Refresh and waits until `condition_js` (an expression over `pane`) holds."""
    page.locator("#txt2img_lora_extra_refresh").click()
    page.wait_for_function(f"() => {{ const pane = {PANE}; return !pane.loading && ({condition_js}); }}",
                           timeout=30000)


def has_item(name: str) -> str:
    return f"pane.items.some(i => i.name === {json.dumps(name)})"


def card_text(page, name: str) -> str:
    return page.evaluate(f"""() => {{ const pane = {PANE};
        return pane.cardTexts(pane.items.find(i => i.name === {json.dumps(name)})).text; }}""")


def x_of_offset(page, selector: str, text_before: str) -> float:
    """The viewport x of the caret after `text_before` on the textarea's first line, measured with a canvas in the
    textarea's own font (independent of the page's drop code)."""
    return page.evaluate("""([selector, before]) => {
        const area = document.querySelector(selector);
        const style = getComputedStyle(area);
        const ctx = document.createElement("canvas").getContext("2d");
        ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
        const rect = area.getBoundingClientRect();
        return rect.left + parseFloat(style.borderLeftWidth) + parseFloat(style.paddingLeft) +
            ctx.measureText(before).width;
    }""", [selector, text_before])


def drop_card(page, name: str, selector: str, x: float) -> None:
    area = page.locator(selector)
    box = area.bounding_box()
    style_top = page.evaluate("""s => { const st = getComputedStyle(document.querySelector(s));
        return parseFloat(st.borderTopWidth) + parseFloat(st.paddingTop) + parseFloat(st.lineHeight || 16) / 2; }""",
                              selector)
    card(page, name).drag_to(area, target_position={"x": x - box["x"], "y": style_top})


@pytest.fixture(scope="module")
def page(cards_page):
    yield cards_page
    assert not cards_page.page_errors, cards_page.page_errors
    assert not cards_page.dialogs, cards_page.dialogs


def test_drag_card_lands_at_drop_point_and_gradio_sees_it(page, sd1_lora):
    page.locator(PROMPT).fill("a red house by the sea")
    page.locator(NEGATIVE).fill("")
    open_lora_tab(page)
    search(page, "")
    inserted = card_text(page, sd1_lora)
    events = page.evaluate("""() => { window.__inputs = 0; const a = document.querySelector('#txt2img_prompt textarea');
        a.addEventListener('input', () => window.__inputs++); return 0; }""")
    # Drop two letters into "house": the drop snaps to the nearer word edge, never splitting the word.
    drop_card(page, sd1_lora, PROMPT, x_of_offset(page, PROMPT, "a red ho"))
    value = page.locator(PROMPT).input_value()
    assert value == f"a red {inserted} house by the sea", value
    assert page.evaluate("() => window.__inputs") >= 1 + events
    shot(page, "dragged")

    # Dragged again to the end: the tag moves (no duplicate).
    drop_card(page, sd1_lora, PROMPT, x_of_offset(page, PROMPT, value) + 20)
    value = page.locator(PROMPT).input_value()
    assert value == f"a red house by the sea {inserted}", value

    # Gradio has the dropped text: the generation uses the LoRA.
    page.get_by_role("tab", name="Generation").click()
    for field, number in (("steps", "4"), ("width", "64"), ("height", "64")):
        page.locator(f"#txt2img_{field} input[type=number]").fill(number)
        page.locator(f"#txt2img_{field} input[type=number]").press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => (document.querySelector('#html_info_txt2img')?.innerText || '')"
                           ".includes('Lora hashes')", timeout=120000)
    assert f'"{sd1_lora}: ' in page.locator("#html_info_txt2img").inner_text()


def test_drag_into_negative_prompt_inserts_negative_text(page, server_files):
    server_files("neg_drag/neg_card.safetensors", tiny_lora_bytes({"ss_output_name": "neg_card"}, seed=3))
    server_files("neg_drag/neg_card.json", json.dumps({"negative text": "blurry", "activation text": "crisp"}))
    page.locator(PROMPT).fill("a cat")
    page.locator(NEGATIVE).fill("ugly hands")
    open_lora_tab(page)
    refresh_until(page, has_item("neg_card"))
    search(page, "neg_card")
    card(page, "neg_card").wait_for(timeout=10000)
    drop_card(page, "neg_card", NEGATIVE, x_of_offset(page, NEGATIVE, "ugly"))
    assert page.locator(NEGATIVE).input_value() == "ugly (blurry:1) hands"
    assert page.locator(PROMPT).input_value() == "a cat"
    # Into the positive prompt: the tag and activation text there, the negative text added once.
    drop_card(page, "neg_card", PROMPT, x_of_offset(page, PROMPT, "a"))
    assert page.locator(PROMPT).input_value() == "a <lora:neg_card:1> crisp cat"
    assert page.locator(NEGATIVE).input_value() == "ugly (blurry:1) hands"
    search(page, "")


def test_click_removes_tag_whatever_weight_or_arguments(page, sd1_lora):
    open_lora_tab(page)
    search(page, "")
    alias = page.evaluate(f"() => {PANE}.items.find(i => i.name === {json.dumps(sd1_lora)}).alias") or sd1_lora
    for written in (f"<lora:{alias}:-0.35e-1>", f"<lora:{alias}:0.5:unet=0.2:te=1>", f"<lyco:{alias}>"):
        page.locator(PROMPT).fill(f"a cat {written}")
        card(page, sd1_lora).click()
        assert page.locator(PROMPT).input_value() == "a cat", written


@pytest.mark.parametrize("text, caret, keys, expected", [
    ("a <lora:x:0.5> b", 8, ["Control+ArrowUp"], "a <lora:x:0.55> b"),
    ("a <lora:x:0.5> b", 13, ["Control+ArrowDown", "Control+ArrowDown"], "a <lora:x:0.4> b"),
    ("<lora:x:-0.1:unet=1>", 3, ["Control+ArrowUp", "Control+ArrowUp", "Control+ArrowUp"], "<lora:x:0.05:unet=1>"),
    ("plain words", 3, ["Control+ArrowUp"], "plain words"),
])
def test_ctrl_arrows_edit_the_weight_under_the_caret(page, text, caret, keys, expected):
    area = page.locator(PROMPT)
    area.fill(text)
    area.evaluate("(a, c) => { a.focus(); a.setSelectionRange(c, c); window.__weightInputs = 0;"
                  " a.addEventListener('input', () => window.__weightInputs++, {once: true}); }", caret)
    for key in keys:
        area.press(key)
    assert area.input_value() == expected
    if expected != text:
        assert page.evaluate("() => window.__weightInputs") == 1  # gradio was told
    area.fill("")


def test_search_covers_alias_hash_description_activation_and_tags(page, server_files, sdapi):
    metadata = {"ss_output_name": "zebra_alias", "ss_tag_frequency": json.dumps({"1_x": {"quokka tag": 3}})}
    server_files("searchable/search_me.safetensors", tiny_lora_bytes(metadata, seed=5))
    server_files("searchable/search_me.json", json.dumps({"activation text": "narwhal words",
                                                          "description": "a wombat description"}))
    open_lora_tab(page)
    refresh_until(page, has_item("search_me"))
    # The background hasher hashes the new file; its hash becomes searchable without pressing Refresh.
    page.wait_for_function(f"() => {PANE}.items.find(i => i.name === 'search_me').terms.some(t => /^[0-9a-f]{{64}}$/"
                           ".test(t))", timeout=60000)
    full_hash = page.evaluate(f"() => {PANE}.items.find(i => i.name === 'search_me').terms.find(t => "
                              "/^[0-9a-f]{64}$/.test(t))")
    for query in ("ZEBRA_alias", full_hash[:16], "wombat", "narwhal", "quokka", "searchable/search"):
        search(page, query)
        assert shown_names(page) == ["search_me"], query
    search(page, "")


def test_progress_line_shows_background_work(page):
    open_lora_tab(page)
    page.evaluate(f"() => {PANE}.showBackground({{running: true, done: 3, total: 10, label: 'Hashing', "
                  "current: 'x', generation: 1})")
    progress = page.locator("#txt2img_lora_pane .extra-network-progress")
    assert progress.is_visible() and progress.inner_text() == "Hashing 3/10"
    shot(page, "hashing_progress")
    # The page's own poll replaces it with the server's real status (nothing running).
    page.wait_for_function("() => document.querySelector('#txt2img_lora_pane .extra-network-progress').hidden",
                           timeout=15000)


def test_sort_buttons_order_cards_and_the_choice_survives_a_reload(page, server_files):
    # Path order: sortz/ before sortz/deeper/; names compare naturally (c9 before c10); mtimes set apart.
    files = {"sortz/sort_b": 3000, "sortz/sort_c10": 1000, "sortz/sort_c9": 4000, "sortz/deeper/sort_a": 2000}
    for index, (rel, mtime) in enumerate(files.items()):
        path = server_files(rel + ".safetensors", tiny_lora_bytes(seed=20 + index))
        os.utime(path, (1.7e9 + mtime, 1.7e9 + mtime))
    open_lora_tab(page)
    refresh_until(page, has_item("sort_a"))
    search(page, "sortz/")
    buttons = "#txt2img_lora_pane .extra-network-control--sort"
    direction = page.locator("#txt2img_lora_pane .extra-network-control--sort-dir")
    expected = {"default": ["sort_b", "sort_c9", "sort_c10", "sort_a"],
                "name": ["sort_a", "sort_b", "sort_c9", "sort_c10"],
                "date_modified": ["sort_c10", "sort_a", "sort_b", "sort_c9"]}
    for key, names in expected.items():
        page.locator(f"{buttons}[data-sort-key='{key}']").click()
        assert shown_names(page) == names, key
    direction.click()
    assert shown_names(page) == expected["date_modified"][::-1]
    page.locator(f"{buttons}[data-sort-key='name']").click()
    assert shown_names(page) == expected["name"][::-1]
    page.reload()
    page.wait_for_selector(PROMPT, timeout=90000)
    open_lora_tab(page)
    search(page, "sortz/")
    assert "extra-network-control--enabled" in page.locator(f"{buttons}[data-sort-key='name']").get_attribute("class")
    assert direction.get_attribute("data-sortdir") == "Descending"
    assert shown_names(page) == expected["name"][::-1]
    page.locator(f"{buttons}[data-sort-key='default']").click()  # back to the default for the other tests
    direction.click()
    search(page, "")


def test_dirs_view_hidden_folder_and_same_stem_cards(page, server_files):
    server_files("dirs_a/twin.safetensors", tiny_lora_bytes(seed=6))
    server_files("dirs_b/twin.safetensors", tiny_lora_bytes(seed=7))
    server_files(".stash/hidden_one.safetensors", tiny_lora_bytes(seed=8))
    open_lora_tab(page)
    refresh_until(page, "pane.items.filter(i => /twin$/.test(i.name)).length === 2 && " + has_item("hidden_one"))
    search(page, "")
    twins = page.evaluate(f"() => {PANE}.items.filter(i => /twin$/.test(i.name)).map(i => i.title)")
    assert sorted(twins) == ["dirs_a/twin", "dirs_b/twin"]
    # Dir buttons put their folder into the search box.
    page.locator("#txt2img_lora_pane .extra-network-dir-button", has_text="dirs_b/").click()
    assert page.locator(SEARCH).input_value() == "dirs_b/"
    names = shown_names(page)
    assert len(names) == 1 and names[0].endswith("twin")
    card(page, names[0]).click()
    assert "<lora:dirs_b/twin:1>" in page.locator(PROMPT).input_value()
    card(page, names[0]).click()
    # A card under a dot folder shows only when searched with 4+ characters (extra_networks_hidden_models).
    search(page, "")
    assert "hidden_one" not in shown_names(page)
    search(page, "hid")
    assert "hidden_one" not in shown_names(page)
    search(page, "hidden_o")
    assert shown_names(page) == ["hidden_one"]
    search(page, "")
    shot(page, "dirs")


def test_tree_view_select_expand_collapse_and_file_click(page, sdapi, server_files):
    server_files("tree_top/tree_sub/tree_leaf.safetensors", tiny_lora_bytes(seed=9))
    server_files("tree_top/tree_file.safetensors", tiny_lora_bytes(seed=10))
    before = sdapi.get("/sdapi/v1/options").json()["extra_networks_tree_view_style"]
    assert sdapi.post("/sdapi/v1/options", json={"extra_networks_tree_view_style": "Tree"}).status_code == 200
    try:
        open_lora_tab(page)
        refresh_until(page, has_item("tree_leaf") + " && pane.opts.extra_networks_tree_view_style === 'Tree'")
        tree = page.locator("#txt2img_lora_pane .extra-network-dirs")
        root_children = page.eval_on_selector_all(
            "#txt2img_lora_pane .tree-list--tree > li > ul > li",
            "lis => lis.map(li => li.classList.contains('tree-list-item--dir') ? 'dir' : 'file')")
        assert root_children == sorted(root_children)  # folders ("dir") before files ("file")
        top = tree.locator(".tree-list-content-dir[data-tree-path='Lora/tree_top']")
        top.click()  # closed → selected and open: the search shows the folder
        assert page.locator(SEARCH).input_value() == "Lora/tree_top/"
        assert sorted(shown_names(page)) == ["tree_file", "tree_leaf"]
        sub = tree.locator(".tree-list-content-dir[data-tree-path='Lora/tree_top/tree_sub']")
        assert sub.is_visible()
        sub.locator(".tree-list-item-action--chevron").click()  # the chevron only opens
        assert page.locator(SEARCH).input_value() == "Lora/tree_top/"
        tree.locator(".tree-list-content-file", has_text="tree_leaf").click()  # a file inserts its tag
        assert "<lora:tree_leaf:1>" in page.locator(PROMPT).input_value()
        shot(page, "tree")
        top.click()  # selected and open → closed, deselected, search cleared
        assert page.locator(SEARCH).input_value() == ""
        assert not sub.is_visible()
    finally:
        sdapi.post("/sdapi/v1/options", json={"extra_networks_tree_view_style": before})
        page.locator(PROMPT).fill("")
        refresh_until(page, "pane.opts.extra_networks_tree_view_style !== 'Tree'")


def test_metadata_popup_and_copy_path(page, server_files):
    cover = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"1_a": {"otter": 2}}),
                "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "Popup title",
                "ssmd_cover_images": json.dumps([cover])}
    path = server_files("popup/popup_card.safetensors", tiny_lora_bytes(metadata, seed=11))
    open_lora_tab(page)
    refresh_until(page, has_item("popup_card"))
    search(page, "popup_card")
    target = card(page, "popup_card")
    assert "cover-images" in target.locator("img.preview").get_attribute("src")  # the embedded cover
    target.hover()
    target.locator(".copy-path-button").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == path
    target.locator(".metadata-button").click()
    popup = page.locator(".global-popup table.popup-metadata").first
    popup.wait_for(timeout=10000)
    text = popup.inner_text()
    assert "ss_network_dim" in text and "otter" in text and "ssmd_cover_images" not in text
    nested = page.locator(".global-popup tr", has=page.locator("th", has_text="modelspec")).first
    assert "architecture" in nested.inner_text() and "Popup title" in nested.inner_text()
    shot(page, "metadata_popup")
    page.keyboard.press("Escape")
    assert page.locator(".global-popup").count() == 0
    search(page, "")


def test_editor_tag_cloud_random_prompt_and_cancel(page, server_files):
    tags = {"1_a": {"red coat": 9, "snow": 5, "lamp": 2}}
    server_files("editor/tag_card.safetensors", tiny_lora_bytes({"ss_tag_frequency": json.dumps(tags)}, seed=12))
    sidecar = server_files("editor/tag_card.json", json.dumps({"activation text": "snow", "custom key": [1, 2]}))
    before = os.stat(sidecar).st_mtime_ns
    open_lora_tab(page)
    refresh_until(page, has_item("tag_card"))
    search(page, "tag_card")
    target = card(page, "tag_card")
    target.hover()
    target.locator(".edit-button").click()
    editor = page.locator(".extra-network-editor")
    editor.wait_for(timeout=10000)
    assert editor.locator(".editor-tag-name").all_inner_texts() == ["red coat", "snow", "lamp"]
    activation = editor.locator("input[data-key='activation text']")
    editor.locator(".editor-tag", has_text="red coat").click()
    assert activation.input_value() == "snow, red coat"
    editor.locator(".editor-tag", has_text="snow").click()
    assert activation.input_value() == "red coat"
    editor.locator(".editor-random button", has_text="Generate").click()
    random_text = editor.locator(".editor-random textarea").input_value()
    picked = random_text.split(", ")
    assert "red coat" in picked and picked == sorted(picked) and set(picked) <= {"red coat", "snow", "lamp"}
    assert editor.locator(".editor-table").inner_text().startswith("Filename:")
    shot(page, "editor_tags")
    editor.locator("button", has_text="Cancel").click()
    page.wait_for_selector(".extra-network-editor", state="detached", timeout=10000)
    assert os.stat(sidecar).st_mtime_ns == before  # nothing written

    # Save keeps keys the editor does not know and refreshes just that card.
    target.hover()
    target.locator(".edit-button").click()
    editor.wait_for(timeout=10000)
    editor.locator("textarea[data-key='notes']").fill("my notes")
    editor.locator("select[data-key='sd version']").select_option("SDXL")
    editor.locator("button", has_text="Save").click()
    page.wait_for_selector(".extra-network-editor", state="detached", timeout=10000)
    with open(sidecar, encoding="utf8") as f:
        saved = json.load(f)
    assert saved["custom key"] == [1, 2] and saved["notes"] == "my notes" and saved["sd version"] == "SDXL"
    assert saved["activation text"] == "snow"
    page.wait_for_function(f"() => {PANE}.items.find(i => i.name === 'tag_card').sd === 'SDXL'", timeout=10000)
    search(page, "")


def test_replace_preview_uses_the_last_generated_image(page, server_files):
    lora = server_files("preview_swap/swap_card.safetensors", tiny_lora_bytes(seed=13))
    target_png = lora[:-len(".safetensors")] + ".png"
    page.get_by_role("tab", name="Generation").click()
    page.locator(PROMPT).fill("a small boat")
    for field, number in (("steps", "2"), ("width", "64"), ("height", "64")):
        page.locator(f"#txt2img_{field} input[type=number]").fill(number)
        page.locator(f"#txt2img_{field} input[type=number]").press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => (document.querySelector('#html_info_txt2img')?.innerText || '').includes('boat')",
                           timeout=120000)
    open_lora_tab(page)
    refresh_until(page, has_item("swap_card"))
    search(page, "swap_card")
    target = card(page, "swap_card")
    assert target.locator("img.preview").count() == 0
    target.hover()
    target.locator(".edit-button").click()
    page.locator(".extra-network-editor button", has_text="Replace preview").click()
    page.wait_for_selector(".extra-network-editor .editor-status:has-text('Preview replaced')", timeout=20000)
    assert os.path.isfile(target_png)
    from PIL import Image
    with Image.open(target_png) as image:
        assert image.size == (64, 64) and "a small boat" in image.info.get("parameters", "")
    page.wait_for_function(f"() => document.querySelector('{CARDS} .card[data-name=\"swap_card\"] img.preview')",
                           timeout=10000)
    assert "swap_card.png" in target.locator("img.preview").get_attribute("src")
    page.keyboard.press("Escape")
    os.remove(target_png)
    search(page, "")


def test_version_filter_follows_a_checkpoint_switch(page, sdapi, sd1_checkpoint):
    open_lora_tab(page)
    search(page, "demo_")
    sd1_cards = page.evaluate(f"() => {PANE}.items.filter(i => i.sd === 'SD1').map(i => i.name)")
    sdxl_cards = page.evaluate(f"() => {PANE}.items.filter(i => i.sd === 'SDXL').map(i => i.name)")
    assert sd1_cards and sdxl_cards
    shown = shown_names(page)
    assert not set(shown) & set(sdxl_cards)
    sdxl_title = next(m["title"] for m in sdapi.get("/sdapi/v1/sd-models").json() if "tiny-sdxl" in m["title"])
    try:
        dropdown = page.locator("#setting_sd_model_checkpoint input")
        dropdown.click()
        page.get_by_role("option", name=sdxl_title).click()
        page.wait_for_function(f"() => {PANE}.modelFamily === 'SDXL'", timeout=120000)
        page.wait_for_function(f"""() => {{ const shown = Array.from(document.querySelectorAll('{CARDS} .card'))
            .map(c => c.dataset.name); return shown.length && shown.every(n => {json.dumps(sdxl_cards)}.includes(n)
            || !{json.dumps(sd1_cards)}.includes(n)); }}""", timeout=30000)
        toggle = page.locator("#txt2img_lora_pane .extra-network-control--other-models")
        assert toggle.is_visible() and "Show all" in toggle.inner_text()
        toggle.click()  # the other family's cards come back, greyed out
        page.wait_for_selector(f"{CARDS} .card.card-other-model", timeout=10000)
        shot(page, "version_filter_sdxl")
        toggle.click()
    finally:
        response = sdapi.post("/sdapi/v1/options", json={"sd_model_checkpoint": sd1_checkpoint})
        assert response.status_code == 200
        page.wait_for_function(f"() => {PANE}.modelFamily === 'SD1'", timeout=120000)  # followed without a click
    search(page, "")
    time.sleep(0.1)
