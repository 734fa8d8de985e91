"""Stable Diffusion 3 / 3.5 transformer: the single-file MMDiT layout (`joint_blocks.*`, as in SAI's
`sd3.5_large.safetensors` and ComfyUI files, with or without `model.diffusion_model.`) ↔ diffusers'
SD3Transformer2DModel parameters, and the config read off the tensor shapes.

One mapping used both ways (as modules/flux_layout.py): `transformer_ref(key)` names the file tensor and rows a
diffusers parameter comes from. q/k/v are fused per attention (three equal row blocks); the final adaLN (and the last
block's context adaLN) hold (shift, scale) where diffusers has (scale, shift).

What shapes cannot tell follows SD3's fixed rules: 64-wide heads when the file has no q/k norm (SD3 Medium; SD3.5
files carry `ln_q`, whose width is the head's), a default sample size of 128 latents.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from modules.sd_models_ldm import CheckpointFormatError, LdmRef, read_ref

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
PROBE = "joint_blocks.0.x_block.attn.qkv.weight"


def find_prefix(keys) -> str | None:
    keys = set(keys)
    for prefix in PREFIXES:
        if prefix + PROBE in keys:
            return prefix
    return None


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise CheckpointFormatError(f"missing tensor {key}") from None


def transformer_config(shapes: Mapping[str, tuple], prefix: str) -> dict:
    p = prefix
    layers = len({m.group(1) for k in shapes if (m := re.match(rf"^{re.escape(p)}joint_blocks\.(\d+)\.", k))})
    hidden, joint = _shape(shapes, p + "context_embedder.weight")
    patch_in = _shape(shapes, p + "x_embedder.proj.weight")
    qk_norm = p + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    head_dim = _shape(shapes, p + "joint_blocks.0.x_block.attn.ln_q.weight")[0] if qk_norm else 64
    if hidden % head_dim:
        raise CheckpointFormatError(f"hidden size {hidden} is not a whole number of {head_dim}-wide heads")
    positions = _shape(shapes, p + "pos_embed")[1]
    max_size = math.isqrt(positions)
    if max_size * max_size != positions:
        raise CheckpointFormatError(f"pos_embed holds {positions} positions, not a square grid")
    patch = patch_in[2]
    dual = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"^{re.escape(p)}joint_blocks\.(\d+)\.x_block\."
                                                                      r"attn2\.", k))})
    return {
        "sample_size": 128, "patch_size": patch, "in_channels": patch_in[1], "num_layers": layers,
        "attention_head_dim": head_dim, "num_attention_heads": hidden // head_dim, "joint_attention_dim": joint,
        "caption_projection_dim": hidden, "pooled_projection_dim": _shape(shapes, p + "y_embedder.mlp.0.weight")[1],
        "out_channels": _shape(shapes, p + "final_layer.linear.weight")[0] // (patch * patch),
        "pos_embed_max_size": max_size, "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


_SIMPLE = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}
_QKV = {f"{attn}.{name}": (fused, i)
        for attn, names, fused in (("attn", ("to_q", "to_k", "to_v"), "x_block.attn.qkv"),
                                   ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "context_block.attn.qkv"),
                                   ("attn2", ("to_q", "to_k", "to_v"), "x_block.attn2.qkv"))
        for i, name in enumerate(names)}
_re_block = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def transformer_ref(key: str, config: Mapping, prefix: str = "") -> LdmRef | None:
    """Where diffusers parameter `key` of the SD3 transformer lives in a single file."""
    if key == "pos_embed.pos_embed":
        return LdmRef(f"{prefix}pos_embed")
    path, _, param = key.rpartition(".")
    if path in _SIMPLE:
        return LdmRef(f"{prefix}{_SIMPLE[path]}.{param}")
    if path == "norm_out.linear":
        return LdmRef(f"{prefix}final_layer.adaLN_modulation.1.{param}", "swap_halves")
    m = _re_block.match(path)
    if m is None:
        return None
    i, module = int(m.group(1)), m.group(2)
    block = f"{prefix}joint_blocks.{i}"
    if module == "norm1_context.linear":  # the last block's context side only shifts and scales
        last = i == config["num_layers"] - 1
        return LdmRef(f"{block}.context_block.adaLN_modulation.1.{param}", "swap_halves" if last else "")
    if module in _BLOCK:
        return LdmRef(f"{block}.{_BLOCK[module]}.{param}")
    if module in _QKV:
        fused, index = _QKV[module]
        return LdmRef(f"{block}.{fused}.{param}", "rows", index, 3)
    return None


def to_single_file_state_dict(transformer: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The single-file layout of a diffusers SD3 transformer (inverse of the loader; for tests and export)."""
    config = transformer.config
    res: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in transformer.state_dict().items():
        ref = transformer_ref(key, config, prefix)
        if ref is None:
            raise CheckpointFormatError(f"transformer.{key} has no place in the SD3 single-file layout")
        t = tensor.detach().cpu()
        if ref.transform == "rows":
            fused.setdefault(ref.key, {})[ref.index] = t
            continue
        res[ref.key] = read_ref(ref, {ref.key: t}).contiguous()
    for key, parts in fused.items():
        res[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous()
    return res
