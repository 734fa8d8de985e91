"""Functional (unfused) mode, setting `lora_functional`: the Loras' outputs are added to their layers' outputs by
forward hooks, and no weight is ever written (no copies, no restore; slower sampling).

Per targeted layer, each network is one branch, its type's own bypass forward (NetworkModule.bypass, the math in
network_*.py): y = y0 + Σ Δy_n(x, y0), y0 the layer's own output. Branches hold the networks' factors (the
network's own tensors on the layer's device, else one copy there) and a few small tensors derived from the weight
(GLoRA's W·a, a DoRA scale per channel); nothing weight-sized:
    LoRA / LoCon / Tucker, LoKr      products through the factors (LoKr by the Kronecker identity)
    OFT / BOFT, IA3 (output side)    the layer's output rotated / scaled per channel
    GLoRA, DoRA, IA3 (input side)    factor chains, a per-channel scale, one more pass of the layer's op
    LoHa, full, norm, other types    ΔW formed in each call and dropped (LoHa's Hadamard product has rank r²)
A1111's functional path ignores `lora_mid`, `dyn`, DoRA and bias; this one does not. MultiheadAttention has no
hookable projection: networks.py merges those layers through the patcher, as A1111 does.
"""
from __future__ import annotations

import logging

import lora_bypass
import lora_plan
import torch

logger = logging.getLogger("lora")

HOOKABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


class _LayerHook:
    def __init__(self, key: tuple, branches: list):
        self.key = key
        self.branches = branches
        self.handle = None

    def __call__(self, layer, args, output):
        x, y0 = args[0], output
        for branch in self.branches:
            output = output + branch(x, y0)
        return output

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.branches)


def branch_for(c: lora_plan.Contribution, layer: torch.nn.Module) -> lora_bypass.Bypass:
    """The contribution's bypass forward on `layer` (a module of no NetworkModule kind: its compute() per call)."""
    bypass = getattr(c.module, "bypass", None)
    if callable(bypass):
        return bypass(layer, c.multiplier, c.dyn_dim)
    return lora_bypass.ComputedBypass(c.module, lora_bypass.LayerOp(layer), c.multiplier, c.dyn_dim)


def _branches(name: str, layer: torch.nn.Module, contributions: list) -> list:
    branches = []
    for c in contributions:
        try:
            with torch.no_grad():
                branches.append(branch_for(c, layer))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            c.network.apply_errors[name] = f"{type(e).__name__}: {e}"
            continue
        c.network.apply_errors.pop(name, None)
    return branches


class FunctionalHooks:
    """Keeps each hookable layer's forward hook in step with the plan."""

    attr = "network_functional"

    @staticmethod
    def hookable(layer: torch.nn.Module) -> bool:
        return isinstance(layer, HOOKABLE) and getattr(layer, "weight", None) is not None

    def current(self, layer: torch.nn.Module) -> _LayerHook | None:
        return getattr(layer, self.attr, None)

    def sync(self, layers: dict[str, torch.nn.Module], plan: dict[str, list[lora_plan.Contribution]]) -> int:
        """Installs, replaces or removes hooks so each layer adds what `plan` wants; returns layers changed."""
        changed = 0
        for name, layer in layers.items():
            contributions = plan.get(name, []) if self.hookable(layer) else []
            key = lora_plan.state_key(contributions)
            hook = self.current(layer)
            if (hook.key if hook is not None else ()) == key:
                continue
            self.remove(layer)
            if contributions:
                branches = _branches(name, layer, contributions)
                new = _LayerHook(key, branches)
                if branches:
                    new.handle = layer.register_forward_hook(new)
                setattr(layer, self.attr, new)
            changed += 1
        return changed

    def remove(self, layer: torch.nn.Module) -> None:
        hook = self.current(layer)
        if hook is not None and hook.handle is not None:
            hook.handle.remove()
        if hook is not None:
            setattr(layer, self.attr, None)

    def clear(self, layers: dict[str, torch.nn.Module]) -> int:
        n = 0
        for layer in layers.values():
            if self.current(layer) is not None:
                self.remove(layer)
                n += 1
        return n

    def held_bytes(self, layers: dict[str, torch.nn.Module]) -> int:
        return sum(h.nbytes for layer in layers.values() if (h := self.current(layer)) is not None)
