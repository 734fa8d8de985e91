"""Unmatched file keys, for the report: the layer name of a key no layer matched, and short key groups
(`lora_unet_double_blocks_*`) with their counts (lora_coverage)."""
from __future__ import annotations

import re
from typing import Iterable

_re_part_tail = re.compile(
    r"\.(?:lora_(?:A|B|down|up|mid)(?:\.[^.]+)?\.weight|lora_linear_layer\.(?:up|down)\.weight|lora\.(?:up|down)\."
    r"weight|lora_magnitude_vector(?:\.[^.]+)*|(?:processor\.)?to_(?:q|k|v|out)_lora\.(?:up|down)\.weight|alpha|"
    r"dora_scale|scale|(?:hada|lokr|oft|boft|glora|ia3)_\w+|[ab][12]\.weight|w_norm|b_norm|diff|diff_b|on_input|"
    r"weight|(?:lora_[AB]\.)?bias)$")
_re_kohya_base = re.compile(r"^([A-Za-z0-9_]+)\.")
_re_first_index = re.compile(r"^(.*?[._])\d+(?=[._]|$)")


def file_base(key: str) -> str:
    """The layer name of a key no layer matched: kohya bases end at the first dot, dotted bases before a
    known part spelling."""
    m = _re_kohya_base.match(key)
    if m and "_" in m.group(1) and m.group(1) not in ("base_model", "text_encoder", "text_encoder_2",
                                                      "diffusion_model", "bundle_emb"):
        return m.group(1)
    m = _re_part_tail.search(key)
    if m:
        return key[:m.start()]
    return key.rpartition(".")[0] or key


def key_group(key: str) -> str:
    """A short family name for a key: its base up to the first block number (`lora_unet_double_blocks_*`,
    `text_encoder_2.encoder.layers.*`)."""
    base = file_base(key)
    m = _re_first_index.match(base)
    return (m.group(1) + "*") if m else base


def group_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    """[(group, key count)], the largest groups first."""
    counts: dict[str, int] = {}
    for key in keys:
        g = key_group(key)
        counts[g] = counts.get(g, 0) + 1
    return sorted(counts.items(), key=lambda x: (-x[1], x[0]))
