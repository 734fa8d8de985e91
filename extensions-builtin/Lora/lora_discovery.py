"""Discovery: Lora folders → NetworkOnDisk records and the name maps (A1111 names).

A rescan (Refresh, the API) walks the folders and stats each file; records are reused while a file's size and
mtime are unchanged, so it costs a directory walk, not a re-read. A name missing at generation time costs even
less: one stat per folder, listing again only the folders whose mtime changed (A1111 rescans everything, up to
twice per generation: 13B-20).

Names: the first file with a stem owns it; a later same-stem file is listed under its path-qualified name
(`sub/stem`, relative to its Lora folder), and every file also resolves by that path-qualified name.

The folder walk itself (DirState, one scandir per folder, leftover temporary files) is lora_folders'.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import lora_files
import lora_folders
import lora_identity
import network
from lora_folders import (  # noqa: F401  (lora_discovery's names before the folder walk moved out)
    RACY_SECONDS,
    STALE_TEMP_SECONDS,
    TEMP_PREFIX,
    DirState,
    dir_listing,
    dir_listings,
    ensure_lora_dir,
    lora_dirs,
    natural_sort_key,
    qualified_name_for,
    walk_files,
)

from modules import shared

available_networks: dict[str, network.NetworkOnDisk] = {}
available_network_aliases: dict[str, network.NetworkOnDisk] = {}
forbidden_network_aliases: dict[str, int] = {}
available_network_hash_lookup: dict[str, network.NetworkOnDisk] = {}  # shorthash → record, filled as hashes are known
available_network_paths: dict[str, network.NetworkOnDisk] = {}  # path-qualified name → record

_records: dict[str, network.NetworkOnDisk] = {}  # absolute path → record, reused while (size, mtime) hold
_ordered: list[network.NetworkOnDisk] = []  # the records in listing order
stem_counts: dict[str, int] = {}  # stem → how many listed files have it


class NameMaps:
    """One consistent set of name maps. A rescan builds a new one and swaps it in with one assignment, so a job
    resolving names while another thread rescans sees either the old maps or the new ones, never an empty or
    half-built map (a cleared-then-refilled dict made a running job report `Lora not found`)."""
    __slots__ = ("networks", "aliases", "forbidden", "paths", "stem_counts")

    def __init__(self, nets: dict, aliases: dict, forbidden: dict, paths: dict, counts: dict):
        self.networks, self.aliases, self.forbidden, self.paths, self.stem_counts = \
            nets, aliases, forbidden, paths, counts


_maps = NameMaps({}, {}, {"none": 1}, {}, {})
scan_count = 0  # full rescans so far (tests check that a missing name does not cause one)
maps_generation = 0  # bumped whenever the name maps change (cards cache what they derive from the maps)
_lock = threading.RLock()
logger = logging.getLogger("lora")


def read_facts(filename: str, stat: os.stat_result | None = None) -> network.FileFacts:
    """What a record holds of its file: size and times, the header's metadata and family hint (cached by path,
    size and mtime; a .pt/.ckpt is checked to load without unpickling code), a hash known without reading
    tensors. A file that cannot be read gets `read_error`; one that cannot be stat'ed raises OSError."""
    st = stat or os.stat(filename)
    facts = network.FileFacts(st.st_size, st.st_mtime, st.st_mtime_ns)
    is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
    if is_safetensors:
        try:
            info = lora_identity.cached_header_info(filename)
            facts.metadata, facts.version_hint = info.get("metadata") or {}, info.get("version_hint")
            facts.also_fits = tuple(info.get("also_fits") or ())
        except Exception as e:
            facts.read_error = str(e)
    else:  # a pickle that needs more than tensors is named on its card at scan time, not when first used
        try:
            facts.read_error = lora_identity.cached_pickle_problem(filename)
        except Exception as e:
            facts.read_error = f"{filename}: {e}"
    facts.hash = lora_identity.known_hash_of(filename, is_safetensors, facts.metadata)
    return facts


def _hash_known(entry: network.NetworkOnDisk) -> None:
    available_network_hash_lookup[entry.shorthash] = entry


