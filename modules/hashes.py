"""File hashes (A1111 names): sha256 of the whole file, and the kohya "addnet" hash of the tensor bytes."""
from __future__ import annotations

import hashlib
import os

from modules import cache, safetensors_header

_CHUNK = 1024 * 1024


def calculate_sha256(filename: str) -> str:
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash_safetensors(b) -> str:
    """SHA-256 of everything after the safetensors header (stable when only metadata is edited)."""
    h = hashlib.sha256()
    size = b.seek(0, os.SEEK_END)
    b.seek(0)
    n = safetensors_header.header_length(b, size, str(getattr(b, "name", "safetensors data")))  # capped, in range
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def _entry_valid(entry: dict | None, filename: str) -> bool:
    if not entry:
        return False
    st = os.stat(filename)
    return entry.get("mtime") == st.st_mtime and entry.get("size", st.st_size) == st.st_size


def sha256_from_cache(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    section = cache.cache("hashes-addnet" if use_addnet_hash else "hashes")
    entry = section.get(title)
    if not os.path.exists(filename) or not _entry_valid(entry, filename):
        return None
    return entry.get("sha256")


def sha256(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    from modules import shared
    cached = sha256_from_cache(filename, title, use_addnet_hash)
    if cached is not None:
        return cached
    if shared.cmd_opts.no_hashing:
        return None
    print(f"Calculating sha256 for {filename}: ", end="", flush=True)
    if use_addnet_hash:
        with open(filename, "rb") as f:
            value = addnet_hash_safetensors(f)
    else:
        value = calculate_sha256(filename)
    print(value)
    st = os.stat(filename)
    cache.cache("hashes-addnet" if use_addnet_hash else "hashes")[title] = {
        "mtime": st.st_mtime, "size": st.st_size, "sha256": value}
    return value
