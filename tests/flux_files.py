"""Tiny Flux and SD3 files in the layouts users have, written from the tiny diffusers folders: a BFL single-file
transformer (with or without `model.diffusion_model.`), `clip_l`, `clip_g`, `t5xxl` and `ae` files, all-in-one files
(Flux "full", SAI's SD3.5 layout), fp8 copies."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from modules import flux_layout, sd3_layout, sd_models_ldm

FP8 = torch.float8_e4m3fn


def clip_l_tensors(text_encoder) -> dict[str, torch.Tensor]:
    """ComfyUI's clip_l.safetensors / clip_g.safetensors: Hugging Face names under `text_model.` and the
    projection (an identity when the model has none: Flux's CLIP-L ignores it)."""
    res = {k if k == "text_projection.weight" else "text_model." + sd_models_ldm.strip_text_model(k): v
           for k, v in text_encoder.state_dict().items()}
    hidden = text_encoder.config.hidden_size
    res.setdefault("text_projection.weight", torch.eye(hidden))
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


def sd3_all_in_one(components: dict, with_t5: bool = True) -> dict[str, torch.Tensor]:
    """SAI's SD3.5 single file: the MMDiT under model.diffusion_model., the three encoders under text_encoders., the
    VAE under first_stage_model."""
    res = sd3_layout.to_single_file_state_dict(components["transformer"], "model.diffusion_model.")
    encoders = [("clip_l", clip_l_tensors(components["text_encoder"])),
                ("clip_g", clip_l_tensors(components["text_encoder_2"]))]
    if with_t5:
        encoders.append(("t5xxl", t5_tensors(components["text_encoder_3"])))
    for name, tensors in encoders:
        res.update({f"text_encoders.{name}.transformer.{k}": v for k, v in tensors.items()})
    res.update(ae_tensors(components["vae"], "first_stage_model."))
    return res


def to_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What fp8 checkpoints hold: every 2-D weight in float8_e4m3fn, the rest as it was."""
    return {k: v.to(FP8) if v.dim() == 2 and k.endswith(".weight") else v for k, v in tensors.items()}


def write(tensors: dict[str, torch.Tensor], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path
