"""Hypernetworks on a real server process with the tiny SD1 model: the HTTP routes (list, create, train with
progress and interrupt), the tag in txt2img, and in headless Chromium the Hypernetworks cards and the Train tab.

The tiny SD1 model's attention layers take contexts 32 and 64 wide (UNet widths 32 and 64; text width 64).
"""
import json
import os
import re
import shutil
import threading
import time

import pytest
import requests
from PIL import Image

from modules.hypernetworks import hypernetwork as hn

SIZES = [32, 64]
GEN = {"steps": 3, "width": 64, "height": 64, "seed": 4321, "cfg_scale": 7, "sampler_name": "Euler a"}
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")


def _hypernetwork_dir(webui_server) -> str:
    return os.path.join(webui_server.data_dir, "models", "hypernetworks")


def _create(sdapi, name: str, **kwargs) -> requests.Response:
    body = {"name": name, "enable_sizes": SIZES, "overwrite_old": True, "activation_func": "relu",
            "weight_init": "XavierNormal", **kwargs}
    return sdapi.post("/sdapi/v1/create/hypernetwork", json=body)


def _load(path: str) -> hn.Hypernetwork:
    h = hn.Hypernetwork()
    h.load(path)
    return h


def _txt2img(sdapi, prompt: str) -> dict:
    response = sdapi.post("/sdapi/v1/txt2img", json={**GEN, "prompt": prompt})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def dataset(webui_server) -> str:
    """Four 64x64 images with caption files, in the server's data folder."""
    folder = os.path.join(webui_server.data_dir, "hypernetwork-data")
    os.makedirs(folder, exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 40), (20, 40, 220), (230, 220, 30)]
    for i, colour in enumerate(colours):
        img = Image.new("RGB", (64, 64), colour)
        img.paste((255, 255, 255), (8 * i, 8, 8 * i + 24, 40))
        img.save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf8") as f:
            f.write(f"a square, colour {i}")
    return folder


# --- HTTP API ---

def test_create_and_list_routes(webui_server, sdapi):
    response = _create(sdapi, "api_style", layer_structure="1, 1.5, 1", add_layer_norm=True, use_dropout=True,
                       dropout_structure=[0, 0.1, 0], weight_init="KaimingNormal", activation_func="elu")
    assert response.status_code == 200, response.text
    path = os.path.join(_hypernetwork_dir(webui_server), "api_style.pt")
    assert response.json()["info"] == f"create hypernetwork filename: {path}"
    listed = sdapi.get("/sdapi/v1/hypernetworks").json()
    assert {"name": "api_style", "path": path} in listed

    h = _load(path)
    assert set(h.layers) == set(SIZES) and h.layer_structure == [1, 1.5, 1] and h.activation_func == "elu"
    assert h.add_layer_norm and h.dropout_structure == [0, 0.1, 0] and h.weight_init == "KaimingNormal"

    again = sdapi.post("/sdapi/v1/create/hypernetwork", json={"name": "api_style", "enable_sizes": SIZES})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    bad = _create(sdapi, "api_bad", layer_structure=[2, 1])
    assert bad.status_code == 422 and "should start with 1" in bad.json()["detail"]
    bad = _create(sdapi, "api_bad", activation_func="nope")
    assert bad.status_code == 422 and "activation" in bad.json()["detail"]
    assert "api_bad" not in [x["name"] for x in sdapi.get("/sdapi/v1/hypernetworks").json()]
    assert requests.get(webui_server.url + "/sdapi/v1/hypernetworks", timeout=30).status_code == 401


def test_txt2img_tag_changes_the_image_records_the_hash_and_ends_with_the_job(sdapi, sd1_checkpoint):
    assert _create(sdapi, "api_strong").status_code == 200
    plain = _txt2img(sdapi, "a red house")
    tagged = _txt2img(sdapi, "a red house <hypernet:api_strong:1>")
    assert tagged["images"][0] != plain["images"][0], "the hypernetwork did not change the image"
    infotext = json.loads(tagged["info"])["infotexts"][0]
    assert re.search(r'Hypernet hashes: "api_strong: [0-9a-f]{10}"', infotext), infotext
    assert infotext.startswith("a red house <hypernet:api_strong:1>")
    assert _txt2img(sdapi, "a red house")["images"][0] == plain["images"][0]  # nothing left applied

    missing = json.loads(_txt2img(sdapi, "a red house <hypernet:ghost:1>")["info"])
    assert "Hypernetwork not found: ghost" in missing["comments"]


