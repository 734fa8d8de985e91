"""Flux.1 / Chroma transformer: the BFL single-file layout (`double_blocks.*`, `single_blocks.*`, as in
`flux1-dev.safetensors`, ComfyUI and Forge files) ↔ diffusers' FluxTransformer2DModel / ChromaTransformer2DModel
parameters, and the transformer's config read off the tensor shapes.

One mapping, used both ways (as sd_models_ldm does for SD): `transformer_ref(key)` names the file tensor, the rows of
it and the reshaping a diffusers parameter comes from. BFL fuses q, k, v (and the single blocks' MLP input) into one
Linear; the rows of each part are derived from the shapes (hidden size, MLP width), never from Flux.1's 3072 (which
diffusers 0.42.1 hard-codes in its converter).

What shapes cannot tell follows the family's fixed rules: rotary axes split the head width 1/8, 7/16, 7/16 (Flux.1's
16, 56, 56 for 128); the MLP is 4x the hidden size (diffusers builds Flux blocks with mlp_ratio 4).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from modules.sd_models_ldm import CheckpointFormatError, LdmRef, read_ref

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
PROBE = "double_blocks.0.img_attn.qkv.weight"
VARIANTS = ("dev", "schnell", "chroma")


def find_prefix(keys) -> str | None:
    """The prefix under which a file holds a BFL-layout Flux/Chroma transformer, None when it holds none."""
    keys = set(keys)
    for prefix in PREFIXES:
        if prefix + PROBE in keys:
            return prefix
    return None


def detect_variant(keys, prefix: str) -> str:
    """"dev" (guidance embedding), "schnell" (none) or "chroma" (a distilled guidance layer, no vector input)."""
    keys = set(keys)
    if any(k.startswith(prefix + "distilled_guidance_layer.") for k in keys):
        return "chroma"
    if prefix + "vector_in.in_layer.weight" not in keys:
        raise CheckpointFormatError("a BFL-layout transformer with neither `vector_in` (Flux.1) nor "
                                    "`distilled_guidance_layer` (Chroma): not a Flux-family model this host knows")
    return "dev" if prefix + "guidance_in.in_layer.weight" in keys else "schnell"


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise CheckpointFormatError(f"missing tensor {key}") from None


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux.1's rotary split of a head (16, 56, 56 for 128), scaled; each axis must be even."""
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointFormatError(f"a head width of {head_dim} cannot be split into Flux's rotary axes "
                                    f"(1/8, 7/16, 7/16, each even); widths that are multiples of 32 can")
    return axes


def transformer_config(shapes: Mapping[str, tuple], prefix: str, variant: str) -> dict:
    """The diffusers config of the transformer in `shapes` (keys under `prefix`)."""
    p = prefix
    inner, in_channels = _shape(shapes, p + "img_in.weight")
    head_dim = _shape(shapes, p + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if inner % head_dim:
        raise CheckpointFormatError(f"hidden size {inner} is not a whole number of {head_dim}-wide heads")
    config = {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, p + "final_layer.linear.weight")[0],
        "num_layers": _count(shapes, rf"^{re.escape(p)}double_blocks\.(\d+)\."),
        "num_single_layers": _count(shapes, rf"^{re.escape(p)}single_blocks\.(\d+)\."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(shapes, p + "txt_in.weight")[1],
        "axes_dims_rope": rope_axes(head_dim),
    }
    if config["in_channels"] != config["out_channels"]:
        raise CheckpointFormatError(f"the transformer takes {config['in_channels']} input channels for "
                                    f"{config['out_channels']} output ones: a FLUX.1 Fill/Canny/Depth model, whose "
                                    f"control image this host does not provide")
    mlp = _shape(shapes, p + "double_blocks.0.img_mlp.0.weight")[0]
    single_rows = 3 * inner + mlp
    if config["num_single_layers"]:
        single_rows = _shape(shapes, p + "single_blocks.0.linear1.weight")[0]
    if mlp != 4 * inner or single_rows != 3 * inner + mlp:
        raise CheckpointFormatError(f"an MLP {mlp} wide for a hidden size of {inner}: diffusers builds Flux blocks "
                                    f"with an MLP 4x the hidden size")
    if variant == "chroma":
        hidden, channels = _shape(shapes, p + "distilled_guidance_layer.in_proj.weight")
        layers = _count(shapes, rf"^{re.escape(p)}distilled_guidance_layer\.layers\.(\d+)\.")
        config.update({"approximator_num_channels": channels, "approximator_hidden_dim": hidden,
                       "approximator_layers": layers})
    else:
        config.update({"pooled_projection_dim": _shape(shapes, p + "vector_in.in_layer.weight")[1],
                       "guidance_embeds": variant == "dev"})
    return config


# --- the mapping --------------------------------------------------------------------------------------------------
_SIMPLE = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_DOUBLE_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
               "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
               "attn.add_v_proj": ("txt_attn.qkv", 2)}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1's rows, in order

