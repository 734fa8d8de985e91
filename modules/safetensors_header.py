"""The one safetensors header reader (capped, validated) and the atomic writer, for the host and the extension.

This file exists twice, byte for byte: `extensions-builtin/Lora/lora_safetensors.py` and
`modules/safetensors_header.py`. The extension cannot import our host's modules (it also runs inside A1111) and the
host imports no extension code, so each has its copy; tests/test_safetensors_header.py fails when they differ.

Reading: the 8-byte little-endian header length (at most MAX_HEADER, inside the file), a JSON object, and for each
tensor a known dtype, a shape of non-negative integers and data offsets that lie in the data block, are
contiguous from 0 to the end of the file (what the safetensors library requires) and span shape × item size.
Every problem is a HeaderError (a ValueError) whose message names the file.
Writing goes through the safetensors library itself (`safetensors.torch.save_file`) into a temporary file next
to the target, then os.replace, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass

import safetensors.torch
import torch

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
TEMP_PREFIX = ".tmp-"  # what the Lora folder scan removes when an interrupted write left it behind

# safetensors dtype → bytes per element (the format's byte-sized dtypes)
ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
                "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
                "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
                "C64": "complex64"}
# safetensors dtype → torch dtype, for the dtypes this torch has
TORCH_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}


class HeaderError(ValueError):
    """Not a readable safetensors file; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its safetensors dtype, shape, absolute file offset and byte count."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return TORCH_DTYPES.get(self.dtype)


@dataclass
class Header:
    """A file's `__metadata__` (as written: normally str → str), its tensors in header order, and where the data
    block starts."""

    metadata: dict
    tensors: dict[str, Entry]
    data_start: int
    size: int


def header_length(f, size: int, filename: str) -> int:
    """The JSON header's byte count from the first 8 bytes of an open file (read from its current position)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise HeaderError(f"{filename}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER or 8 + n > size:
        raise HeaderError(f"{filename}: not a safetensors file (header length {n} out of range)")
    return n


def _entry(key: str, info, data_start: int, filename: str) -> tuple[Entry, int, int]:
    if not isinstance(info, dict):
        raise HeaderError(f"{filename}: bad header entry for {key!r}: {info!r}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ITEM_SIZE:
        raise HeaderError(f"{filename}: tensor {key!r} has an unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) and
            isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise HeaderError(f"{filename}: bad shape or offsets for {key!r}: {info!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEM_SIZE[dtype]
    if begin < 0 or end - begin != nbytes:
        raise HeaderError(f"{filename}: tensor {key!r} has offsets {begin}..{end} that do not fit its shape "
                          f"{shape} of {dtype}")
    return Entry(dtype, tuple(shape), data_start + begin, nbytes), begin, end


def read_header(f, filename: str) -> Header:
    """The validated header of an open binary file (read from its start)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    n = header_length(f, size, filename)
    text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise HeaderError(f"{filename}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{filename}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise HeaderError(f"{filename}: __metadata__ is not an object")
    data_start = 8 + n
    tensors: dict[str, Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        entry, begin, end = _entry(key, info, data_start, filename)
        tensors[key] = entry
        spans.append((begin, end, key))
    at = 0
    for begin, end, key in sorted(spans):  # contiguous from 0, no gap or overlap, up to the end of the file
        if begin != at:
            raise HeaderError(f"{filename}: tensor {key!r} starts at {begin}, not at {at} (gap or overlap)")
        at = end
    if data_start + at != size:
        raise HeaderError(f"{filename}: the tensors end at byte {data_start + at}, the file has {size} bytes")
    return Header(metadata, tensors, data_start, size)


def read_header_file(filename: str) -> Header:
    """The validated header of a file; an unreadable file is a HeaderError too."""
    try:
        with open(filename, "rb") as f:
            return read_header(f, filename)
    except OSError as e:
        raise HeaderError(f"{filename}: cannot read: {e}") from None


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """Writes the tensors with the safetensors library into a temporary file beside `filename`, then replaces it."""
    folder = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(6)}")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
