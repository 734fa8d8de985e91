"""Flux.1 / Chroma key names: the BFL layout (`double_blocks.0.img_attn.qkv`, as kohya/sd-scripts, ComfyUI, Forge and
XLabs name layers) onto the loaded diffusers transformer's canonical layers.

BFL fuses layers that diffusers keeps apart: a double block's `img_attn.qkv` is `attn.to_q/to_k/to_v`, `txt_attn.qkv`
is `attn.add_q_proj/add_k_proj/add_v_proj`, a single block's `linear1` is `attn.to_q/to_k/to_v` + `proj_mlp`, and
`final_layer.adaLN_modulation.1` is `norm_out.linear` with its (shift, scale) halves swapped. Such a file layer gets a
virtual canonical name (`transformer.double_blocks.0.img_attn.qkv`) and a `FusedLayer` that says which rows of the
file's ΔW make each real layer; the rows come from the loaded layers' own shapes (hidden size, MLP width), never
from Flux.1-dev's 3072. network_rows turns a module built on the virtual layer into one module per real layer.

Everything here is derived from the layer names the model has, so a Chroma transformer (no modulation Linears, a
`distilled_guidance_layer`) or a model with other depths and widths gets exactly the names it can take.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FAMILIES = ("Flux", "Chroma")

# diffusers module path → BFL module path, one to one
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
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
           "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# fused BFL layer → the diffusers layers its rows hold, in row order
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# XLabs' processors: double blocks `lora1` = image stream, `lora2` = text stream; single blocks train the q/k/v rows
# of linear1 (not the MLP rows) and `proj_lora` on linear2
_XLABS_DOUBLE = {"processor.qkv_lora1": "img_attn.qkv", "processor.qkv_lora2": "txt_attn.qkv",
                 "processor.proj_lora1": "img_attn.proj", "processor.proj_lora2": "txt_attn.proj"}
_NORM_OUT = "norm_out.linear"

_re_double = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_re_single = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
_re_approximator = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.linear_([12])$")
_re_approximator_norm = re.compile(r"^distilled_guidance_layer\.norms\.(\d+)$")


@dataclass(frozen=True)
class FusedLayer:
    """A file layer that is not one loaded layer: `targets` [(canonical layer, ((first, end) file rows, ...))], the
    file's ΔW rows that make each layer, concatenated in order; `shape` the file layer's (rows, columns).
    `output_side`: XLabs' single-block `proj_lora`, which old XLabs code added to linear2's output (a hidden → hidden
    LoRA on the output, exact as ΔW = B·A·W); newer code feeds it linear2's input, a plain LoRA on proj_out."""

    name: str
    targets: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    shape: tuple[int, int]
    output_side: bool = False


def is_flux_transformer(module) -> bool:
    """diffusers' Flux.1 / Chroma transformer (Flux.2 and other DiTs are other layouts)."""
    return type(module).__name__ in ("FluxTransformer2DModel", "ChromaTransformer2DModel")


def family_of(transformer) -> str:
    """"Chroma" (a distilled guidance layer instead of modulation Linears) or "Flux"."""
    if "Chroma" in type(transformer).__name__ or hasattr(transformer, "distilled_guidance_layer"):
        return "Chroma"
    return "Flux"


def bfl_path(path: str) -> str | None:
    """A diffusers transformer module path → its BFL one (None for the layers BFL fuses, and for unknown ones)."""
    if path in _SIMPLE:
        return _SIMPLE[path]
    if m := _re_approximator.match(path):
        return f"distilled_guidance_layer.layers.{m.group(1)}.{'in' if m.group(2) == '1' else 'out'}_layer"
    if m := _re_approximator_norm.match(path):
        return f"distilled_guidance_layer.norms.{m.group(1)}"
    if (m := _re_double.match(path)) and m.group(2) in _DOUBLE:
        return f"double_blocks.{m.group(1)}.{_DOUBLE[m.group(2)]}"
    if (m := _re_single.match(path)) and m.group(2) in _SINGLE:
        return f"single_blocks.{m.group(1)}.{_SINGLE[m.group(2)]}"
    return None


