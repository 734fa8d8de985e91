"""Module paths between layouts: a diffusers UNet path ↔ the compvis (original SD) one, and CLIP's `text_model.`
level. Canonical layer names use the diffusers paths (lora_keys); the compvis side is what kohya SDXL files and
A1111's modules spell (lora_layers). Pure string and table code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

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
