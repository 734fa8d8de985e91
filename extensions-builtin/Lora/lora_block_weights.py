"""Per-block weights in a Lora tag, in LoRA Block Weight's syntax (hako-mikan's sd-webui-lora-block-weight).

`<lora:name:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>` (or `w=`, or a preset name such as `lbw=OUTALL`, or LBW's
older positional form `<lora:name:1:OUTALL>`) gives one weight per block: 17 or 26 values for SD1/SD2, 12 or 20 for
SDXL, the first one (BASE) for every text encoder layer. Blocks are LBW's, on the compvis UNet layout:
`input_blocks.N` → INnn, `middle_block` → M00, `output_blocks.N` → OUTnn. As in LBW, a short form's unlisted blocks
get 0 and layers in no block (time embedding, `conv_out`, SDXL's add embedding) keep 1.

Transformer models get LBW's Flux ids: `CLIP`, `T5`, `IN` (embedders), `D00`… (double blocks), `S00`… (single blocks),
`OUT` (final layer): 61 values for Flux.1's 19 + 38 blocks, and as many as the loaded model has for other depths.
Single-stream DiTs (and SD3's joint blocks) number their transformer blocks `B00`…, after `BASE` (text encoders) and
`IN`, before `OUT`.

A readable named form is ours: `<lora:name:1:in=0.5:mid=1:out=0.2>` (groups; unnamed groups keep 1), and single
blocks by id (`out03=0`, `base=0.5`); for transformers also `double=`, `single=`, `blocks=`, `clip=`, `t5=`, `d05=`,
`s12=`, `b03=` (`base=` is both text encoders of Flux). Unlike LBW, a vector of the wrong length, an unknown preset
or a value that is not a finite number is an error naming the problem (LBW ignores it silently), and uniform presets
(`ALL`, `NONE`, `ALL0.5`) fit every family.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import lora_keys

BLOCK_IDS_26 = ("BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12)))
BLOCK_IDS_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                *(f"OUT{i:02}" for i in range(3, 12)))
BLOCK_IDS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02}" for i in range(6)))
BLOCK_IDS_20 = ("BASE", *(f"IN{i:02}" for i in range(9)), "M00", *(f"OUT{i:02}" for i in range(9)))
FORMS = {"SD1": (BLOCK_IDS_17, BLOCK_IDS_26), "SD2": (BLOCK_IDS_17, BLOCK_IDS_26),
         "SDXL": (BLOCK_IDS_12, BLOCK_IDS_20)}
ALL_IDS = {"SD1": BLOCK_IDS_26, "SD2": BLOCK_IDS_26, "SDXL": BLOCK_IDS_20}
GROUPS = {"in": "IN", "mid": "M", "out": "OUT"}

# LBW's built-in presets (its DEF_WEIGHT_PRESET; names are case-sensitive there too)
FLUX_COUNT = 61  # LBW's BLOCKIDFLUX: CLIP, T5, IN, D00-D18, S00-S37, OUT
BUILTIN_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "FLUXALL": ",".join(["1"] * FLUX_COUNT),
}
PRESET_LENGTHS = (12, 17, 20, 26, FLUX_COUNT)
TRANSFORMER_GROUPS = {"double": "D", "single": "S", "blocks": "B"}
_re_double = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.")
_re_single = re.compile(r"^transformer\.single_transformer_blocks\.(\d+)\.")
_OUT_LAYERS = ("transformer.proj_out", "transformer.norm_out.")
_re_t5_layer = re.compile(r"^text_encoder(?:_2)?\.encoder\.block\.\d+\.")


class BlockWeightError(ValueError):
    pass


@dataclass(frozen=True)
class BlockWeights:
    """What a tag asked for, before the model is known: a vector (its values in order) or named settings."""

    vector: tuple[float, ...] | None = None
    named: tuple[tuple[str, float], ...] = ()
    source: str = ""  # the text as written, for messages

    def for_family(self, family: str | None, layer_names=()) -> dict[str, float]:
        """{block id: weight} over every block of the family (BASE included); transformer families take their block
        ids from the loaded model's `layer_names`."""
        ids = block_ids(family, layer_names)
        if ids is None:
            raise BlockWeightError(f"block weights are not defined for {family or 'this'} models")
        if self.vector is not None:
            return _from_vector(self.vector, family, self.source, ids)
        weights = dict.fromkeys(ids, 1.0)
        for key, value in self.named:
            targets = _named_targets(key, ids)
            if not targets:
                raise BlockWeightError(f"{family} has no block {key.upper()}")
            for block in targets:
                weights[block] = value
        return weights


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BlockWeightError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise BlockWeightError(f"{what} {text!r} is not a finite number")
    return value


