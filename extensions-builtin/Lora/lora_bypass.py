"""What the network types build their bypass forwards from (functional mode): the targeted layer's own op
(LayerOp) and the branch protocol (Bypass).

A branch gives one network's change of one layer's output, Δy = f(x, y0), where y0 is the layer's own output
(original weights, the other networks' branches not added) — without forming ΔW where the type can. The math of
each type lives in its network_*.py; this module holds only the layer's op and the plumbing every type shares.
Branches keep the network's own tensors where they already are on the layer's device (fp32 factors, cast per call
to the input's dtype: a few KB each); on another device they hold one copy there, which `nbytes` counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerOp:
    """The layer's own op with other parameters: Linear, Conv2d (stride, padding, padding mode, dilation),
    GroupNorm, LayerNorm. `chainable`: whether a factor chain (down k×k, then 1×1 up) computes its ΔW's op, which
    holds for Linear and for ungrouped Conv2d."""

    def __init__(self, layer: torch.nn.Module, weight_shape: tuple | None = None):
        """`weight_shape`: the shape the weights given to this op have, when not the layer's own (a file layer
        that spans several loaded layers, network_rows)."""
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"a {type(layer).__name__} without a weight has no bypass forward")
        if isinstance(layer, torch.nn.Linear):
            self.kind = "linear"
        elif isinstance(layer, torch.nn.Conv2d):
            self.kind = "conv"
        elif isinstance(layer, torch.nn.GroupNorm):
            self.kind = "group_norm"
        elif isinstance(layer, torch.nn.LayerNorm):
            self.kind = "layer_norm"
        else:
            raise TypeError(f"no bypass forward for a {type(layer).__name__}")
        self.layer = layer
        self.weight_shape = tuple(weight.shape) if weight_shape is None else tuple(weight_shape)
        self.device = weight.device
        self.compute_dtype = _compute_dtype(layer, weight)
        self.chainable = self.kind == "linear" or (self.kind == "conv" and layer.groups == 1)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """The layer's (unwritten) weight in `like`'s dtype: the tensor itself when it already is (fp8 or another
        storage dtype is upcast for this call only)."""
        w = self.layer.weight.detach()
        return w if w.dtype == like.dtype else w.to(like.dtype)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's op with weight `w` (any shape with the weight's element count) and bias `b`."""
        layer = self.layer
        w = w.reshape(self.weight_shape)
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.kind == "conv":
            return layer._conv_forward(x, w, b)
        if self.kind == "group_norm":
            return F.group_norm(x, layer.num_groups, w, b, layer.eps)
        return F.layer_norm(x, layer.normalized_shape, w, b, layer.eps)

    def first(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The first op of a factor chain: `w` (r, in[, kh, kw]) applied with the layer's kernel geometry (conv:
        its stride, padding, padding mode and dilation). Only for `chainable` ops."""
        if self.kind == "linear":
            return F.linear(x, w.reshape(w.shape[0], -1))
        if w.dim() == 2:
            w = w.reshape(*w.shape, 1, 1)
        layer = self.layer
        if layer.padding_mode != "zeros":
            return F.conv2d(F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), w, None,
                            layer.stride, 0, layer.dilation)
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation)

    def pointwise(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A channel mix (1×1 for convs, no padding) by `w` (rows out, columns in)."""
        w = w.reshape(w.shape[0], -1)
        if self.kind == "linear":
            return F.linear(x, w)
        return F.conv2d(x, w.reshape(*w.shape, 1, 1))

    def channel_axis(self, y: torch.Tensor) -> int:
        return y.dim() - 1 if self.kind == "linear" else 1

    def per_channel(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A vector over the output channels (LayerNorm: over its normalized shape) shaped to broadcast over y."""
        if self.kind == "layer_norm":
            return v.reshape(self.layer.normalized_shape)
        axis = self.channel_axis(y)
        return v.reshape(-1, *([1] * (y.dim() - axis - 1)))

    def per_input_channel(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A vector over the input channels of a Linear/Conv2d shaped to broadcast over its input x."""
        return self.per_channel(v, x)

    def on_channels(self, y: torch.Tensor, fn) -> torch.Tensor:
        """fn applied to y as a (channels, everything else) matrix, the result put back in y's layout: the same
        row functions that act on a weight's output rows act on the output's channels."""
        axis = self.channel_axis(y)
        moved = y.movedim(axis, 0)
        out = fn(moved.reshape(moved.shape[0], -1))
        return out.reshape(moved.shape).movedim(0, axis)


def _compute_dtype(layer: torch.nn.Module, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: its weight's, or for a weight stored in fp8 its bias's (fp32 without)."""
    if weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return weight.dtype
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return bias.dtype
    return torch.float32


def cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A held tensor in the dtype and on the device of this call's input (no copy when it already is)."""
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(like.device, like.dtype)


class Bypass:
    """One network's output change on one layer: `branch(x, y0)` → Δy. `nbytes`: what the branch holds that the
    network does not (device copies of its factors, factors derived from the layer's weight)."""

    def __init__(self):
        self._held: list[torch.Tensor] = []

    def hold(self, t: torch.Tensor | None, op: LayerOp) -> torch.Tensor | None:
        """`t` for use on the layer's device: itself when it is there already, else one copy there (counted), in
        the layer's compute dtype (the accelerator case: factors there take the model's dtype, not fp32)."""
        if t is None or t.device == op.device:
            return t
        t = t.to(op.device, op.compute_dtype if t.is_floating_point() else t.dtype)
        self._held.append(t)
        return t

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor this branch made (derived from the weight, a per-channel factor): counted."""
        self._held.append(t)
        return t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._held)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Sum(Bypass):
    """Several branches of one network on one layer (its weight part, an A1111 `bias` part, a bias delta)."""

    def __init__(self, parts: list[Bypass]):
        super().__init__()
        self.parts = parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](x, y0)
        for p in self.parts[1:]:
            out = out + p(x, y0)
        return out


class Rebuilt(Bypass):
    """Δy = op(x, ΔW) with ΔW rebuilt from the factors in each call and dropped after it (holds nothing): for the
    types whose structure gives no cheaper forward (LoHa's Hadamard product has rank r², a full `diff` is ΔW)."""

    def __init__(self, op: LayerOp, rebuild, bias: torch.Tensor | None = None):
        super().__init__()
        self.op, self.rebuild, self.bias = op, rebuild, bias

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return self.op(x, cast(self.rebuild(), x), cast(self.bias, x))


class ChannelShift(Bypass):
    """Δy = a constant per output channel (a bias delta), shaped to broadcast over the output."""

    def __init__(self, op: LayerOp, bias: torch.Tensor):
        super().__init__()
        self.op = op
        self.bias = self.hold(bias.reshape(-1), op)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        return self.op.per_channel(cast(self.bias, x), x)
