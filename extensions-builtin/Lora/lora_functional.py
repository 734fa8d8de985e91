"""Functional (unfused) mode, setting `lora_functional`: the Loras' outputs are added to their layers' outputs by
forward hooks, and no weight is ever written (no copies, no restore; slower sampling).

Per targeted layer, each network is one branch:
    low-rank   plain LoRA / LoCon / Tucker LoCon (`lora_mid`), with `dyn`: y += m·s · up(mid(down(x))), the
               factors kept on the layer's device (a few MB)
    dense      any other type or option (DoRA, LoHa, LoKr, OFT, IA3, a weight-shaped `bias` part, `diff_b`, ...):
               (ΔW, Δb) computed once from the layer's weight with the module's own compute(), then
               y += op(x, ΔW, Δb) with the layer's own op (linear, conv, group/layer norm; all linear in weight
               and bias), so every adapter type gives the merged result
A1111's functional path ignores `lora_mid`, `dyn`, DoRA and bias; this one does not. MultiheadAttention has no
hookable projection: networks.py merges those layers through the patcher, as A1111 does.
"""
from __future__ import annotations

import logging

import lora_delta
import lora_plan
import torch
import torch.nn.functional as F

logger = logging.getLogger("lora")

HOOKABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _lowrank_parts(c: lora_plan.Contribution, layer: torch.nn.Module):
    """(down, mid, up, scale) shaped for the layer's op, or None when the module is not a plain low-rank one."""
    parts = lora_delta.plain_lowrank(c.module, c.dyn_dim)
    if parts is None:
        return None
    up, down, mid, scale = parts
    up2 = up.reshape(up.shape[0], -1)
    if isinstance(layer, torch.nn.Linear):
        if mid is not None or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)):
            return None
        down2 = down.reshape(down.shape[0], -1)
        if up2.shape[1] != down2.shape[0] or up2.shape[0] != layer.out_features or \
                down2.shape[1] != layer.in_features:
            return None
        return down2, None, up2, scale
    if isinstance(layer, torch.nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            return None
        k = tuple(layer.kernel_size)
        down4 = down if down.dim() == 4 else down.reshape(*down.shape, 1, 1)
        if mid is not None:  # Tucker: 1x1 down, k×k core, 1x1 up
            if tuple(down4.shape[2:]) != (1, 1) or mid.dim() != 4 or tuple(mid.shape[2:]) != k:
                return None
            if mid.shape[0] != up2.shape[1] or mid.shape[1] != down4.shape[0]:
                return None
        elif tuple(down4.shape[2:]) != k or up2.shape[1] != down4.shape[0]:
            return None
        if up2.shape[0] != layer.out_channels or down4.shape[1] != layer.in_channels:
            return None
        return down4, mid, up2.reshape(*up2.shape, 1, 1), scale
    return None


class _LowRank:
    def __init__(self, c: lora_plan.Contribution, layer: torch.nn.Module, parts):
        down, mid, up, scale = parts
        weight = layer.weight
        scale *= float(c.multiplier)
        self.down = down.to(weight.device, weight.dtype)
        self.mid = None if mid is None else mid.to(weight.device, weight.dtype)
        self.up = (up.to(weight.device, torch.float32) * scale).to(weight.dtype)
        self.conv = isinstance(layer, torch.nn.Conv2d)
        self.layer_args = (layer.stride, layer.padding, layer.dilation) if self.conv else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.mid, self.up) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, mid, up = self.down, self.mid, self.up
        if down.dtype != x.dtype and x.is_floating_point():
            down, up = down.to(x.dtype), up.to(x.dtype)
            mid = None if mid is None else mid.to(x.dtype)
        if not self.conv:
            return F.linear(F.linear(x, down), up)
        stride, padding, dilation = self.layer_args
        if mid is None:
            h = F.conv2d(x, down, None, stride, padding, dilation)
        else:
            h = F.conv2d(F.conv2d(x, down), mid, None, stride, padding, dilation)
        return F.conv2d(h, up)


class _Dense:
    """Σ (ΔW, Δb) of the layer's other networks, from the module's compute() on the (unwritten) weight."""

    def __init__(self, layer: torch.nn.Module, delta_weight: torch.Tensor | None, delta_bias: torch.Tensor | None):
        weight = layer.weight
        self.layer = layer
        self.weight = (torch.zeros_like(weight) if delta_weight is None else
                       delta_weight.reshape(weight.shape).to(weight.device, weight.dtype))
        self.bias = None if delta_bias is None else delta_bias.reshape(-1).to(weight.device, weight.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype and x.is_floating_point():
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        layer = self.layer
        if isinstance(layer, torch.nn.Linear):
            return F.linear(x, w, b)
        if isinstance(layer, torch.nn.Conv2d):
            return layer._conv_forward(x, w, b)
        if isinstance(layer, torch.nn.GroupNorm):
            return F.group_norm(x, layer.num_groups, w, b, layer.eps)
        return F.layer_norm(x, layer.normalized_shape, w, b, layer.eps)


class _LayerHook:
    def __init__(self, key: tuple, branches: list):
        self.key = key
        self.branches = branches
        self.handle = None

    def __call__(self, layer, args, output):
        x = args[0]
        for branch in self.branches:
            output = output + branch(x)
        return output

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.branches)


def _branches(name: str, layer: torch.nn.Module, contributions: list) -> list:
    branches, dense_w, dense_b = [], None, None
    for c in contributions:
        try:
            parts = _lowrank_parts(c, layer)
            if parts is not None:
                branches.append(_LowRank(c, layer, parts))
            else:
                bias = getattr(layer, "bias", None)
                with torch.no_grad():
                    dw, db = lora_delta.module_compute(c.module, layer.weight.detach(), c.multiplier, c.dyn_dim,
                                                         None if bias is None else bias.detach())
                if dw is not None:
                    dw = dw.float()
                    dense_w = dw if dense_w is None else dense_w + dw
                if db is not None:
                    db = db.float()
                    dense_b = db if dense_b is None else dense_b + db
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            c.network.apply_errors[name] = f"{type(e).__name__}: {e}"
            continue
        c.network.apply_errors.pop(name, None)
    if dense_w is not None or dense_b is not None:
        branches.append(_Dense(layer, dense_w, dense_b))
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