def _from_vector(vector: tuple[float, ...], family: str, source: str, all_ids: tuple[str, ...]) -> dict[str, float]:
    forms = FORMS.get(family, (all_ids,))
    ids = next((f for f in forms if len(f) == len(vector)), None)
    if ids is None and len(set(vector)) == 1:  # a uniform vector means the same on every family
        ids = forms[-1]
        vector = vector[:1] * len(ids)
    if ids is None:
        lengths = " or ".join(str(len(f)) for f in forms)
        raise BlockWeightError(f"{source!r} has {len(vector)} values; {family} block weights take {lengths}")
    weights = dict.fromkeys(all_ids, 0.0)  # LBW: blocks a short form does not list get 0
    weights.update(zip(ids, vector, strict=True))
    return weights


def _named_targets(key: str, ids: tuple[str, ...]) -> list[str]:
    key = key.lower()
    if key in TRANSFORMER_GROUPS:
        prefix = TRANSFORMER_GROUPS[key]
        return [b for b in ids if re.fullmatch(rf"{prefix}\d+", b)]
    if key in GROUPS:
        prefix = GROUPS[key]
        return [b for b in ids if b.startswith(prefix) and b != "BASE"]
    if key == "base" and "BASE" not in ids:  # Flux: both text encoders
        return [b for b in ids if b in ("CLIP", "T5")]
    block = key.upper()
    if block == "MID":
        block = "M00"
    return [block] if block in ids else []


_re_named_key = re.compile(r"^(in|mid|out|base|in\d\d|m00|out\d\d|double|single|blocks|clip|t5|[dsb]\d\d)$",
                           re.IGNORECASE)


def is_block_key(key: str) -> bool:
    """Whether a tag's named argument is a block setting of the readable form (`in=`, `out03=`, `base=`)."""
    return bool(_re_named_key.match(key))


def looks_like_vector_or_preset(text: str, presets: dict[str, str]) -> bool:
    """LBW's positional form (`<lora:x:1:OUTALL>`): a preset name or a comma list of a block-weight length."""
    return text in presets or text.count(",") + 1 in PRESET_LENGTHS


