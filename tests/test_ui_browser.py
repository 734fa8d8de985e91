"""The page in headless Chromium (Debian's /usr/bin/chromium): Lora cards, prompt toggling, generation, refresh.

Screenshots go to test-artifacts/.
"""
import os
import shutil
import time

import pytest

ARTIFACTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
PROMPT = "#txt2img_prompt textarea"
NEGATIVE = "#txt2img_neg_prompt textarea"
CARDS = "#txt2img_lora_cards"
SEARCH = "#txt2img_lora_extra_search"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def page(cards_page):
    """One page for the module (conftest's): loading gradio once keeps the tests fast."""
    return cards_page


def shot(page, name: str) -> None:
    os.makedirs(ARTIFACTS_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS_DIR, f"{name}.png"), full_page=True)


def card(page, name: str):
    return page.locator(f"{CARDS} .card[data-name='{name}']")


def open_lora_tab(page) -> None:
    page.get_by_role("tab", name="Lora").click()
    page.wait_for_selector(f"{CARDS} .card", timeout=30000)


def set_prompt(page, text: str) -> None:
    page.locator(PROMPT).fill(text)


def search(page, text: str) -> None:
    page.locator(SEARCH).fill(text)


def visible_card_names(page) -> list[str]:
    return page.eval_on_selector_all(f"{CARDS} .card", "cards => cards.map(c => c.dataset.name)")


def test_prompt_toggle_rules(page):
    """The insertion/removal rules on strings (they fix A1111's regex defect 13B-17)."""
    result = page.evaluate("""() => {
        const t = window.extraNetworksPrompt;
        return {
            insert: t.togglePrompt("a cat", "<lora:x:0.8> trigger words", " "),
            intoEmpty: t.togglePrompt("", "<lora:x:1>", " "),
            anyWeight: t.togglePrompt("a <lora:x:-0.5e-1> b", "<lora:x:1>", " "),
            extraArgs: t.togglePrompt("a <lora:x:1:unet=0.2> b", "<lora:x:1>", " "),
            lyco: t.togglePrompt("a <lyco:x:0.3>", "<lora:x:1>", " "),
            withActivation: t.togglePrompt("a cat <lora:x:0.8> trigger words", "<lora:x:0.8> trigger words", " "),
            atStart: t.togglePrompt("<lora:x:1> a cat", "<lora:x:1>", " "),
            otherNameKept: t.togglePrompt("<lora:xy:1>", "<lora:x:1>", " "),
            regexChars: t.togglePrompt("<lora:a.b(c):1>", "<lora:a.b(c):1>", " "),
            negative: t.togglePrompt("ugly, (bad hands:1.3)", "(bad hands:1)", ", "),
            separator: t.togglePrompt("a cat", "<lora:x:1>", ", "),
        };
    }""")
    assert result["insert"] == "a cat <lora:x:0.8> trigger words"
    assert result["intoEmpty"] == "<lora:x:1>"
    assert result["anyWeight"] == "a b"
    assert result["extraArgs"] == "a b"
    assert result["lyco"] == "a"
    assert result["withActivation"] == "a cat"
    assert result["atStart"] == "a cat"
    assert result["otherNameKept"] == "<lora:xy:1> <lora:x:1>"
    assert result["regexChars"] == ""
    assert result["negative"] == "ugly"
    assert result["separator"] == "a cat, <lora:x:1>"


def test_card_click_toggles_tag_and_generate_shows_image(page, sd1_lora):
    set_prompt(page, "a red house")
    open_lora_tab(page)
    shot(page, "lora_tab")

    card(page, sd1_lora).click()
    value = page.locator(PROMPT).input_value()
    assert value.startswith(f"a red house <lora:{sd1_lora}:"), value
    assert "card-active" in card(page, sd1_lora).get_attribute("class")

    card(page, sd1_lora).click()
    assert page.locator(PROMPT).input_value() == "a red house"

    card(page, sd1_lora).click()
    assert f"<lora:{sd1_lora}:" in page.locator(PROMPT).input_value()

    page.get_by_role("tab", name="Generation").click()
    page.locator("#txt2img_steps input[type=number]").fill("4")
    page.locator("#txt2img_steps input[type=number]").press("Enter")
    for field in ("width", "height"):
        page.locator(f"#txt2img_{field} input[type=number]").fill("64")
        page.locator(f"#txt2img_{field} input[type=number]").press("Enter")
    page.locator("#txt2img_generate").click()
    page.wait_for_selector("#txt2img_gallery img", timeout=120000)
    page.wait_for_function("() => document.querySelector('#html_info_txt2img')?.innerText.includes('Lora hashes')",
                           timeout=120000)
    info = page.locator("#html_info_txt2img").inner_text()
    assert f'Lora hashes: "{sd1_lora}: ' in info
    shot(page, "generated")
    assert not page.page_errors, page.page_errors


