"""The card page under A1111's gradio 3.41.2 (scripts/gradio3_smoke.py), in its own venv.

Skipped unless that venv is ready: `.venv-gradio3` in the repository, or LORA_GRADIO3_VENV. Build it once with
`venv/bin/python scripts/gradio3_smoke.py build` (a few minutes; needs the package registry).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ARTIFACTS_DIR, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gradio3_smoke  # noqa: E402

pytestmark = pytest.mark.skipif(
    not gradio3_smoke.venv_ready(),
    reason=f"no gradio 3.41.2 venv at {gradio3_smoke.VENV} (build it: venv/bin/python scripts/gradio3_smoke.py build,"
           " or point LORA_GRADIO3_VENV at one)")


def test_card_routes_and_scripts_under_gradio3():
    result = subprocess.run([gradio3_smoke.venv_python(), os.path.join(ROOT, "scripts", "gradio3_smoke.py"), "check"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checks passed" in result.stdout


@pytest.fixture(scope="module")
def gradio3_server(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("gradio3-data"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = os.path.join(data_dir, "server.log")
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    with open(log_path, "w") as log:
        process = subprocess.Popen([gradio3_smoke.venv_python(), os.path.join(ROOT, "scripts", "gradio3_smoke.py"),
                                    "serve", "--port", str(port), "--data-dir", data_dir],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests
        deadline = time.time() + 180
        while time.time() < deadline:
            assert process.poll() is None, open(log_path).read()[-3000:]
            try:
                if requests.get(url + "/sd_extra_networks/cards?page=lora", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        yield url, data_dir
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_cards_click_drag_and_editor_in_a_gradio3_page(chromium, gradio3_server):
    url, data_dir = gradio3_server
    page = chromium.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("#txt2img_prompt textarea", timeout=60000)
    page.locator("#txt2img_extra_tabs .tab-nav button", has_text="Lora").click()  # gradio 3: no role=tab
    card = page.locator("#txt2img_lora_cards .card[data-name='g3_style']")
    card.wait_for(timeout=30000)
    area = page.locator("#txt2img_prompt textarea")
    area.fill("a cat")
    card.click()
    assert area.input_value() == "a cat <lora:g3_style:0.7> g3 words"
    page.locator("#smoke_echo_button").click()  # what gradio 3 holds for the prompt
    page.wait_for_function("() => document.querySelector('#smoke_echo textarea').value.includes('g3 words')",
                           timeout=20000)
    card.click()
    assert area.input_value() == "a cat"
    box = area.bounding_box()
    page.locator("#txt2img_lora_cards .card[data-name='g3_other']").drag_to(
        area, target_position={"x": box["width"] - 10, "y": 12})
    assert area.input_value() == "a cat <lora:g3_other:1>"
    card.hover()
    card.locator(".edit-button").click()
    editor = page.locator(".extra-network-editor")
    editor.wait_for(timeout=10000)
    editor.locator("input[data-key='negative text']").fill("blurry")
    editor.locator("button", has_text="Save").click()
    page.wait_for_selector(".extra-network-editor", state="detached", timeout=10000)
    with open(os.path.join(data_dir, "models", "Lora", "g3_style.json"), encoding="utf8") as f:
        assert json.load(f)["negative text"] == "blurry"
    os.makedirs(ARTIFACTS_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS_DIR, "gradio3_cards.png"), full_page=True)
    assert not errors, errors
    page.close()
