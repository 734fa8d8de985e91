"""Norm (A1111 file name): LayerNorm/GroupNorm affine parameters, Δweight = m · s · w_norm, Δbias = m · b_norm.

Bypass forward: the layer's norm with (m·s·w_norm, m·b_norm) as its affine parameters (the normalised input times
the weight change plus the bias change)."""
from __future__ import annotations

import lora_bypass
import network
import torch


class ModuleTypeNorm(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "w_norm" in weights.w:
            return NetworkModuleNorm(net, weights)
        return None


class NetworkModuleNorm(network.NetworkModule):
    delta_reads_weight = False
    supports_dora = False

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.w_norm = weights.w["w_norm"]
        self.b_norm = weights.w.get("b_norm")
        self.parts_used |= {"w_norm"} | ({"b_norm"} if self.b_norm is not None else set())

    def delta_shape(self) -> tuple:
        return tuple(self.w_norm.shape)

    def validate(self, weight_shape: tuple) -> None:
        if self.w_norm.numel() != torch.Size(weight_shape).numel():
            raise ValueError(f"w_norm of shape {tuple(self.w_norm.shape)} does not match the layer's weight of "
                             f"shape {tuple(weight_shape)}")
        if self.b_norm is not None and self.b_norm.numel() != self.w_norm.numel():
            raise ValueError(f"b_norm of shape {tuple(self.b_norm.shape)} does not match w_norm "
                             f"{tuple(self.w_norm.shape)}")

    def extra_bias(self) -> torch.Tensor | None:
        return self.b_norm

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        branch = lora_bypass.Rebuilt(op, None)
        w_norm = branch.hold(self.w_norm, op)
        branch.rebuild = lambda: w_norm * factor
        return branch

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        ex_bias = None if self.b_norm is None else self.b_norm.to(device, torch.float32).reshape(-1)
        return self.w_norm.to(device, torch.float32), list(self.w_norm.shape), ex_bias
