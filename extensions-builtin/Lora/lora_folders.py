"""Lora folders: walking them (symlinks followed, each real folder once, A1111's natural order), one scandir per
folder kept as its DirState (mtime, Lora files, sub-folders, every entry's times for the card page), and the removal
of temporary files an interrupted save left behind. lora_discovery turns the files into records.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable

import lora_files

from modules import shared

logger = logging.getLogger("lora")


def natural_sort_key(s: str, regex: re.Pattern = re.compile(r"([0-9]+)")) -> list:
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def lora_dirs() -> list[str]:
    dirs = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
    return [os.path.abspath(d) for d in dirs if d]


def ensure_lora_dir() -> None:
    dirs = lora_dirs()
    if dirs:
        os.makedirs(dirs[0], exist_ok=True)


class DirState:
    """One scanned folder: its mtime (to notice added or removed entries), its Lora files and sub-folders
    (natural-sorted) and every entry's (mtime, creation time) for the card page's preview and sidecar look-ups."""
    __slots__ = ("mtime_ns", "scanned_at", "files", "subdirs", "listing")

    def __init__(self, mtime_ns: int, files: list[tuple[str, os.stat_result]], subdirs: list[str],
                 listing: dict[str, tuple[float, float]]):
        self.mtime_ns = mtime_ns
        self.scanned_at = time.time()
        self.files = files
        self.subdirs = subdirs
        self.listing = listing

    def settled(self) -> bool:
        """False while the folder's mtime is too close to the scan to prove nothing was added since: file
        systems with coarse timestamps (FAT, some network shares) would hide a file added in the same tick."""
        return self.scanned_at - self.mtime_ns / 1e9 > RACY_SECONDS


RACY_SECONDS = 2.0
# Atomic writes (editor sidecars, previews) write `.tmp-<random>` next to their target and rename it; a crash
# leaves it behind. Our own rule, not the host's (this extension also runs inside A1111): such a file untouched
# for this long belongs to a write that will never finish, so the scan removes it.
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 600.0
stale_temps_removed = 0


def _remove_if_stale_temp(entry: os.DirEntry, st: os.stat_result) -> bool:
    """True when entry was a stale temporary file, now removed (a fresh one, a save in flight, is left alone)."""
    global stale_temps_removed
    if not entry.name.startswith(TEMP_PREFIX) or time.time() - st.st_mtime < STALE_TEMP_SECONDS:
        return False
    try:
        os.remove(entry.path)
    except OSError as e:
        logger.warning("Lora: cannot remove the leftover temporary file %s: %s", entry.path, e)
        return False
    stale_temps_removed += 1
    print(f"Lora: removed unfinished temporary file {entry.path}, left by an interrupted save")
    return True
_dir_index: dict[str, DirState] = {}  # absolute folder path → its last scan


def _is_hidden(rel_dir: str) -> bool:
    return rel_dir != "." and any(p.startswith(".") for p in rel_dir.split(os.sep))


def _scan_dir(dirpath: str, dir_stat: os.stat_result, old: DirState | None = None) -> DirState:
    """One os.scandir: Lora files with their stat, sub-folders, and the whole listing. An unchanged listing
    stays the same object, so the card page can tell in O(1) that nothing in the folder changed."""
    files, subdirs, listing = [], [], {}
    try:
        with os.scandir(dirpath) as it:
            for entry in it:
                try:
                    if entry.is_dir():  # follows symlinks, as A1111's os.walk(followlinks=True)
                        subdirs.append(entry.name)
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                if _remove_if_stale_temp(entry, st):
                    continue
                created = getattr(st, "st_birthtime", None) or min(st.st_ctime, st.st_mtime)
                listing[entry.name] = (st.st_mtime, created)
                if os.path.splitext(entry.name)[1].lower() in lora_files.network_extensions:
                    files.append((entry.name, st))
    except OSError as e:
        logger.warning("Lora: cannot list %s: %s", dirpath, e)
    files.sort(key=lambda x: natural_sort_key(x[0]))
    subdirs.sort(key=natural_sort_key)
    if old is not None and old.listing == listing:
        listing = old.listing
    return DirState(dir_stat.st_mtime_ns, files, subdirs, listing)


def walk(root: str, list_hidden: bool, rescan: Callable[[str, os.stat_result, DirState | None], bool],
          index: dict[str, DirState]) -> list[tuple[str, os.stat_result, bool]]:
    """(path, stat, fresh) of every Lora file under root in natural path order. Each folder is stat'ed;
    `rescan(path, stat, old)` decides whether it is listed again or its last scan reused. Each real folder
    is visited once (symlink loops)."""
    found: list[tuple[str, os.stat_result, bool]] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    ordered_dirs = []
    while stack:
        dirpath = stack.pop()
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        old = _dir_index.get(dirpath)
        fresh = old is None or rescan(dirpath, st, old)
        state = _scan_dir(dirpath, st, old) if fresh else old
        index[dirpath] = state
        ordered_dirs.append((dirpath, state, fresh))
        for sub in reversed(state.subdirs):
            path = os.path.join(dirpath, sub)
            if list_hidden or not sub.startswith("."):
                stack.append(path)
    # A1111 order: folders natural-sorted by their full path, then the files in each.
    ordered_dirs.sort(key=lambda x: natural_sort_key(x[0]))
    for dirpath, state, fresh in ordered_dirs:
        if not list_hidden and _is_hidden(os.path.relpath(dirpath, root)):
            continue
        for name, st in state.files:
            found.append((os.path.join(dirpath, name), st, fresh))
    return found


def walk_files(root: str, list_hidden: bool = True) -> list[str]:
    """Every Lora file under root: symlinks followed (each real folder once), folders and files natural-sorted."""
    return [path for path, _, _ in walk(os.path.abspath(root), list_hidden, lambda *_: True, {})]


def replace_index(index: dict[str, DirState]) -> None:
    """The folders' states after a scan (a folder no longer under any root drops out)."""
    _dir_index.update(index)
    for key in [k for k in _dir_index if k not in index]:
        _dir_index.pop(key, None)


def qualified_name_for(filename: str, root: str) -> str:
    rel = os.path.relpath(filename, root)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def dir_listing(dirname: str) -> dict[str, tuple[float, float]] | None:
    """{file name: (mtime, creation time)} of a Lora folder as of the last scan; None for other folders."""
    state = _dir_index.get(dirname)
    return state.listing if state is not None else None


def dir_listings() -> dict[str, dict[str, tuple[float, float]]]:
    return {path: state.listing for path, state in list(_dir_index.items())}
