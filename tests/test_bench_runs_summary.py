"""scripts/bench_runs_summary.py pools each benchmark's ratio column, one value per run (a table printed twice in
one log counts once), from the logs of both benchmarks."""
from scripts import bench_runs_summary

PATCHER = """\
### SD15 fp32 on cpu (1 threads): 264 layers
| op | floor (block) | ours (source) | ours (residual) | source / floor | residual / floor |
|---|---|---|---|---|---|
| apply 1 | 236 ms (whole layer) | 277 ms | 3741 ms | {a}x (MISSED, goal 1.1x) | 15.84x (MISSED, goal 1.1x) |
| remove | 239 ms | 255 ms | 1071 ms | 1.04x | 4.48x (MISSED, goal 1.2x) |
"""
DIT = """\
### FLUX.1 widths, 2 double + 3 single blocks, rank 16, bf16, CPU (2 threads): 60 layers
| op | floor | ours (source) | ratio | ours (residual) | ratio | full model, ours (source) |
|---|---|---|---|---|---|---|
| switch | 1.2 s | 1.3 s | {s}x | 9 s | 7.00x | 12 s |
"""


def test_pools_one_ratio_per_run_from_both_benchmarks(tmp_path):
    logs = []
    for i, (a, s) in enumerate([("1.16", "1.09"), ("1.04", "1.12"), ("1.08", "1.02")]):
        path = tmp_path / f"run{i}.log"
        path.write_text(PATCHER.format(a=a) * 2 + DIT.format(s=s), encoding="utf8")
        logs.append(str(path))
    pooled = bench_runs_summary.parse(logs)
    assert pooled == {("SD15 fp32, cpu, 1 thread(s)", "apply 1"): [1.16, 1.04, 1.08],
                      ("SD15 fp32, cpu, 1 thread(s)", "remove"): [1.04, 1.04, 1.04],
                      ("FLUX.1, rank 16", "switch"): [1.09, 1.12, 1.02]}
