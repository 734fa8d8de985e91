"""One patch job: its context (the host's source, chunk buffers, counters and notes), its transaction, and the
batch of writes it holds back.

A job is all-or-nothing: if computing or writing any layer fails (out of memory, ...), every layer of the model
gets its original back and PatchError is raised (Transaction).

Writes are batched because streaming a layer's weight through the CPU's caches evicts the interpreter's working
set: bookkeeping done between two layers' writes runs cold. On SD1.5 (264 LoKr layers, fp32, 1 thread) the
patcher's per-layer work took ~35 ms of a ~190 ms job when interleaved with the writes and ~20 ms when it ran on
its own. So the patcher plans a batch of layers (deltas, restore method, record), then writes them back to back.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import lora_delta
import lora_layer_state
import lora_residual
import lora_weight_source
import torch

logger = logging.getLogger("lora")

MAX_NOTES = 50  # notes are taken by each job; bounded if nobody asks
BATCH_BYTES = 64 << 20  # tensors a batch of deferred writes may hold (WriteBatch)


class PatchError(RuntimeError):
    """Writing the weights failed; every layer was put back to its original weights."""


class PatchLog:
    """What the patcher counts (`stats`: writes, restores, source, residual, clone, foreign_changes, inexact, ...)
    and what the job should be told (`notes`: restores that needed a fallback or were not exact)."""

    def __init__(self):
        self.stats: Counter = Counter()
        self.notes: list[str] = []

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    def _add(self, message: str) -> None:
        if message not in self.notes and len(self.notes) < MAX_NOTES:
            self.notes.append(message)

    def fallback(self, module, how: str) -> None:
        """A residual restore that did not reproduce its delta, put right from an exact original."""
        self.stats["restore_fallbacks"] += 1
        name = getattr(module, "network_layer_name", module)
        logger.warning("Lora: %s: the residual restore did not reproduce its Lora delta bit for bit; %s", name, how)
        self._add(f"Lora: the residual restore of {name} did not reproduce its delta; {how} (exact)")

    def inexact(self, module, why: str) -> None:
        self.stats["inexact"] += 1
        name = getattr(module, "network_layer_name", module)
        logger.error("Lora: %s could not be restored bit-exactly: %s; reload the checkpoint to get its exact "
                     "weights back", name, why)
        self._add(f"Lora: {name} could not be restored bit-exactly ({why}); reload the checkpoint")


class ScratchPool:
    """Chunk buffers per device for one job (dropped when it ends, so nothing stays allocated between jobs)."""

    def __init__(self):
        self._by_device: dict = {}

    def get(self, device: torch.device) -> lora_residual.Scratch:
        scratch = self._by_device.get(device)
        if scratch is None:
            scratch = self._by_device[device] = lora_residual.Scratch(device, lora_delta.chunk_elements(device))
        return scratch

    def clear(self) -> None:
        self._by_device.clear()


class PatchJob:
    """What the restore methods and the writer need while they work on layers."""

    def __init__(self, log: PatchLog, pool: ScratchPool, sources: lora_weight_source.Sources):
        self.log, self.pool, self.sources = log, pool, sources

    @property
    def stats(self) -> Counter:
        return self.log.stats

    def scratch(self, device: torch.device) -> lora_residual.Scratch:
        return self.pool.get(device)


@contextlib.contextmanager
def full_fp32_matmul():
    """Deltas are fp32: no TF32/bf16 shortcuts in matmul while patching (a host may enable them for sampling)."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


class Transaction:
    """Runs a job's layer writes; on any error every layer gets its original back (`roll_back`) and PatchError
    says where it failed. `at` is the layer being written."""

    def __init__(self, roll_back: Callable[[], None]):
        self.roll_back = roll_back
        self.at: str | None = None
        self._matmul = full_fp32_matmul()

    def __enter__(self) -> Transaction:
        self._matmul.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._matmul.__exit__(None, None, None)
        if exc is None:
            return False
        self.roll_back()  # e.g. out of memory part-way: the model goes back to its original weights
        raise PatchError(f"applying Lora weights failed at {self.at}: {type(exc).__name__}: {exc}; "
                         f"the model was put back to its original weights") from exc


@dataclass(slots=True)
class DeferredWrite:
    """A layer's write, planned and held back until its batch runs. Only writes whose layer needs nothing from
    them to be rolled back are deferred: until the write runs, the layer holds what its current record says (its
    original, or its old merge under a source record), so a failed job restores it as before."""

    name: str
    module: torch.nn.Module
    contributions: list
    key: tuple  # the layer's state key once written
    weight: torch.Tensor
    delta: lora_delta.LayerDelta
    rec: lora_layer_state.RestoreRecord  # fused: the new record; rows: the layer's source record (old merge)
    rows: bool  # rewrite each block of rows from the source's rows; else merge over the weight's own original


class WriteBatch:
    """Deferred writes of one job, in model order; full when the tensors they made (a rebuilt LoKr factor, a
    generic type's whole ΔW) pass `max_bytes`, which bounds the memory a batch adds (on CPU the networks' factors
    are read in place, fp32 since parsing)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = BATCH_BYTES if max_bytes is None else max_bytes
        self.steps: list[DeferredWrite] = []
        self.nbytes = 0

    def add(self, step: DeferredWrite) -> bool:
        """Holds `step`; True when the batch should run now: over budget, or a write on an accelerator (its kernels
        run asynchronously anyway, and its factors would be copies held on the device)."""
        self.steps.append(step)
        self.nbytes += step.delta.nbytes
        return self.nbytes >= self.max_bytes or step.weight.device.type != "cpu"

    def take(self) -> list[DeferredWrite]:
        steps, self.steps, self.nbytes = self.steps, [], 0
        return steps
