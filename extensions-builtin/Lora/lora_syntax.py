"""`<lora:NAME[:te[:unet[:dyn]]]>` arguments (A1111 1.2) → LoraTag, with a clear error for a bad tag.

A1111 raises on a bad tag and then disables every Lora of the batch; here only the bad tag is skipped, and
multipliers must be finite numbers (A1111 accepts `nan`/`inf`). Block weights (`lbw=`/`w=`, LBW's positional
preset form, `in=`/`mid=`/`out=`) are read into LoraTag.blocks (lora_block_weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import lora_block_weights


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float
    dyn: int | None
    text: str  # the tag's argument text, `NAME:0.5:unet=1`
    blocks: lora_block_weights.BlockWeights | None = None


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


def parse_lora_params(params, presets: dict[str, str] | None = None) -> LoraTag:
    """One ExtraNetworkParams → LoraTag. Unknown named keys (start=, ...) are ignored, as in A1111.

    `presets`: block-weight presets by name (lora_block_weights.all_presets; the built-ins when None)."""
    presets = lora_block_weights.BUILTIN_PRESETS if presets is None else presets
    positional = list(params.positional)
    named = dict(params.named)
    text = ":".join(str(x) for x in params.items)
    if not positional or not str(positional[0]).strip():
        raise LoraTagError("no Lora name")
    blocks = None
    # LBW's older form puts the block weights where A1111 has the unet multiplier: `<lora:x:1:OUTALL>`
    if len(positional) > 2 and lora_block_weights.looks_like_vector_or_preset(str(positional[2]).strip(), presets):
        blocks = _blocks(lora_block_weights.parse_vector, str(positional[2]), presets)
        positional = positional[:2]
    te = _multiplier(positional[1], "multiplier") if len(positional) > 1 else 1.0
    te = _multiplier(named["te"], "te") if "te" in named else te
    unet = _multiplier(positional[2], "unet multiplier") if len(positional) > 2 else te
    unet = _multiplier(named["unet"], "unet") if "unet" in named else unet
    dyn = _dyn(positional[3]) if len(positional) > 3 else None
    dyn = _dyn(named["dyn"]) if "dyn" in named else dyn
    vector_text = named.get("lbw", named.get("w"))
    if vector_text is not None:
        if blocks is not None:
            raise LoraTagError("block weights are given twice")
        blocks = _blocks(lora_block_weights.parse_vector, vector_text, presets)
    readable = _blocks(lambda x, _: lora_block_weights.parse_named(x), named, presets)
    if readable is not None:
        if blocks is not None:
            raise LoraTagError("use either lbw=/w= or in=/mid=/out=, not both")
        blocks = readable
    return LoraTag(name=positional[0], te=te, unet=unet, dyn=dyn, text=text, blocks=blocks)


def _blocks(parse, value, presets):
    try:
        return parse(value, presets)
    except lora_block_weights.BlockWeightError as e:
        raise LoraTagError(str(e)) from None
