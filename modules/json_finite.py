"""JSON that stays strict: NaN and ±Infinity never reach a file or the page.

Python's json reads and writes them by default (`NaN`, `Infinity`, `1e999`), but they are not JSON: the
browser's JSON.parse and starlette's JSONResponse refuse them, so one such number breaks a whole response.
Values read from files keep their text instead, so nothing is lost and everything written is strict.
"""
from __future__ import annotations

import json
import math
from typing import Any


def _float_or_text(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text


def loads_lenient(text: str | bytes) -> Any:
    """json.loads, except that non-finite numbers (`NaN`, `Infinity`, `1e999`) come back as their text."""
    return json.loads(text, parse_constant=str, parse_float=_float_or_text)


def non_finite_text(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def finite(value: Any) -> Any:
    """`value` with every non-finite float (also inside dicts, lists and tuples) replaced by its JSON text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else non_finite_text(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """json.dumps that raises ValueError on NaN/Infinity instead of writing something that is not JSON."""
    return json.dumps(value, allow_nan=False, **kwargs)
