"""How a written layer gets its original back: one class per method, behind one interface (RestoreMethod).

    source     re-read from the host's `sd_model.original_weights` (the loaded checkpoint, memory-mapped): 0 bytes
    residual   recompute Σ ΔW from the networks the layer holds and undo the merge; the few positions where
               rounding lost a bit of W0 are kept as a byte stream (lora_residual): about 1-3 % of the layer's bytes
    clone      a CPU copy of that one layer: only when neither works (a delta that depends on W0, such as DoRA
               or OFT, on a parameter the host cannot re-read)

The order is chosen per device (`choose`): on CPU `source` first (re-reading costs less than recomputing deltas),
on an accelerator `residual` first (recomputing on the GPU beats a host-to-device copy). Each method decides
whether it can hold a layer, writes the merge the way its restore needs (through lora_weight_writer), gives the
original for a rewrite, and restores. Methods keep no state: everything is in the layer's RestoreRecord.
"""
from __future__ import annotations

import lora_delta
import lora_fp8
import lora_layer_state
import lora_residual
import lora_restore_guard
import lora_weight_source
import lora_weight_writer
import torch
from lora_layer_state import RestoreRecord
from lora_weight_source import DONE, PART_WRITTEN

SOURCE, RESIDUAL, CLONE = "source", "residual", "clone"
CPU_ORDER = (SOURCE, RESIDUAL, CLONE)
ACCELERATOR_ORDER = (RESIDUAL, SOURCE, CLONE)


class RestoreMethod:
    """One way back to a layer's original. `job` is a lora_patch_job.PatchJob."""

    name: str
    reads_original_while_writing = False  # the writer must not merge into the original's own memory

    def applies(self, job, module, weight: torch.Tensor, original: torch.Tensor, param, used: list) -> bool:
        raise NotImplementedError

    def prepare(self, job, rec: RestoreRecord, previous: RestoreRecord | None, weight: torch.Tensor,
                original: torch.Tensor) -> None:
        """Fills what the new record needs before the write overwrites the original (nothing by default)."""

    def write(self, job, weight: torch.Tensor, original: torch.Tensor, delta: lora_delta.LayerDelta,
              rec: RestoreRecord) -> None:
        raise NotImplementedError

    def original_for_rewrite(self, job, module, rec: RestoreRecord, weight: torch.Tensor):
        """(the original on the weight's device, whether that is the weight itself, a source tensor to release)
        when this method gives it without undoing the merge in place; None: restore in place first."""
        return None

    def restore(self, job, module, weight: torch.Tensor, rec: RestoreRecord) -> None:
        """Writes the layer's original into `weight` (the layer's own, or a stand-in of the record's dtype)."""
        raise NotImplementedError


