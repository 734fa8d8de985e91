"""File keys → canonical layer names, driven by one table.

Canonical name = the diffusers module path with its component prefix, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or `text_encoder.encoder.layers.0.self_attn.q_proj`.

For a loaded model, `build_key_map` walks its layers once and, for every row of KEY_ROWS that applies, writes the
file-side name that trainer would use for that layer: a dict {file base name → canonical name}. A file key is
then split into (base, part) at the first dot whose left side is a known base. Supporting another trainer's
naming is one more row (e.g. PEFT/diffusers dotted keys: `KeyRow("unet", "unet.", "diffusers", sep=".")`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# diffusers resnet part → compvis ResBlock part (table 3.4, map_res)
RESNET_PARTS = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class UnetStructure:
    """What the compvis block numbering depends on: per down block (resnets, has downsampler), per up block
    (resnets, has attentions). SD1/SD2/SDXL have 2 resnets per down block and 3 per up block."""

    down: tuple[tuple[int, bool], ...]
    up: tuple[tuple[int, bool], ...]

    @classmethod
    def from_unet(cls, unet) -> UnetStructure | None:
        if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
            return None
        down = tuple((len(b.resnets), bool(getattr(b, "downsamplers", None))) for b in unet.down_blocks)
        up = tuple((len(b.resnets), hasattr(b, "attentions")) for b in unet.up_blocks)
        return cls(down, up)

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


_re_down = re.compile(r"^down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_downsample = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$")
_re_mid = re.compile(r"^mid_block\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_up = re.compile(r"^up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$")
_re_upsample = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$")
_re_time = re.compile(r"^(time_embedding|add_embedding)\.linear_(\d+)$")
_simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0"}


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


def strip_text_model(path: str) -> str:
    """`text_model.encoder.layers.0...` and `encoder.layers.0...` name the same CLIP layer (transformers 5
    CLIPTextModel has no `text_model.` level; CLIPTextModelWithProjection has)."""
    return path[len("text_model."):] if path.startswith("text_model.") else path


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


KEY_ROWS: tuple[KeyRow, ...] = (
    KeyRow("unet", "lora_unet_", "diffusers"),  # kohya SD1/SD2, LyCORIS
    KeyRow("unet", "lora_unet_", "compvis"),  # kohya SDXL
    KeyRow("unet", "oft_unet_", "diffusers"),  # kohya OFT
    KeyRow("unet", "oft_unet_", "compvis"),
    KeyRow("text_encoder", "lora_te_", "text_model", te_count=1),  # kohya SD1/SD2
    KeyRow("text_encoder", "lora_te_", "bare", te_count=1),
    KeyRow("text_encoder", "lora_te1_", "text_model"),  # kohya SDXL CLIP-L (and SD1 files using te1 names)
    KeyRow("text_encoder", "lora_te1_", "bare"),
    KeyRow("text_encoder_2", "lora_te2_", "text_model"),  # kohya SDXL CLIP-G
    KeyRow("text_encoder_2", "lora_te2_", "bare"),
)


def _row_name(row: KeyRow, path: str, structure: UnetStructure | None) -> str | None:
    if row.naming == "diffusers":
        return path
    if row.naming == "compvis":
        return diffusers_to_compvis(path, structure) if structure is not None else None
    if row.naming == "text_model":
        return "text_model." + strip_text_model(path)
    if row.naming == "bare":
        return strip_text_model(path)
    raise ValueError(f"unknown key naming {row.naming!r}")


class KeyMap:
    """{file base name → canonical layer name} for one model, and the file-key splitter."""

    def __init__(self, aliases: dict[str, str], collisions: dict[str, tuple[str, str]] | None = None):
        self.aliases = aliases
        self.collisions = collisions or {}

    def resolve(self, base: str) -> str | None:
        return self.aliases.get(base)

    def split(self, key: str) -> tuple[str, str, str] | None:
        """`base.part` → (canonical, base, part), trying each dot from the left; None when no base is known."""
        start = 0
        while (dot := key.find(".", start)) != -1:
            canonical = self.aliases.get(key[:dot])
            if canonical is not None:
                return canonical, key[:dot], key[dot + 1:]
            start = dot + 1
        return None

    def group(self, keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
        """File keys → ({canonical: {part: file key}}, {canonical: base}, [unmatched keys])."""
        groups: dict[str, dict[str, str]] = {}
        bases: dict[str, str] = {}
        unmatched: list[str] = []
        for key in keys:
            found = self.split(key)
            if found is None:
                unmatched.append(key)
                continue
            canonical, base, part = found
            if bases.setdefault(canonical, base) != base:
                # two spellings of the same layer in one file: keep the first, report the other
                unmatched.append(key)
                continue
            groups.setdefault(canonical, {})[part] = key
        return groups, bases, unmatched


def build_key_map(layer_names: Iterable[str], structure: UnetStructure | None, te_count: int,
                  rows: Iterable[KeyRow] = KEY_ROWS) -> KeyMap:
    """Every accepted file-side name of every layer. A name two layers would share keeps the first row's."""
    rows = [r for r in rows if r.te_count is None or r.te_count == te_count]
    by_component: dict[str, list[KeyRow]] = {}
    for row in rows:
        by_component.setdefault(row.component, []).append(row)
    aliases: dict[str, str] = {}
    collisions: dict[str, tuple[str, str]] = {}
    for canonical in layer_names:
        component, _, path = canonical.partition(".")
        for row in by_component.get(component, ()):
            name = _row_name(row, path, structure)
            if name is None:
                continue
            alias = row.prefix + (name.replace(".", row.sep) if row.sep != "." else name)
            previous = aliases.setdefault(alias, canonical)
            if previous != canonical:
                collisions[alias] = (previous, canonical)
    return KeyMap(aliases, collisions)
