"""What a layer holds, kept on the module (A1111 style, so it goes away with the model), and the plan diff.

    network_current_names   the state key the layer holds (() = original)
    network_backup          its RestoreRecord while the layer is patched (None = it holds its original)
    network_written         (weight id, version, bias id, version) after our last write, to notice writes made
                            by someone else (e.g. new checkpoint weights loaded in place): those become the original
    network_source_checked  (source, param, weight version) when the host's source was last seen to hold the layer
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import lora_fp8
import lora_plan
import lora_residual
import torch

logger = logging.getLogger("lora")


def weight_attr(module: torch.nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, torch.nn.MultiheadAttention) else "weight"


def bias_attr(module: torch.nn.Module) -> str:
    return "in_proj_bias" if isinstance(module, torch.nn.MultiheadAttention) else "bias"


def weight_of(module: torch.nn.Module) -> torch.Tensor | None:
    """The layer's weight; a registered parameter is taken from `_parameters` directly (nn.Module.__getattr__ is on
    every layer's path of every job, several times)."""
    name = weight_attr(module)
    param = module.__dict__.get("_parameters", {}).get(name)
    return param if param is not None else getattr(module, name, None)


def bias_of(module: torch.nn.Module) -> torch.Tensor | None:
    name = bias_attr(module)
    params = module.__dict__.get("_parameters", {})
    if name in params:
        return params[name]
    return getattr(module, name, None)


def _put(module: torch.nn.Module, name: str, value) -> None:
    """Sets one of our bookkeeping attributes (plain values: for them nn.Module.__setattr__ ends in the instance
    dict too, after checks that cost more than the rest of a small layer's bookkeeping)."""
    module.__dict__[name] = value


def _get(module: torch.nn.Module, name: str, default=None):
    return module.__dict__.get(name, default)


def no_grad_for(t: torch.Tensor):
    return torch.inference_mode() if t.is_inference() else torch.no_grad()


def version(t: torch.Tensor | None):
    if t is None:
        return None
    try:
        return id(t), t._version
    except RuntimeError:  # inference tensors have no version counter
        return id(t), None


@dataclass
class BiasBackup:
    had_bias: bool
    original: torch.Tensor | None  # a clone of the original bias (biases are tiny next to weights)


@dataclass
class RestoreRecord:
    """How a patched layer gets its original back (module.network_backup); `how` names its lora_restore_methods
    method."""

    how: str | None  # SOURCE, RESIDUAL, CLONE; None when only the bias was written
    contributions: tuple  # the contributions the layer holds (residual recomputes their delta)
    source: object | None = None  # lora_weight_source.OriginalWeights
    param: tuple[str, str] | None = None  # (component, param name) in the source
    residual: lora_residual.Residual | None = None
    device: torch.device | None = None  # where the residual's delta was computed
    clone: torch.Tensor | None = None
    safety_copy: torch.Tensor | None = None  # residual records on unproven devices (lora_restore_guard)
    bias: BiasBackup | None = None
    dtype: torch.dtype | None = None  # the weight's dtype when the record was made
    fp8: lora_fp8.Fp8State | None = None  # how an fp8 weight was written (upcast / stochastic; lora_fp8)

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


def current_state(module: torch.nn.Module) -> tuple:
    return _get(module, "network_current_names", ())


def set_state(module: torch.nn.Module, key: tuple) -> None:
    _put(module, "network_current_names", key)


def record(module: torch.nn.Module) -> RestoreRecord | None:
    rec = _get(module, "network_backup")
    return rec if isinstance(rec, RestoreRecord) else None


def set_record(module: torch.nn.Module, rec: RestoreRecord | None) -> None:
    _put(module, "network_backup", rec)


def forget(module: torch.nn.Module) -> None:
    """Drops the layer's bookkeeping without touching its weights (they are the new original)."""
    _put(module, "network_backup", None)
    _put(module, "network_current_names", ())
    _put(module, "network_written", None)


def _versions(module: torch.nn.Module) -> tuple:
    return version(weight_of(module)), version(bias_of(module))


def record_written(module: torch.nn.Module) -> None:
    _put(module, "network_written", _versions(module))


def changed_outside(module: torch.nn.Module) -> bool:
    """Whether someone else wrote the layer's weight or bias since our last write."""
    if not current_state(module) or record(module) is None:
        return False
    written = _get(module, "network_written")
    return written is not None and written != _versions(module)


def note_source_checked(module: torch.nn.Module, source, param) -> None:
    """The layer holds exactly what `source` has for `param` (checked, or just restored from it)."""
    _put(module, "network_source_checked", (source, param, version(weight_of(module))))


def source_still_checked(module: torch.nn.Module, source, param, original: torch.Tensor) -> bool:
    """The layer's weight is the same tensor at the same version as when the source was last seen to hold it."""
    weight = weight_of(module)
    now = version(weight)
    checked = _get(module, "network_source_checked")
    return checked is not None and checked[0] is source and checked[1] == param and now[1] is not None and \
        checked[2] == now and original.data_ptr() == weight.data_ptr()


def changes(layers: dict[str, torch.nn.Module], plan: dict[str, list[lora_plan.Contribution]], stats: Counter,
            also: Callable[[torch.nn.Module], bool] | None = None) -> list[tuple]:
    """The plan diff: [(name, module, contributions, state key)] for each layer whose wanted state differs from
    the one it holds (or for which `also` says so). A layer written by someone else keeps those weights as its
    new original."""
    todo = []
    for name, module in layers.items():
        if changed_outside(module):
            logger.warning("Lora: weights of %s were changed outside the Lora patcher; they are kept as the new "
                           "original", name)
            stats["foreign_changes"] += 1
            forget(module)
        contributions = plan.get(name, [])
        key = lora_plan.state_key(contributions)
        if current_state(module) != key or (also is not None and also(module)):
            todo.append((name, module, contributions, key))
    return todo
