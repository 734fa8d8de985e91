"""Coverage report of one loaded network: how much of the file found a layer of this model, what did not and
why, as data and as the plain lines the job's comments (infotext and UI warnings) show.

    Lora x: 0 of 722 layers matched; it looks like an SDXL LoRA, the loaded model is SD1
    Lora y: 264 of 266 layers matched; 4 keys unmatched: lora_unet_foo_* (4)
    Lora z: 96 of 96 layers matched; made for SDXL, applied to the text encoders the loaded SD3 model shares with it
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lora_keys

MAX_GROUPS = 5


@dataclass
class Coverage:
    name: str
    matched: int  # file layers the network applies
    file_layers: int  # layers the file names: matched, failed to build, not understood, and unmatched ones
    unmatched: list[tuple[str, int]] = field(default_factory=list)  # (key group, keys) naming no layer
    not_understood: list[tuple[str, int]] = field(default_factory=list)  # (part, keys) no network type uses
    failed: int = 0  # layers whose parts are broken (load_errors)
    hint: str | None = None  # the file's family from its keys and shapes
    family: str | None = None  # the loaded model's family
    refused: str | None = None  # why nothing of the file was applied
    bundle_embeddings: list[str] = field(default_factory=list)

    @property
    def other_family(self) -> bool:
        return not lora_keys.fits_family(self.hint, self.family)

    @property
    def unmatched_count(self) -> int:
        return sum(n for _, n in self.unmatched)


def _part_of(key: str, bases: set[str]) -> str:
    """The part of a key of a matched layer (its base is known), else as far as the key tells."""
    base = next((b for b in bases if key.startswith(b + ".")), None) or lora_keys.file_base(key)
    return key[len(base) + 1:] if key.startswith(base + ".") else key.rpartition(".")[2]


def _grouped_parts(keys: list[str], bases: set[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for key in keys:
        part = _part_of(key, bases)
        counts[part] = counts.get(part, 0) + 1
    return sorted(counts.items(), key=lambda x: (-x[1], x[0]))


def coverage_of(net, family: str | None) -> Coverage:
    """The coverage of a Network (lora_loader's) on a model of `family`."""
    unmatched = list(getattr(net, "unmatched_keys", []))
    not_understood = list(getattr(net, "unsupported_keys", [])) + list(getattr(net, "unused_keys", []))
    unsupported_layers = {lora_keys.file_base(k) for k in getattr(net, "unsupported_keys", [])}
    unmatched_layers = {lora_keys.file_base(k) for k in unmatched}
    load_errors = getattr(net, "load_errors", {})
    hint = getattr(net, "version_hint", None)
    if hint is None and getattr(net, "network_on_disk", None) is not None:
        hint = getattr(net.network_on_disk, "version_hint", None)
    # file layers, not loaded ones: a fused file layer (Flux's qkv) changes several loaded layers under one name
    matched = len({getattr(m, "network_key", name) for name, m in net.modules.items()})
    return Coverage(
        name=net.name, matched=matched,
        file_layers=matched + len(load_errors) + len(unsupported_layers) + len(unmatched_layers),
        unmatched=lora_keys.group_keys(unmatched),
        not_understood=_grouped_parts(not_understood, {getattr(m, "network_key", "") for m in net.modules.values()}),
        failed=len(load_errors), hint=hint, family=family, refused=getattr(net, "refused", None),
        bundle_embeddings=sorted(getattr(net, "bundle_embeddings", {}) or {}))


def _groups_text(groups: list[tuple[str, int]]) -> str:
    text = ", ".join(f"{g} ({n})" for g, n in groups[:MAX_GROUPS])
    if len(groups) > MAX_GROUPS:
        text += f", +{len(groups) - MAX_GROUPS} more groups"
    return text


def messages(cov: Coverage) -> list[str]:
    """The job comments for one network: nothing when every key found its layer."""
    head = f"Lora {cov.name}: {cov.matched} of {cov.file_layers} layers matched"
    if cov.refused or (cov.matched == 0 and cov.other_family):
        reason = cov.refused or (f"it looks like {lora_keys.article(cov.hint)} {cov.hint} LoRA, the loaded model is "
                                 f"{cov.family}")
        return [f"{head}; {reason}"]
    if cov.file_layers == 0:
        return [] if cov.bundle_embeddings else [f"Lora {cov.name}: the file names no layers"]
    lines = []
    if cov.matched and cov.other_family:  # applied where the families share layers (an SDXL text-encoder Lora on SD3)
        lines.append(f"{head}; made for {cov.hint}, applied to the text encoders the loaded {cov.family} model "
                     "shares with it")
    if cov.matched == 0:
        text = f"{head}; is it made for another model family?"
        if cov.unmatched:
            text += f" Unmatched: {_groups_text(cov.unmatched)}"
        lines.append(text)
    elif cov.unmatched:
        lines.append(f"{head}; {cov.unmatched_count} keys unmatched: {_groups_text(cov.unmatched)}")
    if cov.not_understood:
        count = sum(n for _, n in cov.not_understood)
        lines.append(f"Lora {cov.name}: {count} keys of matched layers were not used (no network type reads "
                     f"them): {_groups_text(cov.not_understood)}")
    return lines
