"""Component files of transformer-era models: what a safetensors file holds (a Flux/Chroma/SD3 transformer, CLIP-L,
CLIP-G, T5, a VAE) under which prefix, and each component's config and tensor refs read off the shapes.
SD3 files bundle `text_encoders.clip_g.*` too and their VAE under `first_stage_model.`.

The layouts users have: `clip_l.safetensors`/`clip_g.safetensors` (Hugging Face CLIP names, `text_model.*`),
`t5xxl_fp16.safetensors`/`t5xxl_fp8_e4m3fn.safetensors` (Hugging Face T5 encoder names), `ae.safetensors` (BFL's
VAE: the ldm layout without a prefix) or a diffusers VAE file, and all-in-one files that bundle them next to the
transformer (`text_encoders.clip_l.transformer.*`, `text_encoders.t5xxl.transformer.*`, `vae.*` or
`first_stage_model.*`). What shapes cannot tell follows T5's fixed rules (relative-attention distance 128, layer
norm eps 1e-6, gated-GELU when `wi_0`/`wi_1` exist).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from modules import flux_layout, sd3_layout, sd_models_ldm
from modules.sd_models_ldm import CheckpointFormatError, LdmRef

KINDS = ("transformer", "clip_l", "clip_g", "t5", "vae")
KIND_LABELS = {"transformer": "transformer", "clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5", "vae": "VAE"}
BUNDLED = {  # prefix in all-in-one files → kind
    "text_encoders.clip_l.transformer.": "clip_l",
    "text_encoders.clip_g.transformer.": "clip_g",
    "text_encoders.t5xxl.transformer.": "t5",
    "vae.": "vae",
    "first_stage_model.": "vae",
}
T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_PROBE = "text_model.embeddings.token_embedding.weight"
VAE_LDM_PROBE = "encoder.down.0.block.0.conv1.weight"
VAE_DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"


@dataclass(frozen=True)
class Part:
    """One component inside a file: its kind, the prefix of its keys and (VAE) layout "ldm" or "diffusers"."""

    kind: str
    prefix: str
    layout: str = ""


def find_parts(keys) -> list[Part]:
    """Every component a file holds, the transformer first (layout "bfl": Flux/Chroma, "sd3": SD3's MMDiT)."""
    keys = set(keys)
    parts = []
    prefix = flux_layout.find_prefix(keys)
    if prefix is not None:
        parts.append(Part("transformer", prefix, "bfl"))
    elif (prefix := sd3_layout.find_prefix(keys)) is not None:
        parts.append(Part("transformer", prefix, "sd3"))
    for bundled, kind in BUNDLED.items():
        part = _part_at(keys, bundled, kind)
        if part is not None and not any(p.kind == kind for p in parts):
            parts.append(part)
    if not parts:  # a separate component file: its keys have no prefix
        for kind in ("t5", "clip_l", "vae"):
            part = _part_at(keys, "", kind)
            if part is not None:
                parts.append(part)
    return parts


def unsupported_reason(keys) -> str | None:
    """Why a file's weights cannot be read as plain tensors, or None. Scaled fp8 files (ComfyUI's `scaled_fp8`,
    per-layer `scale_weight`) would load with every weight off by its scale; bitsandbytes NF4/FP4 files pack theirs."""
    for key in keys:
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            return "a scaled fp8 file (ComfyUI's `scale_weight` tensors) is not supported; use an unscaled fp8, bf16 " \
                   "or fp16 file"
        if key.endswith((".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")):
            return "a bitsandbytes NF4/FP4 file is not supported; use an fp8, bf16 or fp16 file"
    return None


def _part_at(keys: set, prefix: str, kind: str) -> Part | None:
    if kind == "t5":
        return Part("t5", prefix) if prefix + T5_PROBE in keys else None
    if kind in ("clip_l", "clip_g"):
        return Part(kind, prefix) if prefix + CLIP_PROBE in keys else None
    if kind == "vae":
        if prefix + VAE_LDM_PROBE in keys:
            return Part("vae", prefix, "ldm")
        if prefix + VAE_DIFFUSERS_PROBE in keys:
            return Part("vae", prefix, "diffusers")
    return None


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise CheckpointFormatError(f"missing tensor {key}") from None


# --- T5 -----------------------------------------------------------------------------------------------------------
def t5_embedding_key(shapes: Mapping[str, tuple], prefix: str) -> str:
    for name in ("shared.weight", "encoder.embed_tokens.weight"):
        if prefix + name in shapes:
            return prefix + name
    raise CheckpointFormatError(f"missing tensor {prefix}shared.weight (T5's token embedding)")


def t5_config(shapes: Mapping[str, tuple], prefix: str) -> dict:
    block = prefix + "encoder.block.0.layer."
    vocab, d_model = _shape(shapes, t5_embedding_key(shapes, prefix))
    buckets, heads = _shape(shapes, block + "0.SelfAttention.relative_attention_bias.weight")
    gated = block + "1.DenseReluDense.wi_0.weight" in shapes
    d_ff = _shape(shapes, block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"))[0]
    return {
        "vocab_size": vocab, "d_model": d_model, "d_kv": _shape(shapes, block + "0.SelfAttention.q.weight")[0] // heads,
        "d_ff": d_ff, "num_layers": _count(shapes, rf"^{re.escape(prefix)}encoder\.block\.(\d+)\."),
        "num_heads": heads, "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": False, "use_cache": False, "decoder_start_token_id": 0, "pad_token_id": 0,
        "eos_token_id": 1,
    }


def t5_ref(key: str, shapes: Mapping[str, tuple], prefix: str) -> LdmRef:
    if key in ("shared.weight", "encoder.embed_tokens.weight"):  # tied: whichever the file has
        return LdmRef(t5_embedding_key(shapes, prefix))
    return LdmRef(prefix + key)


# --- CLIP ---------------------------------------------------------------------------------------------------------
def clip_config(shapes: Mapping[str, tuple], prefix: str, kind: str) -> dict:
    """CLIP-L uses quick GELU, CLIP-G GELU and a projection (SD3 reads both encoders' pooled output)."""
    config = sd_models_ldm.clip_text_config(shapes, prefix + "text_model.",
                                            "gelu" if kind == "clip_g" else "quick_gelu")
    projection = shapes.get(prefix + "text_projection.weight")
    config["projection_dim"] = projection[0] if projection is not None else config["hidden_size"]
    return config


def clip_ref(key: str, prefix: str) -> LdmRef:
    if key == "text_projection.weight":
        return LdmRef(prefix + key)
    return LdmRef(prefix + "text_model." + sd_models_ldm.strip_text_model(key))


# --- VAE ----------------------------------------------------------------------------------------------------------
def vae_config(shapes: Mapping[str, tuple], part: Part, family: str) -> dict:
    if part.layout == "ldm":
        return sd_models_ldm.infer_vae_config(shapes, family, part.prefix)
    p = part.prefix
    count = _count(shapes, rf"^{re.escape(p)}encoder\.down_blocks\.(\d+)\.")
    config = {
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * count, "up_block_types": ["UpDecoderBlock2D"] * count,
        "block_out_channels": [_shape(shapes, f"{p}encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                               for i in range(count)],
        "layers_per_block": _count(shapes, rf"^{re.escape(p)}encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": _shape(shapes, p + "encoder.conv_out.weight")[0] // 2, "norm_num_groups": 32,
        "sample_size": 1024, "scaling_factor": sd_models_ldm.VAE_SCALING[family], "force_upcast": True,
        "shift_factor": sd_models_ldm.VAE_SHIFT.get(family),
    }
    if p + "quant_conv.weight" not in shapes:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    return config


def vae_ref(key: str, part: Part, levels: int) -> LdmRef | None:
    if part.layout == "ldm":
        return sd_models_ldm.vae_ref(key, levels, part.prefix)
    return LdmRef(part.prefix + key)
