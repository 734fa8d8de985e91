"""The headless-Chromium part of scripts/a1111_check.py: A1111's own page (gradio 3.41.2, its extraNetworks JS) with
our Lora extension installed. Returns [(check, passed, detail)]; files it adds to the Lora folder are removed.
Chromium is Debian's (/usr/bin/chromium), driven by the project's Playwright."""
from __future__ import annotations

import json
import os
import struct
import urllib.request

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TAB = "txt2img"


def _safetensors(tensors: dict[str, tuple[tuple[int, ...], float]], metadata: dict) -> bytes:
    """A small fp32 safetensors file: name → (shape, fill value)."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, (shape, value) in tensors.items():
        count = 1
        for n in shape:
            count *= n
        blob = struct.pack(f"<{count}f", *([value] * count))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _set_option(url: str, key: str, value) -> None:
    request = urllib.request.Request(url + "/sdapi/v1/options", data=json.dumps({key: value}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=120).read()


def run(url: str, lora_dir: str, out_dir: str) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
    _set_option(url, "extra_networks_tree_view_style", "Tree")  # A1111 renders the tree only in that style
    added = [os.path.join(lora_dir, n) for n in ("xl_only.safetensors", "newer.safetensors", "c.json")]
    for path in added:
        if os.path.exists(path):
            os.remove(path)
    # an SDXL-only file (second text encoder's keys): the version filter hides it on the SD1.5 model
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    with open(added[0], "wb") as f:
        f.write(_safetensors({f"{te2}.lora_down.weight": ((4, 1280), 0.01), f"{te2}.lora_up.weight": ((1280, 4), 0.01),
                              f"{te2}.alpha": ((), 4.0)}, {"ss_output_name": "xl_only"}))

    def check(name: str, ok: bool, detail: str = "") -> bool:
        results.append((name, bool(ok), detail or ("yes" if ok else "no")))
        print(f"    browser: {name}: {'ok' if ok else 'FAIL'} {detail}", flush=True)
        return ok

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            _steps(page, url, lora_dir, out_dir, check)
        except PlaywrightError as e:
            check("browser pass ran to the end", False, str(e).splitlines()[0][:200])
            page.screenshot(path=os.path.join(out_dir, "browser_failure.png"))
        check("no JavaScript errors on the page", not errors, "; ".join(errors)[:200])
        browser.close()
    for path in added:
        if os.path.exists(path):
            os.remove(path)
    _set_option(url, "extra_networks_tree_view_style", "Dirs")
    return results


def _steps(page, url: str, lora_dir: str, out_dir: str, check) -> None:
    prompt = page.locator(f"#{TAB}_prompt textarea")
    cards = f"#{TAB}_lora_cards > .card"

    def card(name: str):
        return page.locator(f'{cards}[data-name="{name}"]')

    def visible_names() -> list[str]:
        return page.eval_on_selector_all(cards, "els => els.filter(e => e.offsetParent !== null)"
                                                ".map(e => e.dataset.name)")

    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(f"#{TAB}_extra_tabs", timeout=180_000)
    # A1111 fills its JS `opts` once the settings have arrived; a card clicked before inserts "undefined"
    page.wait_for_function("() => window.opts && opts.extra_networks_default_multiplier !== undefined",
                           timeout=180_000)
    page.locator(f"#{TAB}_extra_tabs button", has_text="Lora").first.click()
    page.wait_for_selector(f"{cards}[data-name='a']", state="visible", timeout=60_000)
    names = visible_names()
    check("Lora tab shows the cards", {"a", "b", "c", "loha", "lokr"} <= set(names), ", ".join(names))
    check("version filter hides the SDXL-only file", "xl_only" not in names and page.locator(
        f"{cards}[data-name='xl_only']").count() == 0, "xl_only hidden" if "xl_only" not in names else "shown")

    card("a").click()
    # A1111 puts its separator (extra_networks_add_text_separator, a space) before the tag
    check("click inserts the tag", prompt.input_value().strip() == "<lora:a:1>", repr(prompt.input_value()))
    card("a").click()
    check("second click removes it", prompt.input_value().strip() == "", repr(prompt.input_value()))

    prompt.fill("start ")
    card("b").drag_to(prompt)
    check("drag into the prompt inserts the tag", "<lora:b:1>" in prompt.input_value(), repr(prompt.input_value()))
    prompt.fill("")

    search = page.locator(f"#{TAB}_lora_extra_search:visible")
    search.fill("lok")
    page.wait_for_timeout(500)
    check("search filters the cards", visible_names() == ["lokr"], ", ".join(visible_names()))
    shorthash = card("a").locator(".search_terms").last.inner_text()[:10]
    search.fill(shorthash)
    page.wait_for_timeout(500)
    check("search by hash", visible_names() == ["a"], f"{shorthash}: {', '.join(visible_names())}")
    search.fill("")
    page.wait_for_timeout(300)

    page.locator(f"#{TAB}_lora_extra_sort_name:visible").click()
    page.wait_for_timeout(300)
    ordered = [n for n in visible_names() if n in ("a", "b", "c", "loha", "lokr")]
    check("sort by name", ordered in (sorted(ordered), sorted(ordered, reverse=True)), ", ".join(ordered))

    tree = page.locator(f"#{TAB}_lora_tree:visible")
    toggled = tree.count() == 0
    if toggled:  # the tree button shows and hides the tree pane
        page.locator(f"#{TAB}_lora_extra_tree_view:visible").click()
        page.wait_for_timeout(500)
    root = tree.locator(".tree-list-content-dir").first  # A1111 renders folders collapsed: open the root
    if root.count():
        root.click()
        page.wait_for_timeout(500)
    text = " ".join(tree.nth(i).inner_text(timeout=10_000) for i in range(tree.count()))
    check("tree view lists the files", "lokr" in text, text.replace("\n", " ")[:80])
    if root.count():  # a second click closes and deselects it (its filter would hide nothing, but be tidy)
        root.click()
        page.wait_for_timeout(300)
    if toggled:
        page.locator(f"#{TAB}_lora_extra_tree_view:visible").click()

    card("c").hover()
    card("c").locator(".edit-button").click()
    editor = page.locator(f"#{TAB}_lora_edit_user_metadata")
    editor.wait_for(state="visible", timeout=30_000)
    activation = editor.get_by_label("Activation text")
    activation.fill("ctrigger")
    editor.get_by_role("button", name="Save").click()
    sidecar = os.path.join(lora_dir, "c.json")
    for _ in range(50):
        if os.path.exists(sidecar):
            break
        page.wait_for_timeout(200)
    saved = json.load(open(sidecar, encoding="utf8")) if os.path.exists(sidecar) else {}
    check("editor saves the sidecar", saved.get("activation text") == "ctrigger", json.dumps(saved)[:120])
    page.wait_for_timeout(1500)  # the card is re-fetched (get-single-card)
    prompt.fill("")
    card("c").click()
    check("the saved card inserts its activation text", prompt.input_value().strip() == "<lora:c:1> ctrigger",
          repr(prompt.input_value()))
    prompt.fill("")

    with open(os.path.join(lora_dir, "a.safetensors"), "rb") as src, \
            open(os.path.join(lora_dir, "newer.safetensors"), "wb") as dst:
        dst.write(src.read())
    page.locator(f"#{TAB}_lora_extra_refresh:visible").click()
    try:
        page.wait_for_selector(f"{cards}[data-name='newer']", state="attached", timeout=60_000)
        ok = True
    except PlaywrightError:
        ok = False
    check("refresh shows a file added after start-up", ok)

    b_hash = card("b").locator(".search_terms").last.inner_text()[:12]
    prompt.fill(f'x <lora:old:0.5>\nSteps: 1, Sampler: Euler, Seed: 1, Size: 64x64, Lora hashes: "old: {b_hash}"')
    page.locator(f"#{TAB}_toprow #paste").click()
    page.wait_for_timeout(1500)
    check("infotext paste re-points the tag by hash", prompt.input_value() == "x <lora:b:0.5>",
          repr(prompt.input_value()))
    page.screenshot(path=os.path.join(out_dir, "browser_a1111_lora_tab.png"))
