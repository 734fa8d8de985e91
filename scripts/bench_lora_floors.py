"""The floors of scripts/bench_lora_patcher.py: for each Lora operation, the cheapest in-place loop that does the
same work on the same weights, with everything it needs ready in memory (fp32 factors, and for the operations that
need the original weights, a copy of them), so nothing is read from a file and nothing is planned.

  apply (LoRA)     W.view(out, -1).addmm_(up·s, down); several LoRAs: the cheaper of one addmm_ of the
                   rank-concatenated factors (concatenated before timing) and one addmm_ per LoRA on each block of rows
  apply (LoHa)     per block of rows: t1 = (s·w1a)[rows] @ w1b, t2 = w2a[rows] @ w2b, W[rows].addcmul_(t1, t2)
  apply (LoKr)     w2 = w2a @ w2b; W.view(a, c, b, d).addcmul_(w2.view(1, c, 1, d), (s·w1).view(a, 1, b, 1))
  switch / multiplier   W = W0 + ΔW from the in-memory original, each block of rows merged while it is in cache
  remove           W.copy_(W0): one write of the original bytes
16-bit weights accumulate in fp32 in blocks of rows (s = W[rows].float(); s += ΔW[rows]; W[rows] = s), as any
exact merge must. How big a block is fastest depends on the CPU's caches and the GEMM library's threading, so the
block size is not fixed: `calibrate` times each operation with every size in CHUNKS (and fp32 without blocks)
and keeps the fastest, so the floor is the cheapest of these loops, not one guess of it.
Pure tensor code over {layer name: weight}; the factors come from the parsed networks.
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK = 1 << 21  # elements per block before calibration (what the patcher uses on CPU)
CHUNKS = (1 << 16, 1 << 18, 1 << 20, 1 << 21, 1 << 22, None)  # None: the whole layer as one block


def chunk_name(chunk: int | None) -> str:
    return "whole layer" if chunk is None else f"2^{chunk.bit_length() - 1}"


class Floors:
    def __init__(self, layers: dict[str, torch.nn.Module], nets: dict, device: torch.device):
        self.weights = {}
        for net in nets.values():
            for name in net.modules:
                self.weights[name] = layers[name].weight
        self.device = device
        self.chunk: int | None = CHUNK
        self._scratch: list[torch.Tensor] = []
        self.originals = {name: w.detach().clone() for name, w in self.weights.items()}
        self.nets = nets

    # --- factors, ready in fp32 (not timed) ---------------------------------------------------------------------
    def lora_factors(self, keys: str, m: float = 1.0) -> dict:
        res: dict[str, list] = {}
        for k in keys:
            for name, mod in self.nets[k].modules.items():
                w = self.weights[name]
                up = mod.up.reshape(mod.up.shape[0], -1).to(w.device, torch.float32) * (mod.calc_scale() * m)
                down = mod.down.reshape(mod.down.shape[0], -1).to(w.device, torch.float32)
                res.setdefault(name, []).append((up, down))
        return {n: (torch.cat([u for u, _ in f], 1), torch.cat([d for _, d in f], 0)) for n, f in res.items()}

    def lora_parts(self, keys: str) -> dict:
        """{layer: [(up·s, down) of each LoRA]}: the factors as they are, for one GEMM per LoRA per block."""
        res: dict[str, list] = {}
        for k in keys:
            for name, (up, down) in self.lora_factors(k).items():
                res.setdefault(name, []).append((up, down))
        return res

    def loha_factors(self, key: str) -> dict:
        res = {}
        for name, mod in self.nets[key].modules.items():
            dev, f32 = self.weights[name].device, torch.float32
            res[name] = (mod.w1a.to(dev, f32) * mod.calc_scale(), mod.w1b.reshape(mod.w1b.shape[0], -1).to(dev, f32),
                         mod.w2a.to(dev, f32), mod.w2b.reshape(mod.w2b.shape[0], -1).to(dev, f32))
        return res

    def lokr_factors(self, key: str) -> dict:
        """(s·w1, w2a, w2b): w2 = w2a @ w2b is part of LoKr's ΔW, so the floor rebuilds it (timed), as ours does."""
        res = {}
        for name, mod in self.nets[key].modules.items():
            dev, f32 = self.weights[name].device, torch.float32
            res[name] = (mod.w1.to(dev, f32) * mod.calc_scale(), mod.w2a.to(dev, f32),
                         mod.w2b.reshape(mod.w2b.shape[0], -1).to(dev, f32))
        return res

    # --- calibration (not timed as part of an operation) -----------------------------------------------------------
    def calibrate(self, fn: Callable[[], None], clock, runs: int = 2) -> tuple[int | None, dict]:
        """Times `fn` (an operation of this object) with every block size in CHUNKS, `runs` times each, the weights
        put back after each run; sets and returns the fastest size, and {size name: best time}."""
        best: dict = {}
        for chunk in CHUNKS:
            self.chunk = chunk
            times = []
            for _ in range(runs):
                times.append(clock(fn)[0])
                self.remove()
            best[chunk] = min(times)
            self._scratch = []  # a whole-layer block's buffers are weight-sized: not kept for the next size
        self.chunk = min(best, key=best.get)
        return self.chunk, {chunk_name(c): t for c, t in best.items()}

    # --- the loops ------------------------------------------------------------------------------------------------
    def _blocks(self, w2d: torch.Tensor):
        rows, cols = w2d.shape
        step = rows if self.chunk is None else max(1, self.chunk // cols)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step)

    def _buffer(self, i: int, n: int) -> torch.Tensor:
        """fp32 scratch buffer `i` with at least n elements (grown to the largest block seen, then reused)."""
        while len(self._scratch) <= i:
            self._scratch.append(torch.empty(0, dtype=torch.float32, device=self.device))
        if self._scratch[i].numel() < n:
            self._scratch[i] = torch.empty(max(n, self.chunk or 0), dtype=torch.float32, device=self.device)
        return self._scratch[i][:n]

    def apply_lora(self, factors: dict, from_original: bool = False) -> None:
        with torch.no_grad():
            for name, (up, down) in factors.items():
                w = self.weights[name]
                w2d = w.view(w.shape[0], -1)
                base = self.originals[name].view(w2d.shape) if from_original else w2d
                if w.dtype == torch.float32 and self.chunk is None:
                    if from_original:
                        torch.addmm(base, up, down, out=w2d)
                    else:
                        w2d.addmm_(up, down)
                    continue
                for r0, r1 in self._blocks(w2d):
                    if w.dtype == torch.float32:  # the block's original, then its delta, while it is in cache
                        if from_original:
                            w2d[r0:r1].copy_(base[r0:r1])
                        w2d[r0:r1].addmm_(up[r0:r1], down)
                        continue
                    s = self._buffer(0, (r1 - r0) * w2d.shape[1]).view(r1 - r0, -1)
                    s.copy_(base[r0:r1])
                    s.addmm_(up[r0:r1], down)
                    w2d[r0:r1].copy_(s)

    def apply_lora_parts(self, parts: dict) -> None:
        """Several LoRAs without concatenating them: each block of rows takes one addmm_ per LoRA while in cache."""
        with torch.no_grad():
            for name, factors in parts.items():
                w = self.weights[name]
                w2d = w.view(w.shape[0], -1)
                for r0, r1 in self._blocks(w2d):
                    if w.dtype == torch.float32:
                        for up, down in factors:
                            w2d[r0:r1].addmm_(up[r0:r1], down)
                        continue
                    s = self._buffer(0, (r1 - r0) * w2d.shape[1]).view(r1 - r0, -1).copy_(w2d[r0:r1])
                    for up, down in factors:
                        s.addmm_(up[r0:r1], down)
                    w2d[r0:r1].copy_(s)

    def apply_loha(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (w1a, w1b, w2a, w2b) in factors.items():
                w = self.weights[name]
                w2d = w.view(w.shape[0], -1)
                cols = w2d.shape[1]
                for r0, r1 in self._blocks(w2d):
                    n = (r1 - r0) * cols
                    t1 = torch.mm(w1a[r0:r1], w1b, out=self._buffer(0, n).view(r1 - r0, cols))
                    t2 = torch.mm(w2a[r0:r1], w2b, out=self._buffer(1, n).view(r1 - r0, cols))
                    if w.dtype == torch.float32:
                        w2d[r0:r1].addcmul_(t1, t2)
                    else:
                        s = self._buffer(2, n).view(r1 - r0, cols).copy_(w2d[r0:r1])
                        w2d[r0:r1].copy_(s.addcmul_(t1, t2))

    def apply_lokr(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (w1, w2a, w2b) in factors.items():
                w2 = torch.mm(w2a, w2b)
                w = self.weights[name]
                a, b = w1.shape
                c, d = w2.shape
                w4 = w.view(a, c, b, d)
                if w.dtype == torch.float32 and self.chunk is None:
                    w4.addcmul_(w2.view(1, c, 1, d), w1.view(a, 1, b, 1))
                    continue
                per_i = c * b * d  # the elements of W1's row i: a run of c rows of the weight
                if self.chunk is None or self.chunk >= per_i:  # blocks of whole runs, n of them at once
                    n = a if self.chunk is None else self.chunk // per_i
                    for i0 in range(0, a, n):
                        i1 = min(a, i0 + n)
                        if w.dtype == torch.float32:
                            w4[i0:i1].addcmul_(w2.view(1, c, 1, d), w1[i0:i1].view(-1, 1, b, 1))
                            continue
                        s = self._buffer(0, (i1 - i0) * per_i).view(i1 - i0, c, b, d).copy_(w4[i0:i1])
                        s.addcmul_(w2.view(1, c, 1, d), w1[i0:i1].view(-1, 1, b, 1))
                        w4[i0:i1].copy_(s)
                    continue
                step = max(1, self.chunk // (b * d))
                for i in range(a):
                    for k0 in range(0, c, step):
                        k1 = min(c, k0 + step)
                        if w.dtype == torch.float32:
                            w4[i, k0:k1].addcmul_(w2[k0:k1].view(-1, 1, d), w1[i].view(1, b, 1))
                            continue
                        s = self._buffer(0, (k1 - k0) * b * d).view(k1 - k0, b, d).copy_(w4[i, k0:k1])
                        s.addcmul_(w2[k0:k1].view(-1, 1, d), w1[i].view(1, b, 1))
                        w4[i, k0:k1].copy_(s)

    def remove(self, names=None) -> None:
        with torch.no_grad():
            for name in names if names is not None else self.weights:
                self.weights[name].copy_(self.originals[name])