def parse_vector(text: str, presets: dict[str, str]) -> BlockWeights:
    """`lbw=`/`w=` text: a preset name (case-sensitive) or comma-separated numbers."""
    text = text.strip()
    if text in presets:
        values = presets[text]
    elif "," in text or _is_number(text):
        values = text
    else:
        raise BlockWeightError(f"unknown block-weight preset {text!r}")
    numbers = tuple(_number(v.strip(), "block weight") for v in values.split(","))
    return BlockWeights(vector=numbers, source=text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_named(named: dict[str, str]) -> BlockWeights | None:
    """The readable form's settings from a tag's named arguments (None when there are none)."""
    settings = tuple((k.lower(), _number(v, f"{k}=")) for k, v in named.items() if is_block_key(k))
    if not settings:
        return None
    return BlockWeights(named=settings, source=":".join(f"{k}={v}" for k, v in named.items() if is_block_key(k)))


def block_ids(family: str | None, layer_names=()) -> tuple[str, ...] | None:
    """Every block id of the family, BASE or CLIP/T5 included; None when it has none. UNet families have fixed ids;
    a transformer's follow its depth: LBW's Flux ids (CLIP, T5, IN, Dnn, Snn, OUT) for Flux/Chroma, numbered
    blocks (BASE, IN, Bnn, OUT) for other transformers."""
    if family in ALL_IDS:
        return ALL_IDS[family]
    double = sorted({int(m.group(1)) for n in layer_names if (m := _re_double.match(n))})
    single = sorted({int(m.group(1)) for n in layer_names if (m := _re_single.match(n))})
    if family in ("Flux", "Chroma"):
        return ("CLIP", "T5", "IN", *(f"D{i:02}" for i in range(len(double))),
                *(f"S{i:02}" for i in range(len(single))), "OUT")
    if double:  # a single-stream DiT (or SD3's joint blocks): numbered transformer blocks
        return ("BASE", "IN", *(f"B{i:02}" for i in range(len(double))), "OUT")
    return None


def _transformer_block(layer_name: str, flux: bool) -> str | None:
    if m := _re_double.match(layer_name):
        return f"{'D' if flux else 'B'}{int(m.group(1)):02}"
    if m := _re_single.match(layer_name):
        return f"S{int(m.group(1)):02}"
    if layer_name.startswith(_OUT_LAYERS):
        return "OUT"
    return "IN"  # the embedders (x, context, time/guidance/pooled text, Chroma's approximator)


def block_of(layer_name: str, structure: lora_keys.UnetStructure | None, flux: bool = False) -> str | None:
    """LBW's block id of a canonical layer: BASE for text encoders, INnn/M00/OUTnn for UNet blocks, None outside.
    Transformers (`flux`: LBW's Flux ids): CLIP/T5, IN, Dnn/Snn (or Bnn), OUT; every transformer layer has a block."""
    if layer_name.startswith("text_encoder"):
        if flux:  # by the layer's own naming: Chroma's only text encoder, T5, is `text_encoder`
            return "T5" if _re_t5_layer.match(layer_name) else "CLIP"
        return "BASE"
    if layer_name.startswith("transformer."):
        return _transformer_block(layer_name, flux)
    if not layer_name.startswith("unet.") or structure is None:
        return None
    compvis = lora_keys.diffusers_to_compvis(layer_name[len("unet."):], structure)
    if compvis is None:
        return None
    head, _, rest = compvis.partition(".")
    if head == "input_blocks":
        return f"IN{int(rest.split('.')[0]):02}"
    if head == "output_blocks":
        return f"OUT{int(rest.split('.')[0]):02}"
    if head == "middle_block":
        return "M00"
    return None


def layer_factors(weights: dict[str, float], layer_names, structure) -> dict[str, float]:
    """{layer: factor} for the layers whose block weight is not 1 (the rest keep their tag multiplier)."""
    res = {}
    flux = "CLIP" in weights  # the ids the weights were made for (block_ids) say which naming they use
    for name in layer_names:
        block = block_of(name, structure, flux)
        if block is not None and weights.get(block, 1.0) != 1.0:
            res[name] = weights[block]
    return res


# --- presets: LBW's built-ins plus the user's file in LBW's format --------------------------------------------------
_user_presets: dict[str, tuple[tuple[float, int], dict[str, str]]] = {}  # path → ((mtime, size), presets)


def read_presets_file(path: str) -> dict[str, str]:
    """`NAME:v,v,...` lines (LBW's lbwpresets.txt); comments (`#`) and lines of no block-weight length are skipped,
    as LBW does. Cached by the file's mtime and size."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    stamp = (st.st_mtime, st.st_size)
    cached = _user_presets.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    presets = {}
    try:
        with open(path, encoding="utf8") as f:
            for line in f:
                line = line.strip()
                if ":" not in line or "#" in line:
                    continue
                name, _, values = line.partition(":")
                if values.count(",") + 1 in PRESET_LENGTHS:
                    presets[name.strip()] = values.strip()
    except (OSError, UnicodeDecodeError):
        return {}
    _user_presets[path] = (stamp, presets)
    return presets


def preset_files(data_path: str) -> list[str]:
    """Where LBW keeps the user's presets: its own scripts folder, or `scripts/` under the web UI's data folder."""
    return [os.path.join(data_path, "extensions", "sd-webui-lora-block-weight", "scripts", "lbwpresets.txt"),
            os.path.join(data_path, "scripts", "lbwpresets.txt")]


def all_presets(data_path: str | None) -> dict[str, str]:
    """Built-in presets, overridden by the user's files (later files win, as LBW reads one)."""
    presets = dict(BUILTIN_PRESETS)
    for path in preset_files(data_path) if data_path else []:
        presets.update(read_presets_file(path))
    return presets


def zero_blocks(weights: dict[str, float]) -> list[str]:
    return [b for b, w in weights.items() if w == 0]


def editor_info(family: str | None, data_path: str | None, layer_names=()) -> dict:
    """What the prompt's tag editor needs: the loaded family's block ids, the block lists of each vector length,
    and the presets by name (their values as written)."""
    ids = block_ids(family, layer_names) or ()
    forms = FORMS.get(family or "", (ids,) if ids else ())
    return {"family": family, "blocks": list(ids),
            "forms": {str(len(ids)): list(ids) for ids in forms}, "presets": all_presets(data_path)}
