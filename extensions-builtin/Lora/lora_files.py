"""Reading Lora files: safetensors headers (metadata, key names, shapes), tensors, embedded hashes.

Nothing here unpickles arbitrary objects: `.pt`/`.ckpt` go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import struct

import torch

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
network_extensions = (".pt", ".ckpt", ".safetensors")


class LoraFileError(ValueError):
    """A file that is not a readable Lora file; the message names the file."""


def read_safetensors_header(filename: str) -> tuple[dict, dict]:
    """Returns (raw `__metadata__` strings, {tensor key: {"dtype", "shape"}}) without reading tensor data."""
    try:
        size = os.path.getsize(filename)
        with open(filename, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LoraFileError(f"{filename}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > SAFETENSORS_MAX_HEADER or n + 8 > size:
                raise LoraFileError(f"{filename}: not a safetensors file (header length {n} out of range)")
            text = f.read(n)
    except OSError as e:
        raise LoraFileError(f"{filename}: cannot read: {e}") from None
    try:
        header = json.loads(text)
    except ValueError as e:
        raise LoraFileError(f"{filename}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{filename}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    tensors = {k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in header.items() if isinstance(v, dict)}
    return metadata, tensors


def decode_metadata(raw: dict) -> dict:
    """A1111 rule: string values that start with `{` are JSON-decoded when possible."""
    res = {}
    for k, v in raw.items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        res[str(k)] = v
    return res


def read_metadata(filename: str) -> dict:
    """Decoded safetensors metadata, through the host's reader when it has one (A1111 API)."""
    try:
        from modules import sd_models
        reader = sd_models.read_metadata_from_safetensors
    except (ImportError, AttributeError):
        reader = None
    if reader is not None:
        try:
            return dict(reader(filename) or {})
        except Exception:  # the host's reader may be stricter; ours names the problem below
            pass
    raw, _ = read_safetensors_header(filename)
    return decode_metadata(raw)


def version_hint_from_keys(tensors: dict) -> str | None:
    """The model family a Lora was trained for, from its key names and shapes (header only).

    The cross-attention context width is decisive (768 SD1, 1024 SD2, 2048 SDXL); a second text encoder or
    compvis-named UNet keys (kohya SDXL) mean SDXL; the text encoder width 1024 means SD2."""
    te_width = None
    sdxl_names = False
    for key, info in tensors.items():
        shape = info.get("shape") or []
        is_down = any(part in key for part in ("lora_down.weight", "lora_A.weight", "lora.down.weight"))
        if is_down and len(shape) >= 2 and ("attn2_to_k" in key or "attn2.to_k" in key):
            return {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(int(shape[1]))
        if key.startswith(("lora_te2_", "text_encoder_2.")):
            sdxl_names = True
        if key.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")):
            sdxl_names = True
        if is_down and len(shape) >= 2 and "q_proj" in key and key.startswith(("lora_te_", "lora_te1_")):
            te_width = int(shape[1])
    if sdxl_names:
        return "SDXL"
    if te_width == 1024:
        return "SD2"
    if te_width == 768:
        return "SD1"
    return None


def header_info(filename: str) -> dict:
    """{"metadata": decoded metadata, "version_hint": family or None} of a safetensors file."""
    raw, tensors = read_safetensors_header(filename)
    metadata = read_metadata(filename) if raw else {}
    return {"metadata": metadata, "version_hint": version_hint_from_keys(tensors)}


def embedded_hash(metadata: dict) -> str | None:
    """kohya's embedded `sshs_model_hash`, trusted only when it is 64 hex chars and not the hash of nothing."""
    value = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    if not _HEX64.match(value) or value == EMPTY_SHA256:
        return None
    return value


def load_state_dict(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of a Lora file on the CPU; non-tensor entries of `.pt` files are left out."""
    ext = os.path.splitext(filename)[1].lower()
    try:
        if ext == ".safetensors":
            import safetensors.torch
            return dict(safetensors.torch.load_file(filename, device="cpu"))
        if ext in (".pt", ".ckpt"):
            data = torch.load(filename, map_location="cpu", weights_only=True)
        else:
            raise LoraFileError(f"{filename}: unsupported file type {ext!r}")
    except LoraFileError:
        raise
    except Exception as e:
        raise LoraFileError(f"{filename}: cannot load tensors: {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFileError(f"{filename}: expected a dict of tensors, found {type(data).__name__}")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
