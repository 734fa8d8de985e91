"""Reading and writing hypernetwork .pt files: weights-only unpickling in, atomic replacement out."""
from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch

from modules.atomic import write_bytes_atomic


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
    """torch.save, written atomically (a temporary file next to the target, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(filename, buf.getvalue())