def test_train_route_trains_saves_logs_and_resumes(webui_server, sdapi, sd1_checkpoint, dataset):
    assert _create(sdapi, "api_trained").status_code == 200
    logs = os.path.join(webui_server.data_dir, "hypernetwork-logs")
    body = {"hypernetwork_name": "api_trained", "data_root": dataset, "steps": 4, "learn_rate": "0.01",
            "batch_size": 2, "training_width": 64, "training_height": 64, "save_hypernetwork_every": 2,
            "create_image_every": 4, "preview_steps": 2, "log_directory": logs, "seed": 0,
            "id_task": "ignored", "varsize": False}
    response = sdapi.post("/sdapi/v1/train/hypernetwork", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    path = os.path.join(_hypernetwork_dir(webui_server), "api_trained.pt")
    assert result["step"] == 4 and result["filename"] == path and "finished at step 4" in result["info"]

    trained = _load(path)
    assert trained.step == 4 and trained.optimizer_state_dict is not None  # the .optim sidecar matches
    assert trained.sd_checkpoint_name and "tiny-sd1" in trained.sd_checkpoint_name
    run = os.path.join(logs, os.listdir(logs)[0], "api_trained")
    assert os.path.exists(os.path.join(run, "hypernetworks", "api_trained-2.pt"))
    with Image.open(os.path.join(run, "images", "api_trained-4.png")) as preview:
        assert preview.size == (64, 64)
    with open(os.path.join(run, "hypernetwork_loss.csv"), encoding="utf8") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3", "4"]

    # resume: more steps continue from the saved step
    response = sdapi.post("/sdapi/v1/train/hypernetwork", json={**body, "steps": 5, "create_image_every": 0})
    assert response.status_code == 200 and response.json()["step"] == 5

    missing = sdapi.post("/sdapi/v1/train/hypernetwork", json={**body, "hypernetwork_name": "ghost"})
    assert missing.status_code == 404
    no_data = sdapi.post("/sdapi/v1/train/hypernetwork", json={**body, "steps": 9, "data_root": dataset + "-no"})
    assert no_data.status_code == 422 and "does not exist" in no_data.json()["detail"]


def test_train_route_reports_progress_and_stops_on_interrupt(webui_server, sdapi, sd1_checkpoint, dataset):
    assert _create(sdapi, "api_interrupted").status_code == 200
    body = {"hypernetwork_name": "api_interrupted", "data_root": dataset, "steps": 100000, "learn_rate": "0.001",
            "training_width": 64, "training_height": 64, "log_directory": os.path.join(webui_server.data_dir, "l2")}
    outcome = {}

    def train():
        outcome["response"] = requests.post(webui_server.url + "/sdapi/v1/train/hypernetwork", json=body,
                                            auth=webui_server.auth, timeout=300)

    worker = threading.Thread(target=train)
    worker.start()
    seen = None
    deadline = time.time() + 120
    while time.time() < deadline and worker.is_alive():
        progress = sdapi.get("/sdapi/v1/progress").json()
        if progress["state"]["job"] == "train-hypernetwork" and progress["state"]["job_no"] >= 2:
            seen = progress
            break
        time.sleep(0.2)
    assert seen is not None, "no training progress was reported"
    assert seen["state"]["job_count"] == 100000 and 0 < seen["progress"] < 0.01
    assert "Training hypernetwork api_interrupted: step" in seen["textinfo"]
    assert sdapi.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(120)
    result = outcome["response"].json()
    assert outcome["response"].status_code == 200 and 2 <= result["step"] < 100
    assert "interrupted" in result["info"]
    assert _load(result["filename"]).step == result["step"]  # the steps done are saved


# --- the page ---

pytestmark_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def page(cards_page):
    return cards_page


def _shot(page, name: str) -> None:
    os.makedirs(ARTIFACTS_DIR, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS_DIR, f"{name}.png"), full_page=True)


