"""The hires fix and img2img in process, against diffusers itself: a reference built only from diffusers (its own
pipelines loaded from the tiny SD1 folder, the Lora loaded and fused by `load_lora_weights` + `fuse_lora`) must give
the host's pixels. The host's second pass activates the Hires prompt's Lora set, and every weight is the original
one again after a job without Loras."""
import os

import networks
import numpy as np
import pytest
import torch

PROMPT = "a house"
SEED = 11


@pytest.fixture(scope="module")
def host(default_models_dir, tmp_path_factory):
    """The host's model loaded through modules.sd_models, the demo LoRAs in a private folder, the Lora handler
    registered; the original UNet and text-encoder weights for the restore checks."""
    from modules import extra_networks, scripts, sd_models, shared
    from scripts.make_demo_loras import make_demo_loras

    folder = tmp_path_factory.mktemp("hires-loras")
    sd1 = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1")
    make_demo_loras(str(folder), sd1, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shared.cmd_opts, "lora_dir", str(folder))
        scripts.load_scripts()
        extra_networks.register_extra_network(networks.extra_network_lora)
        networks.list_available_networks()
        model = sd_models.load_model(sd_models.CheckpointInfo(sd1))
        originals = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
                     for name in ("unet", "text_encoder")}
        try:
            yield model, sd1, str(folder / "demo_sd1_style.safetensors"), originals
        finally:
            networks.loaded_networks.clear()
            sd_models.unload_model_weights()