class SourceRestore(RestoreMethod):
    name = SOURCE

    def applies(self, job, module, weight, original, param, used) -> bool:
        source = job.sources.source
        return param is not None and source is not None and job.sources.is_valid(source) and \
            self._checked(module, source, param, original)

    @staticmethod
    def _checked(module, source, param, original: torch.Tensor) -> bool:
        """Whether the source holds this layer's original: sampled once, then trusted while the layer's weight is
        the same tensor at the same version as when it was checked or restored from that source (any other write,
        another source, an inference tensor without a version: sampled again)."""
        if lora_layer_state.source_still_checked(module, source, param, original):
            return True
        if not lora_weight_source.source_matches(source, param, original):
            return False
        if original.data_ptr() == lora_layer_state.weight_of(module).data_ptr():
            lora_layer_state.note_source_checked(module, source, param)
        return True

    @staticmethod
    def holds(job, param, original: torch.Tensor) -> bool:
        """Whether the host's source can give this layer's original back (then no copy is needed)."""
        if param is None or not job.sources.is_valid(job.sources.source):
            return False
        return lora_weight_source.source_matches(job.sources.source, param, original)

    def write(self, job, weight, original, delta, rec) -> None:
        def put_back(w):
            t = lora_weight_source.read(rec.source, rec.param, w) if rec.source is not None else None
            if t is not None:
                w.copy_(t)

        lora_weight_writer.write_fused(job, weight, original, delta, put_back, rec.fp8)

    def rewrites_rows(self, job, rec: RestoreRecord, weight: torch.Tensor, contributions) -> bool:
        """Whether the rewrite may merge straight from the source's rows in one pass (no weight-sized read first):
        the record's source is this job's, valid and has a row reader (A1111's checkpoint source has none), the
        weight is not fp8, and no delta reads the weight (it holds the old merge while Σ ΔW is computed).
        The reader is opened by the write (lora_weight_source.open_rows); when it cannot give this layer's rows,
        the two-pass way."""
        return rec.source is not None and rec.source is job.sources.source and job.sources.is_valid(rec.source) and \
            callable(getattr(rec.source, "open_rows", None)) and \
            rec.fp8 is None and not lora_fp8.is_fp8(weight.dtype) and weight.is_contiguous() and \
            not any(lora_delta.delta_depends_on_weight(c.module) for c in contributions)

    def rewrite(self, job, module, weight: torch.Tensor, delta: lora_delta.LayerDelta, rec: RestoreRecord,
                reader) -> None:
        """weight = cast(original + Σ ΔW) in one pass: each block of rows gets its original from the source and
        is merged while in cache. A file that changed meanwhile leaves a merge of mixed bytes: reported."""
        def put_back(w):
            if lora_weight_source.read_into(rec.source, rec.param, w) != DONE:
                job.log.inexact(module, "the checkpoint file could not be re-read after a failed write")

        job.stats["source_reads"] += 1
        job.stats["source_rows"] += 1
        lora_weight_writer.write_rows(job, weight, delta, rec, reader.read, put_back,
                                      fill_block=getattr(reader, "dtype", None) == weight.dtype)
        if not reader.close():
            job.log.inexact(module, "the checkpoint file changed while it was read")

    def original_for_rewrite(self, job, module, rec, weight):
        if not job.sources.is_valid(rec.source):
            return None
        done = lora_weight_source.read_into(rec.source, rec.param, weight) if weight.is_contiguous() else None
        if done == DONE:  # the original is back in place: the new merge is written over it
            job.stats["source_reads"] += 1
            lora_layer_state.note_source_checked(module, rec.source, rec.param)
            rec.how = None
            return weight.detach(), True, None
        if done == PART_WRITTEN:
            job.log.inexact(module, "the checkpoint file changed while it was read")
            rec.how = None
            return weight.detach(), True, None
        if done is None:
            t = lora_weight_source.read(rec.source, rec.param, weight)
            if t is not None:
                job.stats["source_reads"] += 1
                return t.to(weight.device), False, t
        return None

    def restore(self, job, module, weight, rec) -> None:
        valid = job.sources.is_valid(rec.source)
        done = lora_weight_source.read_into(rec.source, rec.param, weight) if valid and weight.is_contiguous() \
            else None
        if done == DONE:
            job.stats["source_reads"] += 1
            if weight is lora_layer_state.weight_of(module):
                lora_layer_state.note_source_checked(module, rec.source, rec.param)
            return
        if done == PART_WRITTEN:  # the layer holds a mix now; the residual cannot undo that
            job.log.inexact(module, "the checkpoint file changed while it was read")
            return
        t = lora_weight_source.read(rec.source, rec.param, weight) if valid and done is None else None
        if t is not None:
            weight.copy_(t)
            lora_weight_source.release(rec.source, t)
            job.stats["source_reads"] += 1
            return
        job.log.inexact(module, "the checkpoint file changed on disk or cannot be read")
        ResidualRestore.undo_delta(job, module, weight, rec, None)

    @staticmethod
    def reread(weight: torch.Tensor, rec: RestoreRecord) -> bool:
        """The record's source, asked afresh whether it is valid, written into `weight`; False when it cannot."""
        source = rec.source
        if source is None or rec.param is None or not lora_weight_source.Sources(None).is_valid(source):
            return False
        t = lora_weight_source.read(source, rec.param, weight)
        if t is None:
            return False
        weight.copy_(t)
        lora_weight_source.release(source, t)
        return True


