"""Reading and writing hypernetwork .pt files: weights-only unpickling in, atomic replacement out."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from typing import Any

import torch


class UnsafeFileError(Exception):
    """The file needs more than tensors and plain containers to unpickle, so it was not loaded."""


def read_weights_only(filename: str) -> Any:
    """torch.load restricted to tensors and plain containers; anything else is refused, never executed."""
    try:
        return torch.load(filename, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (?:global|operand)[^\n]*", str(e))
        detail = found.group(0).strip() if found else str(e).splitlines()[0]
        raise UnsafeFileError(
            f"Refusing to load {filename}: it contains Python objects other than tensors and plain containers "
            f"({detail}). Only weights-only files are loaded; nothing in it was unpickled.") from None


def save_atomic(obj: Any, filename: str) -> None:
    """torch.save into a temporary file next to the target, fsync, then rename over it."""
    folder = os.path.dirname(os.path.abspath(filename))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a saved network should read like any other file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
