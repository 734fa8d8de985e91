"""Patcher: the only code that writes model weights for Loras.

For each layer whose wanted state (lora_plan) differs from the state it holds:
    W = (W_original.float() + Σ ΔW).to(W.dtype)    always from the original, so jobs never drift
and a layer no longer wanted gets its original back, bit for bit. Originals are kept only for layers that were
written (by `CpuCloneBackup`, the one swappable place that knows how). A job is all-or-nothing: every delta is
computed before the first write, and a failure while writing restores every patched layer to its original.

Per-layer bookkeeping lives on the module (A1111 style, so it goes away with the model):
    network_current_names   the state key the layer holds (() = original)
    network_backup          the original weight/bias while the layer is patched
    network_written         (weight id, weight version, bias id, bias version) after our last write, to notice
                            writes made by someone else (e.g. new checkpoint weights loaded in place)
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import lora_plan
import torch

logger = logging.getLogger("lora")


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


@dataclass
class OriginalWeights:
    weight: torch.Tensor
    bias: torch.Tensor | None
    had_bias: bool


class CpuCloneBackup:
    """Keeps the original weight and bias of a written layer as CPU clones, on the layer itself."""

    attr = "network_backup"

    def has(self, module: torch.nn.Module) -> bool:
        return getattr(module, self.attr, None) is not None

    def save(self, module: torch.nn.Module) -> bool:
        if self.has(module):
            return False
        weight = getattr(module, _weight_attr(module))
        bias = getattr(module, _bias_attr(module), None)
        setattr(module, self.attr, OriginalWeights(
            weight=weight.detach().to("cpu", copy=True),
            bias=None if bias is None else bias.detach().to("cpu", copy=True),
            had_bias=bias is not None))
        return True

    def original_weight(self, module: torch.nn.Module) -> torch.Tensor:
        weight = getattr(module, _weight_attr(module))
        backup = getattr(module, self.attr, None)
        return weight.detach() if backup is None else backup.weight.to(weight.device)

    def original_bias(self, module: torch.nn.Module) -> torch.Tensor | None:
        bias = getattr(module, _bias_attr(module), None)
        backup = getattr(module, self.attr, None)
        if backup is None:
            return None if bias is None else bias.detach()
        if backup.bias is None:
            return None
        return backup.bias.to(bias.device if bias is not None else getattr(module, _weight_attr(module)).device)

    def restore(self, module: torch.nn.Module) -> bool:
        backup = getattr(module, self.attr, None)
        if backup is None:
            return False
        weight = getattr(module, _weight_attr(module))
        with _no_grad_for(weight):
            weight.copy_(backup.weight)
            bias_name = _bias_attr(module)
            bias = getattr(module, bias_name, None)
            if not backup.had_bias:
                if bias is not None:
                    setattr(module, bias_name, None)
            elif bias is not None:
                bias.copy_(backup.bias)
        self.discard(module)
        return True

    def discard(self, module: torch.nn.Module) -> None:
        if hasattr(module, self.attr):
            setattr(module, self.attr, None)


@dataclass
class _Prepared:
    name: str
    module: torch.nn.Module
    key: tuple
    weight: torch.Tensor | None  # new weight in the layer's dtype, None = original
    bias: torch.Tensor | None  # new bias, None = original


class Patcher:
    def __init__(self, backup: CpuCloneBackup | None = None):
        self.backup = backup or CpuCloneBackup()
        self.stats: Counter = Counter()  # writes, restores, backups, foreign_changes

    # --- state -------------------------------------------------------------------------------------------------
    @staticmethod
    def current_state(module: torch.nn.Module) -> tuple:
        return getattr(module, "network_current_names", ())

    def _record_written(self, module: torch.nn.Module) -> None:
        module.network_written = (_version(getattr(module, _weight_attr(module))),
                                  _version(getattr(module, _bias_attr(module), None)))

    def _changed_outside(self, module: torch.nn.Module) -> bool:
        if not self.current_state(module) or not self.backup.has(module):
            return False
        written = getattr(module, "network_written", None)
        now = (_version(getattr(module, _weight_attr(module))), _version(getattr(module, _bias_attr(module), None)))
        return written is not None and written != now

    def forget(self, module: torch.nn.Module) -> None:
        """Drops the layer's bookkeeping without touching its weights (they are the new original)."""
        self.backup.discard(module)
        module.network_current_names = ()
        module.network_written = None

    def restore(self, module: torch.nn.Module) -> bool:
        """Puts the layer's original weights back; True when something was written."""
        restored = self.backup.restore(module)
        module.network_current_names = ()
        module.network_written = None
        if restored:
            self.stats["restores"] += 1
        return restored

    # --- one job -----------------------------------------------------------------------------------------------
    def sync(self, layers: dict[str, torch.nn.Module], plan: dict[str, list[lora_plan.Contribution]]) -> int:
        """Brings every layer of `layers` to its state in `plan` (absent = original). Returns layers written.

        Per-layer delta errors are recorded in the network's `apply_errors` and that network is left out of the
        layer; an error while writing raises PatchError after every patched layer got its original back."""
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

        try:
            prepared = [self._prepare(name, module, contributions, key) for name, module, contributions, key in todo]
        except BaseException as e:  # e.g. out of memory: nothing of this job was written
            self._roll_back(layers, [])
            raise PatchError(f"computing Lora weights failed: {type(e).__name__}: {e}; "
                             f"the model was put back to its original weights") from e

        written: list[torch.nn.Module] = []
        try:
            for item in prepared:
                self._write(item)
                written.append(item.module)
        except BaseException as e:
            self._roll_back(layers, written)
            raise PatchError(f"writing Lora weights failed at {item.name}: {type(e).__name__}: {e}; "
                             f"the model was put back to its original weights") from e
        return len(written)

    def _prepare(self, name: str, module: torch.nn.Module, contributions: list, key: tuple) -> _Prepared:
        if not contributions:
            return _Prepared(name, module, key, None, None)
        weight = getattr(module, _weight_attr(module), None)
        if weight is None:
            for c in contributions:
                c.network.apply_errors[name] = "the layer has no weight"
            return _Prepared(name, module, key, None, None)
        original = self.backup.original_weight(module)
        delta = None
        delta_bias = None
        for c in contributions:
            try:
                dw, db = c.module.compute(original, c.multiplier, c.dyn_dim)
                if db is not None and isinstance(module, torch.nn.MultiheadAttention):
                    raise ValueError("bias deltas are not supported on MultiheadAttention")
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                c.network.apply_errors[name] = f"{type(e).__name__}: {e}"
                continue
            c.network.apply_errors.pop(name, None)
            delta = dw if delta is None else delta + dw
            if db is not None:
                delta_bias = db if delta_bias is None else delta_bias + db
        new_weight = None if delta is None else (original.float() + delta).to(weight.dtype)
        new_bias = None
        if delta_bias is not None:
            original_bias = self.backup.original_bias(module)
            base = torch.zeros_like(delta_bias) if original_bias is None else original_bias.float()
            new_bias = (base + delta_bias.reshape(base.shape)).to(weight.device, weight.dtype)
        return _Prepared(name, module, key, new_weight, new_bias)

    def _write(self, item: _Prepared) -> None:
        module = item.module
        if item.weight is None and item.bias is None:
            self.restore(module)
            module.network_current_names = item.key
            return
        if self.backup.save(module):
            self.stats["backups"] += 1
        weight = getattr(module, _weight_attr(module))
        bias_name = _bias_attr(module)
        with _no_grad_for(weight):
            weight.copy_(item.weight if item.weight is not None else self.backup.original_weight(module))
            bias = getattr(module, bias_name, None)
            if item.bias is not None:
                if bias is None:
                    setattr(module, bias_name, torch.nn.Parameter(item.bias, requires_grad=False))
                else:
                    bias.copy_(item.bias)
            elif bias is not None:
                original_bias = self.backup.original_bias(module)
                if original_bias is None:
                    setattr(module, bias_name, None)
                else:
                    bias.copy_(original_bias)
        module.network_current_names = item.key
        self._record_written(module)
        self.stats["writes"] += 1

    def _roll_back(self, layers: dict[str, torch.nn.Module], written: list[torch.nn.Module]) -> None:
        for module in list(written) + list(layers.values()):
            try:
                if self.backup.has(module) or self.current_state(module):
                    self.restore(module)
            except Exception as e:  # keep going: every other layer still gets its original back
                logger.error("Lora: could not restore %s: %s", getattr(module, "network_layer_name", module), e)
