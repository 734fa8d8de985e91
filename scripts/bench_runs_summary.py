"""Pools the tables of several runs of scripts/bench_lora_dit.py (each its own process, with its own floor
calibration): for each model, rank and operation, the median of the runs' ratios, with their range.

One run's ratio is already a median of paired repeats, but a run's process and its calibrated floor block size
move every ratio of that run together (on a shared VM by ±10 %), so goals are judged on the median over runs
(issue 10: "medians of >= 5 runs").

    venv/bin/python scripts/bench_runs_summary.py run1.log run2.log ...
"""
from __future__ import annotations

import re
import statistics
import sys

GOAL = 1.1  # issue 12: every DiT operation within 1.1x its floor
ROW = re.compile(r"^\| (apply|multiplier|switch|restore) \| [^|]+ \| [^|]+ \| ([0-9.]+)x")  # ours (source)
HEADER = re.compile(r"^### (.+?) widths, .*?rank (\d+)")


def parse(paths: list[str]) -> dict[tuple[str, str, str], list[float]]:
    """{(model, rank, op): [ours (source) / floor, one per run]} (the logs print two decimals)"""
    pooled: dict = {}
    for path in paths:
        current = None
        with open(path, encoding="utf8") as f:
            for line in f:
                m = HEADER.match(line)
                if m:
                    current = m.groups()
                    continue
                m = ROW.match(line)
                if m and current:
                    pooled.setdefault((*current, m.group(1)), []).append(float(m.group(2)))
    return pooled


def main() -> None:
    pooled = parse(sys.argv[1:])
    print("| model | rank | op | runs | ours (source) / floor: median of runs (range) | goal |")
    print("|---|---|---|---|---|---|")
    for (model, rank, op), ratios in pooled.items():
        med = statistics.median(ratios)
        print(f"| {model} | {rank} | {op} | {len(ratios)} | {med:.3f}× ({min(ratios):.2f}–{max(ratios):.2f}) | "
              f"{'met' if med <= GOAL else '**missed**'} |")


if __name__ == "__main__":
    main()
