"""Step schedules in a Lora tag: keyframed weights as sd-webui-loractl writes them, and LBW's start=/stop=.

`<lora:name:0@0,1@0.5>`: weight 0 at the start, 1 from the middle of the steps on, linear in between (`te=`,
`unet=`, `hr=`, `hrte=`, `hrunet=` take the same lists). As in loractl: keyframes are `weight@position` separated by
`,` or `;` (`~` works for `@`), a weight without a position sits at position 1, and positions are fractions of the
pass when the largest is at most 1, else step numbers; before the first keyframe the first weight holds, after the
last the last. `start=`/`stop=` (a step number, or a fraction of the steps when below 1) switch the Lora on from
`start` and off from `stop`.

Unlike loractl, a keyframe that is not `number@number`, positions out of order or non-finite numbers are errors
naming the problem, and a fraction is taken of the pass's last step (step/(steps-1)), so `@1` is the last step.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_re_split = re.compile(r"[,;]")
_re_at = re.compile(r"[@~]")


class ScheduleError(ValueError):
    pass


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ScheduleError(f"{what} {text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Schedule:
    """Keyframes (position, weight), positions ascending; `fractions`: positions are fractions of the pass."""

    keyframes: tuple[tuple[float, float], ...]
    fractions: bool
    text: str

    def weight_at(self, step: int, steps: int) -> float:
        x = (step / (steps - 1) if steps > 1 else 1.0) if self.fractions else float(step)
        points = self.keyframes
        if x <= points[0][0]:
            return points[0][1]
        for (x0, w0), (x1, w1) in zip(points, points[1:], strict=False):
            if x <= x1:
                return w0 + (w1 - w0) * (x - x0) / (x1 - x0) if x1 > x0 else w1
        return points[-1][1]

    def distinct_weights(self, steps: int) -> int:
        return len({self.weight_at(s, steps) for s in range(max(steps, 1))})


def is_schedule(text: str) -> bool:
    return bool(_re_at.search(str(text)))


def parse(text: str, what: str = "weight") -> Schedule:
    """`0@0,1@0.5` → Schedule; ScheduleError naming the problem."""
    points = []
    for part in _re_split.split(str(text)):
        part = part.strip()
        if not part:
            raise ScheduleError(f"{what} schedule {text!r} has an empty keyframe")
        pieces = _re_at.split(part)
        if len(pieces) > 2:
            raise ScheduleError(f"{what} keyframe {part!r} is not weight@position")
        weight = _finite(pieces[0], f"{what} keyframe weight")
        position = _finite(pieces[1], f"{what} keyframe position") if len(pieces) == 2 else 1.0
        if position < 0:
            raise ScheduleError(f"{what} keyframe {part!r} has a negative position")
        points.append((position, weight))
    positions = [p for p, _ in points]
    if positions != sorted(positions):
        raise ScheduleError(f"{what} schedule {text!r} has keyframes out of order")
    return Schedule(tuple(points), fractions=max(positions) <= 1.0, text=str(text))


def step_of(text: str, steps: int, what: str) -> int:
    """`start=`/`stop=` value → a step index: a number below 1 is a fraction of the steps."""
    value = _finite(text, what)
    if value < 0:
        raise ScheduleError(f"{what} {text!r} is negative")
    return round(value * steps) if value < 1 else int(value)


@dataclass(frozen=True)
class Window:
    """`start=`/`stop=` as written (resolved per pass, whose step count is known only then)."""

    start: str | None = None
    stop: str | None = None

    def active(self, step: int, steps: int) -> bool:
        start = step_of(self.start, steps, "start") if self.start is not None else 0
        stop = step_of(self.stop, steps, "stop") if self.stop is not None else steps
        return start <= step < stop

    def check(self) -> None:
        start = _finite(self.start, "start") if self.start is not None else None
        stop = _finite(self.stop, "stop") if self.stop is not None else None
        for value, what in ((start, "start"), (stop, "stop")):
            if value is not None and value < 0:
                raise ScheduleError(f"{what} {value:g} is negative")
        if start is not None and stop is not None and (start < 1) == (stop < 1) and start >= stop:
            raise ScheduleError(f"start={self.start} is not before stop={self.stop}")
