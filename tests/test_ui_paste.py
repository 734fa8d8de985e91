"""Pasting infotext in the browser: the paste button and dropping a generated PNG on the prompt (Lora hashes
re-point a tag to the local file that has that hash; AddNet fields become tags)."""
import base64
import json

import pytest

from modules import infotext_paste

PROMPT = "#txt2img_prompt textarea"


def test_plain_text_is_not_infotext():
    current = {k: None for k in infotext_paste.FIELDS} | {"prompt": "a cat, Steps: 3"}
    assert infotext_paste.field_values("a cat, Steps: 3", current) == current
    text = "a cat <lora:x:0.5>\nNegative prompt: ugly\nSteps: 7, Sampler: Euler, CFG scale: 5.5, Seed: 42, Size: 64x96"
    values = infotext_paste.field_values(text, current)
    assert values == {"prompt": "a cat <lora:x:0.5>", "negative_prompt": "ugly", "steps": 7, "sampler_name": "Euler",
                      "cfg_scale": 5.5, "seed": 42, "width": 64, "height": 96}


@pytest.fixture(scope="module")
def page(cards_page):
    return cards_page


def _value(page, field: str) -> str:
    return page.locator(f"#txt2img_{field} input[type=number]").input_value()


def test_paste_button_resolves_lora_by_hash_and_fills_fields(page, sdapi, sd1_lora):
    lora = next(x for x in sdapi.get("/sdapi/v1/loras").json() if x["name"] == sd1_lora)
    made = sdapi.post("/sdapi/v1/txt2img", json={"prompt": f"a house <lora:{sd1_lora}:0.6>", "steps": 3, "width": 64,
                                                  "height": 64, "seed": 99}).json()
    infotext = json.loads(made["info"])["infotexts"][0]
    shorthash = infotext.split('Lora hashes: "')[1].split(": ")[1][:12]
    # the same image made elsewhere, where the file was called "renamed"
    foreign = (f"a house <lora:renamed:0.6>\nNegative prompt: blurry\nSteps: 5, Sampler: Euler, CFG scale: 6.5, "
               f"Seed: 1234, Size: 64x72, Lora hashes: \"renamed: {shorthash}\"")
    page.locator(PROMPT).fill(foreign)
    page.locator("#txt2img_paste").click()
    page.wait_for_function(f"() => document.querySelector({PROMPT!r}).value.includes('<lora:{lora['alias']}:0.6>')",
                           timeout=30000)
    assert page.locator(PROMPT).input_value() == f"a house <lora:{lora['alias']}:0.6>"
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "blurry"
    assert (_value(page, "steps"), _value(page, "seed"), _value(page, "height")) == ("5", "1234", "72")

    addnet = ("a castle\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, AddNet Enabled: True, "
              "AddNet Module 1: LoRA, AddNet Model 1: some_lora(abcdef12), AddNet Weight A 1: 0.7")
    page.locator(PROMPT).fill(addnet)
    page.locator("#txt2img_paste").click()
    page.wait_for_function(f"() => document.querySelector({PROMPT!r}).value.includes('<lora:some_lora:0.7>')",
                           timeout=30000)
    assert not page.page_errors, page.page_errors


def test_dropping_a_generated_png_on_the_prompt_loads_its_parameters(page, sdapi, sd1_lora):
    made = sdapi.post("/sdapi/v1/txt2img", json={"prompt": f"a boat <lora:{sd1_lora}:0.4>", "negative_prompt": "rain",
                                                  "steps": 3, "width": 64, "height": 64, "seed": 4321}).json()
    png = base64.b64decode(made["images"][0])
    page.locator(PROMPT).fill("")
    page.evaluate("""([b64, selector]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "made.png", {type: "image/png"}));
        const area = document.querySelector(selector);
        area.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(png).decode(), PROMPT])
    page.wait_for_function("() => document.querySelector('#txt2img_seed input[type=number]').value === '4321'",
                           timeout=30000)
    assert page.locator(PROMPT).input_value() == f"a boat <lora:{sd1_lora}:0.4>"
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == "rain"
    assert not page.page_errors, page.page_errors
