"""The tests' one raw safetensors writer, for files that are malformed on purpose (every valid file in the tests is
written by the safetensors library)."""
from __future__ import annotations

import json


def raw_safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length (`length` overrides it), the JSON header as given, then `data`."""
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data
