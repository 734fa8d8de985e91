"""The hires fix of a txt2img job (A1111's StableDiffusionProcessingTxt2Img hires parts).

The first pass runs at width x height. Its latents are interpolated to the target size (the "Latent" modes), or
its images are decoded and resized by an image upscaler and encoded again; then the second pass denoises them
from `denoising_strength` for `hr_second_pass_steps` steps (0: the first pass's steps), run exactly, as in A1111.
Before the second pass the Hires prompt's own extra networks are activated with `p.is_hr_pass` set, so a Lora
handler sees which pass it is (the built-in one reads `hr=` then, and merges `Lora hashes` across the passes).
"""
from __future__ import annotations

import torch

from modules import diffusion_passes, dit_generation, extra_networks, images, samplers, sd_hijack, shared, upscaler
from modules.errors import JobInputError


def _as_list(value, count: int) -> list:
    return list(value) if isinstance(value, list) else [value] * count


def setup_prompts(p) -> None:
    """An empty Hires prompt (or negative prompt) means the first pass's, as in A1111."""
    count = p.batch_size * p.n_iter
    p.all_hr_prompts = _as_list(p.hr_prompt, count) if p.hr_prompt not in ("", None) else list(p.all_prompts)
    p.all_hr_negative_prompts = (_as_list(p.hr_negative_prompt, count) if p.hr_negative_prompt not in ("", None)
                                 else list(p.all_negative_prompts))


def _check(p) -> None:
    if not 0.0 <= float(p.denoising_strength) <= 1.0:
        raise JobInputError(f"denoising_strength must be between 0 and 1, got {p.denoising_strength}")
    try:
        upscaler.check_hires_upscaler(p.hr_upscaler, shared.sd_upscalers)
    except ValueError as e:
        raise JobInputError(f"hr_upscaler: {e}") from None
    if p.hr_sampler_name is not None and p.hr_sampler_name not in samplers.all_samplers:
        raise JobInputError(f"hr_sampler_name: sampler not found: {p.hr_sampler_name}")
    if p.hr_sampler_name is not None:
        try:
            samplers.check(p.hr_sampler_name, p.sd_model)
        except ValueError as e:
            raise JobInputError(f"hr_sampler_name: {e}") from None
    if p.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise JobInputError("hr_checkpoint_name: a second checkpoint for the hires pass is not supported by this "
                            "host; leave it empty")
    if p.hr_second_pass_steps < 0:
        raise JobInputError(f"hr_second_pass_steps must be 0 or more, got {p.hr_second_pass_steps}")
    if p.hr_resize_x < 0 or p.hr_resize_y < 0 or (not p.hr_resize_x and not p.hr_resize_y and p.hr_scale <= 0):
        raise JobInputError("hires size: hr_scale must be above 0 (or hr_resize_x/hr_resize_y given)")


def init(p) -> None:
    """Checks the hires parameters, works out the target size and records the infotext fields A1111 writes."""
    _check(p)
    p.extra_generation_params["Denoising strength"] = p.denoising_strength
    if p.hr_sampler_name is not None and p.hr_sampler_name != p.sampler_name:
        p.extra_generation_params["Hires sampler"] = p.hr_sampler_name

    def hires_prompt(p, index, prompt_text, **kwargs):
        text = p.all_hr_prompts[index]
        return text if text != prompt_text else None

    def hires_negative_prompt(p, index, negative_prompt, **kwargs):
        text = p.all_hr_negative_prompts[index]
        return text if text != negative_prompt else None

    p.extra_generation_params["Hires prompt"] = hires_prompt
    p.extra_generation_params["Hires negative prompt"] = hires_negative_prompt
    mode = p.hr_upscaler if p.hr_upscaler is not None else upscaler.latent_upscale_default_mode
    p.latent_scale_mode = upscaler.latent_upscale_modes.get(mode)
    calculate_target_resolution(p)
    if dit_generation.handles(p.sd_model):
        dit_generation.check_size(p.sd_model, p.hr_upscale_to_x, p.hr_upscale_to_y, "hires size")
    if p.hr_second_pass_steps:
        p.extra_generation_params["Hires steps"] = p.hr_second_pass_steps
    if p.hr_upscaler is not None:
        p.extra_generation_params["Hires upscaler"] = p.hr_upscaler


