"""Issue 13 item 10 in headless Chromium on the test server: a card whose alias holds ':' inserts a tag that the
server resolves, a card with no safe name says so and inserts nothing, a pickle-only .pt card shows its problem."""
import argparse
import io
import json

import pytest
import torch
from conftest import tiny_lora_bytes

PROMPT = "#txt2img_prompt textarea"
CARDS = "#txt2img_lora_cards"
PANE = "window.extraNetworksPanes.get('txt2img_lora_pane')"


def card(page, name: str):
    return page.locator(f"{CARDS} .card[data-name={json.dumps(name)}]")


@pytest.fixture(scope="module")
def page(cards_page):
    yield cards_page
    assert not cards_page.page_errors, cards_page.page_errors
    assert not cards_page.dialogs, cards_page.dialogs


def _pickle_only_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "args": argparse.Namespace(lr=1)}, buf)
    return buf.getvalue()


def test_cards_insert_resolving_tags_or_say_why_not(page, server_files, sdapi):
    server_files("tagsafe/tagsafe_colon.safetensors", tiny_lora_bytes({"ss_output_name": "tagsafe:v2"}, seed=31))
    server_files("tagsafe/tag:hopeless.safetensors", tiny_lora_bytes(seed=32))
    server_files("tagsafe/tagsafe_pickle.pt", _pickle_only_pt())
    page.get_by_role("tab", name="Lora").click()
    page.locator("#txt2img_lora_extra_search").fill("tag")
    page.locator("#txt2img_lora_extra_refresh").click()
    names = ["tagsafe_colon", "tag:hopeless", "tagsafe_pickle"]
    page.wait_for_function(f"names => {{ const pane = {PANE}; return !pane.loading && "
                           "names.every(n => pane.items.some(i => i.name === n)); }", arg=names, timeout=30000)

    page.locator(PROMPT).fill("a cat")
    card(page, "tagsafe_colon").click()
    prompt = page.locator(PROMPT).input_value()
    assert prompt.startswith("a cat <lora:tagsafe_colon:"), prompt
    r = sdapi.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 1, "width": 32, "height": 32, "seed": 1})
    assert r.status_code == 200, r.text
    comments = json.loads(r.json()["info"]).get("comments", "")
    assert "Lora not found" not in str(comments) and "Bad Lora tag" not in str(comments), comments

    page.locator(PROMPT).fill("a cat")
    hopeless = card(page, "tag:hopeless")
    assert "cannot be put into a prompt" in hopeless.locator(".card-error").inner_text()
    hopeless.click()
    assert page.locator(PROMPT).input_value() == "a cat"

    error = card(page, "tagsafe_pickle").locator(".card-error").inner_text()
    assert "Convert it to .safetensors" in error and "weights_only" not in error, error
    page.locator("#txt2img_lora_extra_search").fill("")
