"""Sampler names (A1111 labels) mapped to diffusers schedulers, per model family.

SD models (noise prediction) get the DDPM-family schedulers; flow-matching models (Flux, Chroma) get
FlowMatchEulerDiscreteScheduler, the only diffusers scheduler their pipelines drive with the resolution-dependent
shift. A sampler of the other kind is refused with the names that work (GET /sdapi/v1/samplers and the UI list the
loaded model's).
"""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

default_sampler_name = "Euler a"
default_flow_sampler_name = "Euler"

_schedulers = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DDIM": (DDIMScheduler, {}),
}
_flow_schedulers = {
    "Euler": (FlowMatchEulerDiscreteScheduler, {}),
    "Euler Karras": (FlowMatchEulerDiscreteScheduler, {"use_karras_sigmas": True}),
}

all_samplers = list(dict.fromkeys(list(_schedulers) + list(_flow_schedulers)))  # every name some model takes
samplers = all_samplers


def is_flow_model(sd_model) -> bool:
    return bool(getattr(sd_model, "is_flux", False) or getattr(sd_model, "is_sd3", False))


def _table(sd_model) -> dict:
    return _flow_schedulers if is_flow_model(sd_model) else _schedulers


def samplers_for(sd_model) -> list[str]:
    """The sampler names that work with `sd_model` (every name when no model is loaded)."""
    return all_samplers if sd_model is None else list(_table(sd_model))


def default_for(sd_model) -> str:
    return default_flow_sampler_name if is_flow_model(sd_model) else default_sampler_name


def check(name: str | None, sd_model) -> str:
    """`name` (the model's default when empty), or ValueError naming the samplers that work with the model."""
    if not name:
        return default_for(sd_model)
    table = _table(sd_model)
    if name not in table:
        kind = f"{getattr(sd_model, 'family', 'this model')} (flow matching)" if is_flow_model(sd_model) else \
            "SD models"
        raise ValueError(f"sampler {name!r} does not work with {kind}; use one of: {', '.join(table)}")
    return name


def scheduler_for(name: str | None, sd_model):
    """A fresh scheduler of the named kind built from the model's own scheduler config."""
    table = _table(sd_model)
    default = default_for(sd_model)
    key = name if name in table else default
    cls, extra = table[key]
    cache = sd_model.__dict__.setdefault("_scheduler_cache", {})
    if key not in cache:
        base_config = getattr(sd_model, "base_scheduler_config", None) or sd_model.pipe.scheduler.config
        cache[key] = cls.from_config(base_config, **extra)
    return cache[key]
