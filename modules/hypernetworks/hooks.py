"""Hypernetwork K/V hooks: forward-pre-hooks on every UNet attention layer's to_k and to_v.

The input of to_k/to_v is exactly A1111's `context` (the normed hidden states for self-attention, the text
conditioning for cross-attention), so replacing it there is the same as A1111's patched attention forward,
for diffusers `Attention` and ldm `CrossAttention` alike. With no hypernetwork loaded a hook costs one list
check.
"""
from __future__ import annotations

import torch

from modules import shared

_HANDLES_ATTR = "_hypernetwork_hook_handles"


def _find_unet(sd_model) -> torch.nn.Module | None:
    """The denoiser: `.unet` (diffusers host model or pipeline), `.model.diffusion_model` (ldm), or the module."""
    for path in (("unet",), ("model", "diffusion_model"), ("pipe", "unet")):
        obj = sd_model
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    return sd_model if isinstance(sd_model, torch.nn.Module) else None


def _attention_layers(root: torch.nn.Module) -> list[torch.nn.Module]:
    def is_module(x) -> bool:
        return isinstance(x, torch.nn.Module)

    return [m for m in root.modules() if is_module(getattr(m, "to_k", None)) and is_module(getattr(m, "to_v", None))]


def _hook(index: int):
    from modules.hypernetworks.hypernetwork import apply_to_context  # hypernetwork.py imports this module

    def hook(module, args):
        hypernetworks = shared.loaded_hypernetworks
        if not hypernetworks or not args:
            return None
        context = args[0]
        changed = apply_to_context(hypernetworks, context, index)
        return None if changed is context else (changed, *args[1:])

    return hook


def install_hypernetwork_hooks(sd_model) -> int:
    """Hooks every attention layer of the model's UNet once; returns how many layers were newly hooked."""
    unet = _find_unet(sd_model)
    if unet is None:
        return 0
    count = 0
    for layer in _attention_layers(unet):
        if getattr(layer, _HANDLES_ATTR, None):
            continue
        handles = (layer.to_k.register_forward_pre_hook(_hook(0)), layer.to_v.register_forward_pre_hook(_hook(1)))
        setattr(layer, _HANDLES_ATTR, handles)
        count += 1
    return count


def remove_hypernetwork_hooks(sd_model) -> int:
    """Undoes install_hypernetwork_hooks; returns how many layers were unhooked."""
    unet = _find_unet(sd_model)
    if unet is None:
        return 0
    count = 0
    for layer in _attention_layers(unet):
        handles = getattr(layer, _HANDLES_ATTR, None)
        if handles:
            for handle in handles:
                handle.remove()
            delattr(layer, _HANDLES_ATTR)
            count += 1
    return count


def attention_context_widths(sd_model) -> list[int]:
    """The K/V input widths of the model's attention layers: the sizes a hypernetwork for it needs."""
    unet = _find_unet(sd_model)
    if unet is None:
        return []
    return sorted({int(layer.to_k.in_features) for layer in _attention_layers(unet)
                   if isinstance(getattr(layer.to_k, "in_features", None), int)})
