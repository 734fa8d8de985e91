"""Patcher: the only code that writes model weights for Loras.

For each layer whose wanted state (lora_plan) differs from the state it holds, in one pass over the layer:
    W = cast(W_original + Σ ΔW)      ΔW in fp32 on the weight's device, summed over networks, one cast
and a layer no longer wanted gets its original back, bit for bit. Layers whose state is unchanged are not read
or written at all; layers no network targets are never copied.

The parts, one job each:
    lora_layer_state      what a layer holds (its state key and RestoreRecord, on the module) and the plan diff
    lora_delta            Σ ΔW of one layer (fused per-type terms, summed block by block)
    lora_weight_writer    the merge into the weight and bias, chunked and dtype-aware
    lora_restore_methods  source / residual / clone: how the original comes back, and which one a layer gets
    lora_weight_source    the host's original weights (`sd_model.original_weights`)
    lora_patch_job        a job's context, its transaction (all-or-nothing, rolled back on any error) and the
                          batch of planned writes it runs back to back
This file runs a job over them (`sync`: each layer is planned, and writes that can wait run in batches, back to
back) and restores single layers (`restore`).

A job is all-or-nothing: if computing or writing any layer fails (out of memory, ...), every layer of the model
gets its original back and PatchError is raised. A delta that cannot be computed for one layer (a shape that does
not fit, ...) is recorded in the network's `apply_errors` and that network is left out of the layer.
"""
from __future__ import annotations

import logging

import lora_fp8
import lora_layer_state
import lora_plan
import lora_restore_methods
import lora_weight_source
import lora_weight_writer
import torch
from lora_delta import (  # noqa: F401  (the patcher's public names before lora_delta existed)
    ACCELERATOR_CHUNK,
    CPU_CHUNK,
    compute_delta,
    delta_depends_on_weight,
    module_compute,
    plain_lowrank,
)
from lora_layer_state import RestoreRecord, no_grad_for, set_record, set_state, weight_attr, weight_of
from lora_patch_job import (
    DeferredWrite,
    PatchError,
    PatchJob,
    PatchLog,
    ScratchPool,
    Transaction,
    WriteBatch,
    full_fp32_matmul,
)
from lora_restore_methods import (  # noqa: F401  (the patcher's public names before the split)
    ACCELERATOR_ORDER,
    CLONE,
    CPU_ORDER,
    METHODS,
    RESIDUAL,
    SOURCE,
)
from lora_weight_source import OriginalWeights, Sources, release, source_param  # noqa: F401

logger = logging.getLogger("lora")

__all__ = ["Patcher", "PatchError", "RestoreRecord", "OriginalWeights", "SOURCE", "RESIDUAL", "CLONE",
           "source_param"]


