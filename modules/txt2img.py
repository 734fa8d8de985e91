"""txt2img jobs for the UI and the API: build the processing object, run it (any job) under the queue lock."""
from __future__ import annotations

import os
from typing import Any

from modules import call_queue, processing, sd_modules, shared
from modules.processing import Processed, StableDiffusionProcessingTxt2Img


def is_tiny_checkpoint(info: Any) -> bool:
    """The embedded default models (`tiny-sd1`, `tiny-sdxl`) only make sense at 64x64."""
    if info is None:
        return False
    names = [getattr(info, attr, None) or "" for attr in ("name", "model_name", "title", "filename")]
    return any(os.path.basename(str(n).rstrip("/\\")).startswith("tiny-") for n in names)


def default_size() -> int:
    """512 as in A1111, or 64 when the selected checkpoint is one of the tiny default models."""
    try:
        from modules import sd_models
        info = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        if info is None:
            info = sd_models.select_checkpoint()
    except Exception:
        info = None
    return 64 if is_tiny_checkpoint(info) else 512


def create_processing(prompt: str, negative_prompt: str, steps: int, sampler_name: str, width: int, height: int,
                      seed: int, batch_size: int, n_iter: int, cfg_scale: float,
                      override_settings: dict | None = None, **hires: Any) -> StableDiffusionProcessingTxt2Img:
    """`hires`: the Hires. fix fields (enable_hr, hr_upscaler, hr_second_pass_steps, denoising_strength, hr_scale,
    hr_resize_x, hr_resize_y, hr_sampler_name, hr_prompt, hr_negative_prompt), A1111 names."""
    return StableDiffusionProcessingTxt2Img(
        prompt=prompt or "", negative_prompt=negative_prompt or "", steps=int(steps), sampler_name=sampler_name,
        width=int(width), height=int(height), seed=int(seed if seed is not None else -1),
        batch_size=int(batch_size), n_iter=int(n_iter), cfg_scale=float(cfg_scale),
        override_settings=override_settings or {}, **hires)


LOADING_OPTIONS = ("sd_model_checkpoint", sd_modules.OPTION)  # what the model is loaded from


def _reload_checkpoint(values: dict) -> None:
    from modules import sd_models
    for key, value in values.items():
        shared.opts.set(key, value, run_callbacks=False)
    # the checkpoint is resolved now: a start-up load finishing meanwhile re-selects its own model in the options
    wanted = values.get("sd_model_checkpoint")
    sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match(wanted) if wanted else None)


def run(p: processing.StableDiffusionProcessing) -> Processed:
    """Runs one job under `call_queue.queue_lock`.

    A checkpoint (and its text encoder / VAE files) in override_settings is switched here, not by process_images:
    setting the option there would run its onchange callback, which takes the queue lock we already hold.
    """
    with call_queue.queue_lock:
        wanted = {k: p.override_settings.pop(k) for k in LOADING_OPTIONS if k in p.override_settings}
        previous = {k: shared.opts.data.get(k) for k in wanted}
        switched = any(wanted[k] != previous[k] for k in wanted)
        if switched:
            _reload_checkpoint(wanted)
        try:
            return processing.process_images(p)
        finally:
            if switched and p.override_settings_restore_afterwards:
                _reload_checkpoint(previous)


def txt2img_ui(prompt: str, negative_prompt: str, steps: float, sampler_name: str, width: float, height: float,
               seed: float, batch_size: float, n_iter: float, cfg_scale: float, request: Any = None,
               progress_bar: Any = None, enable_hr: bool = False, hr_upscaler: str | None = None,
               hr_second_pass_steps: float = 0, denoising_strength: float = 0.7, hr_scale: float = 2.0,
               hr_resize_x: float = 0, hr_resize_y: float = 0, hr_sampler_name: str | None = None,
               hr_prompt: str = "", hr_negative_prompt: str = "", distilled_cfg_scale: float | None = None):
    """The Generate button: returns (images, infotext HTML, generation info state); see ui_job.run_for_ui."""
    from modules import ui_job

    hires = {}
    if enable_hr:
        hires = dict(enable_hr=True, hr_upscaler=hr_upscaler, hr_second_pass_steps=int(hr_second_pass_steps or 0),
                     denoising_strength=float(denoising_strength), hr_scale=float(hr_scale),
                     hr_resize_x=int(hr_resize_x or 0), hr_resize_y=int(hr_resize_y or 0),
                     hr_sampler_name=hr_sampler_name, hr_prompt=hr_prompt or "",
                     hr_negative_prompt=hr_negative_prompt or "")
    p = create_processing(prompt, negative_prompt, steps, sampler_name, width, height, seed, batch_size, n_iter,
                          cfg_scale, **hires)
    p.distilled_cfg_scale = None if distilled_cfg_scale is None else float(distilled_cfg_scale)
    return ui_job.run_for_ui(p, progress_bar)
