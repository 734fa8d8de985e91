"""Tiny Flux files in the layouts users have, written from the tiny-flux diffusers folder: a BFL single-file
transformer (with or without `model.diffusion_model.`), `clip_l`, `t5xxl` and `ae` files, an all-in-one file, fp8
copies, and a Chroma-shaped transformer."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from modules import flux_layout, sd_models_ldm

FP8 = torch.float8_e4m3fn


def clip_l_tensors(text_encoder) -> dict[str, torch.Tensor]:
    """ComfyUI's clip_l.safetensors: Hugging Face names under `text_model.` (plus a text_projection it ignores)."""
    res = {"text_model." + sd_models_ldm.strip_text_model(k): v for k, v in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    res["text_projection.weight"] = torch.eye(hidden)
    return res


def t5_tensors(text_encoder_2) -> dict[str, torch.Tensor]:
    """t5xxl_fp16.safetensors: the T5 encoder's Hugging Face names, the tied embedding once (`shared.weight`)."""
    return {k: v for k, v in text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}


def ae_tensors(vae, prefix: str = "") -> dict[str, torch.Tensor]:
    """BFL's ae.safetensors: the ldm VAE layout, no quant convs, no prefix."""
    levels = len(vae.config.block_out_channels)
    res = {}
    for key, t in vae.state_dict().items():
        ref = sd_models_ldm.vae_ref(key, levels, prefix)
        res[ref.key] = t.reshape(*t.shape, 1, 1) if ref.transform == "conv1x1" else t
    return res


def all_in_one(components: dict, vae_prefix: str = "vae.") -> dict[str, torch.Tensor]:
    """A Flux "full" file: the BFL transformer under model.diffusion_model., the encoders under text_encoders."""
    res = flux_layout.to_bfl_state_dict(components["transformer"], "model.diffusion_model.")
    clip, t5 = clip_l_tensors(components["text_encoder"]), t5_tensors(components["text_encoder_2"])
    res.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    res.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
    res.update(ae_tensors(components["vae"], vae_prefix))
    return res


def to_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What fp8 checkpoints hold: every 2-D weight in float8_e4m3fn, the rest as it was."""
    return {k: v.to(FP8) if v.dim() == 2 and k.endswith(".weight") else v for k, v in tensors.items()}


def write(tensors: dict[str, torch.Tensor], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path