_re_double = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_re_single = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
_re_approximator = re.compile(r"^distilled_guidance_layer\.(layers\.\d+)\.linear_([12])$")
_re_approximator_norm = re.compile(r"^distilled_guidance_layer\.norms\.(\d+)$")


def _single_rows(module: str, config: Mapping) -> tuple[int, int, int]:
    """(index, parts, span) of a single block's part in linear1 (q, k, v of the hidden size, then the MLP)."""
    inner = config["attention_head_dim"] * config["num_attention_heads"]
    widths = [inner, inner, inner, 4 * inner]
    unit = math.gcd(*widths)
    i = _SINGLE_PARTS.index(module)
    return sum(widths[:i]) // unit, sum(widths) // unit, widths[i] // unit


def transformer_ref(key: str, config: Mapping, prefix: str = "") -> LdmRef | None:
    """Where diffusers parameter `key` of the transformer lives in a BFL-layout file."""
    path, _, param = key.rpartition(".")
    if path in _SIMPLE:
        return LdmRef(f"{prefix}{_SIMPLE[path]}.{param}")
    if path == "norm_out.linear":  # BFL's (shift, scale) is diffusers' (scale, shift)
        return LdmRef(f"{prefix}final_layer.adaLN_modulation.1.{param}", "swap_halves")
    if m := _re_approximator.match(path):
        return LdmRef(f"{prefix}distilled_guidance_layer.{m.group(1)}.{'in' if m.group(2) == '1' else 'out'}_layer."
                      f"{param}")
    if (m := _re_approximator_norm.match(path)) and param == "weight":
        return LdmRef(f"{prefix}distilled_guidance_layer.norms.{m.group(1)}.scale")
    if m := _re_double.match(path):
        block, module = f"{prefix}double_blocks.{m.group(1)}", m.group(2)
        if module in _DOUBLE:
            return LdmRef(f"{block}.{_DOUBLE[module]}.{param}")
        if module in _DOUBLE_NORMS and param == "weight":
            return LdmRef(f"{block}.{_DOUBLE_NORMS[module]}.scale")
        if module in _DOUBLE_QKV:
            fused, index = _DOUBLE_QKV[module]
            return LdmRef(f"{block}.{fused}.{param}", "rows", index, 3)
        return None
    if m := _re_single.match(path):
        block, module = f"{prefix}single_blocks.{m.group(1)}", m.group(2)
        if module in _SINGLE:
            return LdmRef(f"{block}.{_SINGLE[module]}.{param}")
        if module in _SINGLE_NORMS and param == "weight":
            return LdmRef(f"{block}.{_SINGLE_NORMS[module]}.scale")
        if module in _SINGLE_PARTS:
            index, parts, span = _single_rows(module, config)
            return LdmRef(f"{block}.linear1.{param}", "rows", index, parts, span)
    return None


def to_bfl_state_dict(transformer: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The BFL single-file layout of a diffusers Flux/Chroma transformer (inverse of the loader; for tests and
    export)."""
    config = transformer.config
    res: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in transformer.state_dict().items():
        ref = transformer_ref(key, config, prefix)
        if ref is None:
            raise CheckpointFormatError(f"transformer.{key} has no place in the BFL layout")
        t = tensor.detach().cpu()
        if ref.transform == "rows":
            fused.setdefault(ref.key, {})[ref.index] = t
            continue
        res[ref.key] = read_ref(ref, {ref.key: t}).contiguous()  # swap_halves is its own inverse
    for key, parts in fused.items():
        res[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0).contiguous()
    return res
