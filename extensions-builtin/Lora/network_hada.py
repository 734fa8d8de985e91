"""LoHa (A1111 file name): ΔW = m · s · (W1 ⊙ W2), s = alpha/rank.

W1 = w1_a·w1_b (w1_a: out×r, w1_b: r×in·kh·kw), or with `hada_t1` the Tucker rebuild
W1[p,q,...] = Σ t1[i,j,...]·w1_a[i,p]·w1_b[j,q] (w1_a: r×out, w1_b: r×in); W2 the same with the `2` parts.
"""
from __future__ import annotations

import lyco_helpers
import network
import torch

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class ModuleTypeHada(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(k in weights.w for k in PARTS):
            return NetworkModuleHada(net, weights)
        return None


def _half_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, name: str) -> tuple:
    """The shape one Hadamard factor rebuilds to, checking its parts agree."""
    if t is not None:
        if t.dim() < 2 or a.dim() != 2 or b.dim() != 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
            raise ValueError(f"hada_{name}: t {tuple(t.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)} do not fit "
                             "a Tucker rebuild (t: r×r×..., a: r×out, b: r×in)")
        return (a.shape[1], b.shape[1], *t.shape[2:])
    if a.dim() != 2 or b.dim() not in (2, 4) or a.shape[1] != b.shape[0]:
        raise ValueError(f"hada_{name}_a {tuple(a.shape)} and hada_{name}_b {tuple(b.shape)} do not multiply")
    return (a.shape[0], *b.shape[1:])


class NetworkModuleHada(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.w1a, self.w1b, self.w2a, self.w2b = (w[k] for k in PARTS)
        self.t1 = w.get("hada_t1")
        self.t2 = w.get("hada_t2")
        self.parts_used |= set(PARTS) | {k for k in ("hada_t1", "hada_t2") if k in w}
        shape1 = _half_shape(self.w1a, self.w1b, self.t1, "w1")
        shape2 = _half_shape(self.w2a, self.w2b, self.t2, "w2")
        if torch.Size(shape1).numel() != torch.Size(shape2).numel():
            raise ValueError(f"the two Hadamard factors rebuild to {shape1} and {shape2}")
        self.output_shape = shape1 if len(shape1) >= len(shape2) else shape2
        self.dim = self.w1b.shape[0]

    def delta_shape(self) -> tuple:
        return self.output_shape

    @staticmethod
    def _rebuild(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, device) -> torch.Tensor:
        a, b = a.to(device, torch.float32), b.to(device, torch.float32)
        if t is not None:
            return lyco_helpers.make_weight_cp(t.to(device, torch.float32), a, b)
        return a @ lyco_helpers.flat2d(b)

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        w1 = self._rebuild(self.w1a, self.w1b, self.t1, device)
        w2 = self._rebuild(self.w2a, self.w2b, self.t2, device)
        shape = list(self.output_shape)
        return w1.reshape(shape) * w2.reshape(shape), shape, None
