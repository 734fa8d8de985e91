"""Script payloads in everything a LoRA file brings to the page never run.

Payloads sit in a folder name, a file name, the alias (`ss_output_name`), training tags, `modelspec.*` and other
metadata, the `.txt` description, and every sidecar field. The page then shows them everywhere: cards, dir
buttons, tree view, metadata popup, editor (table, tag cloud, fields), the prompt after a click, and a card
description rendered as HTML (option extra_networks_card_description_is_html, sanitised). Any payload that runs
sets window.__xss or opens a dialog.
"""
import json
import os

from conftest import ARTIFACTS_DIR, tiny_lora_bytes

CARDS = "#txt2img_lora_cards"
SEARCH = "#txt2img_lora_extra_search"
PANE = "window.extraNetworksPanes.get('txt2img_lora_pane')"
RUN = "window.__xss=(window.__xss||0)+1"
PAYLOADS = [f"<img src=x onerror=\"{RUN}\">", f"<script>{RUN}</script>", f"\"><svg onload=\"{RUN}\">",
            f"javascript:{RUN}//", f"');{RUN};('", f"<iframe srcdoc=\"<script>parent.{RUN}</script>\">"]
EVIL = " ".join(PAYLOADS)
FOLDER = "xss_<b onmouseover=x>"
STEM = "xss_<img src=x onerror=window.__xss=1>"
CLICK_STEM = "xssclick"


def write_payload_files(server_files) -> str:
    metadata = {
        "ss_output_name": "xss_alias_" + PAYLOADS[0],
        "ss_tag_frequency": json.dumps({"1_" + PAYLOADS[1]: {tag: i + 1 for i, tag in enumerate(PAYLOADS)}}),
        "ss_sd_model_name": PAYLOADS[2],
        "ss_network_module": PAYLOADS[0],
        "modelspec.title": EVIL,
        "modelspec.description": PAYLOADS[5],
        PAYLOADS[0]: "a key that is a payload",
    }
    path = server_files(f"{FOLDER}/{STEM}.safetensors", tiny_lora_bytes(metadata, seed=31))
    base = path[:-len(".safetensors")]
    # A name that fits in a tag (the one above cannot: it holds '>' and '='), so a click inserts the payloads.
    server_files(f"{FOLDER}/{CLICK_STEM}.safetensors", tiny_lora_bytes(metadata, seed=32))
    server_files(f"{FOLDER}/{CLICK_STEM}.json", json.dumps({"activation text": "act " + PAYLOADS[4],
                                                            "negative text": PAYLOADS[0]}))
    server_files(f"{FOLDER}/{STEM}.txt", "text description " + EVIL)
    server_files(f"{FOLDER}/{STEM}.json", json.dumps({
        "description": "sidecar description " + EVIL + " <b>bold</b> <a href=\"javascript:" + RUN + "\">link</a>",
        "activation text": "act " + PAYLOADS[4], "negative text": PAYLOADS[0], "notes": EVIL,
        "preferred weight": 0.5}))
    return os.path.basename(base)


def assert_clean(page) -> None:
    assert page.evaluate("() => window.__xss") is None
    assert not page.dialogs, page.dialogs
    injected = page.evaluate("""() => {
        const roots = [document.querySelector('#txt2img_lora_pane'), document.querySelector('.global-popup')]
            .filter(Boolean);
        let count = 0;
        roots.forEach(root => root.querySelectorAll('script, iframe, svg[onload], img[src="x"], [onerror], [onload],'
            + ' [onmouseover], a[href^="javascript"]').forEach(() => count++));
        return count;
    }""")
    assert injected == 0