def test_missing_lora_comment_and_toast(page):
    set_prompt(page, "a cat <lora:nope:1>")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("() => document.querySelector('#html_info_txt2img .comments')?.innerText"
                           ".includes('Lora not found: nope')", timeout=120000)
    page.wait_for_selector("text=Lora not found: nope >> nth=1", timeout=10000)  # the toast
    shot(page, "missing_lora")


def test_search_filters_cards(page, sd1_lora):
    open_lora_tab(page)
    search(page, "")
    everything = visible_card_names(page)
    assert sd1_lora in everything
    search(page, sd1_lora.upper())
    filtered = visible_card_names(page)
    assert sd1_lora in filtered
    assert len(filtered) < len(everything) or len(everything) == 1
    search(page, "no-such-card-anywhere")
    page.wait_for_selector(f"{CARDS} .extra-network-message:has-text('Nothing matches')")
    assert visible_card_names(page) == []
    search(page, "")
    assert visible_card_names(page) == everything


def test_refresh_picks_up_new_file_and_keeps_search(page, webui_server, sd1_lora):
    open_lora_tab(page)
    source = next(os.path.join(root, f) for root, _, files in os.walk(webui_server.lora_dir) for f in files
                  if f == f"{sd1_lora}.safetensors")
    target = os.path.join(webui_server.lora_dir, "ui_fresh_copy.safetensors")
    evil = os.path.join(webui_server.lora_dir, "<img src=x onerror=window.__xss=1>.safetensors")
    corrupt = os.path.join(webui_server.lora_dir, "ui_corrupt.safetensors")
    search(page, "fresh")
    assert visible_card_names(page) == []
    shutil.copy(source, target)
    shutil.copy(source, evil)
    with open(corrupt, "wb") as f:
        f.write(b"\xff" * 64)
    try:
        page.locator("#txt2img_lora_extra_refresh").click()
        page.wait_for_selector(f"{CARDS} .card[data-name='ui_fresh_copy']", timeout=30000)
        assert page.locator(SEARCH).input_value() == "fresh"
        assert visible_card_names(page) == ["ui_fresh_copy"]

        # File names reach the page as text, never as markup.
        search(page, "onerror")
        page.wait_for_selector(f"{CARDS} .card .name:has-text('<img src=x')", timeout=10000)
        assert page.locator(f"{CARDS} img[src='x']").count() == 0
        assert page.evaluate("() => window.__xss") is None

        # A corrupt file gets a card and the page keeps working.
        search(page, "ui_corrupt")
        page.wait_for_selector(f"{CARDS} .card[data-name='ui_corrupt']", timeout=10000)
        shot(page, "refreshed")
    finally:
        for path in (target, evil, corrupt):
            os.remove(path)
        search(page, "")
        page.locator("#txt2img_lora_extra_refresh").click()
        time.sleep(0.5)
    assert not page.page_errors, page.page_errors


def test_settings_tab_lists_lora_options_and_applies(page, webui_server, sdapi):
    before = sdapi.get("/sdapi/v1/options").json()["extra_networks_default_multiplier"]
    page.get_by_role("tab", name="Settings").click()
    page.get_by_role("tab", name="Extra Networks").click()
    page.wait_for_selector("#setting_extra_networks_default_multiplier", timeout=10000)
    assert page.locator("#setting_lora_add_hashes_to_infotext").count() == 1
    shot(page, "settings")
    wanted = 0.75 if before != 0.75 else 0.5
    field = page.locator("#setting_extra_networks_default_multiplier input")

    def submit(value) -> None:
        """Fills the field, applies the form and waits until the server holds the value (or 30 s pass)."""
        field.fill(str(value))
        field.blur()
        page.locator("#settings_submit").click()
        page.wait_for_selector("#settings_result:has-text('settings changed')", timeout=30000)
        deadline = time.time() + 30
        while sdapi.get("/sdapi/v1/options").json()["extra_networks_default_multiplier"] != value:
            assert time.time() < deadline, f"the server never took {value}"
            time.sleep(0.2)

    try:
        submit(wanted)
        # submit() waited for the server to read back the new value: applied, not only reported
    finally:
        # back through the form itself: a later submit of this form must not bring the test's value back
        submit(before)
    assert sdapi.get("/sdapi/v1/options").json()["extra_networks_default_multiplier"] == before
    page.get_by_role("tab", name="txt2img").click()


