"""Full (A1111 file name): ΔW = m · s · diff, Δbias = m · diff_b; s = `scale` or 1.

Bypass forward: op(x, m·s·diff) with the file's own diff (it is ΔW; nothing cheaper exists, nothing is copied
on the layer's device)."""
from __future__ import annotations

import lora_bypass
import network
import torch


class ModuleTypeFull(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "diff" in weights.w:
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    delta_reads_weight = False

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

    def extra_bias(self) -> torch.Tensor | None:
        return self.ex_bias

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        if self.weight.numel() != torch.Size(op.weight_shape).numel():
            return None  # a padded (inpainting conv_in) delta
        branch = lora_bypass.Rebuilt(op, None)
        diff = branch.hold(self.weight, op)
        branch.rebuild = lambda: diff * factor if factor != 1 else diff
        return branch

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        ex_bias = None if self.ex_bias is None else self.ex_bias.to(device, torch.float32).reshape(-1)
        return self.weight.to(device, torch.float32), list(self.weight.shape), ex_bias