def test_payloads_in_files_and_metadata_never_run(cards_page, sdapi, server_files):
    page = cards_page
    stem = write_payload_files(server_files)
    page.locator("#txt2img_prompt textarea").fill("")
    page.get_by_role("tab", name="Lora").click()
    page.wait_for_selector(f"{CARDS} .card", timeout=30000)
    page.locator("#txt2img_lora_extra_refresh").click()
    page.wait_for_function(f"() => {PANE}.items.some(i => i.name === {json.dumps(stem)})", timeout=30000)
    page.locator(SEARCH).fill("xss_")
    card = page.locator(f"{CARDS} .card").filter(has=page.locator(".name", has_text=stem))
    card.wait_for(timeout=10000)
    page.wait_for_function(f"() => document.querySelectorAll('{CARDS} .card').length === 2")  # this and xssclick
    assert card.locator(".name").inner_text() == stem  # the name is text
    assert "sidecar description <img src=x" in card.locator(".description").inner_text()
    # No name of this file fits in a tag: the card says so (the payload name as text) and a click inserts nothing.
    assert "cannot be put into a prompt" in card.locator(".card-error").text_content()
    card.click()
    assert page.locator("#txt2img_prompt textarea").input_value() == ""
    assert_clean(page)

    # A click on a card with a usable name puts the payload texts into the prompts as text.
    page.locator(SEARCH).fill(CLICK_STEM)
    click_card = page.locator(f"{CARDS} .card", has_text=CLICK_STEM)
    click_card.wait_for(timeout=10000)
    click_card.click()
    prompt = page.locator("#txt2img_prompt textarea").input_value()
    assert f"<lora:{CLICK_STEM}:" in prompt and PAYLOADS[4] in prompt
    assert page.locator("#txt2img_neg_prompt textarea").input_value() == f"({PAYLOADS[0]}:1)"
    click_card.click()
    page.locator("#txt2img_neg_prompt textarea").fill("")
    page.locator(SEARCH).fill("xss_")
    card.wait_for(timeout=10000)

    # Dir buttons and the metadata popup.
    page.locator("#txt2img_lora_pane .extra-network-dir-button", has_text="xss_<b").click()
    card.hover()
    card.locator(".metadata-button").click()
    page.wait_for_selector(".global-popup table.popup-metadata", timeout=10000)
    assert "<script>" in page.locator(".global-popup").inner_text()
    assert_clean(page)
    page.keyboard.press("Escape")

    # The editor: table, tag cloud, fields.
    card.hover()
    card.locator(".edit-button").click()
    editor = page.locator(".extra-network-editor")
    editor.wait_for(timeout=10000)
    assert editor.locator(".editor-tag").count() > 0  # sentence-long "tags" are split into words (A1111 rule)
    assert "onerror" in editor.locator(".editor-tags").inner_text()
    editor.locator(".editor-tag").first.click()
    editor.locator(".editor-random button").click()
    assert PAYLOADS[0] in editor.locator("textarea[data-key='notes']").input_value()
    os.makedirs(ARTIFACTS_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS_DIR, "xss_editor.png"), full_page=True)
    assert_clean(page)
    editor.locator("button", has_text="Cancel").click()

    # Tree view, and descriptions rendered as HTML: only harmless tags survive.
    before = sdapi.get("/sdapi/v1/options").json()
    sdapi.post("/sdapi/v1/options", json={"extra_networks_tree_view_style": "Tree",
                                          "extra_networks_card_description_is_html": True})
    try:
        page.locator("#txt2img_lora_extra_refresh").click()
        page.wait_for_function(f"() => {PANE}.opts.extra_networks_card_description_is_html === true && "
                               f"!{PANE}.loading", timeout=30000)
        page.locator(SEARCH).fill("xss_")
        page.wait_for_selector(f"{CARDS} .card .description b", timeout=10000)
        assert card.locator(".description b").inner_text() == "bold"
        link = card.locator(".description a")
        assert link.count() == 1 and link.get_attribute("href") is None  # the javascript: URL was dropped
        page.locator("#txt2img_lora_pane .tree-list-content-dir", has_text="xss_<b").first.click()
        page.screenshot(path=os.path.join(ARTIFACTS_DIR, "xss_tree_html_description.png"), full_page=True)
        assert_clean(page)
    finally:
        sdapi.post("/sdapi/v1/options", json={
            "extra_networks_tree_view_style": before["extra_networks_tree_view_style"],
            "extra_networks_card_description_is_html": before["extra_networks_card_description_is_html"]})
        page.locator(SEARCH).fill("")
        page.locator("#txt2img_prompt textarea").fill("")
        page.locator("#txt2img_lora_extra_refresh").click()
    assert_clean(page)
    assert not page.page_errors, page.page_errors


def test_metadata_keys_cannot_pollute_the_page_prototypes(cards_page, sdapi, server_files):
    """`modelspec.__proto__.x` in a file's metadata stays a key of that file's popup: no other card changes and
    card clicks keep working (before, the popup wrote it onto Object.prototype)."""
    page = cards_page
    marker = "PROTO_POLLUTED"
    server_files("proto/proto_bad.safetensors", tiny_lora_bytes({
        "modelspec.__proto__.description": marker + "_description",
        "modelspec.__proto__.error": marker + "_error",
        "modelspec.constructor.prototype.activation": marker + "_activation",
        "modelspec.title": "proto title",
    }, seed=32))
    server_files("proto/proto_good.safetensors", tiny_lora_bytes(seed=33))
    page.locator("#txt2img_prompt textarea").fill("")
    page.get_by_role("tab", name="Lora").click()
    page.wait_for_selector(f"{CARDS} .card", timeout=30000)
    page.locator("#txt2img_lora_extra_refresh").click()
    page.wait_for_function(f"() => !{PANE}.loading && {PANE}.items.some(i => i.name === 'proto_good')",
                           timeout=30000)
    page.locator(SEARCH).fill("proto_bad")
    bad = page.locator(f"{CARDS} .card[data-name='proto_bad']")
    bad.hover()
    bad.locator(".metadata-button").click()
    page.wait_for_selector(".global-popup table.popup-metadata", timeout=10000)
    shown = page.locator(".global-popup").inner_text()
    page.keyboard.press("Escape")

    polluted = page.evaluate("""() => {
        const probe = {};
        return ["description", "error", "activation"].filter(k => probe[k] !== undefined)
            .concat(Object.getOwnPropertyNames(Object.prototype).filter(k => /POLLUTED/.test(String(
                Object.getOwnPropertyDescriptor(Object.prototype, k).value))));
    }""")
    assert polluted == []
    assert "__proto__" in shown and marker + "_description" in shown  # shown as the file's keys, nothing lost
    page.locator(SEARCH).fill("proto_good")
    good = page.locator(f"{CARDS} .card[data-name='proto_good']")
    good.wait_for(timeout=10000)
    assert marker not in good.inner_text() and "card-has-error" not in (good.get_attribute("class") or "")
    good.click()
    assert "<lora:proto_good:" in page.locator("#txt2img_prompt textarea").input_value()
    good.click()
    assert page.locator("#txt2img_prompt textarea").input_value() == ""
    page.locator(SEARCH).fill("")
    assert not page.page_errors, page.page_errors
