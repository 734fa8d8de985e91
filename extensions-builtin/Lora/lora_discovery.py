"""Discovery: Lora folders → NetworkOnDisk records and the name maps (A1111 names).

A rescan walks the folders and stats each file; records are reused while a file's size and mtime are
unchanged, so rescanning (on Refresh, on the API, on a missing name) costs a directory walk, not a re-read.

Names: the first file with a stem owns it; a later same-stem file is listed under its path-qualified name
(`sub/stem`, relative to its Lora folder), and every file also resolves by that path-qualified name.
"""
from __future__ import annotations

import logging
import os
import re
import threading

import lora_files
import network

available_networks: dict[str, network.NetworkOnDisk] = {}
available_network_aliases: dict[str, network.NetworkOnDisk] = {}
forbidden_network_aliases: dict[str, int] = {}
available_network_hash_lookup: dict[str, network.NetworkOnDisk] = {}
available_network_paths: dict[str, network.NetworkOnDisk] = {}  # path-qualified name → record

_records: dict[str, network.NetworkOnDisk] = {}  # absolute path → record, reused while (size, mtime) hold
_lock = threading.RLock()
logger = logging.getLogger("lora")


def natural_sort_key(s: str, regex: re.Pattern = re.compile(r"([0-9]+)")) -> list:
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def lora_dirs() -> list[str]:
    from modules import shared
    dirs = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
    return [os.path.abspath(d) for d in dirs if d]


def ensure_lora_dir() -> None:
    dirs = lora_dirs()
    if dirs:
        os.makedirs(dirs[0], exist_ok=True)


def walk_files(root: str, list_hidden: bool = True) -> list[str]:
    """Every Lora file under root: symlinks followed (each real folder once), roots and files natural-sorted."""
    found = []
    seen: set[str] = set()
    walked = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        walked.append((dirpath, filenames))
    for dirpath, filenames in sorted(walked, key=lambda x: natural_sort_key(x[0])):
        rel_dir = os.path.relpath(dirpath, root)
        if not list_hidden and rel_dir != "." and any(p.startswith(".") for p in rel_dir.split(os.sep)):
            continue
        for filename in sorted(filenames, key=natural_sort_key):
            if os.path.splitext(filename)[1].lower() in lora_files.network_extensions:
                found.append(os.path.join(dirpath, filename))
    return found


def qualified_name_for(filename: str, root: str) -> str:
    rel = os.path.relpath(filename, root)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def _record(filename: str, root: str) -> network.NetworkOnDisk | None:
    try:
        st = os.stat(filename)
    except OSError:
        return None
    old = _records.get(filename)
    if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
        return old
    stem = os.path.splitext(os.path.basename(filename))[0]
    try:
        return network.NetworkOnDisk(stem, filename, qualified_name=qualified_name_for(filename, root), root=root,
                                     stat=st)
    except Exception as e:  # one unreadable file must not hide the others
        logger.warning("Lora: skipping %s: %s", filename, e)
        return None


def list_available_networks() -> None:
    """Rescans the Lora folders and rebuilds the name maps in place (other modules hold these dicts)."""
    from modules import shared
    list_hidden = bool(getattr(shared.opts, "list_hidden_files", True))
    ensure_lora_dir()
    with _lock:
        records: dict[str, network.NetworkOnDisk] = {}
        ordered: list[network.NetworkOnDisk] = []
        for root in lora_dirs():
            if not os.path.isdir(root):
                continue
            for filename in walk_files(root, list_hidden):
                filename = os.path.abspath(filename)
                if filename in records:
                    continue
                entry = _record(filename, root)
                if entry is not None:
                    records[filename] = entry
                    ordered.append(entry)
        _records.clear()
        _records.update(records)
        _rebuild_maps(ordered)


