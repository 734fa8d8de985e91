"""Pools the tables of several runs of scripts/bench_lora_dit.py or scripts/bench_lora_patcher.py (each run its own
process, with its own floor calibration): for each table (model and rank, or model and dtype), each operation, the
median of the runs' ratios of ours (source) to the floor, with their range.

One run's ratio is already a median of paired repeats, but a run's process and its calibrated floor block size
move every ratio of that run together (on a shared VM by ±10 %), so goals are judged on the median over runs
(issue 10: "medians of >= 5 runs").

    venv/bin/python scripts/bench_runs_summary.py run1.log run2.log ...
"""
from __future__ import annotations

import re
import statistics
import sys

# issue 10: apply, switch, multiplier <= 1.1x and remove <= 1.2x (SD); issue 12: every DiT operation <= 1.1x
GOALS = {"remove": 1.2}
GOAL = 1.1
DIT_TABLE = re.compile(r"^### (.+?) widths, .*?rank (\d+)")  # bench_lora_dit.py
PATCHER_TABLE = re.compile(r"^### (\S+ \S+) on (\S+) \((\d+) threads\)")  # bench_lora_patcher.py
RATIO = re.compile(r"^([0-9.]+)x")
# the column of ours (source) / floor in each table's header row
RATIO_COLUMNS = ("source / floor", "ratio")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(paths: list[str]) -> dict[tuple, list[float]]:
    """{(table, op): [ours (source) / floor, one per run]} (the logs print two decimals; a table a log prints twice
    counts once)"""
    pooled: dict = {}
    for path in paths:
        table, column, run = None, None, {}
        with open(path, encoding="utf8") as f:
            for line in f:
                m = DIT_TABLE.match(line)
                if m:
                    table, column = f"{m.group(1)}, rank {m.group(2)}", None
                    continue
                m = PATCHER_TABLE.match(line)
                if m:
                    table, column = f"{m.group(1)}, {m.group(2)}, {m.group(3)} thread(s)", None
                    continue
                if table is None or not line.startswith("|"):
                    continue
                cells = _cells(line)
                if cells[0] == "op":
                    column = next((cells.index(c) for c in RATIO_COLUMNS if c in cells), None)
                    continue
                if column is None or len(cells) <= column:
                    continue
                ratio = RATIO.match(cells[column])
                if ratio:
                    run[table, cells[0]] = float(ratio.group(1))
        for key, ratio in run.items():
            pooled.setdefault(key, []).append(ratio)
    return pooled


def main() -> None:
    pooled = parse(sys.argv[1:])
    print("| table | op | runs | ours (source) / floor: median of runs (range) | goal |")
    print("|---|---|---|---|---|")
    for (table, op), ratios in pooled.items():
        med, goal = statistics.median(ratios), GOALS.get(op, GOAL)
        print(f"| {table} | {op} | {len(ratios)} | {med:.3f}× ({min(ratios):.2f}–{max(ratios):.2f}) | "
              f"{'met' if med <= goal else '**missed**'} (≤ {goal}×) |")


if __name__ == "__main__":
    main()
