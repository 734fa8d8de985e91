"""IA3 (A1111 file name): ΔW = m · s · W ⊙ w, the vector w along the output channels (`on_input` false) or the
input channels (`on_input` true), for Linear and conv weights alike. s = `scale` or 1.

A file without `on_input` is read by the vector's length; a square layer then means output channels (LyCORIS's
default, `train_on_input=False`).

Bypass forward: per output channel Δy = f·w ⊙ (y0 − b) (no extra product at all); per input channel
Δy = f·op(x ⊙ w, W) (one more pass of the layer's op, nothing held).
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import torch


class ModuleTypeIa3(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "weight" in weights.w:
            return NetworkModuleIa3(net, weights)
        return None


class Ia3Bypass(lora_bypass.Bypass):
    def __init__(self, op: lora_bypass.LayerOp, vector: torch.Tensor, axis: int, factor: float):
        super().__init__()
        self.op, self.axis, self.factor = op, axis, factor
        self.vector = self.hold(vector.reshape(-1), op)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        op, v = self.op, lora_bypass.cast(self.vector, x) * self.factor
        if self.axis == 1:
            return op(x * op.per_input_channel(v, x), op.weight(x))
        bias = getattr(op.layer, "bias", None)
        z = y0 if bias is None else y0 - op.per_channel(lora_bypass.cast(bias.detach(), y0), y0)
        return z * op.per_channel(v, y0)


class NetworkModuleIa3(network.NetworkModule):
    supports_dora = False

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.w = weights.w["weight"]
        flag = weights.w.get("on_input")
        self.on_input: bool | None = None if flag is None else bool(network._scalar(flag))
        self.parts_used |= {"weight"} | ({"on_input"} if flag is not None else set())

    def axis_for(self, weight_shape: tuple) -> int:
        """0 (output channels) or 1 (input channels) for a weight of this shape."""
        if len(weight_shape) < 2:
            raise ValueError(f"IA3 needs a Linear or conv weight, not shape {tuple(weight_shape)}")
        n = self.w.numel()
        if self.on_input is None:
            axis = 0 if n == weight_shape[0] else 1
        else:
            axis = 1 if self.on_input else 0
        if n != weight_shape[axis]:
            side = "input" if axis == 1 else "output"
            raise ValueError(f"IA3 vector of {n} values does not match the {weight_shape[axis]} {side} channels "
                             f"of a weight of shape {tuple(weight_shape)}")
        return axis

    def validate(self, weight_shape: tuple) -> None:
        self.axis_for(weight_shape)

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        if op.kind not in ("linear", "conv") or op.weight_shape != tuple(op.layer.weight.shape):
            return None
        axis = self.axis_for(op.weight_shape)
        if axis == 1 and op.kind == "conv" and op.layer.groups != 1:
            return None
        return Ia3Bypass(op, self.w.float(), axis, factor)

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW[rows] = c · W0[rows] ⊙ w (c = m·s), w along the rows or the columns of the weight's 2-D view; None
        where the generic compute() is needed (a subclass's own math)."""
        if not lyco_helpers.own_math(self, NetworkModuleIa3, "calc_delta", "delta_shape"):
            return None
        weight_shape = tuple(weight_shape)
        axis = self.axis_for(weight_shape)
        vector = self.w.reshape(-1)
        if axis == 1 and len(weight_shape) > 2:  # an input channel covers its kernel's columns
            vector = vector.repeat_interleave(torch.Size(weight_shape[2:]).numel())
        return Ia3Rows(vector.to(device), axis, float(self.calc_scale(dyn_dim)) * float(multiplier))

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        axis = self.axis_for(tuple(orig_weight.shape))
        shape = [1] * orig_weight.dim()
        shape[axis] = -1
        vector = self.w.to(orig_weight.device, torch.float32).reshape(shape)
        return orig_weight.to(torch.float32) * vector, list(orig_weight.shape), None


class Ia3Rows(lyco_helpers.RowDelta):
    """ΔW = c · W0 ⊙ w, a block of rows at a time from the original's rows (w per row, or per column): one op per
    block, W0·(1 + c·w) in place when the rows still hold their original, else rows + W0 ⊙ (c·w)."""

    reads_original = True

    def __init__(self, vector: torch.Tensor, axis: int, c: float):
        """`vector`: the file's w (any float dtype; c·w and 1 + c·w are made in fp32, each once, when first used)."""
        self.vector, self.axis, self.c = vector, axis, c
        self._scaled: torch.Tensor | None = None
        self._factor: torch.Tensor | None = None
        self.nbytes = 8 * vector.numel()

    @property
    def scaled(self) -> torch.Tensor:
        if self._scaled is None:
            self._scaled = self.vector.to(torch.float32) * self.c
        return self._scaled

    @property
    def factor(self) -> torch.Tensor:
        if self._factor is None:
            self._factor = self.vector.to(torch.float32, copy=True).mul_(self.c).add_(1)  # the same two roundings
        return self._factor

    def _along(self, t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return t[r0:r1, None] if self.axis == 0 else t

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool,
             original: torch.Tensor | None = None) -> None:
        if not accumulate:
            torch.mul(original, self._along(self.scaled, r0, r1), out=out)
        elif original.data_ptr() == out.data_ptr():
            out.mul_(self._along(self.factor, r0, r1))
        else:
            out.addcmul_(original, self._along(self.scaled, r0, r1))

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        weight.mul_(self._along(self.factor, 0, weight.shape[0]))  # one pass over the layer