def _rebuild_maps(ordered: list[network.NetworkOnDisk]) -> None:
    nets: dict[str, network.NetworkOnDisk] = {}
    aliases: dict[str, network.NetworkOnDisk] = {}
    forbidden: dict[str, int] = {"none": 1}
    paths: dict[str, network.NetworkOnDisk] = {}
    for entry in ordered:
        root_name = os.path.basename(entry.root or "")
        qualified = entry.qualified_name
        if qualified in paths:
            qualified = f"{root_name}/{qualified}"
        paths.setdefault(qualified, entry)
        paths.setdefault(f"{root_name}/{entry.qualified_name}", entry)
        name = entry.stem if entry.stem not in nets else qualified
        if name in nets:
            name = f"{root_name}/{entry.qualified_name}"
        if name != entry.stem:
            logger.info("Lora: %s has the same name as %s; use <lora:%s:...> for it",
                        entry.filename, nets[entry.stem].filename, name)
        entry.name = name
        nets[name] = entry
        if entry.alias in aliases or entry.alias in nets and nets[entry.alias] is not entry:
            forbidden[entry.alias.lower()] = 1
        aliases.setdefault(name, entry)
        aliases.setdefault(entry.alias, entry)
    for target, source in ((available_networks, nets), (available_network_aliases, aliases),
                           (forbidden_network_aliases, forbidden), (available_network_paths, paths)):
        target.clear()
        target.update(source)
    available_network_hash_lookup.clear()
    for entry in ordered:
        if entry.shorthash:
            available_network_hash_lookup[entry.shorthash] = entry


def find_network(name: str) -> network.NetworkOnDisk | None:
    """A prompt name → record: unique name (stem), then alias unless the alias is ambiguous, then path."""
    entry = available_networks.get(name)
    if entry is not None:
        return entry
    if name.lower() not in forbidden_network_aliases:
        entry = available_network_aliases.get(name)
        if entry is not None:
            return entry
    path = name.replace("\\", "/")
    if os.path.splitext(path)[1].lower() in lora_files.network_extensions:
        path = os.path.splitext(path)[0]
    return available_network_paths.get(path)


def find_networks(names: list[str]) -> tuple[dict[str, network.NetworkOnDisk], list[str]]:
    """Resolves names, rescanning the folders at most once when some are missing. Returns (found, missing)."""
    found: dict[str, network.NetworkOnDisk] = {}
    missing: list[str] = []
    for name in names:
        entry = find_network(name)
        if entry is None:
            missing.append(name)
        else:
            found[name] = entry
    if missing:
        list_available_networks()
        still_missing = []
        for name in missing:
            entry = find_network(name)
            if entry is None and name.strip() != name:
                entry = find_network(name.strip())
            if entry is None:
                still_missing.append(name)
            else:
                found[name] = entry
        missing = still_missing
    return found, missing


def refresh_record(entry: network.NetworkOnDisk) -> network.NetworkOnDisk:
    """The record for entry's file as it is now: a new record (in every map) when its size or mtime changed."""
    try:
        st = os.stat(entry.filename)
    except OSError:
        return entry
    if st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns:
        return entry
    with _lock:
        try:
            fresh = network.NetworkOnDisk(entry.stem, entry.filename, qualified_name=entry.qualified_name,
                                          root=entry.root, stat=st)
        except Exception as e:
            logger.warning("Lora: cannot re-read %s: %s", entry.filename, e)
            return entry
        fresh.name = entry.name
        _records[entry.filename] = fresh
        for mapping in (available_networks, available_network_aliases, available_network_paths,
                        available_network_hash_lookup):
            for key in [k for k, v in mapping.items() if v is entry]:
                mapping[key] = fresh
        if entry.shorthash and entry.shorthash != fresh.shorthash:
            available_network_hash_lookup.pop(entry.shorthash, None)
        return fresh


def ambiguous_alias_files(name: str) -> list[network.NetworkOnDisk]:
    """The files that share `name` as their alias, when it is ambiguous (forbidden)."""
    if name.lower() not in forbidden_network_aliases:
        return []
    return [e for e in available_networks.values() if e.alias.lower() == name.lower()]
