"""Folder listings for the card pages (A1111's MassFileLister, by another name here): one os.scandir per folder,
cached until a refresh, so a page of ten thousand cards costs a stat per folder, not per file."""
from __future__ import annotations

import os
import threading

from modules import atomic


class DirectoryLister:
    """One os.scandir per folder per refresh: preview, description and sidecar look-ups become set look-ups."""

    def __init__(self):
        self._dirs: dict[str, dict[str, tuple[float, float]]] = {}
        self._stale: set[str] = set()  # folders written to since the listings in prime() were made
        self._real_dirs: dict[str, str] = {}  # folder → its realpath, for reading thousands of neighbours
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._dirs = {}
            self._stale = set()
            self._real_dirs = {}

    def real_dir(self, dirname: str) -> str:
        real = self._real_dirs.get(dirname)
        if real is None:
            real = self._real_dirs[dirname] = os.path.realpath(dirname)
        return real

    @staticmethod
    def _without_stale_temps(dirname: str, listing: dict) -> dict:
        """A scan is where a save killed mid-write gets cleaned up: its old `.tmp-*` file is removed."""
        temps = [name for name in listing if atomic.is_temp_name(name)]
        removed = set(atomic.remove_stale_temp_files(dirname, temps)) if temps else ()
        if not removed:
            return listing
        return {k: v for k, v in listing.items() if os.path.join(dirname, k) not in removed}

    def prime(self, listings: dict[str, dict[str, tuple[float, float]]], replace: bool = True) -> None:
        """Takes folder listings someone else already made (the Lora discovery walk stats every file once).
        replace=True: they are fresh (a rescan just made them); False: they only fill folders not seen yet."""
        with self._lock:
            if replace:
                self._stale = set()
            taken = [(d, listing) for d, listing in listings.items()
                     if replace or (d not in self._dirs and d not in self._stale)]
        for dirname, listing in taken:
            listing = self._without_stale_temps(dirname, listing)
            with self._lock:
                if replace or (dirname not in self._dirs and dirname not in self._stale):
                    self._dirs[dirname] = listing

    def invalidate(self, dirname: str) -> None:
        """Forgets one folder (a file was written there); the next look-up lists it again."""
        dirname = os.path.abspath(dirname)
        with self._lock:
            self._dirs.pop(dirname, None)
            self._real_dirs.pop(dirname, None)
            self._stale.add(dirname)

    def _listing(self, dirname: str) -> dict[str, tuple[float, float]]:
        listing = self._dirs.get(dirname)
        if listing is not None:
            return listing
        listing = {}
        try:
            with os.scandir(dirname) as it:
                for entry in it:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    created = getattr(st, "st_birthtime", None) or min(st.st_ctime, st.st_mtime)
                    listing[entry.name] = (st.st_mtime, created)
        except OSError:
            pass
        listing = self._without_stale_temps(dirname, listing)
        with self._lock:
            self._dirs[dirname] = listing
        return listing

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        return os.path.split(path)

    def exists(self, path: str) -> bool:
        dirname, name = self._split(path)
        return name in self._listing(dirname)

    def names_in(self, dirname: str) -> dict[str, tuple[float, float]]:
        """{file name: (mtime, creation time)} of one folder."""
        return self._listing(dirname)

    def mctime(self, path: str) -> tuple[float, float]:
        """(mtime, creation time) of a file, (0, 0) when it is missing."""
        dirname, name = self._split(path)
        return self._listing(dirname).get(name, (0.0, 0.0))
