"""Identity of a Lora file: cached header info and hashes, keyed by absolute path and validated by size and mtime.

A1111 keys these caches by `lora/<stem>`, so same-named files in different folders share entries (13B-12).
"""
from __future__ import annotations

import os

import lora_files

from modules import cache, hashes

HEADER_SUBSECTION = "lora-header-3"  # bump when lora_files.header_info changes what it returns
PICKLE_SUBSECTION = "lora-pickle-1"  # bump when lora_files.pickle_problem changes what it returns


def cache_title(filename: str) -> str:
    return "lora/" + os.path.abspath(filename)


def cached_header_info(filename: str) -> dict:
    """{"metadata", "version_hint", "also_fits"} of a safetensors file, read once per (path, size, mtime)."""
    return cache.cached_data_for_file(HEADER_SUBSECTION, cache_title(filename), filename,
                                      lambda: lora_files.header_info(filename)) or {}


def cached_pickle_problem(filename: str) -> str | None:
    """Why a .pt/.ckpt file cannot be loaded safely (None: it can), checked once per (path, size, mtime)."""
    return cache.cached_data_for_file(PICKLE_SUBSECTION, cache_title(filename), filename,
                                      lambda: lora_files.pickle_problem(filename)) or None


def known_hash_of(filename: str, is_safetensors: bool, metadata: dict) -> str | None:
    """A hash available without reading tensors: a cached computed one, else a plausible embedded one."""
    cached = hashes.sha256_from_cache(filename, cache_title(filename), use_addnet_hash=is_safetensors)
    return cached or lora_files.embedded_hash(metadata)


def known_hash(entry) -> str | None:
    """known_hash_of for a record."""
    return known_hash_of(entry.filename, entry.is_safetensors, entry.metadata)


def compute_hash(entry) -> str | None:
    """The tensor-data ("addnet") hash for safetensors, the file sha256 otherwise; None with --no-hashing."""
    try:
        return hashes.sha256(entry.filename, cache_title(entry.filename), use_addnet_hash=entry.is_safetensors)
    except OSError as e:
        print(f"*** Lora: cannot hash {entry.filename}: {e}")
        return None
