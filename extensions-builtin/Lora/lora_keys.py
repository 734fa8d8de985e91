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

Homes: the tables (KEY_ROWS, PART_RENAMES, LAYER_IN_PART) in lora_key_tables, the UNet/CLIP path conversions in
lora_layer_names, the unmatched-key grouping for the report in lora_key_report; this file looks keys up (KeyMap,
build_key_map) and splits one file (parse_state_dict). Their names stay importable from here.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import lora_files  # the key/shape family heuristics live with the header reader
import torch
from lora_key_report import file_base, group_keys, key_group  # noqa: F401  (lora_keys' names before the split)
from lora_key_tables import (  # noqa: F401  (lora_keys' names before the split)
    BUNDLE_PREFIX,
    KEY_ROWS,
    LAYER_IN_PART,
    PART_RENAMES,
    PEFT_MAGNITUDE_SPELLINGS,
    KeyRow,
    LayerInPart,
    _is_peft_magnitude,
    canonical_part,
)
from lora_layer_names import (  # noqa: F401  (lora_keys' names before the split)
    RESNET_PARTS,
    RESNET_PARTS_REVERSE,
    UnetStructure,
    canonical_text_path,
    compvis_to_diffusers,
    diffusers_to_compvis,
    strip_text_model,
)


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
    fit would change the model without doing what the file was made for. Text-encoder-only files of a family
    whose text encoders the model has too (SDXL's CLIP-L and CLIP-G in SD3) are applied."""
    parsed = ParsedFile(tensors=dict(state_dict))
    parsed.bundle_embeddings, parsed.bad_bundle_keys = parse_bundle_embeddings(state_dict)
    parsed.version_hint = lora_files.version_hint_from_keys(state_dict)
    if not fits_family(parsed.version_hint, key_map.family) and \
            not shares_text_encoders(state_dict, parsed.version_hint, key_map.family):
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


# Text encoders a loaded family shares with a file's family, with the key prefixes that name them: SD3 has SDXL's
# CLIP-L and CLIP-G under the same layer names, so a file that trains only those fits (ComfyUI applies them too).
shares_text_encoders = lora_files.shares_text_encoders


def article(family: str) -> str:
    """"an SDXL LoRA", "a Flux LoRA": the letters S and D are read out, the names are not."""
    return "an" if family.startswith("SD") else "a"
