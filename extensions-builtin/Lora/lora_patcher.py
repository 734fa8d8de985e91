"""Patcher: the only code that writes model weights for Loras.

For each layer whose wanted state (lora_plan) differs from the state it holds, in one pass over the layer:
    W = cast(W_original + Σ ΔW)      ΔW in fp32 on the weight's device, summed over networks, one cast
and a layer no longer wanted gets its original back, bit for bit. Layers whose state is unchanged are not read
or written at all; layers no network targets are never copied.

No full copy of the originals is kept. A written layer keeps a small record of how its original comes back:
    source     re-read from the host's `sd_model.original_weights` (the loaded checkpoint, memory-mapped): 0 bytes
    residual   recompute Σ ΔW from the networks it holds and undo the merge; the few positions where rounding
               lost a bit of W0 are kept as a byte stream (lora_residual): about 1-3 % of the layer's bytes
    clone      a CPU copy of that one layer: only when neither works (a delta that depends on W0, such as DoRA
               or OFT, on a parameter the host cannot re-read)
The order is chosen per device: on CPU `source` first (re-reading costs less than recomputing deltas), on an
accelerator `residual` first (recomputing on the GPU beats a host-to-device copy). See README.

A job is all-or-nothing: if computing or writing any layer fails (out of memory, ...), every layer of the model
gets its original back and PatchError is raised. A delta that cannot be computed for one layer (a shape that does
not fit, ...) is recorded in the network's `apply_errors` and that network is left out of the layer.

Per-layer bookkeeping lives on the module (A1111 style, so it goes away with the model):
    network_current_names   the state key the layer holds (() = original)
    network_backup          the restore record while the layer is patched (None = it holds its original)
    network_written         (weight id, version, bias id, version) after our last write, to notice writes made
                            by someone else (e.g. new checkpoint weights loaded in place): those become the original
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import lora_delta
import lora_plan
import lora_residual
import lora_restore_guard
import network_lora
import torch
from lora_delta import (  # noqa: F401  (the patcher's public names before lora_delta existed)
    ACCELERATOR_CHUNK,
    CPU_CHUNK,
    compute_delta,
    delta_depends_on_weight,
    module_compute,
    plain_lowrank,
)

logger = logging.getLogger("lora")

SOURCE, RESIDUAL, CLONE = "source", "residual", "clone"
CPU_ORDER = (SOURCE, RESIDUAL, CLONE)
ACCELERATOR_ORDER = (RESIDUAL, SOURCE, CLONE)


class OriginalWeights(Protocol):
    """The host's seam (`sd_model.original_weights`): parameters exactly as loaded, or None when unknown."""

    def read(self, component: str, param_name: str) -> torch.Tensor | None: ...

    def valid(self) -> bool: ...


class PatchError(RuntimeError):
    """Writing the weights failed; every layer was put back to its original weights."""


def _weight_attr(module: torch.nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, torch.nn.MultiheadAttention) else "weight"


def _bias_attr(module: torch.nn.Module) -> str:
    return "in_proj_bias" if isinstance(module, torch.nn.MultiheadAttention) else "bias"


def _no_grad_for(t: torch.Tensor):
    return torch.inference_mode() if t.is_inference() else torch.no_grad()


def _version(t: torch.Tensor | None):
    if t is None:
        return None
    try:
        return id(t), t._version
    except RuntimeError:  # inference tensors have no version counter
        return id(t), None


@contextlib.contextmanager
def _full_fp32_matmul():
    """Deltas are fp32: no TF32/bf16 shortcuts in matmul while patching (a host may enable them for sampling)."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def source_param(name: str, module: torch.nn.Module, module_paths: dict | None) -> tuple[str, str] | None:
    """(component, the component's own state-dict key of the layer's weight) for the host's source, or None when
    the layer has no parameter of its own (a row block of a fused q/k/v weight).

    Canonical names are not always module paths (text encoders drop `text_model.`, compvis UNets are renamed):
    the layer map's `module_paths` (or `module.network_module_path`) says where the module really is."""
    if module_paths is not None:
        path = module_paths.get(name)
    elif hasattr(module, "network_module_path"):
        path = module.network_module_path
    else:
        component, _, rest = name.partition(".")
        path = (component, rest)
    if path is None:
        return None
    return path[0], f"{path[1]}.{_weight_attr(module)}"