def calculate_target_resolution(p, opt_f: int = 8) -> None:
    """A1111's rule: hr_scale times the first pass, or hr_resize_x x hr_resize_y (one of them 0: keep the aspect
    ratio; both: scale to cover, then crop the excess from the latents, `truncate_x/y` in latent pixels)."""
    if p.hr_upscale_to_x and p.hr_upscale_to_y:  # firstphase_width/height: the target was given as width x height
        return
    if p.hr_resize_x == 0 and p.hr_resize_y == 0:
        p.extra_generation_params["Hires upscale"] = p.hr_scale
        p.hr_upscale_to_x = int(p.width * p.hr_scale)
        p.hr_upscale_to_y = int(p.height * p.hr_scale)
        return
    p.extra_generation_params["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
    if p.hr_resize_y == 0:
        p.hr_upscale_to_x = p.hr_resize_x
        p.hr_upscale_to_y = p.hr_resize_x * p.height // p.width
    elif p.hr_resize_x == 0:
        p.hr_upscale_to_x = p.hr_resize_y * p.width // p.height
        p.hr_upscale_to_y = p.hr_resize_y
    else:
        target_w, target_h = p.hr_resize_x, p.hr_resize_y
        if p.width / p.height < p.hr_resize_x / p.hr_resize_y:
            p.hr_upscale_to_x = p.hr_resize_x
            p.hr_upscale_to_y = p.hr_resize_x * p.height // p.width
        else:
            p.hr_upscale_to_x = p.hr_resize_y * p.width // p.height
            p.hr_upscale_to_y = p.hr_resize_y
        p.truncate_x = (p.hr_upscale_to_x - target_w) // opt_f
        p.truncate_y = (p.hr_upscale_to_y - target_h) // opt_f


def parse_extra_network_prompts(p) -> None:
    sl = slice(p.iteration * p.batch_size, (p.iteration + 1) * p.batch_size)
    p.hr_prompts, p.hr_extra_network_data = extra_networks.parse_prompts(p.all_hr_prompts[sl])
    p.hr_negative_prompts, _ = extra_networks.parse_prompts(p.all_hr_negative_prompts[sl])


def _upscaled_latents(p, latents: torch.Tensor, opt_f: int) -> torch.Tensor:
    mode = p.latent_scale_mode
    size = (p.hr_upscale_to_y // opt_f, p.hr_upscale_to_x // opt_f)
    antialias = bool(mode["antialias"]) and mode["mode"] in ("bilinear", "bicubic")
    latents = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode["mode"], antialias=antialias)
    tx, ty = p.truncate_x, p.truncate_y
    return latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2, tx // 2:latents.shape[3] - (tx + 1) // 2]


def _upscaled_images(p, first: list, opt_f: int) -> list:
    tx, ty = p.truncate_x, p.truncate_y
    res = []
    for image in first:
        image = images.resize_image(0, image, p.hr_upscale_to_x, p.hr_upscale_to_y, upscaler_name=p.hr_upscaler)
        if tx or ty:  # the crop A1111 makes on the latents, in pixels
            image = image.crop((tx // 2 * opt_f, ty // 2 * opt_f, image.width - (tx + 1) // 2 * opt_f,
                                image.height - (ty + 1) // 2 * opt_f))
        res.append(image)
    return res


def _apply_embeddings(p, sd_model) -> tuple[list[str], list[str]]:
    """The Hires prompts' embedding words; `TI hashes` keeps the first pass's entries too."""
    before = p.extra_generation_params.get("TI hashes")
    prompts, negative = sd_hijack.model_hijack.apply_embeddings(sd_model, p.hr_prompts, p.hr_negative_prompts, p)
    after = p.extra_generation_params.get("TI hashes")
    if before and after and after != before:
        entries = [x.strip() for x in f"{before},{after}".split(",") if x.strip()]
        p.extra_generation_params["TI hashes"] = ", ".join(dict.fromkeys(entries))
    elif before and not after:
        p.extra_generation_params["TI hashes"] = before
    return prompts, negative


def sample(p, sd_model) -> list:
    """Both passes for one batch → the final images."""
    opt_f = int(getattr(sd_model.pipe, "vae_scale_factor", 8))
    latent = p.latent_scale_mode is not None
    first = diffusion_passes.txt2img(p, sd_model, p.seeds, output_type="latent" if latent else "pil")
    if shared.state.interrupted:
        return diffusion_passes.decode_latents(sd_model, first) if latent else first
    shared.state.job_no += 1
    p.is_hr_pass = True
    try:
        init = _upscaled_latents(p, first, opt_f) if latent else _upscaled_images(p, first, opt_f)
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.hr_extra_network_data)
        prompts, negative_prompts = _apply_embeddings(p, sd_model)
        steps = p.hr_second_pass_steps or p.steps
        length = diffusion_passes.schedule_for_exact_steps(steps, float(p.denoising_strength))
        return diffusion_passes.img2img(p, sd_model, init, p.seeds, prompts, negative_prompts,
                                        float(p.denoising_strength), length, p.hr_sampler_name or p.sampler_name)
    finally:
        p.is_hr_pass = False