def out_rows(layer) -> int | None:
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def in_cols(layer) -> int | None:
    weight = getattr(layer, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def stacked_layer(name: str, parts: list[str], layers: dict) -> FusedLayer | None:
    """Layers whose weights the file stacks by rows (q, k, v[, mlp]), each as wide as its own weight."""
    if not all(p in layers for p in parts):
        return None
    rows = [out_rows(layers[p]) for p in parts]
    cols = {in_cols(layers[p]) for p in parts}
    if None in rows or len(cols) != 1:
        return None
    targets, start = [], 0
    for part, n in zip(parts, rows, strict=True):
        targets.append((part, ((start, start + n),)))
        start += n
    return FusedLayer(name, tuple(targets), (start, cols.pop()))


def fused_layers(layers: dict) -> dict[str, FusedLayer]:
    """{virtual canonical name (`transformer.<BFL path>`): FusedLayer} of the model's transformer."""
    res: dict[str, FusedLayer] = {}
    blocks = {"double": set(), "single": set()}
    for canonical in layers:
        component, _, path = canonical.partition(".")
        if component != "transformer":
            continue
        if m := _re_double.match(path):
            blocks["double"].add(int(m.group(1)))
        elif m := _re_single.match(path):
            blocks["single"].add(int(m.group(1)))
    for n in sorted(blocks["double"]):
        for fused, parts in _DOUBLE_FUSED.items():
            name = f"transformer.double_blocks.{n}.{fused}"
            layer = stacked_layer(name, [f"transformer.transformer_blocks.{n}.{p}" for p in parts], layers)
            if layer is not None:
                res[name] = layer
    for n in sorted(blocks["single"]):
        parts = [f"transformer.single_transformer_blocks.{n}.{p}" for p in _SINGLE_FUSED["linear1"]]
        for name, chosen in ((f"transformer.single_blocks.{n}.linear1", parts),
                             (f"transformer.single_blocks.{n}.linear1.qkv", parts[:3])):  # XLabs' qkv_lora
            layer = stacked_layer(name, chosen, layers)
            if layer is not None:
                res[name] = layer
        proj = f"transformer.single_transformer_blocks.{n}.proj_out"
        if proj in layers and out_rows(layers[proj]) is not None:
            rows, cols = out_rows(layers[proj]), in_cols(layers[proj])
            name = f"transformer.single_blocks.{n}.processor.proj_lora"
            res[name] = FusedLayer(name, ((proj, ((0, rows),)),), (rows, cols), output_side=True)
    name = "transformer.final_layer.adaLN_modulation.1"
    if (layer := swapped_halves(name, f"transformer.{_NORM_OUT}", layers)) is not None:
        res[name] = layer
    return res


def swapped_halves(name: str, target: str, layers: dict) -> FusedLayer | None:
    """A file layer whose two row halves are the loaded layer's in the other order: BFL's and SAI's adaLN
    (shift, scale) is diffusers' (scale, shift)."""
    rows = out_rows(layers[target]) if target in layers else None
    if rows is None or rows % 2:
        return None
    half = rows // 2
    return FusedLayer(name, ((target, ((half, rows), (0, half))),), (rows, in_cols(layers[target])))


# --- file-side names --------------------------------------------------------------------------------------------
# (prefix, separator) of the trainers that write BFL paths
BFL_ROWS = (
    ("lora_unet_", "_"),  # kohya/sd-scripts, LyCORIS through sd-scripts, Forge
    ("lycoris_", "_"),  # LyCORIS' own wrapper around a BFL-layout model
    ("diffusion_model.", "."),  # ComfyUI / BFL (lora_A/lora_B, lora_up/lora_down, diff, ...)
    ("model.diffusion_model.", "."),
    ("", "."),  # bare BFL paths (XLabs, some ComfyUI exports)
)
# (prefix, separator) for the transformer's diffusers paths beyond KEY_ROWS' `transformer.` (PEFT/ai-toolkit)
DIFFUSERS_ROWS = (
    ("lora_transformer_", "_"),  # OneTrainer
    ("lycoris_", "_"),  # SimpleTuner's LyCORIS (`lycoris_transformer_blocks_0_attn_to_q`)
    ("base_model.model.", "."),  # a raw PeftModel state dict of the transformer
)
# text encoders by kind, whichever component holds them (Chroma's only text encoder, T5, is `text_encoder`):
# (prefix, naming, separator) as lora_keys.KeyRow spells them
TEXT_ROWS = {
    "clip": (("lora_te1_", "text_model", "_"), ("lora_te1_", "bare", "_"),
             ("lora_te_", "text_model", "_"), ("lora_te_", "bare", "_"),  # SD1's single-encoder spelling
             ("text_encoders.clip_l.transformer.text_model.", "bare", "."),  # ComfyUI
             ("text_encoders.clip_l.transformer.", "bare", ".")),
    "t5": (("lora_te3_", "bare", "_"),  # kohya/sd-scripts (and SD3's numbering, which ComfyUI reads)
           ("lora_te2_", "bare", "_"),  # OneTrainer and older sd-scripts forks
           ("text_encoders.t5xxl.transformer.", "bare", ".")),  # ComfyUI
}
_re_t5_layer = re.compile(r"^encoder\.block\.\d+\.")


def _spell(prefix: str, sep: str, path: str) -> str:
    return prefix + (path if sep == "." else path.replace(".", sep))


def aliases(layers: dict, fused: dict[str, FusedLayer]) -> dict[str, str]:
    """{file base name: canonical (or virtual) layer} for every Flux-specific spelling of the model's layers."""
    res: dict[str, str] = {}
    t5_components = {c for c, _, p in (n.partition(".") for n in layers) if _re_t5_layer.match(p)}

    def add(alias: str, canonical: str) -> None:
        res.setdefault(alias, canonical)

    for canonical in layers:
        component, _, path = canonical.partition(".")
        if component == "transformer":
            bfl = bfl_path(path)
            for prefix, sep in BFL_ROWS if bfl is not None else ():
                add(_spell(prefix, sep, bfl), canonical)
                if out_rows(layers[canonical]) is None:  # ComfyUI names an RMSNorm by its parameter (`….scale.diff`)
                    add(_spell(prefix, sep, bfl + ".scale"), canonical)
            for prefix, sep in DIFFUSERS_ROWS:
                add(_spell(prefix, sep, path), canonical)
            if bfl is not None and (m := re.match(r"^double_blocks\.(\d+)\.(.+)$", bfl)):
                for xlabs, part in _XLABS_DOUBLE.items():
                    if part == m.group(2):
                        for prefix in ("", "diffusion_model."):
                            add(f"{prefix}double_blocks.{m.group(1)}.{xlabs}", canonical)
        elif component in ("text_encoder", "text_encoder_2"):
            kind = "t5" if component in t5_components else "clip"
            for prefix, naming, sep in TEXT_ROWS[kind]:
                add(_spell(prefix, sep, ("text_model." + path) if naming == "text_model" else path), canonical)
    for name, layer in fused.items():
        bfl = name[len("transformer."):]
        if layer.output_side:  # XLabs single-block proj_lora
            n = bfl.split(".")[1]
            for prefix in ("", "diffusion_model."):
                add(f"{prefix}single_blocks.{n}.processor.proj_lora", name)
            continue
        if bfl.endswith("linear1.qkv"):
            n = bfl.split(".")[1]
            for prefix in ("", "diffusion_model."):
                add(f"{prefix}single_blocks.{n}.processor.qkv_lora", name)
            continue
        for prefix, sep in BFL_ROWS:
            add(_spell(prefix, sep, bfl), name)
        if m := re.match(r"^double_blocks\.(\d+)\.(.+)$", bfl):
            for xlabs, part in _XLABS_DOUBLE.items():
                if part == m.group(2):
                    for prefix in ("", "diffusion_model."):
                        add(f"{prefix}double_blocks.{m.group(1)}.{xlabs}", name)
    return res


def extend_key_map(key_map, layers: dict) -> None:
    """Adds the Flux/Chroma spellings and fused layers to a lora_keys.KeyMap built for the model's layers (a name
    the generic rows already give keeps its first meaning)."""
    fused = fused_layers(layers)
    key_map.fused.update(fused)
    for alias, canonical in aliases(layers, fused).items():
        key_map.aliases.setdefault(alias, canonical)
