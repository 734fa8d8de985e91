"""The floors of scripts/bench_lora_types.py: for each adapter type beyond LoRA / LoHa / LoKr (those are in
scripts/bench_lora_floors.py), the cheapest in-place loop that applies it to the original weights, with its factors
ready in fp32 (not timed) and nothing read from a file or planned:

  full   W[rows] += s·diff[rows]
  IA3    W[rows] *= 1 + s·w (output channels: one factor per row; input channels: one per column)
  OFT    R = (I − Q)⁻¹(I + Q) for all blocks in one batched solve, then per block of whole OFT blocks one batched
         b×b GEMM of R_kᵀ and the rows (torch.bmm) into a buffer, times the rescale when the file has one, copied back
  BOFT   per block of whole butterfly spans, each stage: rows regrouped into its blocks (a copy), one batched
         b×b GEMM, rows put back (a copy); R made in the loop as for OFT
  GLoRA  W[rows] += s·((W[rows] @ a1) @ a2 + b1[rows] @ b2)  (rank-r chains: never the in×in a1·a2)
  DoRA   V = W + s·up@down; per-input-channel norm ‖V[:, j]‖ summed block by block, then W = M/‖V‖ ⊙ V with V
         made again block by block (a 16-bit weight cannot hold V in between; fp32 keeps it in place)
16-bit weights go through an fp32 block of rows (s = W[rows].float(); op on s; W[rows] = s), as any exact merge
must; the block size is calibrated as in bench_lora_floors (the fastest of CHUNKS for each type).
"""
from __future__ import annotations

import lyco_helpers  # on the path through bench_lora_patcher (the extension's folder)
import torch

from scripts.bench_lora_floors import Floors


def _vector(t: torch.Tensor, device) -> torch.Tensor:
    return t.reshape(-1).to(device, torch.float32)