@pytestmark_browser
def test_hypernetworks_cards_tab_toggles_the_tag_and_refreshes(page, webui_server, sdapi):
    assert _create(sdapi, "ui_card_style").status_code == 200
    cards = "#txt2img_hypernetworks_cards"
    page.locator("#txt2img_prompt textarea").fill("a red house")
    page.get_by_role("tab", name="Hypernetworks").click()
    page.locator("#txt2img_hypernetworks_extra_refresh").click()
    card = page.locator(f"{cards} .card[data-name='ui_card_style']")
    card.wait_for(timeout=30000)
    _shot(page, "hypernetworks_tab")
    card.click()
    assert page.locator("#txt2img_prompt textarea").input_value() == "a red house <hypernet:ui_card_style:1>"
    card.click()
    assert page.locator("#txt2img_prompt textarea").input_value() == "a red house"

    copied = os.path.join(_hypernetwork_dir(webui_server), "ui_card_copy.pt")
    shutil.copy(os.path.join(_hypernetwork_dir(webui_server), "ui_card_style.pt"), copied)
    try:
        page.locator("#txt2img_hypernetworks_extra_refresh").click()
        page.locator(f"{cards} .card[data-name='ui_card_copy']").wait_for(timeout=30000)
    finally:
        os.remove(copied)
    page.locator("#txt2img_prompt textarea").fill("")
    assert not page.page_errors, page.page_errors


def _set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


@pytestmark_browser
def test_train_tab_creates_and_trains(page, webui_server, dataset):
    page.locator("#tab_train-button").click()
    page.locator("#train_new_hypernetwork textarea, #train_new_hypernetwork input").first.fill("ui_trained")
    page.locator("#refresh_train_hypernetwork_sizes").click()  # checks exactly the loaded model's widths
    page.wait_for_function("""(expected) => {
        const boxes = [...document.querySelectorAll('#train_new_hypernetwork_sizes input[type=checkbox]')];
        const on = boxes.filter(b => b.checked).map(b => b.closest('label').innerText.trim());
        return JSON.stringify(on) === JSON.stringify(expected);
    }""", arg=[str(x) for x in SIZES], timeout=30000)
    page.locator("#train_overwrite_old_hypernetwork input").check()
    page.locator("#train_create_hypernetwork").click()
    page.wait_for_selector("#train_create_output:has-text('Created')", timeout=30000)
    path = os.path.join(_hypernetwork_dir(webui_server), "ui_trained.pt")
    assert set(_load(path).layers) == set(SIZES)

    page.get_by_role("tab", name="Train hypernetwork").click()
    assert page.locator("#train_hypernetwork input").first.input_value() == "ui_trained"
    page.locator("#train_dataset_directory textarea, #train_dataset_directory input").first.fill(dataset)
    page.locator("#train_hypernetwork_learn_rate textarea, #train_hypernetwork_learn_rate input").first.fill("0.005")
    _set_number(page, "train_steps", 3)
    _set_number(page, "train_create_image_every", 3)
    _set_number(page, "train_training_width", 64)
    _set_number(page, "train_training_height", 64)
    page.locator("#train_train_hypernetwork").click()
    page.wait_for_selector("#ti_output:has-text('finished at step 3')", timeout=120000)
    page.wait_for_selector("#ti_preview img", timeout=30000)
    _shot(page, "train_tab")
    assert _load(path).step == 3
    assert not page.page_errors, page.page_errors



@pytestmark_browser
def test_pasting_infotext_repoints_hypernet_tags_by_hash(page, webui_server, sdapi):
    import hashlib

    assert page.locator("#txt2img_paste").count() == 1  # the page's paste button must exist
    assert _create(sdapi, "ui_paste_target").status_code == 200
    with open(os.path.join(_hypernetwork_dir(webui_server), "ui_paste_target.pt"), "rb") as f:
        shorthash = hashlib.sha256(f.read()).hexdigest()[:10]
    page.get_by_role("tab", name="txt2img").click()
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill(f'a cat <hypernet:their_name:0.5>\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, '
                f'Hypernet hashes: "their_name: {shorthash}", Hypernet: ui_paste, Hypernet strength: 0.25')
    page.locator("#txt2img_paste").click()
    page.wait_for_function("() => !document.querySelector('#txt2img_prompt textarea').value.includes('Steps:')",
                           timeout=30000)
    # the hash finds the local file; the old `Hypernet:` field becomes a tag (closest local name)
    assert prompt.input_value() == "a cat <hypernet:ui_paste_target:0.5><hypernet:ui_paste_target:0.25>"
    prompt.fill("")