def _record(filename: str, root: str, st: os.stat_result | None = None) -> network.NetworkOnDisk | None:
    """The record for a file: the previous one while size and mtime hold (no read at all), else a new one."""
    try:
        st = st or os.stat(filename)
    except OSError:
        return None
    old = _records.get(filename)
    if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
        return old
    stem = os.path.splitext(os.path.basename(filename))[0]
    try:
        return network.NetworkOnDisk(stem, filename, qualified_name=qualified_name_for(filename, root), root=root,
                                     facts=read_facts(filename, st))
    except Exception as e:  # one unreadable file must not hide the others
        logger.warning("Lora: skipping %s: %s", filename, e)
        return None


def _scan(rescan: Callable[[str, os.stat_result, DirState | None], bool], stat_files: bool) -> bool:
    """Walks the Lora folders and rebuilds the maps when the set of records changed. With stat_files, every
    file is stat'ed (a changed size or mtime gives a new record); without, only new files are looked at."""
    list_hidden = bool(getattr(shared.opts, "list_hidden_files", True))
    ensure_lora_dir()
    with _lock:
        records: dict[str, network.NetworkOnDisk] = {}
        ordered: list[network.NetworkOnDisk] = []
        index: dict[str, DirState] = {}
        for root in lora_dirs():
            if not os.path.isdir(root):
                continue
            for filename, st, fresh in lora_folders.walk(root, list_hidden, rescan, index):
                if filename in records:
                    continue
                old = _records.get(filename)
                if old is not None and not stat_files and not fresh:
                    entry = old
                else:
                    entry = _record(filename, root, st if fresh else None)
                if entry is not None:
                    records[filename] = entry
                    ordered.append(entry)
        lora_folders.replace_index(index)
        changed = [id(e) for e in ordered] != [id(e) for e in _ordered]
        if changed:
            _replace_in_place(_records, records)
            _ordered[:] = ordered
            _rebuild_maps(ordered)
    if changed:
        _notify(ordered)
    return changed


def list_available_networks() -> None:
    """Rescans the Lora folders (A1111 name). Incremental: each file costs a stat, and a file whose size and
    mtime are unchanged keeps its record, so nothing is read again. The name maps are rebuilt in place (other
    modules hold these dicts) only when something changed."""
    global scan_count
    scan_count += 1
    _scan(lambda path, st, old: True, stat_files=True)


def rescan_changed_folders() -> bool:
    """The cheap look for new files: one stat per folder; only folders whose mtime changed (an entry was
    added, removed or renamed) are listed again. Files are not stat'ed. Returns whether anything changed."""
    def rescan(path: str, st: os.stat_result, old: DirState | None) -> bool:
        return old is None or old.mtime_ns != st.st_mtime_ns or not old.settled()
    return _scan(rescan, stat_files=False)


_listeners: list[Callable[[list[network.NetworkOnDisk]], None]] = []


def on_records_changed(callback: Callable[[list[network.NetworkOnDisk]], None]) -> None:
    """callback(all records) after a scan that changed the set of records (the background hasher listens)."""
    if callback not in _listeners:
        _listeners.append(callback)


def _notify(ordered: list[network.NetworkOnDisk]) -> None:
    for callback in list(_listeners):
        try:
            callback(list(ordered))
        except Exception as e:
            logger.warning("Lora: a listing listener failed: %s", e)


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
    counts: dict[str, int] = {}
    for entry in ordered:
        counts[entry.stem] = counts.get(entry.stem, 0) + 1
    _publish(NameMaps(nets, aliases, forbidden, paths, counts))
    hashes = {entry.shorthash: entry for entry in ordered if entry.shorthash}
    _replace_in_place(available_network_hash_lookup, hashes)


def _replace_in_place(target: dict, source: dict) -> None:
    """Makes target equal source without a moment in which a key present in both is missing (no clear())."""
    target.update(source)
    for key in [k for k in target if k not in source]:
        target.pop(key, None)


