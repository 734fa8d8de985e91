"""Full (A1111 file name): ΔW = m · s · diff, Δbias = m · diff_b; s = `scale` or 1."""
from __future__ import annotations

import network
import torch


class ModuleTypeFull(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "diff" in weights.w:
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    delta_depends_on_weight = False  # without DoRA (the patcher checks that): ΔW reads only W's shape
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.weight = weights.w["diff"]
        self.ex_bias = weights.w.get("diff_b")
        self.parts_used |= {"diff"} | ({"diff_b"} if self.ex_bias is not None else set())

    def delta_shape(self) -> tuple:
        return tuple(self.weight.shape)

    def validate(self, weight_shape: tuple) -> None:
        super().validate(weight_shape)
        if self.ex_bias is not None and self.ex_bias.numel() != weight_shape[0]:
            raise ValueError(f"diff_b of shape {tuple(self.ex_bias.shape)} does not match the layer's "
                             f"{weight_shape[0]} output channels")

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        ex_bias = None if self.ex_bias is None else self.ex_bias.to(device, torch.float32).reshape(-1)
        return self.weight.to(device, torch.float32), list(self.weight.shape), ex_bias