@dataclass
class _BiasBackup:
    had_bias: bool
    original: torch.Tensor | None  # a clone of the original bias (biases are tiny next to weights)


@dataclass
class RestoreRecord:
    """How a patched layer gets its original back (module.network_backup)."""

    how: str | None  # SOURCE, RESIDUAL, CLONE; None when only the bias was written
    contributions: tuple  # the contributions the layer holds (residual recomputes their delta)
    source: OriginalWeights | None = None
    param: tuple[str, str] | None = None  # (component, param name) in the source
    residual: lora_residual.Residual | None = None
    device: torch.device | None = None  # where the residual's delta was computed
    clone: torch.Tensor | None = None
    safety_copy: torch.Tensor | None = None  # residual records on unproven devices (lora_restore_guard)
    bias: _BiasBackup | None = None
    dtype: torch.dtype | None = None  # the weight's dtype when the record was made

    @property
    def nbytes(self) -> int:
        """Memory held for restoring this layer."""
        n = 0
        if self.residual is not None:
            n += self.residual.nbytes
        for t in (self.clone, self.safety_copy):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.bias is not None and self.bias.original is not None:
            n += self.bias.original.numel() * self.bias.original.element_size()
        return n


class _Sources:
    """The job's source with its validity asked once per job."""

    def __init__(self, source: OriginalWeights | None):
        self.source = source if source is not None and callable(getattr(source, "read", None)) else None
        self.module_paths: dict | None = None
        self._valid: dict[int, bool] = {}

    def is_valid(self, source) -> bool:
        if source is None:
            return False
        key = id(source)
        if key not in self._valid:
            try:
                self._valid[key] = bool(source.valid())
            except Exception as e:
                logger.warning("Lora: original weights source failed: %s", e)
                self._valid[key] = False
        return self._valid[key]


def _read_source(source, param: tuple[str, str], like: torch.Tensor) -> torch.Tensor | None:
    try:
        t = source.read(*param)
    except Exception as e:
        logger.debug("Lora: cannot read %s/%s from the original weights: %s", *param, e)
        return None
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
        return None
    return t


def _release(source, t: torch.Tensor) -> None:
    release = getattr(source, "release", None)
    if callable(release):
        try:
            release(t)
        except Exception:
            pass


SAMPLES = 64  # elements compared before a source is trusted for a layer


def _bits_equal(sa: torch.Tensor, sb: torch.Tensor) -> bool:
    if sa.shape != sb.shape or sa.dtype != sb.dtype:
        return False
    if sa.dtype.is_floating_point and sa.element_size() in (1, 2, 4, 8):
        iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[sa.element_size()]
        return torch.equal(sa.contiguous().view(iv), sb.contiguous().view(iv))
    return torch.equal(sa, sb)


