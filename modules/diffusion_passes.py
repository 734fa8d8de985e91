"""One denoising pass on the loaded diffusers pipeline, from noise (txt2img) or from init latents or images
(img2img, the hires fix's second pass), with one seed per image, progress in shared.state and interrupt.

The img2img pipeline is built from the loaded pipeline's own components (`StableDiffusionImg2ImgPipeline(
**pipe.components)`, the SDXL, Flux or Chroma one for those): the same module objects, so no weight exists twice
and whatever the Lora patcher wrote is what both passes use. What differs for the Flux family (prompts through T5,
distilled guidance, packed latents) is in modules/dit_generation.py.
"""
from __future__ import annotations

import torch

from modules import dit_generation, prompt_encoder, samplers, script_callbacks, shared

_IMG2IMG_ATTR = "_img2img_pipeline"


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _denoiser_params(x, step: int, total: int, conditioning: dict, pipeline):
    return script_callbacks.CFGDenoiserParams(
        x=x, image_cond=None, sigma=None, sampling_step=step, total_sampling_steps=total,
        text_cond=conditioning.get("prompt_embeds"), text_uncond=conditioning.get("negative_prompt_embeds"),
        denoiser=pipeline)


def _step_callbacks(pipeline, total: int, conditioning: dict):
    """Progress, interrupt and A1111's on_cfg_denoiser callbacks "before each step": step 0 is announced here,
    before the pipeline starts; every later step from diffusers' callback at the end of the previous one."""
    shared.state.sampling_steps = total
    shared.state.sampling_step = 0
    script_callbacks.cfg_denoiser_callback(_denoiser_params(None, 0, total, conditioning, pipeline))

    def on_step_end(pipe, step, timestep, callback_kwargs):
        shared.state.sampling_step = step + 1
        if shared.state.interrupted:
            pipe._interrupt = True
        elif step + 1 < total:
            script_callbacks.cfg_denoiser_callback(
                _denoiser_params(callback_kwargs.get("latents"), step + 1, total, conditioning, pipe))
        return callback_kwargs

    return on_step_end


def img2img_pipeline(sd_model):
    """The img2img pipeline over the loaded pipeline's components, built once per model (rebuilt if a component
    was swapped)."""
    if dit_generation.handles(sd_model):
        return dit_generation.img2img_pipeline(sd_model)
    pipe = sd_model.pipe
    components = pipe.components
    cached = sd_model.__dict__.get(_IMG2IMG_ATTR)
    if cached is not None and all(getattr(cached, k, None) is v for k, v in components.items() if k != "scheduler"):
        return cached
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    if getattr(sd_model, "is_sdxl", False):
        force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        img2img = StableDiffusionXLImg2ImgPipeline(**components, force_zeros_for_empty_prompt=force_zeros,
                                                   add_watermarker=False)
    else:
        img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    sd_model.__dict__[_IMG2IMG_ATTR] = img2img
    return img2img


def encode_conditioning(sd_model, prompts: list[str], negative_prompts: list[str], p=None) -> dict[str, torch.Tensor]:
    if dit_generation.handles(sd_model):
        return dit_generation.encode(sd_model, prompts, negative_prompts, float(getattr(p, "cfg_scale", 1.0)), p)
    with torch.inference_mode():
        return prompt_encoder.encode(sd_model, prompts, negative_prompts)


def _guidance(p, sd_model) -> dict:
    if dit_generation.handles(sd_model):
        return dit_generation.guidance_kwargs(p, sd_model)
    return {"guidance_scale": p.cfg_scale}


def txt2img(p, sd_model, seeds: list[int], output_type: str = "pil") -> list | torch.Tensor:
    """The first pass: PIL images, or the latents (B, C, H/8, W/8) when output_type is "latent"."""
    pipe = sd_model.pipe
    pipe.scheduler = samplers.scheduler_for(p.sampler_name, sd_model)
    conditioning = encode_conditioning(sd_model, p.prompts, p.negative_prompts, p)
    on_step_end = _step_callbacks(pipe, p.steps, conditioning)
    with torch.inference_mode():
        result = pipe(**conditioning, **_guidance(p, sd_model), num_inference_steps=p.steps, width=p.width,
                      height=p.height, generator=generators(seeds), num_images_per_prompt=1,
                      callback_on_step_end=on_step_end, output_type=output_type)
    if output_type != "latent":
        return list(result.images)
    if dit_generation.handles(sd_model):
        return dit_generation.unpack_latents(sd_model, result.images, p.width, p.height)
    return result.images