class ResidualRestore(RestoreMethod):
    name = RESIDUAL
    reads_original_while_writing = True

    def applies(self, job, module, weight, original, param, used) -> bool:
        return weight.dtype in lora_residual.SUPPORTED_DTYPES and \
            not any(lora_delta.delta_depends_on_weight(c.module) for c in used)

    def prepare(self, job, rec, previous, weight, original) -> None:
        if previous is not None and lora_restore_guard.reusable(previous.safety_copy, weight):
            rec.safety_copy = previous.safety_copy  # the layer was restored exactly: the copy still holds it
        if rec.safety_copy is None and not lora_restore_guard.residual_proven(weight.device) and \
                not SourceRestore.holds(job, rec.param, original):
            rec.safety_copy = lora_restore_guard.take_copy(original)  # before the write overwrites it

    def write(self, job, weight, original, delta, rec) -> None:
        rec.residual = lora_weight_writer.write_residual(job, weight, original, delta)
        rec.device = weight.device

    def restore(self, job, module, weight, rec) -> None:
        self.undo_delta(job, module, weight, rec, rec.residual)

    @staticmethod
    def undo_delta(job, module, weight: torch.Tensor, rec: RestoreRecord, residual) -> None:
        """W0 = guess(W1, Σ ΔW) + residual corrections; Σ ΔW recomputed where it was computed at apply time.

        The delta's fingerprint is checked at the end: if it did not reproduce, a source (when there is one)
        puts the exact original back, else the guess stays (close, not exact) and the user is told."""
        device = rec.device or weight.device
        work = weight.detach() if weight.device == device else weight.detach().to(device)
        if not work.is_contiguous():
            work = work.contiguous()
        name = getattr(module, "network_layer_name", "?")
        delta = lora_delta.compute_delta(name, module, work, rec.contributions,
                                         lora_weight_writer.original_bias(module, rec), record_errors=False)
        if not delta.has_weight:
            if lora_restore_guard.reusable(rec.safety_copy, weight):
                weight.copy_(rec.safety_copy)
                job.log.fallback(module, "restored from the copy taken before the write")
                return
            job.log.inexact(module, "its Lora delta could not be recomputed")
            return
        scratch = job.scratch(device)
        flat_w, fp = work.view(-1), 0
        for start, end, d in delta.blocks(work.shape, device, scratch):
            lora_residual.guess_(flat_w[start:end], d, scratch)
            fp += lora_residual.fingerprint(d)
        if residual is not None and fp != residual.delta_fingerprint:
            lora_restore_guard.mark_unproven(device)
            if SourceRestore.reread(weight, rec):
                job.log.fallback(module, "restored from the checkpoint file")
                return
            if lora_restore_guard.reusable(rec.safety_copy, weight):
                weight.copy_(rec.safety_copy)
                job.log.fallback(module, "restored from the copy taken before the write")
                return
            job.log.inexact(module, "its Lora delta did not reproduce bit for bit")
            residual = None
        if residual is not None:
            lora_residual.correct_(flat_w, residual)
        if work.data_ptr() != weight.data_ptr():
            weight.copy_(work)


class CloneRestore(RestoreMethod):
    name = CLONE

    def applies(self, job, module, weight, original, param, used) -> bool:
        return True

    def prepare(self, job, rec, previous, weight, original) -> None:
        if previous is not None and previous.how == CLONE:
            rec.clone = previous.clone  # the same original: no second copy

    def write(self, job, weight, original, delta, rec) -> None:
        if rec.clone is None:
            rec.clone = original.detach().to("cpu", copy=True)
        lora_weight_writer.write_fused(job, weight, original, delta, lambda w: w.copy_(rec.clone), rec.fp8)

    def original_for_rewrite(self, job, module, rec, weight):
        return rec.clone.to(weight.device), False, None

    def restore(self, job, module, weight, rec) -> None:
        weight.copy_(rec.clone)


METHODS: dict[str, RestoreMethod] = {m.name: m for m in (SourceRestore(), ResidualRestore(), CloneRestore())}


def choose(job, name: str, module, weight: torch.Tensor, original: torch.Tensor, used: list,
           prefer: tuple[str, ...] | None) -> tuple[str, tuple[str, str] | None]:
    """(method name, the layer's parameter in the host's source) for a layer's new record: the first method of
    `prefer` (default: by device) that can hold it."""
    order = prefer or (CPU_ORDER if weight.device.type == "cpu" else ACCELERATOR_ORDER)
    param = lora_weight_source.source_param(name, module, job.sources.module_paths)
    for how in order:
        if METHODS[how].applies(job, module, weight, original, param, used):
            return how, param
    return CLONE, param
