"""Persistent key/value caches for hashes and file metadata (A1111 names: cache(), cached_data_for_file()).

One SQLite file, one table per subsection; values are JSON. SQLite gives atomic writes and scales to
tens of thousands of entries without rewriting a whole JSON file on every change.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any, Callable

_lock = threading.RLock()
_conn: sqlite3.Connection | None = None
_conn_path: str | None = None


def cache_dir() -> str:
    from modules import shared
    return os.environ.get("SD_WEBUI_CACHE_DIR") or os.path.join(shared.data_path, "cache")


def _connection() -> sqlite3.Connection:
    global _conn, _conn_path
    path = os.path.join(cache_dir(), "cache.sqlite")
    if _conn is None or _conn_path != path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        _conn.execute("PRAGMA journal_mode=WAL")
        _conn.execute("PRAGMA synchronous=NORMAL")
        _conn_path = path
    return _conn


class CacheSection:
    """A dict-like view of one subsection."""

    def __init__(self, subsection: str):
        self.table = "c_" + "".join(ch if ch.isalnum() else "_" for ch in subsection)
        with _lock:
            _connection().execute(f"CREATE TABLE IF NOT EXISTS {self.table} (k TEXT PRIMARY KEY, v TEXT)")

    def get(self, key: str, default: Any = None) -> Any:
        with _lock:
            row = _connection().execute(f"SELECT v FROM {self.table} WHERE k=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _missing)
        if value is _missing:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key, _missing) is not _missing

    def __setitem__(self, key: str, value: Any) -> None:
        with _lock:
            _connection().execute(f"INSERT OR REPLACE INTO {self.table} (k, v) VALUES (?, ?)",
                                  (key, json.dumps(value)))

    def __delitem__(self, key: str) -> None:
        with _lock:
            _connection().execute(f"DELETE FROM {self.table} WHERE k=?", (key,))

    def items(self) -> list[tuple[str, Any]]:
        with _lock:
            rows = _connection().execute(f"SELECT k, v FROM {self.table}").fetchall()
        return [(k, json.loads(v)) for k, v in rows]


_missing = object()
_sections: dict[str, CacheSection] = {}


def cache(subsection: str) -> CacheSection:
    with _lock:
        if subsection not in _sections or _conn_path != os.path.join(cache_dir(), "cache.sqlite"):
            _sections[subsection] = CacheSection(subsection)
        return _sections[subsection]


def cached_data_for_file(subsection: str, title: str, filename: str, func: Callable[[], Any]) -> Any:
    """Returns func()'s value for a file, cached under title; recomputed when the file's mtime or size changes."""
    st = os.stat(filename)
    section = cache(subsection)
    entry = section.get(title)
    if entry and entry.get("mtime") == st.st_mtime and entry.get("size", st.st_size) == st.st_size:
        return entry.get("value")
    value = func()
    if value is None:
        return None
    section[title] = {"mtime": st.st_mtime, "size": st.st_size, "value": value}
    return value
