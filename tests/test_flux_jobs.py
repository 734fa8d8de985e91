"""Flux jobs through the host: txt2img as diffusers' FluxPipeline renders it, the text encoder / VAE pick
(`forge_additional_modules`) with transactional switching, samplers, hires and img2img, and one HTTP txt2img."""
import os

import numpy as np
import pytest
import torch

from modules import processing, sd_models, sd_modules, shared
from modules.errors import JobInputError

SEED = 5


@pytest.fixture(scope="module")
def host(flux_files):
    """The host with the Flux module files in its models/text_encoder and models/VAE, tiny-flux loaded."""
    models = flux_files["models"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared.cmd_opts, "text_encoder_dir", os.path.join(models, "text_encoder"))
        mp.setattr(shared.cmd_opts, "vae_dir", os.path.join(models, "VAE"))
        mp.setitem(shared.opts.data, sd_modules.OPTION, [])
        model = sd_models.load_model(sd_models.CheckpointInfo(flux_files["folder"]))
        try:
            yield model
        finally:
            sd_models.unload_model_weights()


def _job(model, **kwargs):
    args = dict(sd_model=model, prompt="a (red:1.3) house", steps=3, width=64, height=64, seed=SEED,
                do_not_save_samples=True)
    args.update(kwargs)
    cls = processing.StableDiffusionProcessingImg2Img if "init_images" in args else \
        processing.StableDiffusionProcessingTxt2Img
    return processing.process_images(cls(**args))


def test_txt2img_is_diffusers_flux_pipeline(host, flux_files):
    from diffusers import FluxPipeline

    result = _job(host, distilled_cfg_scale=2.5, negative_prompt="ugly")
    assert "Sampler: Euler," in result.info and "Distilled CFG Scale: 2.5" in result.info
    assert "emphasis weights like (word:1.2) were ignored" in result.comments
    assert "has no negative prompt" in result.comments
    reference = FluxPipeline.from_pretrained(flux_files["folder"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    want = reference(prompt="a red house", num_inference_steps=3, guidance_scale=2.5, width=64, height=64,
                     max_sequence_length=64, generator=[torch.Generator().manual_seed(SEED)]).images[0]
    diff = np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(want, dtype=int))
    assert diff.max() <= 1, f"max difference {diff.max()}"


def test_samplers_hires_and_img2img(host):
    from PIL import Image

    with pytest.raises(JobInputError, match="'DPM\\+\\+ 2M' does not work with flux .* use one of: Euler, Euler K"):
        _job(host, sampler_name="DPM++ 2M")
    with pytest.raises(JobInputError, match="72x64 is not a multiple of 16 .* FLUX.1-dev needs .e.g. 64x64."):
        _job(host, width=72)
    with pytest.raises(JobInputError, match="hires size: 72x72 is not a multiple of 16"):
        _job(host, enable_hr=True, hr_resize_x=72, hr_resize_y=72, denoising_strength=0.5)
    hires = _job(host, steps=1, enable_hr=True, hr_scale=2.0, denoising_strength=0.5, hr_second_pass_steps=1,
                 hr_sampler_name="Euler Karras")
    assert hires.images[0].size == (128, 128) and "Hires upscale: 2.0" in hires.info
    assert "Hires sampler: Euler Karras" in hires.info
    resized = _job(host, steps=1, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.5,
                   hr_second_pass_steps=1)
    assert resized.images[0].size == (96, 96)
    # img2img with latent upscale (Flux's 16-channel latents; the Lanczos hires pass above took the image path)
    out = _job(host, init_images=[Image.new("RGB", (80, 48), (200, 40, 40))], resize_mode=3, denoising_strength=0.5,
               steps=2)
    assert out.images[0].size == (64, 64)


def test_module_pick_switches_all_or_nothing(host, flux_files):
    bfl = sd_models.CheckpointInfo(flux_files["bfl"])
    with pytest.raises(sd_models.CheckpointLoadError, match="pick them under VAE / Text Encoder.*stays loaded"):
        sd_models.load_model(bfl)
    assert sd_models.model_data.sd_model is host, "the loaded model stays"

    with pytest.raises(ValueError, match="'nope.safetensors' is not a text encoder or VAE file in"):
        shared.opts.check(sd_modules.OPTION, ["nope.safetensors"])
    picked = shared.opts.check(sd_modules.OPTION, [flux_files["clip_l"], "t5xxl_fp16.safetensors", "ae.safetensors"])
    assert picked == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]  # stored as names
    try:
        shared.opts.set(sd_modules.OPTION, picked, run_callbacks=False)
        model = sd_models.reload_model_weights(info=bfl)
        assert model.sd_checkpoint_info.filename == flux_files["bfl"]
        assert model.additional_modules == (flux_files["clip_l"], flux_files["t5"], flux_files["ae"])
        assert sd_models.reload_model_weights(info=bfl) is model, "nothing changed: no reload"
        shared.opts.set(sd_modules.OPTION, ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "ae.safetensors"],
                        run_callbacks=False)
        assert sd_modules.changed_for(model)
        fp8 = sd_models.reload_model_weights(info=bfl)
        assert fp8 is not model and fp8.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == \
            torch.float8_e4m3fn
    finally:
        shared.opts.data[sd_modules.OPTION] = []
        sd_models.load_model(sd_models.CheckpointInfo(flux_files["folder"]))


def test_flux_txt2img_over_http(sdapi, sd1_checkpoint):
    before = sdapi.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert before == sd1_checkpoint
    flux = next(m["title"] for m in sdapi.get("/sdapi/v1/sd-models").json() if "tiny-flux" in m["title"])
    response = sdapi.post("/sdapi/v1/txt2img", json={
        "prompt": "a house", "steps": 4, "width": 64, "height": 64, "seed": 1,
        "override_settings": {"sd_model_checkpoint": flux}})
    assert response.status_code == 200, response.text
    info = response.json()["info"]
    assert "Sampler: Euler" in info and "Distilled CFG Scale: 3.5" in info and "tiny-flux" in info
    assert len(response.json()["images"]) == 1
    assert sdapi.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before, "the model is switched back"
    bad = sdapi.post("/sdapi/v1/options", json={sd_modules.OPTION: ["nope.safetensors"]})
    assert bad.status_code == 422 and "forge_additional_modules" in bad.text
    assert sdapi.get("/sdapi/v1/sd-modules").status_code == 200