def test_editor_saves_sidecar_and_card_uses_it(page, webui_server, sd1_lora):
    open_lora_tab(page)
    search(page, sd1_lora)
    target = card(page, sd1_lora)
    target.hover()
    target.locator(".edit-button").click()
    page.wait_for_selector(".extra-network-editor", timeout=10000)
    page.locator(".extra-network-editor input[data-key='activation text']").fill("editor words")
    page.locator(".extra-network-editor input[data-key='preferred weight']").fill("0.65")
    page.locator(".extra-network-editor input[data-key='negative text']").fill("blurry")
    shot(page, "editor")
    page.locator(".extra-network-editor button:has-text('Save')").click()
    page.wait_for_selector(".extra-network-editor", state="detached", timeout=10000)
    sidecar = next(os.path.join(root, f) for root, _, files in os.walk(webui_server.lora_dir) for f in files
                   if f == f"{sd1_lora}.json")
    try:
        import json
        with open(sidecar, encoding="utf8") as f:
            saved = json.load(f)
        assert saved["activation text"] == "editor words" and saved["preferred weight"] == 0.65
        set_prompt(page, "")
        page.locator(NEGATIVE).fill("")
        page.wait_for_function(f"""() => {{
            const pane = window.extraNetworksPanes.get('txt2img_lora_pane');
            const item = pane.items.find(i => i.name === {sd1_lora!r});
            return item && item.activation === 'editor words';
        }}""", timeout=10000)
        card(page, sd1_lora).click()
        assert page.locator(PROMPT).input_value().endswith(":0.65> editor words")
        assert page.locator(NEGATIVE).input_value() == "(blurry:1)"
        card(page, sd1_lora).click()
        assert page.locator(PROMPT).input_value() == ""
        assert page.locator(NEGATIVE).input_value() == ""
    finally:
        os.remove(sidecar)
        page.evaluate(f"() => window.extraNetworksRefreshSingleCard('lora', 'txt2img', {sd1_lora!r})")
        search(page, "")


def test_ctrl_up_changes_tag_weight(page):
    page.get_by_role("tab", name="Generation").click()
    set_prompt(page, "a <lora:x:0.5> b")
    area = page.locator(PROMPT)
    area.evaluate("a => { a.focus(); a.setSelectionRange(8, 8); }")
    area.press("Control+ArrowUp")
    assert area.input_value() == "a <lora:x:0.55> b"
    area.press("Control+ArrowDown")
    area.press("Control+ArrowDown")
    assert area.input_value() == "a <lora:x:0.45> b"
    set_prompt(page, "")


def test_settings_refuse_a_samples_format_that_is_not_an_image(page, webui_server):
    """samples_format is the extension the image routes and saves use: the settings form refuses `safetensors`
    with a message, and config.json keeps its value."""
    import json

    config_path = os.path.join(webui_server.data_dir, "config.json")
    page.get_by_role("tab", name="Settings").click()
    page.get_by_role("tab", name="Saving images").click()
    box = page.locator("#setting_samples_format").locator("textarea, input").first
    box.wait_for(timeout=10000)
    before = box.input_value()
    box.fill("safetensors")
    try:
        page.locator("#settings_submit").click()
        page.wait_for_function("() => /Failed/.test(document.querySelector('#settings_result').textContent)",
                               timeout=60000)
        result = page.locator("#settings_result").inner_text()
        assert "samples_format" in result and "not an image format" in result, result
        with open(config_path, encoding="utf8") as f:
            assert json.load(f).get("samples_format", "png") != "safetensors"
    finally:
        box.fill(before)  # later Apply clicks submit the whole form
        page.get_by_role("tab", name="txt2img").click()
