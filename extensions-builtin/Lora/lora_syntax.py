"""`<lora:NAME[:te[:unet[:dyn]]]>` arguments (A1111 1.2) → LoraTag, with a clear error for a bad tag.

A1111 raises on a bad tag and then disables every Lora of the batch; here only the bad tag is skipped, and
multipliers must be finite numbers (A1111 accepts `nan`/`inf`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float
    dyn: int | None
    text: str  # the tag's argument text, `NAME:0.5:unet=1`


class LoraTagError(ValueError):
    pass


def _multiplier(value: str, what: str) -> float:
    try:
        res = float(value)
    except (TypeError, ValueError):
        raise LoraTagError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(res):
        raise LoraTagError(f"{what} {value!r} is not a finite number")
    return res


def _dyn(value: str) -> int:
    try:
        res = int(value)
    except (TypeError, ValueError):
        raise LoraTagError(f"dyn {value!r} is not a whole number") from None
    if res < 1:
        raise LoraTagError(f"dyn {value!r} must be at least 1")
    return res


def parse_lora_params(params) -> LoraTag:
    """One ExtraNetworkParams → LoraTag. Unknown named keys (lbw=, start=, ...) are ignored, as in A1111."""
    positional = list(params.positional)
    named = dict(params.named)
    text = ":".join(str(x) for x in params.items)
    if not positional or not str(positional[0]).strip():
        raise LoraTagError("no Lora name")
    te = _multiplier(positional[1], "multiplier") if len(positional) > 1 else 1.0
    te = _multiplier(named["te"], "te") if "te" in named else te
    unet = _multiplier(positional[2], "unet multiplier") if len(positional) > 2 else te
    unet = _multiplier(named["unet"], "unet") if "unet" in named else unet
    dyn = _dyn(positional[3]) if len(positional) > 3 else None
    dyn = _dyn(named["dyn"]) if "dyn" in named else dyn
    return LoraTag(name=positional[0], te=te, unet=unet, dyn=dyn, text=text)
