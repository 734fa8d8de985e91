"""IA3 (A1111 file name): ΔW = m · s · W ⊙ w, the vector w along the output channels (`on_input` false) or the
input channels (`on_input` true), for Linear and conv weights alike. s = `scale` or 1.

A file without `on_input` is read by the vector's length; a square layer then means output channels (LyCORIS's
default, `train_on_input=False`).
"""
from __future__ import annotations

import network
import torch


class ModuleTypeIa3(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "weight" in weights.w:
            return NetworkModuleIa3(net, weights)
        return None


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

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        axis = self.axis_for(tuple(orig_weight.shape))
        shape = [1] * orig_weight.dim()
        shape[axis] = -1
        vector = self.w.to(orig_weight.device, torch.float32).reshape(shape)
        return orig_weight.to(torch.float32) * vector, list(orig_weight.shape), None
