"""What a Lora file's metadata and keys say about it: its model family (`SdVersion`, `detect_version`) and
the training arguments that change its math (DoRA's axis on square layers, `dora_axis_from_metadata`). Pure
functions over what discovery read; network.py re-exports the A1111 names (`network.SdVersion`,
`network.detect_version`)."""
from __future__ import annotations

import enum
import json

import lora_files
import lyco_helpers


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4
    SD3 = 5  # the transformer families are ours; A1111 v1.10.1 has the four above
    Flux = 6
    Chroma = 7


def detect_version(metadata: dict, version_hint: str | None = None) -> SdVersion:
    """The model family of a Lora file. Its keys and shapes (`version_hint`, lora_files.version_hint_from_keys)
    win over what the metadata says, since trainers write wrong or no `ss_*` values and A1111 calls every LoRA
    with metadata SD1 (13A-10). Without a key hint: A1111's rules (ss_base_model_version, ss_v2), then
    modelspec.architecture; Flux/Chroma/SD3 from keys or metadata (`flux1`, `flux-1-dev/lora`, `chroma`, ...);
    a file of another architecture is Unknown, and any other file with metadata is SD1, as in A1111."""
    if version_hint in SdVersion.__members__ and version_hint != "Unknown":
        return SdVersion[version_hint]
    transformer = lora_files.transformer_family_from_metadata(metadata)
    if version_hint == "DiT":  # the keys say "a transformer" only: the metadata may say which
        return SdVersion[transformer] if transformer else SdVersion.Unknown
    if version_hint:  # another architecture: none of ours
        return SdVersion.Unknown
    if transformer:
        return SdVersion[transformer]
    base = str(metadata.get("ss_base_model_version", "") or "")
    if base.startswith("sdxl_"):
        return SdVersion.SDXL
    if str(metadata.get("ss_v2", "")) == "True" or base.startswith("sd_v2"):
        return SdVersion.SD2
    if base.startswith("sd_v1"):
        return SdVersion.SD1
    arch = str(metadata.get("modelspec.architecture", "") or "")
    for prefix, version in (("stable-diffusion-xl", SdVersion.SDXL), ("stable-diffusion-v2", SdVersion.SD2),
                            ("stable-diffusion-v1", SdVersion.SD1)):
        if arch.startswith(prefix):
            return version
    if base or arch:  # named, but not a family of ours (flux1, sd3, stable-diffusion-v3-medium/lora, ...)
        return SdVersion.Unknown
    if metadata:
        return SdVersion.SD1
    return SdVersion.Unknown


def _truthy(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
        return False
    return None


def dora_axis_from_metadata(metadata: dict | None) -> str:
    """The DoRA axis for a 1-D magnitude on a square layer: the file's own `wd_on_output` training argument when
    its metadata has one (LyCORIS, `ss_network_args`), else the kohya/A1111 input-axis convention."""
    args = (metadata or {}).get("ss_network_args")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    if isinstance(args, dict):
        for key in ("wd_on_output", "wd_on_out"):
            flag = _truthy(args.get(key))
            if flag is not None:
                return lyco_helpers.DORA_OUTPUT_AXIS if flag else lyco_helpers.DORA_INPUT_AXIS
    return lyco_helpers.DORA_INPUT_AXIS
