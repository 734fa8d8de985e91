"""Pasting infotext into the txt2img/img2img fields (A1111's paste button and image drop): parse, let extensions
rewrite it (`on_infotext_pasted`: the Lora extension re-points `<lora:...>` tags by `Lora hashes` and turns AddNet
fields into tags), then read the field values (the Hires. fix ones as A1111 maps them)."""
from __future__ import annotations

from typing import Any

from modules import infotext_utils, samplers, script_callbacks

FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")
HIRES_FIELDS = ("enable_hr", "hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_scale", "hr_resize_x",
                "hr_resize_y", "hr_sampler_name", "hr_prompt", "hr_negative_prompt")
IMG2IMG_FIELDS = FIELDS + ("denoising_strength",)
SAME_SAMPLER = "Use same sampler"


def looks_like_infotext(text: str) -> bool:
    last = (text or "").strip().split("\n")[-1]
    return "Steps:" in last and len(infotext_utils.re_param.findall(last)) >= 3


def parse(text: str) -> dict[str, Any]:
    params = infotext_utils.parse_generation_parameters(text)
    script_callbacks.infotext_pasted_callback(text, params)
    return params


def _number(value: Any, kind: type, default: Any) -> Any:
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return default


def _hires_values(params: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """A1111's rule: the hires fix was on when the text has a denoising strength and a hires size or upscaler."""
    enabled = "Denoising strength" in params and any(
        k in params for k in ("Hires upscale", "Hires upscaler", "Hires resize-1"))
    if not enabled:
        return {"enable_hr": False, "denoising_strength": _number(params.get("Denoising strength"), float,
                                                                  current.get("denoising_strength"))}
    sampler = params.get("Hires sampler", SAME_SAMPLER)
    return {
        "enable_hr": True,
        "hr_upscaler": params.get("Hires upscaler", "Latent"),
        "hr_second_pass_steps": _number(params.get("Hires steps", 0), int, 0),
        "denoising_strength": _number(params.get("Denoising strength"), float, current.get("denoising_strength")),
        "hr_scale": _number(params.get("Hires upscale", 2.0), float, 2.0),
        "hr_resize_x": _number(params.get("Hires resize-1", 0), int, 0),
        "hr_resize_y": _number(params.get("Hires resize-2", 0), int, 0),
        "hr_sampler_name": sampler if sampler in samplers.all_samplers else SAME_SAMPLER,
        "hr_prompt": params.get("Hires prompt", ""),
        "hr_negative_prompt": params.get("Hires negative prompt", ""),
    }


def field_values(text: str, current: dict[str, Any]) -> dict[str, Any]:
    """The values of the fields in `current` (FIELDS, HIRES_FIELDS, IMG2IMG_FIELDS) for pasted infotext; fields
    the text does not mention keep their current value. Text that is not infotext is left as a plain prompt."""
    if not looks_like_infotext(text):
        return dict(current)
    params = parse(text)
    sampler = params.get("Sampler")
    values = {
        "prompt": params.get("Prompt", ""),
        "negative_prompt": params.get("Negative prompt", ""),
        "steps": _number(params.get("Steps"), int, current.get("steps")),
        "sampler_name": sampler if sampler in samplers.all_samplers else current.get("sampler_name"),
        "cfg_scale": _number(params.get("CFG scale"), float, current.get("cfg_scale")),
        "distilled_cfg_scale": _number(params.get("Distilled CFG Scale"), float, current.get("distilled_cfg_scale")),
        "seed": _number(params.get("Seed"), int, current.get("seed")),
        "width": _number(params.get("Size-1"), int, current.get("width")),
        "height": _number(params.get("Size-2"), int, current.get("height")),
    }
    values.update(_hires_values(params, current))
    return {k: values.get(k, v) for k, v in current.items()}
