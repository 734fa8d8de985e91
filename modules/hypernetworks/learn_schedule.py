"""A1111's learning-rate syntax: "0.005" or "0.005:100, 1e-5:1000, 1e-6" (rate until step, last one to the end)."""
from __future__ import annotations


def parse_learn_rate(learn_rate: float | str, max_steps: int) -> list[tuple[float, int]]:
    """[(rate, end_step)]: rate applies while step < end_step; the last pair without a step runs to max_steps."""
    if isinstance(learn_rate, (int, float)):
        return [(float(learn_rate), max_steps)]
    res: list[tuple[float, int]] = []
    pairs = [x.strip() for x in str(learn_rate).split(",") if x.strip()]
    if not pairs:
        raise ValueError("learning rate is empty")
    for i, pair in enumerate(pairs):
        rate_text, _, step_text = pair.partition(":")
        try:
            rate = float(rate_text)
            end = int(step_text) if step_text.strip() else max_steps
        except ValueError:
            raise ValueError(f"invalid learning rate entry {pair!r}: expected RATE or RATE:STEP") from None
        if end < 0:
            end = max_steps
        if rate <= 0:
            raise ValueError(f"learning rate must be positive, got {pair!r}")
        if res and end <= res[-1][1]:
            raise ValueError(f"learning rate steps must increase: {pair!r} after step {res[-1][1]}")
        if not step_text.strip() and i != len(pairs) - 1:
            raise ValueError(f"only the last learning rate may omit its step: {pair!r}")
        res.append((rate, end))
    return res


class LearnRateScheduler:
    def __init__(self, learn_rate: float | str, max_steps: int, cur_step: int = 0):
        self.schedule = parse_learn_rate(learn_rate, max_steps)
        self.learn_rate = self.schedule[0][0]
        self.finished = False
        self.step(cur_step)

    def step(self, step_number: int) -> bool:
        """Picks the rate for step_number; returns True when it changed. Past the last end: finished."""
        for rate, end in self.schedule:
            if step_number < end:
                changed = rate != self.learn_rate
                self.learn_rate = rate
                return changed
        self.finished = True
        return False

    def apply(self, optimizer, step_number: int) -> None:
        self.step(step_number)
        for group in optimizer.param_groups:
            group["lr"] = self.learn_rate
