"""The prompt's tag editor in headless Chromium: right-click (or Alt+E) on a <lora:...> tag opens it with the
loaded family's blocks and LBW's presets; changes show in the preview; Apply rewrites only that tag; Ctrl+Z undoes."""
import pytest

PROMPT = "#txt2img_prompt textarea"
PANEL = ".lora-tag-editor"


@pytest.fixture(scope="module")
def page(cards_page):
    yield cards_page
    assert not cards_page.page_errors, cards_page.page_errors
    assert not cards_page.dialogs, cards_page.dialogs


def test_open_change_apply_undo(page):
    prompt = page.locator(PROMPT)
    original = "<lora:edited:0.8:hr=0.5> a cat, <lora:other:1>"
    prompt.fill(original)
    prompt.click(button="right", position={"x": 30, "y": 12})  # on the first tag
    panel = page.locator(PANEL)
    panel.wait_for(timeout=10000)
    preview = panel.locator(".lora-tag-editor-preview")
    assert preview.inner_text() == "<lora:edited:0.8:hr=0.5>"
    assert panel.locator(".lora-tag-editor-blocks input[type=range]").count() == 26  # SD1: BASE, IN00-11, M00, OUT
    assert [g.inner_text() for g in panel.locator(".lora-tag-editor-group").all()] == ["BASE", "IN", "MID", "OUT"]

    panel.locator("input[type=text][data-key=te]").fill("0.5")
    panel.locator(".lora-tag-editor-preset").select_option("OUTALL")
    assert panel.locator("input[type=text][data-key=OUT11]").input_value() == "1"
    assert panel.locator("input[type=text][data-key=IN01]").input_value() == "0"
    panel.locator("input[type=text][data-key=start]").fill("0.25")
    assert panel.locator("input[type=text][data-key=unet]").input_value() == "0.5"  # follows te: none of its own
    assert preview.inner_text() == "<lora:edited:0.5:hr=0.5:lbw=OUTALL:start=0.25>"
    panel.locator("input[type=text][data-key=unet]").fill("0.7")
    panel.locator("input[type=text][data-key=M00]").fill("0.5")  # no longer the preset: the vector is written
    text = preview.inner_text()
    vector = "1,0,0,0,0,0,0,0,0,0,0,0,0,0.5,0,0,0,1,1,1,1,1,1,1,1,1"  # OUTALL expanded, M00 changed
    assert text == f"<lora:edited:0.5:0.7:hr=0.5:lbw={vector}:start=0.25>"
    panel.locator(".lora-tag-editor-apply").click()
    assert page.locator(PANEL).count() == 0
    assert prompt.input_value() == text + " a cat, <lora:other:1>"  # only that tag changed

    prompt.focus()
    page.keyboard.press("Control+z")
    assert prompt.input_value() == original


def test_alt_e_at_the_caret_and_escape(page):
    prompt = page.locator(PROMPT)
    prompt.fill("x <lora:second:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1> y")
    prompt.evaluate("t => { t.focus(); t.setSelectionRange(10, 10); }")
    page.keyboard.press("Alt+e")
    panel = page.locator(PANEL)
    panel.wait_for(timeout=10000)
    # the 17-value form lists IN01: 0, and leaves IN00 out (LBW gives it 0)
    assert panel.locator("input[type=text][data-key=IN00]").input_value() == "0"
    assert panel.locator("input[type=text][data-key=OUT03]").input_value() == "1"
    page.keyboard.press("Escape")
    assert page.locator(PANEL).count() == 0
    assert prompt.input_value() == "x <lora:second:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1> y"
    prompt.fill("")
