"""txt2img jobs for the UI and the API: build the processing object, run it under the queue lock."""
from __future__ import annotations

import contextvars
import os
import threading
import time
from typing import Any

from modules import call_queue, processing, progress, shared
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
                      override_settings: dict | None = None) -> StableDiffusionProcessingTxt2Img:
    return StableDiffusionProcessingTxt2Img(
        prompt=prompt or "", negative_prompt=negative_prompt or "", steps=int(steps), sampler_name=sampler_name,
        width=int(width), height=int(height), seed=int(seed if seed is not None else -1),
        batch_size=int(batch_size), n_iter=int(n_iter), cfg_scale=float(cfg_scale),
        override_settings=override_settings or {})


def _reload_checkpoint(name: str) -> None:
    from modules import sd_models
    shared.opts.set("sd_model_checkpoint", name, run_callbacks=False)
    sd_models.reload_model_weights()


def run(p: processing.StableDiffusionProcessing) -> Processed:
    """Runs one job under `call_queue.queue_lock`.

    A checkpoint in override_settings is switched here, not by process_images: setting the option there would
    run its onchange callback, which takes the queue lock we already hold.
    """
    with call_queue.queue_lock:
        wanted = p.override_settings.pop("sd_model_checkpoint", None)
        previous = shared.opts.sd_model_checkpoint
        switched = wanted is not None and wanted != previous
        if switched:
            _reload_checkpoint(wanted)
        try:
            return processing.process_images(p)
        finally:
            if switched and p.override_settings_restore_afterwards:
                _reload_checkpoint(previous)


def txt2img_ui(prompt: str, negative_prompt: str, steps: float, sampler_name: str, width: float, height: float,
               seed: float, batch_size: float, n_iter: float, cfg_scale: float, request: Any = None,
               progress_bar: Any = None):
    """The Generate button: runs the job in a worker thread while the progress bar follows shared.state.

    Returns (images, infotext HTML, generation info state). Every comment also becomes a warning toast.
    """
    import gradio as gr

    from modules import ui_common

    p = create_processing(prompt, negative_prompt, steps, sampler_name, width, height, seed, batch_size, n_iter,
                          cfg_scale)
    outcome: dict = {}

    def work():
        try:
            outcome["processed"] = run(p)
        except Exception as e:  # shown under the gallery; the server keeps running
            from modules import errors
            errors.display(e, "txt2img")
            outcome["error"] = f"{type(e).__name__}: {e}"

    # The context copy lets gr.Warning raised inside the job (by extensions) reach this event's page.
    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(work,), name="txt2img-job", daemon=True)
    started = time.time()
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if progress_bar is not None:
            if progress.is_active():
                progress_bar(shared.state.progress(), desc=progress.describe())
            else:
                progress_bar(None, desc="Waiting for the model..." if time.time() - started > 0.5 else None)

    if "error" in outcome:
        gr.Warning(outcome["error"])
        return [], ui_common.infotext_html("", error=outcome["error"]), {"infotexts": [], "comments": ""}

    processed: Processed = outcome["processed"]
    for line in (processed.comments or "").split("\n"):
        if line.strip():
            gr.Warning(line)
    info = {"infotexts": list(processed.infotexts), "comments": processed.comments or ""}
    first = processed.infotexts[0] if processed.infotexts else processed.info
    return list(processed.images), ui_common.infotext_html(first, processed.comments), info