class Patcher:
    def __init__(self, prefer: tuple[str, ...] | None = None):
        """prefer: the order of restore methods to try (default: by device, see lora_restore_methods)."""
        self.prefer = prefer
        self.log = PatchLog()
        self.stats = self.log.stats  # writes, restores, source, residual, clone, foreign_changes, inexact, ...
        self._pool = ScratchPool()
        self._in_job = False
        self.fp8_strategy: str | None = None  # fp8 weights: lora_fp8.UPCAST / STOCHASTIC; None = round to nearest

    @property
    def notes(self) -> list[str]:
        """What the job should be told (restores that needed a fallback)."""
        return self.log.notes

    def take_notes(self) -> list[str]:
        return self.log.take_notes()

    # --- state -------------------------------------------------------------------------------------------------
    current_state = staticmethod(lora_layer_state.current_state)
    record = staticmethod(lora_layer_state.record)
    forget = staticmethod(lora_layer_state.forget)

    def held_bytes(self, layers: dict[str, torch.nn.Module]) -> int:
        """Memory held for exact restore by the layers' records (residual streams, clones, bias copies)."""
        return sum(rec.nbytes for m in layers.values() if (rec := self.record(m)) is not None)

    def _job(self, sources: Sources | None = None) -> PatchJob:
        return PatchJob(self.log, self._pool, sources if sources is not None else Sources(None))

    # --- one job -----------------------------------------------------------------------------------------------
    def sync(self, layers: dict[str, torch.nn.Module], plan: dict[str, list[lora_plan.Contribution]],
             source: OriginalWeights | None = None, module_paths: dict | None = None) -> int:
        """Brings every layer of `layers` to its state in `plan` (absent = original). Returns layers changed.

        `source` is the host's original weights (optional), `module_paths` the layer map's {name: (component,
        module path)} to find a layer's parameter in it. An error while computing or writing raises PatchError
        after every layer got its original back."""
        todo = lora_layer_state.changes(layers, plan, self.stats,
                                        also=lambda m: lora_fp8.stale(self.record(m), self.fp8_strategy))
        if not todo:
            return 0
        job = self._job(Sources(source, module_paths))
        self._in_job = True
        try:
            with Transaction(lambda: self._roll_back(layers)) as transaction:
                batch = WriteBatch()  # writes planned first and run back to back (lora_patch_job: why)
                for name, module, contributions, key in self._restore_from_source(job, todo):
                    transaction.at = name
                    step = self._bring(job, name, module, contributions, key, defer=True)
                    if step is not None and batch.add(step):
                        self._write_batch(job, batch.take(), transaction)
                self._write_batch(job, batch.take(), transaction)
        finally:
            self._in_job = False
            self._pool.clear()
        return len(todo)

    def _restore_from_source(self, job: PatchJob, todo: list[tuple]) -> list[tuple]:
        """Layers going back to their original that the source holds, restored in one batch (one lease and one file
        check per file, not per layer: removing Loras is a copy per layer, so the per-read work counted); returns
        the rest of `todo` (and any layer the batch did not restore) for the one-by-one path."""
        batch, rest = [], []
        for item in todo:
            module, contributions = item[1], item[2]
            rec = self.record(module)
            weight = weight_of(module)
            if contributions or rec is None or rec.how != SOURCE or weight is None or rec.dtype != weight.dtype or \
                    rec.source is not job.sources.source or not job.sources.is_valid(rec.source):
                rest.append(item)
            else:
                batch.append((item, rec, weight))
        if len(batch) < 2:
            return todo
        done = lora_weight_source.read_many_into(job.sources.source, [(rec.param, w) for _, rec, w in batch])
        if done is None:
            return todo
        for how, ((name, module, _, key), rec, _) in zip(done, batch, strict=True):
            if how == lora_weight_source.NOT_READ:
                rest.append((name, module, (), key))
                continue
            if how == lora_weight_source.DONE:
                lora_layer_state.note_source_checked(module, rec.source, rec.param)
                self.stats["source_reads"] += 1
            else:  # as one layer's read that stopped part-way: the layer holds a mix, the residual cannot undo it
                job.log.inexact(module, "the checkpoint file changed while it was read")
            lora_weight_writer.restore_bias(module, rec)
            self.forget(module)
            set_state(module, key)
            self.stats["restores"] += 1
        return rest

    def restore(self, module: torch.nn.Module, job: PatchJob | None = None) -> bool:
        """Puts the layer's original weights back; True when something was written. `job`: the running job's
        (inside `sync`, whose transaction already holds fp32 matmul and whose source validity is known)."""
        rec = self.record(module)
        if rec is None:
            self.forget(module)
            return False
        if job is not None:
            if not self._settle_dtype_change(job, module, rec):
                self._restore_weight(job, module, rec)
        else:
            try:
                with full_fp32_matmul():
                    job = self._job()
                    if not self._settle_dtype_change(job, module, rec):
                        self._restore_weight(job, module, rec)
            finally:
                if not self._in_job:
                    self._pool.clear()
        lora_weight_writer.restore_bias(module, rec)
        self.forget(module)
        self.stats["restores"] += 1
        return True

    def _roll_back(self, layers: dict[str, torch.nn.Module]) -> None:
        for module in layers.values():
            try:
                if self.record(module) is not None or self.current_state(module):
                    self.restore(module)
            except Exception as e:  # keep going: every other layer still gets its original back
                logger.error("Lora: could not restore %s: %s", getattr(module, "network_layer_name", module), e)

    # --- one layer ---------------------------------------------------------------------------------------------
    def _bring(self, job: PatchJob, name: str, module: torch.nn.Module, contributions: list, key: tuple,
               defer: bool = False, rows: bool = True) -> DeferredWrite | None:
        """Brings one layer to `key`. With `defer`, a write that can wait (lora_patch_job.DeferredWrite) is
        returned instead of run; `rows=False` skips the rewrite from the source's rows."""
        weight = weight_of(module)
        if not contributions or weight is None:
            if weight is None:
                for c in contributions:
                    c.network.apply_errors[name] = "the layer has no weight"
            self.restore(module, job)
            set_state(module, key)
            return None
        rec = self.record(module)
        if rec is not None and rec.how == lora_fp8.UPCAST and self.fp8_strategy != lora_fp8.UPCAST:
            self.restore(module, job)  # the fp8 strategy changed: start again from the fp8 parameter
            rec, weight = None, weight_of(module)
        self._settle_dtype_change(job, module, rec)
        if rows and rec is not None and rec.how == SOURCE and \
                METHODS[SOURCE].rewrites_rows(job, rec, weight, contributions):
            step = self._rows_step(job, name, module, contributions, key, rec, weight)
            if step is None or defer:
                return step
            if self._write(job, step):
                return None
            return self._bring(job, name, module, contributions, key, rows=False)
        original, in_place, read = self._original(job, module, rec, weight)
        delta = compute_delta(name, module, original, contributions, lora_weight_writer.original_bias(module, rec))
        if not delta.has_weight and delta.bias is None:  # every network failed on this layer
            self.restore(module, job)
            set_state(module, key)
            return None

        bias_backup = rec.bias if rec is not None else None
        if delta.has_weight:
            fp8 = lora_fp8.handles(original, self.fp8_strategy)
            how, param = (lora_fp8.UPCAST, None) if fp8 == lora_fp8.UPCAST else \
                lora_restore_methods.choose(job, name, module, weight, original, delta.used, self.prefer)
            new_rec = RestoreRecord(how, tuple(c.held() for c in delta.used), source=job.sources.source, param=param,
                                    bias=bias_backup)
            if how == SOURCE and in_place and fp8 is None:  # the weight holds its original; the source restores it
                step = DeferredWrite(name, module, contributions, key, weight, delta, new_rec, rows=False)
                if defer:
                    return step
                self._write(job, step)
                return None
            if fp8 is not None:
                new_rec.fp8 = lora_fp8.Fp8State(fp8, seed=lora_fp8.seed_for(name, delta.used))
            if how == lora_fp8.UPCAST:
                new_rec.fp8 = lora_fp8.write_upcast(module, weight_attr(module), original, delta,
                                                    job.scratch(weight.device))
                self.stats["fp8_upcast"] += 1
            else:
                method = METHODS[how]
                method.prepare(job, new_rec, rec, weight, original)
                lora_weight_writer.write(job, weight, original, delta, new_rec, method)
        else:  # only a bias delta: the weight holds its original
            if not in_place:
                with no_grad_for(weight):
                    weight.copy_(original)
            new_rec = RestoreRecord(None, tuple(c.held() for c in delta.used), bias=bias_backup)
        if read is not None:
            release(rec.source, read)
        self._finish(module, weight, delta, new_rec, key)
        return None

    def _rows_step(self, job: PatchJob, name: str, module, contributions: list, key: tuple, rec: RestoreRecord,
                   weight: torch.Tensor) -> DeferredWrite | None:
        """A source-held layer rewritten in one pass: Σ ΔW does not read the weight (lora_restore_methods'
        rewrites_rows), so it is computed over the old merge; the write (`_write`) merges each block from the
        source's rows. None when there is nothing to merge (done here)."""
        delta = compute_delta(name, module, weight.detach(), contributions,
                              lora_weight_writer.original_bias(module, rec))
        if not delta.has_weight and delta.bias is None:  # every network failed on this layer
            self.restore(module, job)
            set_state(module, key)
            return None
        if not delta.has_weight:  # only a bias delta: the weight takes its original
            self._restore_weight(job, module, rec)
            self._finish(module, weight, delta, RestoreRecord(None, tuple(delta.used), bias=rec.bias), key)
            return None
        return DeferredWrite(name, module, contributions, key, weight, delta, rec, rows=True)

    def _write_batch(self, job: PatchJob, steps: list[DeferredWrite], transaction: Transaction) -> None:
        for step in steps:
            transaction.at = step.name
            if not self._write(job, step):  # the source gave no rows this time: the two-pass way
                self._bring(job, step.name, step.module, step.contributions, step.key, rows=False)

    def _write(self, job: PatchJob, step: DeferredWrite) -> bool:
        """Runs a planned write; False (nothing written) when a rows rewrite finds the source has no row reader."""
        module, weight, delta, rec = step.module, step.weight, step.delta, step.rec
        if not step.rows:
            lora_weight_writer.write(job, weight, weight.detach(), delta, rec, METHODS[SOURCE])
            self._finish(module, weight, delta, rec, step.key)
            return True
        reader = lora_weight_source.open_rows(rec.source, rec.param, weight)
        if reader is None:
            return False
        try:
            new_rec = RestoreRecord(SOURCE, tuple(delta.used), source=rec.source, param=rec.param, bias=rec.bias)
            METHODS[SOURCE].rewrite(job, module, weight, delta, new_rec, reader)
        finally:
            reader.close()
        self._finish(module, weight, delta, new_rec, step.key)
        return True

    def _finish(self, module, weight: torch.Tensor, delta, new_rec: RestoreRecord, key: tuple) -> None:
        """The bias and the layer's new record, after its weight was written."""
        lora_weight_writer.write_bias(module, weight, delta.bias, new_rec)
        new_rec.dtype = weight_of(module).dtype
        set_record(module, new_rec)
        set_state(module, key)
        lora_layer_state.record_written(module)
        self.stats["writes"] += 1

    def _original(self, job: PatchJob, module, rec: RestoreRecord | None, weight: torch.Tensor):
        """(the layer's original weight on its device, whether that is the weight itself, the source tensor read).

        A layer that holds its original is used as it is; otherwise its method gives the original, or the
        layer is restored in place first (a residual record, or a source that went away)."""
        if rec is None or rec.how is None:
            return weight.detach(), True, None
        if rec.how == lora_fp8.UPCAST:
            return rec.fp8.original.detach(), False, None
        got = METHODS[rec.how].original_for_rewrite(job, module, rec, weight)
        if got is not None:
            return got
        self._restore_weight(job, module, rec)
        rec.how, rec.residual, rec.clone = None, None, None
        return weight.detach(), True, None

    def _settle_dtype_change(self, job: PatchJob, module, rec: RestoreRecord | None) -> bool:
        """The model was cast (e.g. `.to(torch.float64)`) while the layer was patched: its record is in the old
        dtype, so the original comes back in that dtype and is then cast. Exact when the cast widened (the patched
        values survived it) or when the source or a clone holds the original. Returns True when it ran."""
        weight = weight_of(module)
        if rec is None or rec.how in (None, lora_fp8.UPCAST) or rec.dtype is None or weight is None or \
                weight.dtype == rec.dtype:
            return False
        widened = weight.dtype.is_floating_point and rec.dtype.is_floating_point and \
            torch.finfo(weight.dtype).bits > torch.finfo(rec.dtype).bits
        target = weight.detach().to(rec.dtype)
        if not widened and rec.how == RESIDUAL:
            job.log.inexact(module, f"the model was cast from {rec.dtype} to {weight.dtype} while a Lora was merged")
        self._restore_weight(job, module, rec, target)
        with no_grad_for(weight):
            weight.copy_(target)
        rec.how, rec.residual, rec.clone, rec.dtype = None, None, None, weight.dtype
        rec.safety_copy = None
        return True

    @staticmethod
    def _restore_weight(job: PatchJob, module, rec: RestoreRecord, weight: torch.Tensor | None = None) -> None:
        """Writes the layer's original weight into `weight` (default: the layer's own) by the record's method."""
        weight = weight_of(module) if weight is None else weight
        if rec.how is None:
            return
        if rec.how == lora_fp8.UPCAST:  # the fp8 parameter was never written
            lora_fp8.restore_upcast(module, weight_attr(module), rec.fp8)
            return
        with no_grad_for(weight):
            METHODS[rec.how].restore(job, module, weight, rec)
