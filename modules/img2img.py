"""img2img jobs for the UI (A1111 module name); the API builds its own processing object (modules/api/api.py)."""
from __future__ import annotations

from typing import Any

from modules.processing import StableDiffusionProcessingImg2Img


def create_processing(init_image: Any, prompt: str, negative_prompt: str, steps: int, sampler_name: str,
                      resize_mode: int, width: int, height: int, denoising_strength: float, seed: int,
                      batch_size: int, n_iter: int, cfg_scale: float,
                      override_settings: dict | None = None) -> StableDiffusionProcessingImg2Img:
    """No init image gives a job that stops with a message naming init_images."""
    return StableDiffusionProcessingImg2Img(
        init_images=[init_image] if init_image is not None else [], prompt=prompt or "",
        negative_prompt=negative_prompt or "", steps=int(steps), sampler_name=sampler_name,
        resize_mode=int(resize_mode or 0), width=int(width), height=int(height),
        denoising_strength=float(denoising_strength), seed=int(seed if seed is not None else -1),
        batch_size=int(batch_size), n_iter=int(n_iter), cfg_scale=float(cfg_scale),
        override_settings=override_settings or {})


def img2img_ui(init_image: Any, prompt: str, negative_prompt: str, steps: float, sampler_name: str,
               resize_mode: int, width: float, height: float, denoising_strength: float, seed: float,
               batch_size: float, n_iter: float, cfg_scale: float, progress_bar: Any = None,
               distilled_cfg_scale: float | None = None):
    """The img2img Generate button: returns (images, infotext HTML, generation info state)."""
    from modules import ui_job

    p = create_processing(init_image, prompt, negative_prompt, steps, sampler_name, resize_mode, width, height,
                          denoising_strength, seed, batch_size, n_iter, cfg_scale)
    p.distilled_cfg_scale = None if distilled_cfg_scale is None else float(distilled_cfg_scale)
    return ui_job.run_for_ui(p, progress_bar)
