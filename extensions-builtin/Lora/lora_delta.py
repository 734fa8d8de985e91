"""Σ ΔW of one layer for the patcher, computed block by block without a weight-sized temporary where the type can.

Each contribution (network × layer) gives its delta one of two ways:
- fused: the type's `row_delta(weight_shape, device, multiplier, dyn)` (network_lora, network_hada, network_lokr,
  network_full, and network_ia3 / network_oft / network_glora and DoRA over any of them, whose ΔW reads the
  original weight) returns a lyco_helpers.RowDelta that writes any block of rows of ΔW into a cache-sized buffer.
  Several on one layer are summed block by block while the block is in cache (not concatenated: a per-job copy
  of every factor cost more than the GEMMs it merged, ~14 % of applying 3 LoRAs on SD1.5); the terms that read
  the original go first and read the block's original rows (a copy when there are two of them), so they are only
  merged over an original;
- generic: the module's own compute() gives the whole fp32 ΔW (A1111's weight-shaped `bias` part, Norm, DoRA on a
  layer split from fused rows, any subclass that changes the math).
No adapter math lives here: both ways are the types' own (network_*.py).
The same inputs and shapes always give the same blocks and the same bits (the residual restore relies on it).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import lora_plan
import lyco_helpers
import network_lora
import torch
from lora_bypass import module_compute  # re-exported: it lived here before

CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"  # Linux: the first core's caches, one index* folder per cache


def l2_cache_bytes(cache_dir: str = CACHE_DIR) -> int | None:
    """One core's level-2 cache in bytes, from Linux's sysfs (None where it does not say: other systems)."""
    try:
        for entry in sorted(os.listdir(cache_dir)):
            folder = os.path.join(cache_dir, entry)
            if not entry.startswith("index") or _read(folder, "level") != "2" or \
                    _read(folder, "type") not in ("Unified", "Data"):
                continue
            size = _read(folder, "size")  # "2048K"
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
            return int(size.rstrip("KMGkmg")) * scale
    except (OSError, ValueError):
        return None
    return None


def _read(folder: str, name: str) -> str:
    with open(os.path.join(folder, name)) as f:
        return f.read().strip()


def cpu_block_elements(l2_bytes: int | None, threads: int = 1) -> int:
    """fp32 elements per merge block on CPU. On one thread: half of the core's L2 cache (a power of two, 2^16–2^21),
    so the fp32 block, the 16-bit rows it is cast from and back into and the GEMM's inputs stay in L2 while each op
    passes over them; on several threads 2^21, because each op on a block is split over the threads and pays their
    wake-up, so fewer, larger blocks win (they stay in the L3). Measured on a 2 MiB-L2 Xeon, paired with the fused
    floor (2026-12-06): SD1.5 bf16 on 1 thread, median of 8, 2^18 took apply 1 / LoHa / LoKr / switch from 1.14 /
    1.29 / 1.26 / 1.09x of the floor at 2^21 to 1.10 / 1.08 / 1.14 / 1.02x (2^16: too many ops); FLUX.1 widths on
    2 threads, median of 6, 2^19 instead of 2^21 took apply / multiplier / switch from 1.04 / 1.02 / 0.96x to
    1.06 / 1.15 / 1.26x. Where the L2 is unknown: 1 MiB."""
    if threads > 1:
        return 1 << 21
    elements = l2_bytes // 2 // 4 if l2_bytes and l2_bytes > 0 else 1 << 18
    return 1 << max(16, min(21, elements.bit_length() - 1))


# elements per block on CPU, fixed for the process (the residual restore recomputes the same blocks, so the block
# size must not change between a write and its restore): torch's threads when the extension is imported
CPU_CHUNK = cpu_block_elements(l2_cache_bytes(), torch.get_num_threads())
ACCELERATOR_CHUNK = 1 << 24  # bounds the scratch memory on a GPU


# fill(r0, r1, rows): writes the original of rows r0:r1 into `rows` (the weight's own rows, about to be merged)
RowFill = Callable[[int, int, torch.Tensor], None]


def chunk_elements(device: torch.device) -> int:
    return CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK


def block_for(terms: list, device: torch.device) -> int:
    """Elements per block for a merge of `terms`: the device's block, divided among the block-sized buffers the
    terms use next to the merged rows (lyco_helpers.RowDelta.block_temporaries)."""
    return chunk_elements(device) // (1 + max((getattr(t, "block_temporaries", 0) for t in terms), default=0))


def row_run(terms: list) -> int:
    """Rows per run the terms share (lyco_helpers.RowDelta.row_run; 1 when they differ): blocks made of whole runs
    cost each term one op per block. Terms whose runs must stay whole (`whole_runs`) decide: the least common
    multiple of their runs."""
    whole = {t.row_run for t in terms if getattr(t, "whole_runs", False)}
    if whole:
        return math.lcm(*whole)
    runs = {getattr(t, "row_run", 1) for t in terms}
    return runs.pop() if len(runs) == 1 else 1


def keeps_runs_whole(terms: list) -> bool:
    return any(getattr(t, "whole_runs", False) for t in terms)


def row_blocks(rows: int, cols: int, block: int, run: int = 1, whole: bool = False):
    """(r0, r1) of blocks of whole rows with about `block` elements each; with `run` > 1 no block crosses a
    boundary between runs of `run` rows: a block holds whole runs, or a run is cut into equal pieces (never with
    `whole`: then a block holds at least one run, whatever its size)."""
    step = max(1, block // cols)
    if whole and run > 1:
        step = max(step, run)
    if run > 1 and step < run:
        pieces = -(-run // step)
        for run0 in range(0, rows, run):
            run1 = min(rows, run0 + run)
            piece = -(-(run1 - run0) // pieces)
            for r0 in range(run0, run1, piece):
                yield r0, min(run1, r0 + piece)
        return
    if run > 1:
        step -= step % run
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def delta_depends_on_weight(module) -> bool:
    """Whether the module's ΔW reads the original weight's values (then a residual restore cannot recompute it):
    what the type declares (NetworkModule.delta_depends_on_weight: its `delta_reads_weight`, DoRA, a subclass
    that changed the math); a module of no known kind is assumed to."""
    if getattr(module, "dora_scale", None) is not None:
        return True
    flag = getattr(module, "delta_depends_on_weight", None)
    return True if flag is None else bool(flag)


@dataclass
class LayerDelta:
    """Σ ΔW (and Σ Δbias) of one layer: fused per-type terms and whole deltas."""

    parts: list = field(default_factory=list)  # lyco_helpers.RowDelta, one per fused contribution
    full: torch.Tensor | None = None  # fp32, weight-shaped
    bias: torch.Tensor | None = None  # fp32
    used: list = field(default_factory=list)  # contributions that produced a delta

    @property
    def has_weight(self) -> bool:
        return bool(self.parts) or self.full is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this delta holds (an upper bound: see lyco_helpers.RowDelta.nbytes)."""
        held = [t for t in (self.full, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in held) + sum(getattr(t, "nbytes", 0) for t in self.terms)

    @property
    def single(self):
        """The one fused term when there is exactly one (it can add itself into the weight in place), else None."""
        terms = self.terms
        return terms[0] if len(terms) == 1 and self.full is None else None

    def merge(self, out: torch.Tensor, original: torch.Tensor, scratch, fill: RowFill | None = None,
              fill_block: bool = False) -> None:
        """out = cast(original + Σ ΔW) with each term added straight into the result (no ΔW buffer): fp32 in place
        (one fused op per term where the type has one), 16-bit through a cache-sized fp32 block. `out` may be
        `original`; both contiguous. With `fill` (out is original), each block of rows first gets its original
        from fill(r0, r1, rows) and is merged while it is in cache: one pass over the weight. `fill_block`: a
        16-bit weight's fill may write straight into the fp32 block (it reads the weight's own dtype, so the cast is
        exact), saving the copy through the weight's rows."""
        rows = out.shape[0] if out.dim() else 1
        cols = max(1, out.numel() // max(rows, 1))
        out2, orig2 = out.view(rows, cols), original.reshape(rows, cols)
        terms = self.terms
        full = self.full.reshape(rows, cols) if self.full is not None else None
        block, run, whole = block_for(terms, out.device), row_run(terms), keeps_runs_whole(terms)
        if out.dtype == torch.float32 and fill is not None:
            self.prepare(orig2, scratch, block, fill)
            for r0, r1 in row_blocks(rows, cols, block, run, whole):
                fill(r0, r1, out2[r0:r1])
                self.add_terms(out2[r0:r1], r0, r1, scratch)
                if full is not None:
                    out2[r0:r1].add_(full[r0:r1])
            return
        if out.dtype == torch.float32 and len(terms) < 2:
            if out2.data_ptr() != orig2.data_ptr():
                out2.copy_(orig2)
            for term in terms:  # (a term that needs the whole original prepares itself there)
                term.add_to(out2, scratch, chunk_elements(out.device))
            if full is not None:
                out2.add_(full)
            return
        if out.dtype == torch.float32:  # several terms: each block of rows takes them all while it is in cache
            self.prepare(orig2, scratch, block)
            copy = out2.data_ptr() != orig2.data_ptr()
            for r0, r1 in row_blocks(rows, cols, block, run, whole):
                if copy:
                    out2[r0:r1].copy_(orig2[r0:r1])
                self.add_terms(out2[r0:r1], r0, r1, scratch)
                if full is not None:
                    out2[r0:r1].add_(full[r0:r1])
            return
        for r0, r1, s in self.summed_rows(out, original, scratch, block, fill, fill_block):
            out2[r0:r1].copy_(s)

    @property
    def terms(self) -> list:
        return self.parts

    def prepare(self, original: torch.Tensor, scratch, block: int, fill: RowFill | None = None) -> None:
        """Lets the terms that need the whole original before the merge (DoRA's norms) read it, block by block."""
        needs = [t for t in self.parts if getattr(t, "needs_whole_original", False)]
        if not needs:
            return
        if fill is not None:
            raise RuntimeError("this Lora's delta needs the whole original weight before the merge")
        rows, cols = original.shape
        run, whole = row_run(self.parts), keeps_runs_whole(self.parts)
        for term in needs:
            term.prepare(original, scratch, row_blocks(rows, cols, block, run, whole))

    def add_terms(self, block: torch.Tensor, r0: int, r1: int, scratch) -> None:
        """block (fp32 rows r0:r1, holding their original) += Σ ΔW of the terms. The terms that read the original
        come first (compute_delta puts them there); a second one reads a copy taken before the first added."""
        original = None
        for term in self.parts:
            if not getattr(term, "reads_original", False):
                term.rows(block, r0, r1, scratch, accumulate=True)
                continue
            if original is None:
                readers = sum(1 for t in self.parts if getattr(t, "reads_original", False))
                original = block if readers == 1 else \
                    scratch.get("original", torch.float32, block.numel()).view(block.shape).copy_(block)
            term.rows(block, r0, r1, scratch, accumulate=True, original=original)

    def summed_rows(self, out: torch.Tensor, original: torch.Tensor, scratch, block: int,
                    fill: RowFill | None = None, fill_block: bool = False):
        """(r0, r1, fp32 rows r0:r1 of original + Σ ΔW) in cache-sized blocks of `out`'s 2-D view; each block is
        one scratch buffer, valid until the next is asked for (the caller stores it into `out` its own way).
        `fill(r0, r1, rows)` first writes the block's original into those rows of `original`, or with `fill_block`
        into the fp32 block itself (see merge)."""
        rows = out.shape[0] if out.dim() else 1
        cols = max(1, out.numel() // max(rows, 1))
        orig2 = original.reshape(rows, cols)
        full = self.full.reshape(rows, cols) if self.full is not None else None
        self.prepare(orig2, scratch, block, fill)
        for r0, r1 in row_blocks(rows, cols, block, row_run(self.terms), keeps_runs_whole(self.terms)):
            s = scratch.get("merge", torch.float32, (r1 - r0) * cols).view(r1 - r0, cols)
            if fill is not None and fill_block:
                fill(r0, r1, s)
            else:
                if fill is not None:
                    fill(r0, r1, orig2[r0:r1])
                s.copy_(orig2[r0:r1])
            self.add_terms(s, r0, r1, scratch)
            if full is not None:
                s.add_(full[r0:r1])
            yield r0, r1, s

    def blocks(self, shape: torch.Size, device: torch.device, scratch):
        """(start, end, Σ ΔW of those flat positions) in blocks of whole rows of the weight's 2-D view."""
        numel = shape.numel()
        rows = shape[0] if len(shape) else 1
        cols = max(1, numel // max(rows, 1))
        full = self.full.reshape(-1) if self.full is not None else None
        terms = self.terms
        if any(getattr(t, "reads_original", False) for t in terms):
            raise RuntimeError("this Lora's delta reads the original weight; it is merged over it, not on its own")
        for r0, r1 in row_blocks(rows, cols, block_for(terms, device), row_run(terms), keeps_runs_whole(terms)):
            a, b = r0 * cols, r1 * cols
            if not terms:
                yield a, b, full[a:b]
                continue
            d = scratch.get("delta", torch.float32, b - a).view(r1 - r0, cols)
            for i, term in enumerate(terms):
                term.rows(d, r0, r1, scratch, accumulate=i > 0)
            d = d.view(-1)
            if full is not None:
                d.add_(full[a:b])
            yield a, b, d


def plain_lowrank(module, dyn_dim: int | None):
    """(up, down, mid, scale) of a plain low-rank module (LoRA / LoCon / Tucker LoCon with its own math, without
    DoRA or a weight-shaped `bias` part), ranks sliced as `dyn` keeps them; None for anything else. An accessor
    for size estimates (lora_fp8); the math is network_lora's."""
    if not isinstance(module, network_lora.NetworkModuleLora) or module.bias is not None or \
            module.dora_scale is not None or \
            not lyco_helpers.own_math(module, network_lora.NetworkModuleLora, "calc_delta", "delta_shape"):
        return None
    rank = module.truncated_rank(dyn_dim)
    mid = None if module.mid is None else module.mid[:rank, :rank]
    return module.up[:, :rank], module.down[:rank], mid, float(module.calc_scale(dyn_dim))


def _row_delta(c: lora_plan.Contribution, original: torch.Tensor):
    row_delta = getattr(c.module, "row_delta", None)
    if not callable(row_delta) or original.dim() < 2:
        return None
    return row_delta(original.shape, original.device, float(c.multiplier), c.dyn_dim)


def compute_delta(name: str, module: torch.nn.Module, original: torch.Tensor, contributions,
                  orig_bias: torch.Tensor | None = None, record_errors: bool = True) -> LayerDelta:
    """Σ ΔW (and Σ Δbias) of the contributions for a layer whose original weight is `original`.

    A contribution that fails (a shape that does not fit, ...) is left out and its error recorded on its network."""
    result = LayerDelta()
    for c in contributions:
        try:
            fused = _row_delta(c, original)
            if fused is not None:
                if getattr(fused, "reads_original", False):  # first: they read the block before others add
                    readers = sum(1 for t in result.parts if getattr(t, "reads_original", False))
                    result.parts.insert(readers, fused)
                else:
                    result.parts.append(fused)
                bias = fused.bias_for(orig_bias)
                if bias is not None:
                    db = bias.to(original.device, torch.float32)
                    result.bias = db if result.bias is None else result.bias + db
            else:
                dw, db = module_compute(c.module, original, c.multiplier, c.dyn_dim, orig_bias)
                if db is not None and isinstance(module, torch.nn.MultiheadAttention):
                    raise ValueError("bias deltas are not supported on MultiheadAttention")
                if dw is not None:
                    dw = dw.to(original.device, torch.float32)
                    result.full = dw if result.full is None else result.full + dw
                if db is not None:
                    db = db.to(original.device, torch.float32)
                    result.bias = db if result.bias is None else result.bias + db
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if record_errors:
                c.network.apply_errors[name] = f"{type(e).__name__}: {e}"
            continue
        if record_errors:
            c.network.apply_errors.pop(name, None)
        result.used.append(c)
    return result
