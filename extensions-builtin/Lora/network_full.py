"""Full (A1111 file name): ΔW = m · s · diff, Δbias = m · diff_b; s = `scale` or 1.

Bypass forward: op(x, m·s·diff) with the file's own diff (it is ΔW; nothing cheaper exists, nothing is copied
on the layer's device)."""
from __future__ import annotations

import lora_bypass
import lyco_helpers
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

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW = c·diff (c = m·s) a block of rows at a time, cast from the file's dtype in cache; None where the
        generic compute() is needed (a delta that must be padded, a subclass's own math). With DoRA:
        lyco_helpers.DoraRows over it."""
        weight_shape = torch.Size(weight_shape)
        if self.weight.shape[0] != weight_shape[0] or \
                self.weight.numel() != weight_shape.numel() or \
                not lyco_helpers.own_math(self, NetworkModuleFull, "calc_delta", "delta_shape"):
            return None
        m = 1.0 if self.dora_scale is not None else float(multiplier)  # DoRA takes m after its norms
        bias = None if self.ex_bias is None else self.ex_bias.to(device, torch.float32).reshape(-1) * m
        rows = DiffRows(lyco_helpers.flat2d(self.weight.to(device)), float(self.calc_scale(dyn_dim)) * m, bias)
        return lyco_helpers.dora_rows(self, rows, weight_shape, multiplier)

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        ex_bias = None if self.ex_bias is None else self.ex_bias.to(device, torch.float32).reshape(-1)
        return self.weight.to(device, torch.float32), list(self.weight.shape), ex_bias


class DiffRows(lyco_helpers.RowDelta):
    """ΔW = c · diff (diff in the file's dtype, rows × cols): each block's rows cast and scaled into the merge."""

    block_temporaries = 1  # the block's rows of diff, cast to fp32

    def __init__(self, diff: torch.Tensor, c: float, bias: torch.Tensor | None):
        self.diff, self.c, self.bias = diff, c, bias

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        d = self.diff[r0:r1]
        if not accumulate:
            out.copy_(d)
            if self.c != 1:
                out.mul_(self.c)
            return
        if d.dtype != torch.float32 or self.c != 1:  # cast and scale in a cache-sized temporary, then one add
            d = scratch.get("diff", torch.float32, out.numel()).view(out.shape).copy_(d)
            if self.c != 1:
                d.mul_(self.c)
        out.add_(d)