def _sample_matches(a: torch.Tensor, b: torch.Tensor, samples: int = SAMPLES) -> bool:
    """Cheap check that a source tensor holds the layer's values: ~64 elements compared bitwise (few pages read)."""
    step = max(1, a.numel() // samples)
    return _bits_equal(a.reshape(-1)[::step], b.reshape(-1)[::step].to(a.device))


def _source_matches(source, param: tuple[str, str], original: torch.Tensor) -> bool:
    """Whether the source's copy of `param` holds `original`'s values at ~64 sampled elements. A source with
    `sample(component, name, step)` reads only those elements; others are read whole."""
    sample = getattr(source, "sample", None)
    if callable(sample):
        step = max(1, original.numel() // SAMPLES)
        try:
            got = sample(*param, step)
        except Exception as e:
            logger.debug("Lora: cannot sample %s/%s from the original weights: %s", *param, e)
            return False
        return isinstance(got, torch.Tensor) and _bits_equal(got, original.reshape(-1)[::step].to(got.device))
    t = _read_source(source, param, original)
    if t is None:
        return False
    try:
        return _sample_matches(t, original)
    finally:
        _release(source, t)


DONE, NOT_READ, PART_WRITTEN = "done", "not read", "part-written"


def _read_source_into(source, param: tuple[str, str], weight: torch.Tensor) -> str | None:
    """Writes the source's original into `weight` in place when the source can (`read_into`, which returns False
    when it wrote nothing and raises when it stopped part-way): DONE, NOT_READ or PART_WRITTEN; None when the
    source has no such door."""
    read_into = getattr(source, "read_into", None)
    if not callable(read_into):
        return None
    try:
        with _no_grad_for(weight):
            return DONE if read_into(*param, weight.detach()) else NOT_READ
    except Exception as e:
        logger.warning("Lora: reading %s/%s from the original weights failed part-way: %s", *param, e)
        return PART_WRITTEN


class Patcher:
    def __init__(self, prefer: tuple[str, ...] | None = None):
        """prefer: the order of restore methods to try (default: by device, see the module docstring)."""
        self.prefer = prefer
        self.stats: Counter = Counter()
        self._job_scratch: dict = {}
        self._in_job = False  # writes, restores, source, residual, clone, foreign_changes, inexact
        self.notes: list[str] = []  # what the job should be told (restores that needed a fallback)

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    # --- state -------------------------------------------------------------------------------------------------
    @staticmethod
    def current_state(module: torch.nn.Module) -> tuple:
        return getattr(module, "network_current_names", ())

    @staticmethod
    def record(module: torch.nn.Module) -> RestoreRecord | None:
        rec = getattr(module, "network_backup", None)
        return rec if isinstance(rec, RestoreRecord) else None

    def held_bytes(self, layers: dict[str, torch.nn.Module]) -> int:
        """Memory held for exact restore by the layers' records (residual streams, clones, bias copies)."""
        return sum(rec.nbytes for m in layers.values() if (rec := self.record(m)) is not None)

    def _record_written(self, module: torch.nn.Module) -> None:
        module.network_written = (_version(getattr(module, _weight_attr(module))),
                                  _version(getattr(module, _bias_attr(module), None)))

    def _changed_outside(self, module: torch.nn.Module) -> bool:
        if not self.current_state(module) or self.record(module) is None:
            return False
        written = getattr(module, "network_written", None)
        now = (_version(getattr(module, _weight_attr(module))), _version(getattr(module, _bias_attr(module), None)))
        return written is not None and written != now

    def forget(self, module: torch.nn.Module) -> None:
        """Drops the layer's bookkeeping without touching its weights (they are the new original)."""
        module.network_backup = None
        module.network_current_names = ()
        module.network_written = None

    # --- one job -----------------------------------------------------------------------------------------------
    def sync(self, layers: dict[str, torch.nn.Module], plan: dict[str, list[lora_plan.Contribution]],
             source: OriginalWeights | None = None, module_paths: dict | None = None) -> int:
        """Brings every layer of `layers` to its state in `plan` (absent = original). Returns layers changed.

        `source` is the host's original weights (optional), `module_paths` the layer map's {name: (component,
        module path)} to find a layer's parameter in it. An error while computing or writing raises PatchError
        after every layer got its original back."""
        todo = []
        for name, module in layers.items():
            if self._changed_outside(module):
                logger.warning("Lora: weights of %s were changed outside the Lora patcher; they are kept as the "
                               "new original", name)
                self.stats["foreign_changes"] += 1
                self.forget(module)
            contributions = plan.get(name, [])
            key = lora_plan.state_key(contributions)
            if self.current_state(module) != key:
                todo.append((name, module, contributions, key))
        if not todo:
            return 0
        sources = _Sources(source)
        sources.module_paths = module_paths
        name = None
        self._in_job = True
        try:
            with _full_fp32_matmul():
                for name, module, contributions, key in todo:
                    self._bring(name, module, contributions, key, sources)
        except BaseException as e:  # e.g. out of memory part-way: the model goes back to its original weights
            self._roll_back(layers)
            raise PatchError(f"applying Lora weights failed at {name}: {type(e).__name__}: {e}; "
                             f"the model was put back to its original weights") from e
        finally:
            self._in_job = False
            self._job_scratch.clear()
        return len(todo)

    def restore(self, module: torch.nn.Module) -> bool:
        """Puts the layer's original weights back; True when something was written."""
        rec = self.record(module)
        if rec is None:
            self.forget(module)
            return False
        try:
            with _full_fp32_matmul():
                if not self._settle_dtype_change(module, rec, _Sources(None)):
                    self._restore_weight(module, rec, _Sources(None))
        finally:
            if not self._in_job:
                self._job_scratch.clear()
        self._restore_bias(module, rec)
        self.forget(module)
        self.stats["restores"] += 1
        return True

    # --- one layer ---------------------------------------------------------------------------------------------
    def _bring(self, name: str, module: torch.nn.Module, contributions: list, key: tuple, sources: _Sources):
        weight = getattr(module, _weight_attr(module), None)
        if not contributions or weight is None:
            if weight is None:
                for c in contributions:
                    c.network.apply_errors[name] = "the layer has no weight"
            self.restore(module)
            module.network_current_names = key
            return
        rec = self.record(module)
        self._settle_dtype_change(module, rec, sources)
        original, in_place, read = self._original(module, rec, weight, sources)
        delta = compute_delta(name, module, original, contributions, self._original_bias(module, rec))
        if not delta.has_weight and delta.bias is None:  # every network failed on this layer
            self.restore(module)
            module.network_current_names = key
            return

        bias_backup = rec.bias if rec is not None else None
        if delta.has_weight:
            how, param, checked = self._choose(name, module, weight, original, delta.used, sources)
            new_rec = RestoreRecord(how, tuple(delta.used), source=sources.source, param=param, bias=bias_backup)
            if how == CLONE and rec is not None and rec.how == CLONE:
                new_rec.clone = rec.clone  # the same original: no second copy
            if how == RESIDUAL and rec is not None and lora_restore_guard.reusable(rec.safety_copy, weight):
                new_rec.safety_copy = rec.safety_copy  # the layer was restored exactly: the copy still holds it
            if how == RESIDUAL and new_rec.safety_copy is None and \
                    not lora_restore_guard.residual_proven(weight.device) and \
                    not self._source_holds(param, original, sources):
                new_rec.safety_copy = lora_restore_guard.take_copy(original)  # before the write overwrites it
            self._write_weight(weight, original, delta, new_rec)
            if checked is not None:
                _release(sources.source, checked)
        else:  # only a bias delta: the weight holds its original
            if not in_place:
                with _no_grad_for(weight):
                    weight.copy_(original)
            new_rec = RestoreRecord(None, tuple(delta.used), bias=bias_backup)
        if read is not None:
            _release(rec.source, read)
        self._write_bias(module, weight, delta.bias, new_rec)
        new_rec.dtype = weight.dtype
        module.network_backup = new_rec
        module.network_current_names = key
        self._record_written(module)
        self.stats["writes"] += 1

    @staticmethod
    def _source_holds(param, original: torch.Tensor, sources: _Sources) -> bool:
        """Whether the host's source can give this layer's original back (then no copy is needed)."""
        if param is None or not sources.is_valid(sources.source):
            return False
        return _source_matches(sources.source, param, original)

    def _original(self, module, rec: RestoreRecord | None, weight: torch.Tensor, sources: _Sources):
        """(the layer's original weight on its device, whether that is the weight itself, the source tensor read).

        A layer that holds its original is used as it is; a residual record is undone in place first."""
        if rec is None or rec.how is None:
            return weight.detach(), True, None
        if rec.how == SOURCE and sources.is_valid(rec.source):
            done = _read_source_into(rec.source, rec.param, weight) if weight.is_contiguous() else None
            if done == DONE:  # the original is back in place: the new merge is written over it
                self.stats["source_reads"] += 1
                self._note_restored_from(module, rec)
                rec.how = None
                return weight.detach(), True, None
            if done == PART_WRITTEN:
                self._inexact(module, "the checkpoint file changed while it was read")
                rec.how = None
                return weight.detach(), True, None
            if done is None:
                t = _read_source(rec.source, rec.param, weight)
                if t is not None:
                    self.stats["source_reads"] += 1
                    return t.to(weight.device), False, t
        if rec.how == CLONE:
            return rec.clone.to(weight.device), False, None
        self._restore_weight(module, rec, sources)  # residual (or a source that went away): undo in place
        rec.how, rec.residual, rec.clone = None, None, None
        return weight.detach(), True, None

    def _choose(self, name: str, module, weight: torch.Tensor, original: torch.Tensor, used: list,
                sources: _Sources):
        """(how, source param, source tensor read for the check) for the layer's new record."""
        order = self.prefer or (CPU_ORDER if weight.device.type == "cpu" else ACCELERATOR_ORDER)
        param = source_param(name, module, sources.module_paths)
        for how in order:
            if how == SOURCE and param is not None and sources.source is not None and \
                    sources.is_valid(sources.source) and self._source_checked(module, sources.source, param,
                                                                              original):
                return SOURCE, param, None
            elif how == RESIDUAL and weight.dtype in lora_residual.SUPPORTED_DTYPES and \
                    not any(delta_depends_on_weight(c.module) for c in used):
                return RESIDUAL, param, None
            elif how == CLONE:
                return CLONE, param, None
        return CLONE, param, None

    @staticmethod
    def _source_checked(module, source, param, original: torch.Tensor) -> bool:
        """Whether the source holds this layer's original: sampled once, then trusted while the layer's weight is
        the same tensor at the same version as when it was checked or restored from that source (any other write,
        another source, an inference tensor without a version: sampled again)."""
        weight = getattr(module, _weight_attr(module))
        version = _version(weight)
        checked = getattr(module, "network_source_checked", None)
        if checked is not None and checked[0] is source and checked[1] == param and version[1] is not None and \
                checked[2] == version and original.data_ptr() == weight.data_ptr():
            return True
        if not _source_matches(source, param, original):
            return False
        if original.data_ptr() == weight.data_ptr():
            module.network_source_checked = (source, param, version)
        return True

    @staticmethod
    def _note_restored_from(module, rec: RestoreRecord) -> None:
        """The layer holds exactly what `rec`'s source has (just restored from it): no sampling needed next time."""
        if rec.how == SOURCE and rec.source is not None and rec.param is not None:
            module.network_source_checked = (rec.source, rec.param,
                                             _version(getattr(module, _weight_attr(module))))

    def _write_weight(self, weight: torch.Tensor, original: torch.Tensor, delta: lora_delta.LayerDelta,
                      rec: RestoreRecord) -> None:
        if not weight.is_contiguous():  # flat chunks need one block of memory
            target = weight.detach().contiguous()
            if original.data_ptr() == weight.data_ptr():
                original = target.clone() if rec.how == RESIDUAL else target
            self._write_weight(target, original, delta, rec)
            with _no_grad_for(weight):
                weight.copy_(target)
            return
        if rec.how == CLONE and rec.clone is None:
            rec.clone = original.detach().to("cpu", copy=True)
        self.stats[rec.how] += 1
        with _no_grad_for(weight):
            if rec.how != RESIDUAL:  # nothing to record: each term is added straight into the weight
                term = delta.single
                if isinstance(term, network_lora.LowRankRows) and weight.dtype == torch.float32 and \
                        original.data_ptr() != weight.data_ptr() and original.is_contiguous():
                    out = weight.view(weight.shape[0], -1)  # one GEMM from the original into the weight
                    torch.addmm(original.reshape(out.shape), term.up, term.down, out=out)
                    return
                try:
                    delta.merge(weight, original if original.is_contiguous() else original.contiguous(),
                                self._scratch(weight.device))
                except BaseException:
                    self._put_back(weight, original, rec)
                    raise
                return
            # residual: Σ ΔW block by block (the restore recomputes the same blocks), the guess's misses recorded
            scratch = self._scratch(weight.device)
            encoder = lora_residual.Encoder(weight.dtype, weight.numel(), weight.device)
            flat_w, flat_o = weight.view(-1), original.reshape(-1)
            done, fp = 0, 0
            try:
                for start, end, d in delta.blocks(weight.shape, weight.device, scratch):
                    encoder.merge_into(start, flat_w[start:end], flat_o[start:end], d, scratch)
                    fp += lora_residual.fingerprint(d)
                    done = end
            except BaseException:
                self._undo_prefix(weight, done, rec, encoder, original, delta, scratch)
                raise
            rec.residual = encoder.finish(fp)
            rec.device = weight.device

    def _scratch(self, device: torch.device) -> lora_residual.Scratch:
        """Chunk buffers for this job (dropped when it ends, so nothing stays allocated between jobs)."""
        scratch = self._job_scratch.get(device)
        if scratch is None:
            scratch = self._job_scratch[device] = lora_residual.Scratch(device, lora_delta.chunk_elements(device))
        return scratch

    @staticmethod
    def _put_back(weight, original, rec: RestoreRecord) -> None:
        """A fused in-place write failed part-way: the layer gets its original back from the clone or source."""
        if original.data_ptr() != weight.data_ptr():
            weight.copy_(original)
        elif rec.how == CLONE and rec.clone is not None:
            weight.copy_(rec.clone)
        elif rec.how == SOURCE and rec.source is not None:
            t = _read_source(rec.source, rec.param, weight)
            if t is not None:
                weight.copy_(t)

    @staticmethod
    def _undo_prefix(weight, done: int, rec: RestoreRecord, encoder, original, delta, scratch) -> None:
        """A failure inside one layer's residual write: the part already written gets its original back."""
        if done == 0:
            return
        flat_w, flat_o = weight.view(-1), original.reshape(-1)
        if flat_o.data_ptr() != flat_w.data_ptr():
            flat_w[:done].copy_(flat_o[:done])
            return
        partial = encoder.finish(0)
        for start, end, d in delta.blocks(weight.shape, weight.device, scratch):
            if start >= done:
                break
            lora_residual.guess_(flat_w[start:end], d, scratch)
        lora_residual.correct_(flat_w, partial, 0, done)

    def _settle_dtype_change(self, module, rec: RestoreRecord | None, sources: _Sources) -> bool:
        """The model was cast (e.g. `.to(torch.float64)`) while the layer was patched: its record is in the old
        dtype, so the original comes back in that dtype and is then cast. Exact when the cast widened (the patched
        values survived it) or when the source or a clone holds the original. Returns True when it ran."""
        weight = getattr(module, _weight_attr(module), None)
        if rec is None or rec.how is None or rec.dtype is None or weight is None or weight.dtype == rec.dtype:
            return False
        widened = weight.dtype.is_floating_point and rec.dtype.is_floating_point and \
            torch.finfo(weight.dtype).bits > torch.finfo(rec.dtype).bits
        target = weight.detach().to(rec.dtype)
        if not widened and rec.how == RESIDUAL:
            self._inexact(module, f"the model was cast from {rec.dtype} to {weight.dtype} while a Lora was merged")
        self._restore_weight(module, rec, sources, target)
        with _no_grad_for(weight):
            weight.copy_(target)
        rec.how, rec.residual, rec.clone, rec.dtype = None, None, None, weight.dtype
        rec.safety_copy = None
        return True

    def _restore_weight(self, module, rec: RestoreRecord, sources: _Sources, weight: torch.Tensor | None = None
                        ) -> None:
        """Writes the layer's original weight into `weight` (default: the layer's own)."""
        weight = getattr(module, _weight_attr(module)) if weight is None else weight
        if rec.how is None:
            return
        with _no_grad_for(weight):
            if rec.how == CLONE:
                weight.copy_(rec.clone)
                return
            if rec.how == SOURCE:
                valid = sources.is_valid(rec.source)
                done = _read_source_into(rec.source, rec.param, weight) if valid and weight.is_contiguous() \
                    else None
                if done == DONE:
                    self.stats["source_reads"] += 1
                    if weight is getattr(module, _weight_attr(module)):
                        self._note_restored_from(module, rec)
                    return
                if done == PART_WRITTEN:  # the layer holds a mix now; the residual cannot undo that
                    self._inexact(module, "the checkpoint file changed while it was read")
                    return
                t = _read_source(rec.source, rec.param, weight) if valid and done is None else None
                if t is not None:
                    weight.copy_(t)
                    _release(rec.source, t)
                    self.stats["source_reads"] += 1
                    return
                self._inexact(module, "the checkpoint file changed on disk or cannot be read")
                self._undo_delta(module, weight, rec, None)
                return
            self._undo_delta(module, weight, rec, rec.residual)

    def _undo_delta(self, module, weight: torch.Tensor, rec: RestoreRecord, residual) -> None:
        """W0 = guess(W1, Σ ΔW) + residual corrections; Σ ΔW recomputed where it was computed at apply time.

        The delta's fingerprint is checked at the end: if it did not reproduce, a source (when there is one)
        puts the exact original back, else the guess stays (close, not exact) and the user is told."""
        device = rec.device or weight.device
        work = weight.detach() if weight.device == device else weight.detach().to(device)
        if not work.is_contiguous():
            work = work.contiguous()
        name = getattr(module, "network_layer_name", "?")
        delta = compute_delta(name, module, work, rec.contributions, self._original_bias(module, rec),
                              record_errors=False)
        if not delta.has_weight:
            if lora_restore_guard.reusable(rec.safety_copy, weight):
                weight.copy_(rec.safety_copy)
                self._note(module, "restored from the copy taken before the write")
                return
            self._inexact(module, "its Lora delta could not be recomputed")
            return
        scratch = self._scratch(device)
        flat_w, fp = work.view(-1), 0
        for start, end, d in delta.blocks(work.shape, device, scratch):
            lora_residual.guess_(flat_w[start:end], d, scratch)
            fp += lora_residual.fingerprint(d)
        if residual is not None and fp != residual.delta_fingerprint:
            lora_restore_guard.mark_unproven(device)
            if self._restore_from_current_source(module, weight, rec):
                self._note(module, "restored from the checkpoint file")
                return
            if lora_restore_guard.reusable(rec.safety_copy, weight):
                weight.copy_(rec.safety_copy)
                self._note(module, "restored from the copy taken before the write")
                return
            self._inexact(module, "its Lora delta did not reproduce bit for bit")
            residual = None
        if residual is not None:
            lora_residual.correct_(flat_w, residual)
        if work.data_ptr() != weight.data_ptr():
            weight.copy_(work)

    def _restore_from_current_source(self, module, weight, rec: RestoreRecord) -> bool:
        source = rec.source
        if source is None or rec.param is None or not _Sources(None).is_valid(source):
            return False
        t = _read_source(source, rec.param, weight)
        if t is None:
            return False
        weight.copy_(t)
        _release(source, t)
        return True

    def _note(self, module, how: str) -> None:
        """A residual restore that did not reproduce its delta, put right from an exact original."""
        self.stats["restore_fallbacks"] += 1
        name = getattr(module, "network_layer_name", module)
        logger.warning("Lora: %s: the residual restore did not reproduce its Lora delta bit for bit; %s", name, how)
        message = f"Lora: the residual restore of {name} did not reproduce its delta; {how} (exact)"
        if message not in self.notes and len(self.notes) < 50:  # taken by each job; bounded if nobody asks
            self.notes.append(message)

    def _inexact(self, module, why: str) -> None:
        self.stats["inexact"] += 1
        name = getattr(module, "network_layer_name", module)
        logger.error("Lora: %s could not be restored bit-exactly: %s; reload the checkpoint to get its exact "
                     "weights back", name, why)
        message = f"Lora: {name} could not be restored bit-exactly ({why}); reload the checkpoint"
        if message not in self.notes and len(self.notes) < 50:  # taken by each job; bounded if nobody asks
            self.notes.append(message)

    # --- bias --------------------------------------------------------------------------------------------------
    @staticmethod
    def _original_bias(module, rec: RestoreRecord | None) -> torch.Tensor | None:
        if rec is not None and rec.bias is not None:
            return rec.bias.original
        bias = getattr(module, _bias_attr(module), None)
        return None if bias is None else bias.detach()

    @staticmethod
    def _write_bias(module, weight: torch.Tensor, delta_bias: torch.Tensor | None, rec: RestoreRecord) -> None:
        bias_name = _bias_attr(module)
        bias = getattr(module, bias_name, None)
        if delta_bias is None:
            if rec.bias is not None:  # the previous state changed the bias, this one does not
                Patcher._restore_bias(module, rec)
                rec.bias = None
            return
        if rec.bias is None:
            rec.bias = _BiasBackup(bias is not None, None if bias is None else bias.detach().clone())
        base = rec.bias.original
        new = delta_bias.reshape(-1) if base is None else base.float() + delta_bias.reshape(base.shape)
        with _no_grad_for(weight):
            if bias is None:
                setattr(module, bias_name, torch.nn.Parameter(new.to(weight.device, weight.dtype),
                                                              requires_grad=False))
            else:
                bias.copy_(new)

    @staticmethod
    def _restore_bias(module, rec: RestoreRecord) -> None:
        if rec.bias is None:
            return
        bias_name = _bias_attr(module)
        bias = getattr(module, bias_name, None)
        if not rec.bias.had_bias:
            if bias is not None:
                setattr(module, bias_name, None)
        elif bias is not None:
            with _no_grad_for(bias):
                bias.copy_(rec.bias.original)

    def _roll_back(self, layers: dict[str, torch.nn.Module]) -> None:
        for module in layers.values():
            try:
                if self.record(module) is not None or self.current_state(module):
                    self.restore(module)
            except Exception as e:  # keep going: every other layer still gets its original back
                logger.error("Lora: could not restore %s: %s", getattr(module, "network_layer_name", module), e)