class TypeFloors(Floors):
    """Floors of the other types over the same weights (and in-memory originals) as Floors."""

    # --- factors, ready in fp32 (not timed) ---------------------------------------------------------------------
    def full_factors(self, key: str) -> dict:
        res = {}
        for name, mod in self.nets[key].modules.items():
            w = self.weights[name]
            res[name] = mod.weight.reshape(w.shape[0], -1).to(w.device, torch.float32) * mod.calc_scale()
        return res

    def ia3_factors(self, key: str) -> dict:
        res = {}
        for name, mod in self.nets[key].modules.items():
            w = self.weights[name]
            axis = mod.axis_for(tuple(w.shape))
            factor = 1 + _vector(mod.w, w.device) * mod.calc_scale()
            if axis == 1 and w.dim() > 2:  # a conv's input channel covers its kernel's columns
                factor = factor.repeat_interleave(w[0, 0].numel())
            res[name] = (axis, factor)
        return res

    def oft_factors(self, key: str) -> dict:
        """(Q, rescale or None): the skew blocks whose Cayley transform is R (taken back from the type's R, so the
        constraint is in them); R itself is part of OFT's ΔW, so the floor makes it in the timed loop (as LoKr's
        floor makes w2), the cheapest way: one batched solve (I − Q)⁻¹(I + Q)."""
        res = {}
        for name, mod in self.nets[key].modules.items():
            w = self.weights[name]
            r = mod.rotation(w.shape[0], 1.0, w.device).double()
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            q = torch.linalg.solve(r + eye, r - eye).float()  # R = (I + Q)(I − Q)⁻¹ ⇔ Q = (R + I)⁻¹(R − I)
            rescale = None if mod.rescale is None else _vector(mod.rescale, w.device)
            res[name] = (q, rescale)
        return res

    def boft_factors(self, key: str) -> dict:
        """(Q (stages, blocks, b, b), rescale or None), as oft_factors: R·W per stage, R made in the timed loop."""
        return self.oft_factors(key)

    def glora_factors(self, key: str) -> dict:
        """(a1·s, a2, b1·s, b2) for Linear layers (new LyCORIS layout)."""
        res = {}
        for name, mod in self.nets[key].modules.items():
            w = self.weights[name]
            dev, s = w.device, mod.calc_scale()
            a1, a2, b1, b2 = (t.reshape(t.shape[0], -1).to(dev, torch.float32) for t in
                              (mod.a1, mod.a2, mod.b1, mod.b2))
            res[name] = (a1 * s, a2, b1 * s, b2)
        return res

    def dora_factors(self, key: str) -> dict:
        res = {}
        for name, (up, down) in self.lora_factors(key).items():
            mod = self.nets[key].modules[name]
            res[name] = (up, down, _vector(mod.dora_scale, up.device))
        return res

    # --- the loops ------------------------------------------------------------------------------------------------
    def _each_block(self, w2d: torch.Tensor, op, run: int = 1) -> None:
        """op(rows r0:r1 as fp32, r0, r1) on each block of rows in place: the weight's own rows for fp32, an fp32
        copy for 16-bit (written back). `run`: blocks hold whole runs of rows (OFT blocks)."""
        rows, cols = w2d.shape
        step = rows if self.chunk is None else max(run, (self.chunk // cols) // run * run)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if w2d.dtype == torch.float32:
                op(w2d[r0:r1], r0, r1)
                continue
            s = self._buffer(0, (r1 - r0) * cols).view(r1 - r0, cols).copy_(w2d[r0:r1])
            op(s, r0, r1)
            w2d[r0:r1].copy_(s)

    def apply_full(self, factors: dict) -> None:
        with torch.no_grad():
            for name, diff in factors.items():
                self._full_layer(self.weights[name], diff)

    def _full_layer(self, w: torch.Tensor, diff: torch.Tensor) -> None:
        self._each_block(w.view(w.shape[0], -1), lambda s, r0, r1: s.add_(diff[r0:r1]))

    def apply_ia3(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (axis, factor) in factors.items():
                self._ia3_layer(self.weights[name], axis, factor)

    def _ia3_layer(self, w: torch.Tensor, axis: int, factor: torch.Tensor) -> None:
        if axis == 0:
            self._each_block(w.view(w.shape[0], -1), lambda s, r0, r1: s.mul_(factor[r0:r1, None]))
        else:
            self._each_block(w.view(w.shape[0], -1), lambda s, r0, r1: s.mul_(factor))

    def apply_oft(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (q, rescale) in factors.items():
                self._oft_layer(self.weights[name], q, rescale)

    def _oft_layer(self, w: torch.Tensor, q: torch.Tensor, rescale: torch.Tensor | None) -> None:
        w2d = w.view(w.shape[0], -1)
        b, cols = q.shape[-1], w2d.shape[1]
        eye = torch.eye(b, dtype=q.dtype, device=q.device)
        rt = torch.linalg.solve(eye - q, eye + q).transpose(1, 2)  # R, transposed for bmm from the left

        def turn(s, r0, r1):
            t = self._buffer(1, (r1 - r0) * cols).view(-1, b, cols)
            torch.bmm(rt[r0 // b:r1 // b], s.view(-1, b, cols), out=t)
            t = t.view(r1 - r0, cols)
            if rescale is not None:
                t.mul_(rescale[r0:r1, None])
            s.copy_(t)
        self._each_block(w2d, turn, run=b)

    def apply_boft(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (q, rescale) in factors.items():
                eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
                self._boft_layer(self.weights[name], torch.linalg.solve(eye - q, eye + q), rescale)

    def _boft_layer(self, w: torch.Tensor, r: torch.Tensor, rescale: torch.Tensor | None) -> None:
        w2d = w.view(w.shape[0], -1)
        stages, b, cols = r.shape[0], r.shape[-1], w2d.shape[1]

        def turn(s, r0, r1):  # the stages in place (lyco_helpers.butterfly_: a regrouping copy, one bmm, a copy back)
            n = r1 - r0
            lyco_helpers.butterfly_(s, r[:, r0 // b:r1 // b], self._buffer(1, n * cols), self._buffer(2, n * cols))
            if rescale is not None:
                s.mul_(rescale[r0:r1, None])
        self._each_block(w2d, turn, run=b * 2 ** (stages - 1))

    def apply_glora(self, factors: dict) -> None:
        with torch.no_grad():
            for name, parts in factors.items():
                if parts[0].shape[0] != self.weights[name][0].numel():
                    raise ValueError(f"{name}: the GLoRA floor handles Linear and 1x1 layers only")
                self._glora_layer(self.weights[name], *parts)

    def _glora_layer(self, w: torch.Tensor, a1, a2, b1, b2) -> None:
        def merge(s, r0, r1):
            t = torch.mm(s, a1)  # rows x rank, from the original rows before they change
            s.addmm_(t, a2)
            s.addmm_(b1[r0:r1], b2)
        self._each_block(w.view(w.shape[0], -1), merge)

    def apply_dora(self, factors: dict) -> None:
        with torch.no_grad():
            for name, (up, down, magnitude) in factors.items():
                self._dora_layer(self.weights[name], up, down, magnitude)

    def _dora_layer(self, w: torch.Tensor, up, down, magnitude) -> None:
        w2d = w.view(w.shape[0], -1)
        cols = w2d.shape[1]
        squares = torch.zeros(cols, dtype=torch.float32, device=w.device)
        fp32 = w.dtype == torch.float32

        def add_and_sum(s, r0, r1):
            s.addmm_(up[r0:r1], down)
            squares.add_(s.square().sum(0))
        if fp32:
            self._each_block(w2d, add_and_sum)  # V in place
        else:  # sum only: V is made again below
            rows = w2d.shape[0]
            step = rows if self.chunk is None else max(1, self.chunk // cols)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                add_and_sum(self._buffer(0, (r1 - r0) * cols).view(r1 - r0, cols).copy_(w2d[r0:r1]), r0, r1)
        kernel = w[0, 0].numel() if w.dim() > 2 else 1
        norm = squares.view(-1, kernel).sum(1).sqrt_().add_(torch.finfo(torch.float32).eps)
        scale = (magnitude / norm).repeat_interleave(kernel)
        if fp32:
            self._each_block(w2d, lambda s, r0, r1: s.mul_(scale))
        else:
            self._each_block(w2d, lambda s, r0, r1: s.addmm_(up[r0:r1], down).mul_(scale))
