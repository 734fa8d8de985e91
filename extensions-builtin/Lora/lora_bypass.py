"""What the network types build their bypass forwards from (functional mode): the targeted layer's own op
(LayerOp) and the branch protocol (Bypass).

A branch gives one network's change of one layer's output, Δy = f(x, y0), where y0 is the layer's own output
(original weights, the other networks' branches not added) — without forming ΔW where the type can. The math of
each type lives in its network_*.py; this module holds the layer's op, the plumbing every type shares, the two
wrappers any type gets: ComputedBypass (ΔW from compute() per call, for what a type's own forward does not cover)
and DoraBypass (DoRA's per-channel scale around a type's forward), and `assemble`, which puts them and the shared
parts (A1111's `bias` part, Δbias) around a type's forward.
Branches keep the network's own tensors where they already are on the layer's device (fp32 factors, cast per call
to the input's dtype: a few KB each); on another device they hold one copy there, which `nbytes` counts.
"""
from __future__ import annotations

import inspect

import lyco_helpers
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


def module_compute(module, original: torch.Tensor, multiplier: float, dyn_dim: int | None,
                   orig_bias: torch.Tensor | None):
    """module.compute(), with the layer's original bias for the types that read it (OFT; an A1111-era subclass may
    not take it)."""
    kind = type(module)
    if kind not in _takes_orig_bias:
        try:
            _takes_orig_bias[kind] = "orig_bias" in inspect.signature(module.compute).parameters
        except (TypeError, ValueError):
            _takes_orig_bias[kind] = False
    if _takes_orig_bias[kind]:
        return module.compute(original, multiplier, dyn_dim, orig_bias=orig_bias)
    return module.compute(original, multiplier, dyn_dim)


_takes_orig_bias: dict[type, bool] = {}


class ComputedBypass(Bypass):
    """Δy = op(x, ΔW, Δb) with (ΔW, Δb) from the module's compute() in each call, dropped after it (holds nothing):
    for a subclass that changes its type's math and for layers a type's own forward does not cover (an inpainting
    conv_in's padded delta, a grouped conv). The same as A1111's functional path."""

    def __init__(self, module, op: LayerOp, multiplier: float, dyn_dim: int | None):
        super().__init__()
        self.module, self.op, self.multiplier, self.dyn_dim = module, op, float(multiplier), dyn_dim

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        bias = getattr(self.op.layer, "bias", None)
        dw, db = module_compute(self.module, self.op.weight(x), self.multiplier, self.dyn_dim,
                                None if bias is None else bias.detach())
        return self.op(x, cast(dw, x), cast(None if db is None else db.reshape(-1), x))


class DoraBypass(Bypass):
    """DoRA around a type's forward: W' = c ⊙ V with V = W + s·U and c = M/‖V‖ per channel (computed once from
    the weight; only c is kept). Per output channel Δy = m·((c − 1)·(y0 − b) + c·core(x)); per input channel
    Δy = m·(op(x·(c − 1), W) + core(x·c))."""

    def __init__(self, module, op: LayerOp, core: Bypass, scale: float,
                 multiplier: float, dyn_dim: int | None):
        super().__init__()
        weight = op.layer.weight.detach().float()
        updown, shape, _ = module.calc_delta(weight, dyn_dim, 1.0, None)
        merged = weight + module.shaped_delta(updown, weight, shape) * scale
        self.axis = lyco_helpers.dora_axis(module.dora_scale.shape, weight.shape, module.dora_square_default)
        magnitude = module.dora_scale.to(weight.device, torch.float32)
        self.c = self.keep(lyco_helpers.dora_channel_scale(merged, magnitude, self.axis).reshape(-1))
        self.op, self.core, self.m = op, core, float(multiplier)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.core.nbytes

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        op, c = self.op, cast(self.c, x)
        if self.axis == lyco_helpers.DORA_OUTPUT_AXIS:
            bias = getattr(op.layer, "bias", None)
            z = y0 if bias is None else y0 - op.per_channel(cast(bias.detach(), y0), y0)
            cy = op.per_channel(c, y0)
            return self.m * ((cy - 1) * z + cy * self.core(x, y0))
        cx = op.per_input_channel(c, x)
        return self.m * (op(x * (cx - 1), op.weight(x)) + self.core(x * cx, y0))


def assemble(module, op: LayerOp, multiplier: float, dyn_dim: int | None) -> Bypass:
    """A type's own forward (`module.bypass_weight`) at strength `multiplier`, with what every type shares put
    around it: A1111's weight-shaped `bias` part, DoRA's scale, the type's own Δbias. Falls back to ComputedBypass
    where the type has no forward for this layer. NetworkModule.bypass_on calls this for a type with its own math."""
    if module.applies_multiplier:
        return module.bypass_weight(op, float(multiplier), dyn_dim) or ComputedBypass(module, op, multiplier, dyn_dim)
    m, scale = float(multiplier), float(module.calc_scale(dyn_dim))
    factor = scale if module.dora_scale is not None else scale * m  # DoraBypass applies m after its scale
    core = module.bypass_weight(op, factor, dyn_dim)
    if core is None:
        return ComputedBypass(module, op, multiplier, dyn_dim)
    if module.bias is not None:
        if module.bias.numel() != torch.Size(op.weight_shape).numel():
            return ComputedBypass(module, op, multiplier, dyn_dim)
        part = module.bias
        core = Sum([core, Rebuilt(op, lambda: part.to(op.device, torch.float32) * factor)])
    if module.dora_scale is not None:
        core = DoraBypass(module, op, core, scale, m, dyn_dim)
    ex_bias = module.extra_bias()
    if ex_bias is not None:
        core = Sum([core, ChannelShift(op, ex_bias.float() * m)])
    return core
