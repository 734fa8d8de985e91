"""SD3 / SD3.5 key names: SAI's MMDiT layout (`joint_blocks.0.x_block.attn.qkv`, as kohya/sd-scripts, ComfyUI and SAI
name layers) onto the loaded diffusers SD3Transformer2DModel's canonical layers, and the names of SD3's T5.

SAI fuses what diffusers keeps apart: `x_block.attn.qkv` is `attn.to_q/to_k/to_v`, `context_block.attn.qkv` is
`attn.add_q_proj/add_k_proj/add_v_proj`, SD3.5's MMDiT-X `x_block.attn2.qkv` is `attn2.to_q/to_k/to_v`; the final
adaLN and the last block's context adaLN (a block that only shifts and scales the text) hold (shift, scale) where
diffusers has (scale, shift). These become lora_flux.FusedLayer virtual layers whose rows come from the loaded layers'
shapes (never from SD3 Medium's or SD3.5 Large's widths), split per real layer by network_rows.

Spellings, each derived from the layer names the model has (SD3 Medium, SD3.5 Medium with its MMDiT-X blocks, SD3.5
Large, other depths and widths alike):
- SAI paths: kohya/sd-scripts and LyCORIS through it (`lora_unet_joint_blocks_0_x_block_attn_qkv`,
  `lora_unet_x_embedder_proj`, `lora_unet_final_layer_linear`), the LyCORIS wrapper (`lycoris_joint_blocks_…`),
  ComfyUI/SAI (`diffusion_model.` / `model.diffusion_model.` + path, lora_A/B, lora_up/down, diff, ...);
- diffusers paths beyond PEFT's `transformer.` (lora_keys): OneTrainer `lora_transformer_`, SimpleTuner's LyCORIS
  `lycoris_`, raw PEFT `base_model.model.` (as ComfyUI reads them);
- text encoders: CLIP-L and CLIP-G through lora_keys' rows (`lora_te1_`, `lora_te2_`, `text_encoder.`,
  `text_encoder_2.`), T5 (`text_encoder_3`) as sd-scripts' `lora_te3_` and PEFT's `text_encoder_3.`, and ComfyUI's
  `text_encoders.clip_l/clip_g/t5xxl.transformer.` for all three.
"""
from __future__ import annotations

import re

import lora_flux

FAMILIES = ("SD3",)

# diffusers module path → SAI module path, one to one
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
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
}
# fused SAI layer → the diffusers layers its rows hold, in row order
_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_re_block = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")

# (prefix, separator) of the trainers that write SAI paths
SAI_ROWS = (
    ("lora_unet_", "_"),  # kohya/sd-scripts, LyCORIS through sd-scripts
    ("lycoris_", "_"),  # LyCORIS' own wrapper around an SAI-layout model
    ("diffusion_model.", "."),  # ComfyUI / SAI
    ("model.diffusion_model.", "."),
)
# (prefix, separator) for the transformer's diffusers paths beyond lora_keys' `transformer.` (as ComfyUI reads them)
DIFFUSERS_ROWS = (
    ("lora_transformer_", "_"),  # OneTrainer
    ("lycoris_", "_"),  # SimpleTuner's LyCORIS
    ("base_model.model.", "."),  # a raw PeftModel state dict of the transformer
)
# text encoders: (prefix, naming, separator); naming "text_model" puts CLIP's `text_model.` level back
TEXT_ROWS = {
    "text_encoder": (("text_encoders.clip_l.transformer.", "text_model", "."),),
    "text_encoder_2": (("text_encoders.clip_g.transformer.", "text_model", "."),),
    "text_encoder_3": (("lora_te3_", "bare", "_"),  # kohya/sd-scripts (train_t5xxl)
                       ("text_encoder_3.", "bare", "."),  # PEFT / diffusers
                       ("text_encoders.t5xxl.transformer.", "bare", ".")),  # ComfyUI
}


def is_sd3_transformer(module) -> bool:
    """diffusers' SD3 / SD3.5 transformer."""
    return type(module).__name__ == "SD3Transformer2DModel"


def _is_pre_only(block: int, layers: dict) -> bool:
    """The last joint block only shifts and scales the text (no text attention output, no text MLP)."""
    prefix = f"transformer.transformer_blocks.{block}."
    return f"{prefix}attn.add_q_proj" in layers and f"{prefix}attn.to_add_out" not in layers


def sai_path(path: str, layers: dict) -> str | None:
    """A diffusers transformer module path → its SAI one (None for the layers SAI fuses or swaps, and unknown ones)."""
    if path in _SIMPLE:
        return _SIMPLE[path]
    m = _re_block.match(path)
    if m is None or m.group(2) not in _BLOCK:
        return None
    if m.group(2) == "norm1_context.linear" and _is_pre_only(int(m.group(1)), layers):
        return None
    return f"joint_blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"


def _blocks(layers: dict) -> list[int]:
    return sorted({int(m.group(1)) for name in layers if name.startswith("transformer.")
                   and (m := _re_block.match(name[len("transformer."):]))})


def fused_layers(layers: dict) -> dict[str, lora_flux.FusedLayer]:
    """{virtual canonical name (`transformer.<SAI path>`): FusedLayer} of the model's transformer."""
    res: dict[str, lora_flux.FusedLayer] = {}
    for n in _blocks(layers):
        for fused, parts in _FUSED.items():
            name = f"transformer.joint_blocks.{n}.{fused}"
            layer = lora_flux.stacked_layer(name, [f"transformer.transformer_blocks.{n}.{p}" for p in parts], layers)
            if layer is not None:
                res[name] = layer
        if _is_pre_only(n, layers):
            name = f"transformer.joint_blocks.{n}.context_block.adaLN_modulation.1"
            target = f"transformer.transformer_blocks.{n}.norm1_context.linear"
            if (layer := lora_flux.swapped_halves(name, target, layers)) is not None:
                res[name] = layer
    name = "transformer.final_layer.adaLN_modulation.1"
    if (layer := lora_flux.swapped_halves(name, "transformer.norm_out.linear", layers)) is not None:
        res[name] = layer
    return res


def _spell(prefix: str, sep: str, path: str) -> str:
    return prefix + (path if sep == "." else path.replace(".", sep))


def aliases(layers: dict, fused: dict[str, lora_flux.FusedLayer]) -> dict[str, str]:
    """{file base name: canonical (or virtual) layer} for every SD3-specific spelling of the model's layers."""
    res: dict[str, str] = {}
    for canonical in layers:
        component, _, path = canonical.partition(".")
        if component == "transformer":
            sai = sai_path(path, layers)
            for prefix, sep in SAI_ROWS if sai is not None else ():
                res.setdefault(_spell(prefix, sep, sai), canonical)
            for prefix, sep in DIFFUSERS_ROWS:
                res.setdefault(_spell(prefix, sep, path), canonical)
        for prefix, naming, sep in TEXT_ROWS.get(component, ()):
            res.setdefault(_spell(prefix, sep, ("text_model." + path) if naming == "text_model" else path), canonical)
    for name in fused:
        for prefix, sep in SAI_ROWS:
            res.setdefault(_spell(prefix, sep, name[len("transformer."):]), name)
    return res


def extend_key_map(key_map, layers: dict) -> None:
    """Adds the SD3 spellings and fused layers to a lora_keys.KeyMap built for the model's layers (a name the generic
    rows already give keeps its first meaning)."""
    fused = fused_layers(layers)
    key_map.fused.update(fused)
    for alias, canonical in aliases(layers, fused).items():
        key_map.aliases.setdefault(alias, canonical)
