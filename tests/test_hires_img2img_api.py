"""The hires fix and img2img through the real HTTP API (tiny SD1, 64x64 → 128x128, 2-3 steps): which Lora set each
pass uses (told apart by exact pixel equalities), the infotext fields and merged `Lora hashes` A1111 writes, the
A1111 request/response shapes, and clear refusals of bad input."""
import base64
import io
import json
import re

import numpy as np
from PIL import Image

STYLE, LOCON = "demo_sd1_style", "demo_locon"  # the two SD1 demo LoRAs (scripts/make_demo_loras.py)
BASE = {"steps": 2, "width": 64, "height": 64, "seed": 321, "cfg_scale": 7, "sampler_name": "Euler"}
HIRES = {**BASE, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1, "denoising_strength": 0.5}


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _post(sdapi, route: str, body: dict) -> tuple[np.ndarray, str, dict]:
    response = sdapi.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    info = json.loads(result["info"])
    return _pixels(result["images"][0]), info["infotexts"][0], result


def _fields(infotext: str) -> dict:
    """The last line's `Key: value` pairs (values JSON-quoted when they hold a separator)."""
    line = infotext.strip().split("\n")[-1]
    return {k: json.loads(v) if v.startswith('"') else v
            for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)}


def test_hires_pass_activates_the_hires_prompts_loras(sdapi, sd1_checkpoint):
    plain, plain_text, _ = _post(sdapi, "txt2img", {**HIRES, "prompt": "a house"})
    assert plain.shape == (128, 128, 3)
    fields = _fields(plain_text)
    assert (fields["Size"], fields["Hires upscale"], fields["Hires steps"], fields["Denoising strength"]) == \
        ("64x64", "2.0", "1", "0.5")
    assert "Hires prompt" not in fields and "Lora hashes" not in fields and "Hires upscaler" not in fields

    # a Lora in the first pass only: the first pass changes, the Hires prompt is recorded as written (its empty
    # tag is reported and kept from the text encoder)
    first_only, text, result = _post(sdapi, "txt2img", {**HIRES, "prompt": f"a house <lora:{STYLE}:1>",
                                                         "hr_prompt": "a house <lora:>"})
    assert not np.array_equal(first_only, plain)
    assert "Bad Lora tag <lora:>: no Lora name" in json.loads(result["info"])["comments"]
    fields = _fields(text)
    assert fields["Hires prompt"] == "a house <lora:>"
    assert re.fullmatch(rf"{STYLE}: [0-9a-f]{{12}}", fields["Lora hashes"])

    # hr=0 (loractl): the same tag sets the second pass's multiplier to 0, which is the first-pass-only image
    hr_zero, text, _ = _post(sdapi, "txt2img", {**HIRES, "prompt": f"a house <lora:{STYLE}:1:hr=0>"})
    np.testing.assert_array_equal(hr_zero, first_only)
    assert "Hires prompt" not in _fields(text)  # an empty Hires prompt is the prompt itself

    # (a Lora in the Hires prompt only is compared with diffusers' own pipelines in test_hires_img2img.py)
    # a different set in each pass: both are recorded, in the order the passes activated them
    both, text, result = _post(sdapi, "txt2img", {**HIRES, "prompt": f"a house <lora:{STYLE}:1>",
                                                   "hr_prompt": f"a house <lora:{LOCON}:0.8>",
                                                   "hr_upscaler": "Lanczos"})
    fields = _fields(text)
    assert re.fullmatch(rf"{STYLE}: [0-9a-f]{{12}}, {LOCON}: [0-9a-f]{{12}}", fields["Lora hashes"])
    assert (fields["Hires upscaler"], fields["Hires prompt"]) == ("Lanczos", f"a house <lora:{LOCON}:0.8>")
    assert result["parameters"]["hr_prompt"] == f"a house <lora:{LOCON}:0.8>"

    # exact restore: a plain job afterwards is the plain job from before, pixel for pixel
    again, _, _ = _post(sdapi, "txt2img", {**HIRES, "prompt": "a house"})
    np.testing.assert_array_equal(again, plain)


def test_hires_target_size_and_bad_parameters(sdapi, sd1_checkpoint):
    image, text, _ = _post(sdapi, "txt2img", {**HIRES, "prompt": "a cat", "hr_resize_x": 96, "hr_resize_y": 128,
                                               "hr_upscaler": "Latent (nearest-exact)"})
    assert image.shape == (128, 96, 3)
    assert _fields(text)["Hires resize"] == "96x128"
    for bad, detail in (({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"), ({"denoising_strength": 1.5}, "denoising"),
                        ({"hr_sampler_name": "nope"}, "hr_sampler_name")):
        response = sdapi.post("/sdapi/v1/txt2img", json={**HIRES, "prompt": "a cat", **bad})
        assert response.status_code == 422 and detail in response.json()["detail"], response.text
    upscalers = [u["name"] for u in sdapi.get("/sdapi/v1/upscalers").json()]
    modes = [m["name"] for m in sdapi.get("/sdapi/v1/latent-upscale-modes").json()]
    assert upscalers == ["None", "Lanczos", "Nearest"] and modes[0] == "Latent" and len(modes) == 6


def _png_b64(width: int, height: int) -> str:
    noise = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_with_lora_tags_infotext_and_restore(sdapi, sd1_checkpoint):
    init = _png_b64(64, 64)
    body = {**BASE, "steps": 3, "init_images": [init], "denoising_strength": 0.6, "prompt": "a boat"}
    plain, plain_text, result = _post(sdapi, "img2img", body)
    assert plain.shape == (64, 64, 3) and result["parameters"]["init_images"] is None
    assert _fields(plain_text)["Denoising strength"] == "0.6"

    styled, text, _ = _post(sdapi, "img2img", {**body, "prompt": f"a boat <lora:{STYLE}:1>",
                                               "init_images": ["data:image/png;base64," + init]})
    assert not np.array_equal(styled, plain)
    assert re.fullmatch(rf"{STYLE}: [0-9a-f]{{12}}", _fields(text)["Lora hashes"])
    assert text.startswith(f"a boat <lora:{STYLE}:1>\n")

    again, _, _ = _post(sdapi, "img2img", body)
    np.testing.assert_array_equal(again, plain)

    # one init image for a batch of two, resized as latents (mode 3) to the job's size
    batch = sdapi.post("/sdapi/v1/img2img", json={**body, "batch_size": 2, "width": 96, "height": 64,
                                                   "resize_mode": 3, "include_init_images": True}).json()
    assert [_pixels(x).shape for x in batch["images"]] == [(64, 96, 3)] * 2
    assert batch["parameters"]["init_images"] == [init]


def test_img2img_refuses_bad_input_with_a_message(sdapi, sd1_checkpoint):
    base = {**BASE, "prompt": "x"}
    cases = [({}, 404, "Init image not found"), ({"init_images": ["not base64!"]}, 422, "init_images[0]"),
             ({"init_images": ["http://example.com/a.png"]}, 422, "URLs are not fetched"),
             ({"init_images": ["aGVsbG8="], "mask": "aGVsbG8="}, 422, "inpainting"),
             ({"init_images": []}, 422, "at least one init image")]
    for extra, status, detail in cases:
        response = sdapi.post("/sdapi/v1/img2img", json={**base, **extra})
        assert response.status_code == status and detail in response.json()["detail"], (extra, response.text)
    response = sdapi.post("/sdapi/v1/img2img", json={**base, "init_images": [_png_b64(8, 8)], "resize_mode": 9})
    assert response.status_code == 422 and "resize_mode" in response.json()["detail"]
