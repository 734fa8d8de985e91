"""Benchmark: re-reading original weights from a checkpoint, through the leased map against `pread`.

What the Lora restore and the one-pass rewrite read (modules/original_weights.OriginalWeights): every attention,
feed-forward and projection weight of an SD1.5 UNet (random values, real shapes) from a .safetensors file on disk,
into weights of the file's dtype (a plain copy) and of fp32 (a cast from fp16), whole (`read_into`) and in blocks
of rows (`open_rows`). The floor is one copy of the same bytes from a second copy already in memory (what A1111's
backup restore does). Both readers run in the same process, in turns, after one untimed warm-up each (the file is in
the page cache; the map's pages are mapped once); medians of --repeats.

    venv/bin/python scripts/bench_original_reads.py [--threads 1] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules import leased_map  # noqa: E402
from modules.original_weights import OriginalWeights  # noqa: E402

# SD1.5 UNet transformer blocks: (channels, count)
LEVELS = [(320, 2), (640, 2), (1280, 2), (1280, 1), (1280, 3), (640, 3), (320, 3)]


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for level, (c, count) in enumerate(LEVELS):
        for i in range(count):
            p = f"l{level}.{i}."
            shapes[p + "proj_in"] = shapes[p + "proj_out"] = (c, c, 1, 1)
            for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn2.to_q", "attn2.to_out"):
                shapes[p + n] = (c, c)
            shapes[p + "attn2.to_k"] = shapes[p + "attn2.to_v"] = (c, 768)
            shapes[p + "ff.0"] = (8 * c, c)
            shapes[p + "ff.2"] = (c, 4 * c)
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = sd15_shapes()
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-original-reads-") as folder:
        path = os.path.join(folder, "unet.safetensors")
        save_file({k: torch.randn(s, generator=gen).half() for k, s in shapes.items()}, path)
        print(f"SD1.5 UNet attention/ff/proj weights: {len(shapes)} tensors, fp16 file, {args.threads} thread(s), "
              f"median of {args.repeats}; leases available: {leased_map.available()}")
        print("| weights | floor (in-memory copy) | map: whole | ratio | map: rows | ratio | pread: whole | ratio | "
              "pread: rows | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for dtype in (torch.float16, torch.float32):
            print(row(path, shapes, dtype, args.repeats))


def row(path: str, shapes: dict, dtype: torch.dtype, repeats: int) -> str:
    live = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
    held = {k: torch.randn(s).to(dtype) for k, s in shapes.items()}

    def source() -> OriginalWeights:
        return OriginalWeights({("unet", k): (path, k, None) for k in shapes}, {("unet", k): dtype for k in shapes})

    def whole(src):
        for k, w in live.items():
            assert src.read_into("unet", k, w)

    def rows(src):
        for k, w in live.items():
            w2 = w.view(w.shape[0], -1)
            step = max(1, (1 << 18) // w2.shape[1])
            with src.open_rows("unet", k, w) as reader:
                for r0 in range(0, w2.shape[0], step):
                    reader.read(r0, min(w2.shape[0], r0 + step), w2[r0:r0 + step])

    def floor(_):
        for k, w in live.items():
            w.copy_(held[k])

    available = leased_map.available
    sources = {"map": source(), "pread": source()}
    times: dict[str, list[float]] = {}
    try:
        for rep in range(repeats + 1):
            for reader in ("map", "pread"):
                leased_map.available = available if reader == "map" else (lambda: False)
                for kind, fn in (("whole", whole), ("rows", rows)):
                    started = time.perf_counter()
                    fn(sources[reader])
                    if rep:
                        times.setdefault(f"{reader} {kind}", []).append(time.perf_counter() - started)
            started = time.perf_counter()
            floor(None)
            if rep:
                times.setdefault("floor", []).append(time.perf_counter() - started)
    finally:
        leased_map.available = available
    med = {k: statistics.median(v) for k, v in times.items()}
    size = sum(w.numel() * w.element_size() for w in live.values()) / 2**20
    cells = [f"{str(dtype).replace('torch.', '')} ({size:.0f} MiB)", f"{med['floor'] * 1e3:.1f} ms"]
    for key in ("map whole", "map rows", "pread whole", "pread rows"):
        cells += [f"{med[key] * 1e3:.1f} ms", f"{med[key] / med['floor']:.2f}x"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
