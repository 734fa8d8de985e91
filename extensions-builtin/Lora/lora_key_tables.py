"""The tables of key spellings: one row per trainer naming of a layer (KEY_ROWS), one vocabulary of parts
(PART_RENAMES into kohya/LyCORIS's spelling), keys whose layer name sits inside the part (LAYER_IN_PART).
Supporting another trainer is one more row here; lora_keys looks keys up through them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BUNDLE_PREFIX = "bundle_emb."


# --- rows: one trainer naming each -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyRow:
    """One trainer naming: files name the layer `prefix + <naming of its path>` with `.` written as `sep`.

    naming: "diffusers" (module path), "compvis" (original SD UNet path), "text_model" (CLIP path under
    `text_model.`), "bare" (CLIP path without it). te_count: the row applies only to models with that many
    text encoders (None: always)."""

    component: str
    prefix: str
    naming: str
    sep: str = "_"
    te_count: int | None = None
    source: str = ""  # who writes it (for the README table and the report)


KEY_ROWS: tuple[KeyRow, ...] = (
    KeyRow("unet", "lora_unet_", "diffusers", source="kohya SD1/SD2, LyCORIS, OneTrainer"),
    KeyRow("unet", "lora_unet_", "compvis", source="kohya SDXL (sgm names)"),
    KeyRow("unet", "oft_unet_", "diffusers", source="kohya OFT"),
    KeyRow("unet", "oft_unet_", "compvis", source="kohya OFT SDXL"),
    KeyRow("unet", "lycoris_", "diffusers", source="SimpleTuner / LyCORIS wrapper"),
    KeyRow("unet", "unet.", "diffusers", ".", source="PEFT / diffusers save_lora_weights"),
    KeyRow("unet", "base_model.model.", "diffusers", ".", source="raw PeftModel state dict of a UNet"),
    KeyRow("unet", "diffusion_model.", "compvis", ".", source="ldm-named (\"generic\") files"),
    KeyRow("unet", "model.diffusion_model.", "compvis", ".", source="ldm-named files with the checkpoint prefix"),
    KeyRow("text_encoder", "lora_te_", "text_model", te_count=1, source="kohya SD1/SD2"),
    KeyRow("text_encoder", "lora_te_", "bare", te_count=1),
    KeyRow("text_encoder", "lora_te1_", "text_model", source="kohya SDXL CLIP-L (and SD1 files using te1)"),
    KeyRow("text_encoder", "lora_te1_", "bare"),
    KeyRow("text_encoder", "lycoris_te_", "text_model", te_count=1, source="LyCORIS wrapper text encoder"),
    KeyRow("text_encoder", "text_encoder.", "text_model", ".", source="PEFT / diffusers (transformers 4 names)"),
    KeyRow("text_encoder", "text_encoder.", "bare", ".", source="PEFT / diffusers (transformers 5 names)"),
    KeyRow("text_encoder", "base_model.model.", "text_model", ".", te_count=1, source="raw PeftModel of a CLIP"),
    KeyRow("text_encoder", "base_model.model.", "bare", ".", te_count=1),
    KeyRow("text_encoder_2", "lora_te2_", "text_model", source="kohya SDXL OpenCLIP-bigG"),
    KeyRow("text_encoder_2", "lora_te2_", "bare", source="OneTrainer (text_projection)"),
    KeyRow("text_encoder_2", "text_encoder_2.", "text_model", ".", source="PEFT / diffusers SDXL"),
    KeyRow("text_encoder_2", "text_encoder_2.", "bare", "."),
    KeyRow("transformer", "transformer.", "diffusers", ".", source="PEFT / diffusers / ai-toolkit / SimpleTuner DiT"),
)


# --- parts: one canonical vocabulary ------------------------------------------------------------------------------
# Exact renames of other trainers' part spellings (PEFT, old diffusers) into kohya/LyCORIS's.
PART_RENAMES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "down.weight": "lora_down.weight",  # XLabs' LoRALinearLayer (`processor.qkv_lora1.down.weight`)
    "up.weight": "lora_up.weight",
}
# PEFT writes the adapter name when a raw state dict is saved (`lora_A.default.weight`, `lora_B.default_0.weight`)
_re_adapter_name = re.compile(r"^(?:(lora_A|lora_B)\.(?!weight$)[^.]+\.weight|(lora_magnitude_vector)\.(?!weight$)[^.]+"
                              r"(?:\.weight)?)$")
# Parts in PEFT's DoRA convention: a magnitude per output channel (shape (out,) or, for convs, (1, out, 1, 1)).
# They become `dora_scale` of shape (out, 1), which states the output axis to every network type.
PEFT_MAGNITUDE_SPELLINGS = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


@dataclass(frozen=True)
class LayerInPart:
    """A key whose last layer name is spelled inside its part: `<layer>.<pattern>` → (`<layer><suffix>`, part)
    for the first of `suffixes` that names a layer of the model."""

    pattern: re.Pattern
    suffixes: tuple[str, ...]
    part: str


def _layer_in_part_rows() -> tuple[LayerInPart, ...]:
    rows = []
    targets = {"q": (".to_q", ".q_proj"), "k": (".to_k", ".k_proj"), "v": (".to_v", ".v_proj"),
               "out": (".to_out.0", ".out_proj")}
    for name, suffixes in targets.items():
        for side, part in (("down", "lora_down.weight"), ("up", "lora_up.weight")):
            # old diffusers attention processors (unet: `attn1.processor.to_q_lora.down.weight`, text encoder:
            # `self_attn.to_q_lora.down.weight`)
            rows.append(LayerInPart(re.compile(rf"^(.+?)(?:\.processor)?\.to_{name}_lora\.{side}\.weight$"),
                                    suffixes, part))
    return tuple(rows)


LAYER_IN_PART = _layer_in_part_rows()


def canonical_part(part: str) -> str:
    """Any trainer's spelling of a part → kohya/LyCORIS's (`lora_A.default.weight` → `lora_down.weight`)."""
    if part in PART_RENAMES:
        return PART_RENAMES[part]
    m = _re_adapter_name.match(part)
    if m:
        return PART_RENAMES[(m.group(1) or m.group(2)) + ".weight"]
    return part


def _is_peft_magnitude(part: str) -> bool:
    return part in PEFT_MAGNITUDE_SPELLINGS or part.startswith("lora_magnitude_vector.")
