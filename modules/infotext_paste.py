"""Pasting infotext into the txt2img fields (A1111's paste button and image drop): parse, let extensions rewrite it
(`on_infotext_pasted`: the Lora extension re-points `<lora:...>` tags by `Lora hashes` and turns AddNet fields into
tags), then read the field values."""
from __future__ import annotations

from typing import Any

from modules import infotext_utils, samplers, script_callbacks

FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")


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


def field_values(text: str, current: dict[str, Any]) -> dict[str, Any]:
    """The txt2img field values for pasted infotext; fields the text does not mention keep their current value.
    Text that is not infotext is left as a plain prompt."""
    if not looks_like_infotext(text):
        return dict(current)
    params = parse(text)
    sampler = params.get("Sampler")
    return {
        "prompt": params.get("Prompt", ""),
        "negative_prompt": params.get("Negative prompt", ""),
        "steps": _number(params.get("Steps"), int, current.get("steps")),
        "sampler_name": sampler if sampler in samplers.all_samplers else current.get("sampler_name"),
        "cfg_scale": _number(params.get("CFG scale"), float, current.get("cfg_scale")),
        "seed": _number(params.get("Seed"), int, current.get("seed")),
        "width": _number(params.get("Size-1"), int, current.get("width")),
        "height": _number(params.get("Size-2"), int, current.get("height")),
    }