def _publish(maps: NameMaps) -> None:
    """Swaps in new name maps; A1111's module-level dicts (other extensions hold them) follow, updated in place."""
    global _maps, maps_generation
    _maps = maps
    maps_generation += 1
    for target, source in ((available_networks, maps.networks), (available_network_aliases, maps.aliases),
                           (forbidden_network_aliases, maps.forbidden), (available_network_paths, maps.paths),
                           (stem_counts, maps.stem_counts)):
        _replace_in_place(target, source)


def find_network(name: str) -> network.NetworkOnDisk | None:
    """A prompt name → record: unique name (stem), then alias unless the alias is ambiguous, then path."""
    maps = _maps  # one snapshot for the whole look-up
    entry = maps.networks.get(name)
    if entry is not None:
        return entry
    if name.lower() not in maps.forbidden:
        entry = maps.aliases.get(name)
        if entry is not None:
            return entry
    path = name.replace("\\", "/")
    if os.path.splitext(path)[1].lower() in lora_files.network_extensions:
        path = os.path.splitext(path)[0]
    return maps.paths.get(path)


def find_networks(names: list[str]) -> tuple[dict[str, network.NetworkOnDisk], list[str]]:
    """Resolves names. When some are missing, the folders whose mtime changed are listed again (one stat per
    folder, never a full rescan) and the names looked up once more. Returns (found, missing)."""
    found: dict[str, network.NetworkOnDisk] = {}
    missing: list[str] = []
    for name in names:
        entry = find_network(name)
        if entry is None and name.strip() != name:
            entry = find_network(name.strip())
        if entry is None:
            missing.append(name)
        else:
            found[name] = entry
    if missing and rescan_changed_folders():
        still_missing = []
        for name in missing:
            entry = find_network(name) or find_network(name.strip())
            if entry is None:
                still_missing.append(name)
            else:
                found[name] = entry
        missing = still_missing
    return found, missing


def path_name(entry: network.NetworkOnDisk) -> str:
    """The path-qualified name (`sub/stem`, or `Lora/sub/stem` when two folders hold the same path) that
    resolves to this file."""
    paths = _maps.paths
    for candidate in (entry.qualified_name, f"{os.path.basename(entry.root or '')}/{entry.qualified_name}"):
        if paths.get(candidate) is entry:
            return candidate
    return entry.name


def shares_stem(entry: network.NetworkOnDisk) -> bool:
    """Whether another listed file has the same stem (then cards show and insert path-qualified names)."""
    return _maps.stem_counts.get(entry.stem, 0) > 1


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
                                          root=entry.root, facts=read_facts(entry.filename, st))
        except Exception as e:
            logger.warning("Lora: cannot re-read %s: %s", entry.filename, e)
            return entry
        fresh.name = entry.name
        _records[entry.filename] = fresh
        _ordered[:] = [fresh if e is entry else e for e in _ordered]
        maps = _maps

        def swapped(mapping: dict) -> dict:
            return {k: fresh if v is entry else v for k, v in mapping.items()}
        _publish(NameMaps(swapped(maps.networks), swapped(maps.aliases), maps.forbidden, swapped(maps.paths),
                          maps.stem_counts))
        if entry.shorthash and entry.shorthash != fresh.shorthash and \
                available_network_hash_lookup.get(entry.shorthash) is entry:
            available_network_hash_lookup.pop(entry.shorthash, None)
        for key in [k for k, v in list(available_network_hash_lookup.items()) if v is entry]:
            available_network_hash_lookup[key] = fresh
        if fresh.shorthash:
            available_network_hash_lookup[fresh.shorthash] = fresh
        return fresh


def ambiguous_alias_files(name: str) -> list[network.NetworkOnDisk]:
    """The files that share `name` as their alias, when it is ambiguous (forbidden)."""
    maps = _maps
    if name.lower() not in maps.forbidden:
        return []
    return [e for e in maps.networks.values() if e.alias.lower() == name.lower()]


network.set_name_resolver(find_network)
network.set_file_io(read_facts, lora_identity.compute_hash, _hash_known)
