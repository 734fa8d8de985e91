"""Callbacks extensions register for host events (A1111 names and signatures)."""
from __future__ import annotations

import inspect
from collections import namedtuple
from typing import Any, Callable

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class CFGDenoiserParams:
    """What A1111 passes to on_cfg_denoiser callbacks before each sampling step (its field names). Here `x` is the
    pipeline's latents before the step and `denoiser` the diffusers pipeline; `sampling_step` counts from 0 within
    the pass, `total_sampling_steps` is the number of steps the pass runs."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


_callback_names = [
    "callbacks_app_started", "callbacks_model_loaded", "callbacks_ui_tabs", "callbacks_ui_train_tabs",
    "callbacks_ui_settings", "callbacks_before_image_saved", "callbacks_image_saved", "callbacks_infotext_pasted",
    "callbacks_script_unloaded", "callbacks_before_ui", "callbacks_list_optimizers", "callbacks_list_unets",
    "callbacks_before_token_counter", "callbacks_cfg_denoiser",
]
callback_map: dict[str, list[ScriptCallback]] = {name: [] for name in _callback_names}


def _caller_script() -> str:
    stack = [x for x in inspect.stack() if x.filename != __file__]
    return stack[0].filename if stack else "unknown file"


def add_callback(callbacks: list, fun: Callable, *, name: str | None = None, category: str | None = None) -> None:
    callbacks.append(ScriptCallback(_caller_script(), fun, name))


def remove_current_script_callbacks() -> None:
    filename = _caller_script()
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(cb)


def remove_callbacks_for_function(callback_func: Callable) -> None:
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def clear_callbacks() -> None:
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(name: str, *args: Any) -> list:
    results = []
    for c in list(callback_map[name]):
        try:
            results.append(c.callback(*args))
        except Exception:
            errors.report(f"Error executing callback {c.callback} for {name}", exc_info=True)
    return results


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    _run("callbacks_cfg_denoiser", params)


def app_started_callback(demo, app) -> None:
    _run("callbacks_app_started", demo, app)


def model_loaded_callback(sd_model) -> None:
    _run("callbacks_model_loaded", sd_model)


def ui_tabs_callback() -> list:
    res = []
    for r in _run("callbacks_ui_tabs"):
        res += r or []
    return res


def ui_settings_callback() -> None:
    _run("callbacks_ui_settings")


def before_image_saved_callback(params: ImageSaveParams) -> None:
    _run("callbacks_before_image_saved", params)


def image_saved_callback(params: ImageSaveParams) -> None:
    _run("callbacks_image_saved", params)


def infotext_pasted_callback(infotext: str, params: dict) -> None:
    _run("callbacks_infotext_pasted", infotext, params)


def script_unloaded_callback() -> None:
    _run("callbacks_script_unloaded")


def before_ui_callback() -> None:
    _run("callbacks_before_ui")


def on_app_started(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_app_started"], callback, name=name)


def on_model_loaded(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name)


def on_ui_tabs(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name)


def on_ui_train_tabs(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_ui_train_tabs"], callback, name=name)


def on_ui_settings(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name)


def on_before_image_saved(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_before_image_saved"], callback, name=name)


def on_image_saved(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_image_saved"], callback, name=name)


def on_infotext_pasted(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_infotext_pasted"], callback, name=name)


def on_script_unloaded(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name)


def on_before_ui(callback: Callable, *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_before_ui"], callback, name=name)


def on_cfg_denoiser(callback: Callable, *, name: str | None = None) -> None:
    """callback(params: CFGDenoiserParams) before each sampling step of every pass."""
    add_callback(callback_map["callbacks_cfg_denoiser"], callback, name=name, category="cfg_denoiser")
