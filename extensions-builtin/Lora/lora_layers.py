"""Layer map: the loaded model's patchable modules under canonical names, and the key map built from them.

Built once per model (on_model_loaded, or lazily on first use); rebuilt when the model's components change.
"""
from __future__ import annotations

import hashlib

import lora_keys
import torch

LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
COMPONENT_NAMES = ("unet", "text_encoder", "text_encoder_2")


def model_components(sd_model) -> dict[str, torch.nn.Module]:
    """{diffusers component folder name: module} for the parts Loras patch (never the VAE)."""
    components = sd_model.components() if callable(getattr(sd_model, "components", None)) else \
        {name: getattr(sd_model, name, None) for name in COMPONENT_NAMES}
    return {k: v for k, v in components.items() if k in COMPONENT_NAMES and isinstance(v, torch.nn.Module)}


class LayerMap:
    """{canonical name: module} of one model plus its KeyMap; `token` identifies the naming for caches."""

    def __init__(self, sd_model):
        self.components = model_components(sd_model)
        self.component_ids = {k: id(v) for k, v in self.components.items()}
        self.layers: dict[str, torch.nn.Module] = {}
        for component_name, component in self.components.items():
            for path, module in component.named_modules():
                if path and isinstance(module, LAYER_TYPES):
                    self.layers[f"{component_name}.{path}"] = module
        unet = self.components.get("unet")
        self.structure = lora_keys.UnetStructure.from_unet(unet) if unet is not None else None
        te_count = sum(1 for k in ("text_encoder", "text_encoder_2") if k in self.components)
        self.key_map = lora_keys.build_key_map(self.layers, self.structure, te_count)
        digest = hashlib.sha256("\n".join(self.layers).encode()).hexdigest()[:16]
        self.token = f"{len(self.layers)}:{digest}"

    def is_current_for(self, sd_model) -> bool:
        components = model_components(sd_model)
        return {k: id(v) for k, v in components.items()} == self.component_ids


def assign_network_names_to_compvis_modules(sd_model) -> LayerMap | None:
    """Names every patchable module (`module.network_layer_name`) and stores the map on the model
    (`sd_model.network_layer_mapping`, A1111's attribute, and `sd_model.network_layer_map`)."""
    if sd_model is None:
        return None
    layer_map = LayerMap(sd_model)
    for name, module in layer_map.layers.items():
        module.network_layer_name = name
    sd_model.network_layer_mapping = layer_map.layers
    sd_model.network_layer_map = layer_map
    return layer_map


def get_layer_map(sd_model) -> LayerMap:
    layer_map = getattr(sd_model, "network_layer_map", None)
    if layer_map is None or not layer_map.is_current_for(sd_model):
        layer_map = assign_network_names_to_compvis_modules(sd_model)
    return layer_map
