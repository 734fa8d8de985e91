"""The timing and memory rows of scripts/a1111_check.py's table: each operation's job time and the time inside the
Lora's weight code (min / median, ratio of medians), removal against one write of the touched weights measured in
the same server, and the servers' resident memory. A side is an a1111_check.Side (times, inner, write_floor, rss)."""
from __future__ import annotations

import statistics


def _gib(side, key: str) -> str:
    total, private = side.rss.get(key, 0), side.rss_private.get(key)
    return f"{total / 2**30:.2f} GiB" + (f" ({private / 2**30:.2f})" if private else "")


def _fmt_times(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}" if values else "-"


def _fmt_inner(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def timing_rows(builtin, ours, timed: list[str]) -> list[str]:
    """Markdown rows (no header) for the operations in `timed`, the write floor and RSS."""
    rows = []
    for op in [*timed, "(a job that changes nothing)"]:
        b, o = builtin.times.get(op, []), ours.times.get(op, [])
        if not b and not o:
            continue
        verdict = ""
        if op in timed and b and o:
            ratio = statistics.median(o) / max(statistics.median(b), 1e-9)
            verdict = f"{ratio:.2f}× the built-in ({'faster' if ratio < 1 else 'SLOWER'})"
        rows.append(f"| {op} (s, min / median of {len(b)}) | {_fmt_times(b)} | {_fmt_times(o)} | {verdict} |")
    for op in timed:  # the server's own clock around the Lora's weight code: no job noise
        b, o = ([v for v in side.inner.get(op, []) if v == v] for side in (builtin, ours))  # NaN: no clock
        if b and o:
            ratio = statistics.median(o) / max(statistics.median(b), 1e-9)
            rows.append(f"| {op}: time in the Lora's weight code inside the server (s, min / median of {len(b)}) | "
                        f"{_fmt_inner(b)} | {_fmt_inner(o)} | {ratio:.2f}× the built-in "
                        f"({'faster' if ratio < 1 else 'SLOWER'}) |")
    b, o = builtin.write_floor, ours.write_floor
    if b.get("seconds") and o.get("seconds"):  # removal against its floor, each in its own server
        cells = []
        for side, floor in ((builtin, b), (ours, o)):
            removal = [v for v in side.inner.get("remove all", []) if v == v]
            ratio = statistics.median(removal) / statistics.median(floor["seconds"]) if removal else float("nan")
            cells.append(f"{_fmt_inner(floor['seconds'])}; removal {ratio:.2f}× it")
        rows.append(f"| one write of the {o['parameters']} weights a Lora touches ({o['bytes'] / 2**30:.2f} GiB, "
                    f"`p.copy_(copy)`, the floor of a removal; s, min / median of {len(o['seconds'])}) | "
                    f"{cells[0]} | {cells[1]} | |")
    for key in ["no Lora", "apply 1 LoRA", "apply 3 stacked", "remove all"]:
        b, o = builtin.rss.get(key), ours.rss.get(key)
        if b and o:
            rows.append(f"| server RSS after {key} (of it private: not mapped file pages) | {_gib(builtin, key)} | "
                        f"{_gib(ours, key)} | |")
    return rows