def schedule_for_exact_steps(steps: int, strength: float) -> int:
    """A schedule length whose last `steps` steps start at `strength` (A1111 runs the hires pass's steps exactly,
    on a schedule of steps / denoising strength); diffusers runs int(length * strength) of them."""
    length = max(steps, int(steps / max(strength, 1e-3)))
    while int(length * strength) < steps:
        length += 1
    return length


def steps_run(length: int, strength: float) -> int:
    """How many steps diffusers' img2img runs for a schedule of `length` at `strength`."""
    return min(int(length * strength), length)


def img2img(p, sd_model, init: list | torch.Tensor, seeds: list[int], prompts: list[str],
            negative_prompts: list[str], strength: float, schedule_length: int, sampler_name: str | None,
            output_type: str = "pil") -> list:
    """Denoises `init` (PIL images, or latents already scaled by the VAE's scaling factor) from `strength`."""
    count = steps_run(schedule_length, strength)
    if count < 1:  # nothing to denoise: the init image comes back (through the VAE when it is latents)
        shared.state.sampling_steps = shared.state.sampling_step = 0
        return decode_latents(sd_model, init) if isinstance(init, torch.Tensor) else [x.copy() for x in init]
    pipe = img2img_pipeline(sd_model)
    pipe.scheduler = samplers.scheduler_for(sampler_name, sd_model)
    conditioning = encode_conditioning(sd_model, prompts, negative_prompts, p)
    on_step_end = _step_callbacks(pipe, count, conditioning)
    size = {}
    if dit_generation.handles(sd_model):  # the pipeline would take the size from the config, not the image
        size = {"width": init[0].size[0], "height": init[0].size[1]} if not isinstance(init, torch.Tensor) else \
            {"width": init.shape[-1] * pipe.vae_scale_factor, "height": init.shape[-2] * pipe.vae_scale_factor}
    with torch.inference_mode():
        result = pipe(**conditioning, **_guidance(p, sd_model), **size, image=init, strength=strength,
                      num_inference_steps=schedule_length, generator=generators(seeds), num_images_per_prompt=1,
                      callback_on_step_end=on_step_end, output_type=output_type)
    if output_type == "latent" and dit_generation.handles(sd_model):
        return dit_generation.unpack_latents(sd_model, result.images, size["width"], size["height"])
    return result.images if output_type == "latent" else list(result.images)


def _needs_upcast(vae):
    """An fp16 VAE that asks for it (`force_upcast`, SDXL's) is run in fp32, as diffusers' pipelines do."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def _latents_stats(vae, latents: torch.Tensor):
    """(mean, std) the pipelines shift latents by: SDXL-style per-channel stats, or Flux/SD3's `shift_factor`."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        shift = getattr(vae.config, "shift_factor", None)
        if not shift:
            return None
        one = torch.ones((), device=latents.device, dtype=latents.dtype)
        return one * shift, one
    shape = (1, latents.shape[1], 1, 1)
    return (torch.tensor(mean).view(shape).to(latents.device, latents.dtype),
            torch.tensor(std).view(shape).to(latents.device, latents.dtype))


def decode_latents(sd_model, latents: torch.Tensor) -> list:
    """Latents (scaled) → PIL images, the way the pipelines decode them."""
    pipe = sd_model.pipe
    vae = pipe.vae
    upcast = _needs_upcast(vae)
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.inference_mode():
            latents = latents.to(vae.device, vae.dtype)
            stats = _latents_stats(vae, latents)
            if stats is not None:
                latents = latents * stats[1] / vae.config.scaling_factor + stats[0]
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            return list(pipe.image_processor.postprocess(image, output_type="pil"))
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def encode_images(sd_model, images: list, seeds: list[int]) -> torch.Tensor:
    """PIL images (one size) → scaled latents, sampled from the VAE's distribution with each image's seed, as
    diffusers' img2img encodes an init image."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    pipe = sd_model.pipe
    vae = pipe.vae
    upcast = _needs_upcast(vae)
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.inference_mode():
            pixels = pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)
            parts = [retrieve_latents(vae.encode(pixels[i:i + 1]), generator=g)
                     for i, g in enumerate(generators(seeds))]
            latents = torch.cat(parts)
            stats = _latents_stats(vae, latents)
            if stats is not None:
                return (latents - stats[0]) * vae.config.scaling_factor / stats[1]
            return latents * vae.config.scaling_factor
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
