"""File keys → (canonical layer, canonical part), driven by tables.

Canonical layer = the diffusers module path with its component prefix and without CLIP's `text_model.` level,
e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.encoder.layers.0.self_attn.q_proj`. It is the same whichever layout the host has (diffusers
components or A1111's compvis modules, see lora_layers), so files, plans and tools never depend on it.

Canonical part = kohya/LyCORIS's spelling (`lora_down.weight`, `lora_up.weight`, `alpha`, `dora_scale`, `hada_w1_a`,
...); PART_RENAMES turns the other trainers' spellings into it.

For a loaded model, `build_key_map` walks its layers once and, for every row of KEY_ROWS that applies, writes the
file-side name that trainer uses for that layer: a dict {file base name → canonical name}. A file key is split at
the first dot whose left side is a known base (kohya bases have no dots; dotted PEFT/diffusers bases do), then its
part is renamed. Keys whose layer name is spelled inside the part (old diffusers attention processors,
`attn1.processor.to_q_lora.up.weight`) go through LAYER_IN_PART. Supporting another trainer is one more row.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import lora_files  # the key/shape family heuristics live with the header reader
import torch

# diffusers resnet part → compvis ResBlock part (table 3.4, map_res)
RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
RESNET_PARTS_REVERSE = {v: k for k, v in RESNET_PARTS.items()}
BUNDLE_PREFIX = "bundle_emb."


@dataclass(frozen=True)
class UnetStructure:
    """What the compvis block numbering depends on: per down block (resnets, has downsampler), per up block
    (resnets, has attentions). SD1/SD2/SDXL have 2 resnets per down block and 3 per up block."""

    down: tuple[tuple[int, bool], ...]
    up: tuple[tuple[int, bool], ...]

    @classmethod
    def from_unet(cls, unet) -> UnetStructure | None:
        """From a diffusers UNet2DConditionModel, or from an ldm/sgm UNetModel (compvis layout)."""
        if hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks"):
            down = tuple((len(b.resnets), bool(getattr(b, "downsamplers", None))) for b in unet.down_blocks)
            up = tuple((len(b.resnets), hasattr(b, "attentions")) for b in unet.up_blocks)
            return cls(down, up)
        if hasattr(unet, "input_blocks") and hasattr(unet, "output_blocks"):
            return cls.from_ldm_unet(unet)
        return None

    @classmethod
    def from_ldm_unet(cls, unet) -> UnetStructure:
        """From the blocks of an ldm UNetModel: a level ends at a downsampler (`op`) or an upsampler."""
        down: list[tuple[int, bool]] = []
        count = 0
        for block in list(unet.input_blocks)[1:]:
            if any(hasattr(child, "op") for child in block.children()):
                down.append((count, True))
                count = 0
            else:
                count += 1
        down.append((count, False))
        up: list[tuple[int, bool]] = []
        count, attention = 0, False
        blocks = list(unet.output_blocks)
        for n, block in enumerate(blocks):
            children = list(block.children())
            count += 1
            attention = attention or any(hasattr(child, "transformer_blocks") for child in children)
            is_upsampler = [not hasattr(c, "in_layers") and not hasattr(c, "transformer_blocks") and hasattr(c, "conv")
                            for c in children]
            if any(is_upsampler) or n == len(blocks) - 1:
                up.append((count, attention))
                count, attention = 0, False
        return cls(tuple(down), tuple(up))

    @classmethod
    def from_config(cls, config: dict) -> UnetStructure:
        """From a diffusers UNet2DConditionModel config.json (for tools that have no model in memory)."""
        down_types = config["down_block_types"]
        up_types = config["up_block_types"]
        lpb = config.get("layers_per_block", 2)
        lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down_types)
        down = tuple((lpb[i], i < len(down_types) - 1) for i in range(len(down_types)))
        rev = list(reversed(lpb))
        up = tuple((rev[i] + 1, "CrossAttn" in t) for i, t in enumerate(up_types))
        return cls(down, up)

    def input_base(self, i: int) -> int:
        return 1 + sum(n + int(has_down) for n, has_down in self.down[:i])

    def output_base(self, i: int) -> int:
        return sum(n for n, _ in self.up[:i])

    def block_table(self) -> dict[str, tuple[str, str]]:
        """{compvis block prefix: (diffusers block prefix, kind)}, kind "resnet", "attention" or "sampler" (the
        whole module). Both directions of the UNet name conversion read this one table."""
        table: dict[str, tuple[str, str]] = {}
        for i, (n, has_down) in enumerate(self.down):
            base = self.input_base(i)
            for j in range(n):
                table[f"input_blocks.{base + j}.0"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
                table[f"input_blocks.{base + j}.1"] = (f"down_blocks.{i}.attentions.{j}", "attention")
            if has_down:
                table[f"input_blocks.{base + n}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", "sampler")
        table["middle_block.0"] = ("mid_block.resnets.0", "resnet")
        table["middle_block.1"] = ("mid_block.attentions.0", "attention")
        table["middle_block.2"] = ("mid_block.resnets.1", "resnet")
        for i, (n, has_attentions) in enumerate(self.up):
            base = self.output_base(i)
            for j in range(n):
                table[f"output_blocks.{base + j}.0"] = (f"up_blocks.{i}.resnets.{j}", "resnet")
                if has_attentions:
                    table[f"output_blocks.{base + j}.1"] = (f"up_blocks.{i}.attentions.{j}", "attention")
            if i < len(self.up) - 1:
                table[f"output_blocks.{base + n - 1}.{2 if has_attentions else 1}.conv"] = (
                    f"up_blocks.{i}.upsamplers.0.conv", "sampler")
        return table


_re_down = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_downsample = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$")
_re_mid = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_up = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_upsample = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$")
_re_time = re.compile(r"^(time_embedding|add_embedding)\.linear_(\d+)$")
_simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0"}
_simple_reverse = {v: k for k, v in _simple.items()} | {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_re_compvis_block = re.compile(r"^((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)(?:\.(.+))?$")


def _block_part(kind: str, rest: str) -> str:
    return f"1.{rest}" if kind == "attentions" else f"0.{RESNET_PARTS.get(rest, rest)}"


def diffusers_to_compvis(path: str, structure: UnetStructure) -> str | None:
    """A diffusers UNet module path → the compvis (original SD) one, or None when it has no compvis twin.

    Forward version of A1111's convert_diffusers_name_to_compvis (table 3.4), with block indices taken from
    the model's structure; an up block's upsampler sits after its attention when it has one (`_2_2_conv` in
    SDXL's up_blocks.0, where A1111 wrongly uses `_2_1_conv`)."""
    if path in _simple:
        return _simple[path]
    try:
        if m := _re_time.match(path):
            n = int(m.group(2))
            return f"{'time_embed' if m.group(1) == 'time_embedding' else 'label_emb.0'}.{2 * n - 2}"
        if m := _re_down.match(path):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            return f"input_blocks.{structure.input_base(i) + j}.{_block_part(kind, rest)}"
        if m := _re_downsample.match(path):
            i = int(m.group(1))
            return f"input_blocks.{structure.input_base(i) + structure.down[i][0]}.0.op"
        if m := _re_mid.match(path):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            return f"middle_block.{2 * j + 1}.{rest}" if kind == "attentions" else \
                f"middle_block.{2 * j}.{RESNET_PARTS.get(rest, rest)}"
        if m := _re_up.match(path):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            return f"output_blocks.{structure.output_base(i) + j}.{_block_part(kind, rest)}"
        if m := _re_upsample.match(path):
            i = int(m.group(1))
            n, has_attentions = structure.up[i]
            return f"output_blocks.{structure.output_base(i) + n - 1}.{2 if has_attentions else 1}.conv"
    except IndexError:
        return None
    return None


def compvis_to_diffusers(path: str, table: Mapping[str, tuple[str, str]]) -> str | None:
    """An ldm UNetModel module path → the diffusers one (None when it has no twin); `table` is
    UnetStructure.block_table()."""
    if path in _simple_reverse:
        return _simple_reverse[path]
    if path in table:
        target, kind = table[path]
        return target if kind == "sampler" else None
    m = _re_compvis_block.match(path)
    if m is None or m.group(2) is None:
        return None
    entry = table.get(m.group(1))
    if entry is None:
        return None
    target, kind = entry
    rest = m.group(2)
    if kind == "resnet":
        rest = RESNET_PARTS_REVERSE.get(rest)
        if rest is None:
            return None
    return f"{target}.{rest}"


def strip_text_model(path: str) -> str:
    """`text_model.encoder.layers.0...` and `encoder.layers.0...` name the same CLIP layer (transformers 5
    CLIPTextModel has no `text_model.` level; CLIPTextModelWithProjection has)."""
    return path[len("text_model."):] if path.startswith("text_model.") else path


def canonical_text_path(path: str) -> str:
    """A CLIP text encoder's module path as canonical names spell it (no `text_model.`)."""
    return strip_text_model(path)


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


def _row_name(row: KeyRow, path: str, compvis: str | None) -> str | None:
    if row.naming == "diffusers":
        return path
    if row.naming == "compvis":
        return compvis
    if row.naming == "text_model":
        return "text_model." + path
    if row.naming == "bare":
        return path
    raise ValueError(f"unknown key naming {row.naming!r}")


class KeyMap:
    """{file base name → canonical layer name} for one model, and the file-key splitter.

    `family` is the loaded model's family ("SD1", "SD2", "SDXL" or None when unknown); files that clearly
    belong to another one are not applied (see parse_state_dict)."""

    def __init__(self, aliases: dict[str, str], collisions: dict[str, tuple[str, str]] | None = None,
                 family: str | None = None):
        self.aliases = aliases
        self.collisions = collisions or {}
        self.family = family
        # virtual layer (a file layer that is several loaded layers, e.g. Flux's fused qkv) → lora_flux.FusedLayer
        self.fused: dict[str, Any] = {}

    def resolve(self, base: str) -> str | None:
        return self.aliases.get(base)

    def split_raw(self, key: str) -> tuple[str, str, str] | None:
        """`base.part` → (canonical, base, part as written); None when no base is known."""
        start = 0
        while (dot := key.find(".", start)) != -1:
            canonical = self.aliases.get(key[:dot])
            if canonical is not None:
                return canonical, key[:dot], key[dot + 1:]
            start = dot + 1
        for row in LAYER_IN_PART:
            m = row.pattern.match(key)
            if m is None:
                continue
            for suffix in row.suffixes:
                canonical = self.aliases.get(m.group(1) + suffix)
                if canonical is not None:
                    return canonical, m.group(1) + suffix, row.part
        return None

    def split(self, key: str) -> tuple[str, str, str] | None:
        """`base.part` → (canonical, base, canonical part); None when no base is known."""
        found = self.split_raw(key)
        if found is None:
            return None
        canonical, base, part = found
        return canonical, base, canonical_part(part)

    def group(self, keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
        """File keys → ({canonical: {canonical part: file key}}, {canonical: base}, [unmatched keys]).
        `bundle_emb.*` keys are neither grouped nor unmatched (they are embeddings, see parse_state_dict)."""
        groups: dict[str, dict[str, str]] = {}
        bases: dict[str, str] = {}
        unmatched: list[str] = []
        for key in keys:
            if key.startswith(BUNDLE_PREFIX):
                continue
            found = self.split(key)
            if found is None:
                unmatched.append(key)
                continue
            canonical, base, part = found
            if bases.setdefault(canonical, base) != base or part in groups.get(canonical, ()):
                # two spellings of the same layer (or part) in one file: keep the first, report the other
                unmatched.append(key)
                continue
            groups.setdefault(canonical, {})[part] = key
        return groups, bases, unmatched


def build_key_map(layer_names: Iterable[str], structure: UnetStructure | None, te_count: int,
                  rows: Iterable[KeyRow] = KEY_ROWS, family: str | None = None) -> KeyMap:
    """Every accepted file-side name of every canonical layer. A name two layers would share keeps the first."""
    rows = [r for r in rows if r.te_count is None or r.te_count == te_count]
    by_component: dict[str, list[KeyRow]] = {}
    for row in rows:
        by_component.setdefault(row.component, []).append(row)
    aliases: dict[str, str] = {}
    collisions: dict[str, tuple[str, str]] = {}
    for canonical in layer_names:
        component, _, path = canonical.partition(".")
        component_rows = by_component.get(component, ())
        if not component_rows:
            continue
        compvis = diffusers_to_compvis(path, structure) if component == "unet" and structure is not None else None
        for row in component_rows:
            name = _row_name(row, path, compvis)
            if name is None:
                continue
            alias = row.prefix + (name.replace(".", row.sep) if row.sep != "." else name)
            previous = aliases.setdefault(alias, canonical)
            if previous != canonical:
                collisions[alias] = (previous, canonical)
    return KeyMap(aliases, collisions, family)


# --- one file ---------------------------------------------------------------------------------------------------
@dataclass
class ParsedFile:
    """A state dict split for one model. `tensors` holds the file's tensors under their keys, with PEFT DoRA
    magnitudes reshaped to (out, 1) and derived alphas under `<base>.alpha`; `groups` names, per canonical
    layer, the key in `tensors` of each canonical part."""

    tensors: dict[str, torch.Tensor]
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    bundle_embeddings: dict[str, Any] = field(default_factory=dict)
    bad_bundle_keys: list[str] = field(default_factory=list)
    version_hint: str | None = None
    refused: str | None = None  # why nothing of the file is applied (it belongs to another model family)


def parse_bundle_embeddings(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """`bundle_emb.<name>.string_to_param.*` → {name: tensor} (SD1/SD2 textual inversion) and
    `bundle_emb.<name>.<vector>` → {name: {vector: tensor}} (SDXL: `clip_l`, `clip_g`). Returns (embeddings,
    keys that fit neither form)."""
    res: dict[str, Any] = {}
    bad: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
        if not name or not rest or not isinstance(tensor, torch.Tensor):
            bad.append(key)
            continue
        if rest.startswith("string_to_param."):
            if name in res:
                bad.append(key)  # one vector per SD1/SD2 embedding
                continue
            res[name] = tensor
        else:
            entry = res.setdefault(name, {})
            if not isinstance(entry, dict):
                bad.append(key)
                continue
            entry[rest] = tensor
    return res, bad


def _peft_adapter_config(metadata: Mapping | None) -> dict | None:
    """The `lora_adapter_metadata` diffusers writes with save_lora_weights (PEFT LoraConfig per component,
    keys like `unet.lora_alpha`)."""
    if not metadata:
        return None
    value = metadata.get("lora_adapter_metadata")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _pattern_value(patterns: Mapping, names: Iterable[str]):
    """PEFT's get_pattern_key: a pattern matches a module name as a dotted suffix."""
    if not isinstance(patterns, Mapping):
        return None
    for pattern, value in patterns.items():
        for name in names:
            try:
                if re.match(rf"(.*\.)?({pattern})$", name):
                    return value
            except re.error:
                return None
    return None


def peft_alpha(config: Mapping, canonical: str, rank: int) -> float | None:
    """The kohya-convention alpha (scale = alpha / rank) of a PEFT layer: lora_alpha, or its alpha_pattern entry;
    with use_rslora PEFT scales by alpha/sqrt(r), which is alpha·sqrt(r) in kohya's terms."""
    component, _, path = canonical.partition(".")

    def get(name: str):
        for key in (f"{component}.{name}", name):
            if key in config:
                return config[key]
        return None

    alpha = get("lora_alpha")
    names = [path, "text_model." + path] if component.startswith("text_encoder") else [path]
    alpha = _pattern_value(get("alpha_pattern") or {}, names) or alpha
    if alpha is None:
        return None
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        return None
    if get("use_rslora") in (True, "true", "True"):
        alpha *= math.sqrt(rank)
    return alpha


def parse_state_dict(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap,
                     metadata: Mapping | None = None) -> ParsedFile:
    """Splits a Lora file for the model behind key_map: canonical layers and parts, unmatched keys, bundled
    embeddings, the file's model family from its keys and shapes. A file that clearly belongs to another
    family than the model's is refused whole (every key unmatched): applying the layers whose names happen to
    fit would change the model without doing what the file was made for."""
    parsed = ParsedFile(tensors=dict(state_dict))
    parsed.bundle_embeddings, parsed.bad_bundle_keys = parse_bundle_embeddings(state_dict)
    parsed.version_hint = lora_files.version_hint_from_keys(state_dict)
    if not fits_family(parsed.version_hint, key_map.family):
        parsed.refused = f"it looks like {article(parsed.version_hint)} {parsed.version_hint} LoRA, the loaded " \
                         f"model is {key_map.family}"
        parsed.unmatched = [k for k in state_dict if not k.startswith(BUNDLE_PREFIX)]
        parsed.bundle_embeddings = {}  # made for the other family's text encoders too
        return parsed

    groups: dict[str, dict[str, str]] = {}
    bases: dict[str, str] = {}
    unmatched: list[str] = []
    peft_layers: set[str] = set()  # layers spelled the PEFT way (lora_A/lora_B): their alpha is in the metadata
    for key in state_dict:
        if key.startswith(BUNDLE_PREFIX):
            continue
        found = key_map.split_raw(key)
        if found is None:
            unmatched.append(key)
            continue
        canonical, base, raw_part = found
        part = canonical_part(raw_part)
        if bases.setdefault(canonical, base) != base or part in groups.get(canonical, ()):
            unmatched.append(key)  # a second spelling of the same layer or part: the first one wins
            continue
        if _is_peft_magnitude(raw_part):
            parsed.tensors[key] = state_dict[key].reshape(-1, 1)
        if raw_part.startswith("lora_A."):
            peft_layers.add(canonical)
        groups.setdefault(canonical, {})[part] = key
    parsed.unmatched = unmatched + parsed.bad_bundle_keys
    parsed.groups, parsed.bases = groups, bases

    config = _peft_adapter_config(metadata)
    if config:
        for canonical, parts in groups.items():
            if "alpha" in parts or canonical not in peft_layers:
                continue
            alpha = peft_alpha(config, canonical, int(state_dict[parts["lora_down.weight"]].shape[0]))
            if alpha is not None:
                alpha_key = f"{bases[canonical]}.alpha"
                parsed.tensors[alpha_key] = torch.tensor(alpha)
                parts["alpha"] = alpha_key
    return parsed


# File families that fit a loaded family of another name: Flux.1 and Chroma share their blocks; "DiT" (diffusers-named
# transformer keys, or T5 keys alone, that tell no more) fits any transformer family.
_FITS = {"Flux": {"Chroma"}, "Chroma": {"Flux"}, "DiT": {"Flux", "Chroma", "SD3"}}


def fits_family(hint: str | None, family: str | None) -> bool:
    """Whether a file whose keys look like `hint` may be applied to a model of `family` (unknown either way: yes)."""
    return not hint or not family or hint == family or family in _FITS.get(hint, ())


def article(family: str) -> str:
    """"an SDXL LoRA", "a Flux LoRA": the letters S and D are read out, the names are not."""
    return "an" if family.startswith("SD") else "a"


# --- unmatched keys, for the report -------------------------------------------------------------------------------
_re_part_tail = re.compile(
    r"\.(?:lora_(?:A|B|down|up|mid)(?:\.[^.]+)?\.weight|lora_linear_layer\.(?:up|down)\.weight|lora\.(?:up|down)\."
    r"weight|lora_magnitude_vector(?:\.[^.]+)*|(?:processor\.)?to_(?:q|k|v|out)_lora\.(?:up|down)\.weight|alpha|"
    r"dora_scale|scale|(?:hada|lokr|oft|boft|glora|ia3)_\w+|[ab][12]\.weight|w_norm|b_norm|diff|diff_b|on_input|"
    r"weight|(?:lora_[AB]\.)?bias)$")
_re_kohya_base = re.compile(r"^([A-Za-z0-9_]+)\.")
_re_first_index = re.compile(r"^(.*?[._])\d+(?=[._]|$)")


def file_base(key: str) -> str:
    """The layer name of a key no layer matched: kohya bases end at the first dot, dotted bases before a
    known part spelling."""
    m = _re_kohya_base.match(key)
    if m and "_" in m.group(1) and m.group(1) not in ("base_model", "text_encoder", "text_encoder_2",
                                                      "diffusion_model", "bundle_emb"):
        return m.group(1)
    m = _re_part_tail.search(key)
    if m:
        return key[:m.start()]
    return key.rpartition(".")[0] or key


def key_group(key: str) -> str:
    """A short family name for a key: its base up to the first block number (`lora_unet_double_blocks_*`,
    `text_encoder_2.encoder.layers.*`)."""
    base = file_base(key)
    m = _re_first_index.match(base)
    return (m.group(1) + "*") if m else base


def group_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    """[(group, key count)], the largest groups first."""
    counts: dict[str, int] = {}
    for key in keys:
        g = key_group(key)
        counts[g] = counts.get(g, 0) + 1
    return sorted(counts.items(), key=lambda x: (-x[1], x[0]))
