"""Sampler names (A1111 labels) mapped to diffusers schedulers."""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

default_sampler_name = "Euler a"

_schedulers = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "DDIM": (DDIMScheduler, {}),
}

all_samplers = list(_schedulers)
samplers = all_samplers


def scheduler_for(name: str | None, sd_model):
    """A fresh scheduler of the named kind built from the model's own scheduler config."""
    cls, extra = _schedulers.get(name or default_sampler_name, _schedulers[default_sampler_name])
    cache = sd_model.__dict__.setdefault("_scheduler_cache", {})
    key = name or default_sampler_name
    if key not in cache:
        base_config = getattr(sd_model, "base_scheduler_config", None) or sd_model.pipe.scheduler.config
        cache[key] = cls.from_config(base_config, **extra)
    return cache[key]
