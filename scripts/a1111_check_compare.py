"""Comparisons for scripts/a1111_check.py: which tensors both sides save, and how far two saves or images differ."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from safetensors.torch import load_file


def _ndim(digest: str) -> int:
    shape = digest.rsplit(":", 1)[1].strip("()")
    return len([x for x in shape.split(",") if x.strip()])


def selection(digests: dict) -> list[str]:
    """Every 16th weight matrix or kernel of the UNet and text encoder, in name order: both sides save the same."""
    names = [n for n in sorted(digests) if n.startswith(("model.diffusion_model.", "cond_stage_model."))
             and n.endswith(".weight") and _ndim(digests[n]) >= 2]
    return names[::16]


def max_diff(a: str, b: str) -> tuple[float, float]:
    """(max |a - b|, max |a|) over the tensors saved in two files."""
    ta, tb = load_file(a), load_file(b)
    worst, scale = 0.0, 0.0
    for k, v in ta.items():
        worst = max(worst, (v.double() - tb[k].double()).abs().max().item())
        scale = max(scale, v.double().abs().max().item())
    return worst, scale


def image_diff(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two PNGs' RGB values (0-255)."""
    ia = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    ib = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    return float(np.abs(ia - ib).mean())


def changed(reference: dict, now: dict) -> int:
    """How many parameters' digests differ from the reference."""
    return sum(1 for k, v in reference.items() if now.get(k) != v)
