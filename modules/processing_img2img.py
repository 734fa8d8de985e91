"""img2img jobs (A1111's StableDiffusionProcessingImg2Img without inpainting): init images → resized to the job's
size by `resize_mode` → encoded by the VAE → denoised from `denoising_strength`.

diffusers' img2img runs int(steps x denoising strength) of `steps` (A1111 without "fix steps" runs one more).
Mode 3, "Just resize (latent upscale)", encodes each image at its own size and interpolates the latents
(bilinear), as A1111 does.
"""
from __future__ import annotations

import torch

from modules import diffusion_passes, images
from modules.errors import JobInputError


def init(p) -> None:
    """Checks the inputs and prepares one init image per image of a batch (p.batch_init_images)."""
    if p.image_mask is not None:
        raise JobInputError("mask: inpainting is not supported by this host; send img2img without a mask")
    if not p.init_images:
        raise JobInputError("init_images: img2img needs at least one init image")
    if not 0.0 <= float(p.denoising_strength) <= 1.0:
        raise JobInputError(f"denoising_strength must be between 0 and 1, got {p.denoising_strength}")
    if p.resize_mode not in range(len(images.RESIZE_MODES)):
        raise JobInputError(f"resize_mode must be 0-3 ({', '.join(images.RESIZE_MODES)}), got {p.resize_mode}")
    p.extra_generation_params["Denoising strength"] = p.denoising_strength

    prepared = []
    for image in p.init_images:
        image = images.flatten(image)
        if p.resize_mode != 3:
            image = images.resize_image(p.resize_mode, image, p.width, p.height)
        prepared.append(image)
    if len(prepared) == 1:
        p.batch_init_images = prepared * p.batch_size
    elif len(prepared) <= p.batch_size:
        p.batch_size = len(prepared)
        p.batch_init_images = prepared
    else:
        raise JobInputError(f"init_images: {len(prepared)} images for a batch size of {p.batch_size}; send one "
                            f"image, or at most batch_size images")


def _latent_upscaled(p, sd_model) -> torch.Tensor:
    """Resize mode 3: each image encoded at its own size, then its latents interpolated to the job's size."""
    opt_f = int(getattr(sd_model.pipe, "vae_scale_factor", 8))
    parts = []
    for image, seed in zip(p.batch_init_images, p.seeds, strict=False):
        latents = diffusion_passes.encode_images(sd_model, [image], [seed])
        parts.append(torch.nn.functional.interpolate(latents.float(), size=(p.height // opt_f, p.width // opt_f),
                                                     mode="bilinear"))
    return torch.cat(parts)


def sample(p, sd_model) -> list:
    init = _latent_upscaled(p, sd_model) if p.resize_mode == 3 else p.batch_init_images[:len(p.seeds)]
    p.init_latent = init if isinstance(init, torch.Tensor) else None
    return diffusion_passes.img2img(p, sd_model, init, p.seeds, p.prompts, p.negative_prompts,
                                    float(p.denoising_strength), p.steps, p.sampler_name)