@pytest.fixture(scope="module")
def reference(host):
    """diffusers' own SD1 pipeline from the same folder, Euler, no host code involved."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(host[1], local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    res = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    res.set_progress_bar_config(disable=True)
    return res


def _generator():
    return [torch.Generator().manual_seed(SEED)]


def _assert_same_image(host_image, reference_image) -> None:
    diff = np.abs(np.asarray(host_image, dtype=int) - np.asarray(reference_image, dtype=int))
    assert diff.max() <= 1, f"max difference {diff.max()} (mean {diff.mean():.3f})"  # 0 on this CPU


def _assert_restored(model, originals) -> None:
    for name, weights in originals.items():
        changed = [k for k, v in getattr(model, name).state_dict().items() if not torch.equal(v, weights[k])]
        assert not changed, f"{name}: {changed[:5]}"


def _plain_job(model):
    from modules import processing
    processing.process_images(processing.StableDiffusionProcessingTxt2Img(
        sd_model=model, prompt=PROMPT, steps=1, width=64, height=64, seed=1, do_not_save_samples=True))


def test_hires_second_pass_uses_the_hires_loras_as_diffusers_would(host, reference):
    from modules import processing

    model, _, lora_path, originals = host
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=model, prompt=PROMPT, hr_prompt=f"{PROMPT} <lora:demo_sd1_style:1>", steps=3, width=64, height=64,
        seed=SEED, sampler_name="Euler", enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5,
        hr_upscaler="Latent", do_not_save_samples=True)
    processed = processing.process_images(p)
    assert 'Lora hashes: "demo_sd1_style: ' in processed.infotexts[0]
    assert any(not torch.equal(v, originals["unet"][k]) for k, v in model.unet.state_dict().items())

    # the reference: first pass without the Lora, latents x2 (bilinear), the Lora fused, img2img that runs
    # exactly the 2 hires steps (a schedule of 2 / 0.5 = 4 steps from strength 0.5), as A1111 does
    with torch.inference_mode():
        latents = reference(prompt=PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64,
                            generator=_generator(), output_type="latent").images
    upscaled = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
    reference.load_lora_weights(lora_path)
    reference.fuse_lora(lora_scale=1.0)
    try:
        with torch.inference_mode():
            expected = _img2img(reference)(prompt=PROMPT, image=upscaled, strength=0.5, num_inference_steps=4,
                                           guidance_scale=7.0, generator=_generator()).images[0]
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    assert processed.images[0].size == (128, 128)
    _assert_same_image(processed.images[0], expected)

    _plain_job(model)
    _assert_restored(model, originals)


def test_img2img_with_a_lora_tag_as_diffusers_would(host, reference):
    from modules import processing

    model, _, lora_path, originals = host
    with torch.inference_mode():
        init = reference(prompt="a boat", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                         generator=_generator()).images[0]
    p = processing.StableDiffusionProcessingImg2Img(
        sd_model=model, init_images=[init], prompt=f"{PROMPT} <lora:demo_sd1_style:0.7>", steps=3, width=64,
        height=64, seed=SEED, sampler_name="Euler", denoising_strength=0.6, do_not_save_samples=True)
    processed = processing.process_images(p)
    assert "Denoising strength: 0.6" in processed.infotexts[0]
    assert 'Lora hashes: "demo_sd1_style: ' in processed.infotexts[0]

    reference.load_lora_weights(lora_path)
    reference.fuse_lora(lora_scale=0.7)
    try:
        with torch.inference_mode():
            expected = _img2img(reference)(prompt=PROMPT, image=init, strength=0.6, num_inference_steps=3,
                                           guidance_scale=7.0, generator=_generator()).images[0]
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    _assert_same_image(processed.images[0], expected)

    _plain_job(model)
    _assert_restored(model, originals)


# --- the geometry, without a model ---------------------------------------------------------------------------------
RED, BLUE, GREEN, WHITE = [255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 255]


def test_resize_modes_give_a1111s_layouts():
    from PIL import Image

    from modules import images

    im = Image.fromarray(np.array([[RED, RED, BLUE, BLUE], [GREEN, GREEN, WHITE, WHITE]], dtype=np.uint8))
    # 1 crop and resize: the 4x2 image keeps its height and loses a column on each side
    assert np.asarray(images.resize_image(1, im, 2, 2)).tolist() == [[RED, BLUE], [GREEN, WHITE]]
    # 2 resize and fill: the image in the middle rows, its first and last rows stretched into the bands
    assert np.asarray(images.resize_image(2, im, 4, 4)).tolist() == \
        [[RED, RED, BLUE, BLUE]] * 2 + [[GREEN, GREEN, WHITE, WHITE]] * 2
    # the Nearest upscaler doubles every pixel (no Lanczos pass once the size is exact)
    assert np.asarray(images.resize_image(0, im, 8, 4, upscaler_name="Nearest"))[0].tolist() == \
        [RED] * 4 + [BLUE] * 4


def test_hires_target_size_and_latent_crop_follow_a1111():
    from types import SimpleNamespace

    from modules import processing_hires, upscaler

    p = SimpleNamespace(width=64, height=96, hr_scale=2.0, hr_resize_x=128, hr_resize_y=128, hr_upscale_to_x=0,
                        hr_upscale_to_y=0, truncate_x=0, truncate_y=0, extra_generation_params={},
                        latent_scale_mode=upscaler.latent_upscale_modes["Latent (nearest)"])
    processing_hires.calculate_target_resolution(p)
    # covers 128x128 keeping 2:3 → 128x192, then 64 px (8 latent rows) too many, cropped 4 above and 4 below
    assert (p.hr_upscale_to_x, p.hr_upscale_to_y, p.truncate_x, p.truncate_y) == (128, 192, 0, 8)
    assert p.extra_generation_params == {"Hires resize": "128x128"}
    latents = torch.arange(8 * 12, dtype=torch.float32).reshape(1, 1, 12, 8)
    cropped = processing_hires._upscaled_latents(p, latents, 8)
    assert cropped.shape == (1, 1, 16, 16)
    # nearest x2: latent row r of the 24-row upscale is source row r // 2; rows 4..19 are kept
    assert torch.equal(cropped[0, 0, :, 0], latents[0, 0, torch.arange(4, 20) // 2, 0])

    q = SimpleNamespace(width=64, height=64, hr_scale=1.5, hr_resize_x=0, hr_resize_y=0, hr_upscale_to_x=0,
                        hr_upscale_to_y=0, truncate_x=0, truncate_y=0, extra_generation_params={})
    processing_hires.calculate_target_resolution(q)
    assert (q.hr_upscale_to_x, q.hr_upscale_to_y, q.extra_generation_params) == (96, 96, {"Hires upscale": 1.5})


def test_hires_steps_run_exactly():
    from modules import diffusion_passes

    for steps in range(1, 30):
        for strength in (0.05, 0.3, 0.5, 0.7, 0.99, 1.0):
            length = diffusion_passes.schedule_for_exact_steps(steps, strength)
            assert diffusion_passes.steps_run(length, strength) == steps, (steps, strength, length)
    assert diffusion_passes.schedule_for_exact_steps(2, 0.5) == 4  # A1111: int(2 / 0.5)
