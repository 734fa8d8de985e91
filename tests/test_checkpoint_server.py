"""Issue 13 items 3 and 4 through a real server: a loaded checkpoint survives its file rewritten, truncated or
deleted (the same images, the server stays up); a checkpoint that fails to load leaves the previous one loaded and
selected, the API answer and the UI name the file and the reason, and each checkpoint is listed once.

One extra server for this module, on tiny single-file copies of the default SD1 model (the session server's
models are shared with other tests and must not be switched or damaged)."""
import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from checkpoint_files import BAD_FILES, overwrite_in_place, tiny_sd1_ldm, truncate, write_bad, write_good
from conftest import ROOT, SERVER_AUTH, WebuiServer, _free_port, _wait_until_ready

GOOD = "a-good.safetensors"
UI_BAD = "c-bad-ui.safetensors"  # never loaded before the browser test: its title changes when it is first hashed


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_models_dir):
    data_dir = str(tmp_path_factory.mktemp("checkpoint-server"))
    ckpt_dir = os.path.join(data_dir, "models", "Stable-diffusion")
    ldm = tiny_sd1_ldm(default_models_dir)
    write_good(ldm, ckpt_dir, stem="a-good")
    bad = write_bad(ldm, ckpt_dir)
    shutil.copyfile(bad["bad-shapes.safetensors"], os.path.join(ckpt_dir, UI_BAD))
    os.makedirs(os.path.join(data_dir, "models", "Lora"))
    port = _free_port()
    log_path = os.path.join(data_dir, "server.log")
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    cmd = [sys.executable, os.path.join(ROOT, "webui.py"), "--data-dir", data_dir, "--port", str(port),
           "--api-auth", ":".join(SERVER_AUTH), "--lora-dir", os.path.join(data_dir, "models", "Lora"),
           "--ckpt", os.path.join(ckpt_dir, GOOD)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = WebuiServer(f"http://127.0.0.1:{port}", data_dir, process, log_path)
    srv.ckpt_dir = ckpt_dir
    try:
        _wait_until_ready(srv, timeout=180)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def api(server):
    import requests

    class Client(requests.Session):
        def request(self, method, url, *args, **kwargs):
            kwargs.setdefault("timeout", 300)
            return super().request(method, server.url + url, *args, **kwargs)

    client = Client()
    client.auth = server.auth
    yield client
    client.close()


def _image(api, **override) -> np.ndarray:
    payload = {"prompt": "a red house", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 11,
               "cfg_scale": 7}
    payload.update(override)
    response = api.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    from PIL import Image
    return np.array(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def _loaded(api) -> str:
    return api.get("/sdapi/v1/options").json()["sd_model_checkpoint"]


def _switch(api, name: str):
    return api.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})


def _assert_listed_once(api, server) -> list[dict]:
    models = api.get("/sdapi/v1/sd-models").json()
    filenames = [m["filename"] for m in models]
    titles = [m["title"] for m in models]
    assert len(set(filenames)) == len(filenames) and len(set(titles)) == len(titles), titles
    on_disk = sorted(os.path.join(server.ckpt_dir, f) for f in os.listdir(server.ckpt_dir))
    assert sorted(filenames) == on_disk
    return models


@pytest.fixture(scope="module")
def reference(api):
    """The loaded good model's title and image. The title gains the file's short hash when the background hashing
    finishes: wait for it, so the tests compare with the title the server keeps."""
    deadline = time.time() + 120
    title = _loaded(api)
    while not re.fullmatch(re.escape(GOOD) + r" \[[0-9a-f]{10}\]", title) and time.time() < deadline:
        time.sleep(0.5)
        title = _loaded(api)
    assert re.fullmatch(re.escape(GOOD) + r" \[[0-9a-f]{10}\]", title), title
    return title, _image(api)


@pytest.fixture
def back_to_good(api, reference):
    yield
    assert _switch(api, GOOD).status_code == 200
    assert _loaded(api) == reference[0]


@pytest.mark.parametrize("name", [n for n in BAD_FILES])
def test_api_switch_to_a_bad_checkpoint_keeps_the_loaded_one(api, server, reference, name):
    title, image = reference
    response = _switch(api, name)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert os.path.join(server.ckpt_dir, name) in detail and BAD_FILES[name] in detail, detail
    assert f"{title} stays loaded" in detail
    assert _loaded(api) == title
    assert np.array_equal(_image(api), image), "the next job did not run on the previous model"
    _assert_listed_once(api, server)


def test_a_job_asking_for_a_bad_checkpoint_fails_with_the_reason_and_the_next_runs(api, server, reference):
    title, image = reference
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "width": 64, "height": 64,
                                                    "override_settings": {"sd_model_checkpoint": "bad-missing"}})
    assert response.status_code == 500 and "bad-missing.safetensors" in response.json()["detail"], response.text
    assert "tensors missing" in response.json()["detail"]
    assert _loaded(api) == title
    assert np.array_equal(_image(api), image)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("action", ["rewrite", "truncate", "delete"])
def test_the_loaded_model_survives_its_file_changing(api, server, reference, back_to_good, fmt, action):
    _, image = reference
    victim = os.path.join(server.ckpt_dir, f"victim-{action}.{fmt}")
    shutil.copyfile(os.path.join(server.ckpt_dir, f"a-good.{fmt}"), victim)
    try:
        assert api.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        response = _switch(api, os.path.basename(victim))
        assert response.status_code == 200, response.text
        assert _loaded(api).startswith(os.path.basename(victim))
        assert np.array_equal(_image(api), image)
        {"rewrite": overwrite_in_place, "truncate": truncate, "delete": os.remove}[action](victim)
        assert np.array_equal(_image(api), image), f"{action} of the loaded file changed the next image"
        assert np.array_equal(_image(api, seed=11), image)
        assert server.process.poll() is None, f"the server died:\n{server.log_tail()}"
    finally:
        if os.path.exists(victim):
            os.remove(victim)
    assert api.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_ui_switch_to_a_bad_checkpoint_says_why_and_lists_it_once(chromium, api, server, reference):
    title, image = reference
    page = chromium.new_page()
    try:
        page.goto(server.url + "/")
        dropdown = page.locator("#setting_sd_model_checkpoint input")
        dropdown.wait_for(timeout=90000)
        dropdown.click()
        page.get_by_role("option", name=UI_BAD, exact=True).click()
        toast = page.locator(f"text=/Could not load checkpoint .*{UI_BAD}/").first
        toast.wait_for(timeout=60000)
        assert "wrong shape" in toast.inner_text() and f"{title} stays loaded" in toast.inner_text()
        page.wait_for_function(f"() => document.querySelector('#setting_sd_model_checkpoint input').value === "
                               f"{title!r}", timeout=30000)
        dropdown.click()
        options = page.get_by_role("option").all_inner_texts()
        assert sum(o.startswith(UI_BAD) for o in options) == 1, options
        assert len(options) == len(set(options)) == len(os.listdir(server.ckpt_dir)), options
    finally:
        page.close()
    assert _loaded(api) == title
    assert np.array_equal(_image(api), image)
    _assert_listed_once(api, server)
