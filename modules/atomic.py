"""Atomic file writes: write a temporary file in the same folder, fsync, then rename over the target.

A process killed mid-write leaves its temporary file behind (`.tmp-<random>`, next to the target). Folder scans
call remove_stale_temp_files() to clear such leftovers once they are older than any write in flight could be.
"""
import os
import stat
import tempfile
import time
from typing import Iterable

TEMP_PREFIX = ".tmp-"  # every temporary file of a write here starts with this; nothing else should
STALE_TEMP_AGE_S = 600.0  # a temporary file untouched this long belongs to a write that will never finish


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: toggling the process umask later would race with other threads


def write_bytes_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file should read like any other the user saves
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf8"))


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def remove_stale_temp_files(folder: str, names: Iterable[str] | None = None,
                            max_age: float = STALE_TEMP_AGE_S) -> list[str]:
    """Removes the temporary files of writes that never finished from `folder`: regular files named `.tmp-*`
    whose last change is older than `max_age` seconds (a save in flight keeps its file fresh, so it is never
    touched). `names` are the folder's entries when the caller has already listed it. Returns the removed paths."""
    if names is None:
        try:
            names = os.listdir(folder)
        except OSError:
            return []
    cutoff = time.time() - max_age
    removed = []
    for name in names:
        if not is_temp_name(name):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)  # lstat: a link or a folder with this name is not ours
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    if removed:
        print(f"Removed {len(removed)} unfinished temporary file(s) left by an interrupted save in {folder}: "
              + ", ".join(os.path.basename(p) for p in removed))
    return removed
