"""LoHa (A1111 file name): ΔW = m · s · (W1 ⊙ W2), s = alpha/rank.

W1 = w1_a·w1_b (w1_a: out×r, w1_b: r×in·kh·kw), or with `hada_t1` the Tucker rebuild
W1[p,q,...] = Σ t1[i,j,...]·w1_a[i,p]·w1_b[j,q] (w1_a: r×out, w1_b: r×in); W2 the same with the `2` parts.

Bypass forward: ΔW rebuilt from the factors in each call and applied with the layer's op (as LyCORIS's
loha.bypass_forward_diff does). The Hadamard product of two rank-r matrices has rank up to r², so a factored
forward (x through r² Khatri-Rao columns) costs more than the rebuild for every SD layer at r ≥ 8.
"""
from __future__ import annotations

import lora_bypass
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


def half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """One Hadamard factor: a·b (b flattened past its rows), or the Tucker rebuild with t."""
    if t is not None:
        return lyco_helpers.make_weight_cp(t, a, b)
    return a @ lyco_helpers.flat2d(b)


def diff_weight(w1a, w1b, w2a, w2b, t1, t2, shape, factor: float = 1.0) -> torch.Tensor:
    """factor · W1 ⊙ W2 shaped `shape` (the factor folded into the smallest part; the product written into W1's
    fresh tensor, so a forward's rebuild peaks at two weight-sized tensors, not three)."""
    return half(w1a * factor, w1b, t1).reshape(shape).mul_(half(w2a, w2b, t2).reshape(shape))


class NetworkModuleHada(network.NetworkModule):
    delta_reads_weight = False

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.w1a, self.w1b, self.w2a, self.w2b = (lyco_helpers.factor(w[k]) for k in PARTS)
        self.t1 = lyco_helpers.factor(w.get("hada_t1"))
        self.t2 = lyco_helpers.factor(w.get("hada_t2"))
        self.parts_used |= set(PARTS) | {k for k in ("hada_t1", "hada_t2") if k in w}
        shape1 = _half_shape(self.w1a, self.w1b, self.t1, "w1")
        shape2 = _half_shape(self.w2a, self.w2b, self.t2, "w2")
        if torch.Size(shape1).numel() != torch.Size(shape2).numel():
            raise ValueError(f"the two Hadamard factors rebuild to {shape1} and {shape2}")
        self.output_shape = shape1 if len(shape1) >= len(shape2) else shape2
        self.dim = self.w1b.shape[0]

    def delta_shape(self) -> tuple:
        return self.output_shape

    def _parts(self, device) -> list:
        return [None if t is None else t.to(device, torch.float32)
                for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2)]

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        shape = list(self.output_shape)
        return diff_weight(*self._parts(orig_weight.device), shape), shape, None

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        if torch.Size(self.output_shape).numel() != torch.Size(op.weight_shape).numel():
            return None  # a padded (inpainting conv_in) delta
        branch = lora_bypass.Rebuilt(op, None)
        parts = [branch.hold(t, op) for t in self._parts(self.w1a.device)]
        branch.rebuild = lambda: diff_weight(*parts, self.output_shape, factor)
        return branch

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW = (c·W1) ⊙ W2 (c = m·s) a block of rows at a time, never forming W1 or W2 whole; None where the
        generic compute() is needed (a weight-shaped `bias` part, halves or a weight that do not line up). With DoRA:
        lyco_helpers.DoraRows over it."""
        if self.bias is not None or \
                not lyco_helpers.own_math(self, NetworkModuleHada, "calc_delta", "delta_shape"):
            return None
        weight_shape = torch.Size(weight_shape)
        shape = torch.Size(self.output_shape)
        if len(weight_shape) < 2 or shape[0] != weight_shape[0] or shape.numel() != weight_shape.numel():
            return None
        c = float(self.calc_scale(dyn_dim)) * (1.0 if self.dora_scale is not None else float(multiplier))
        halves = []
        for a, b, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            a, b = a.to(device, torch.float32), lyco_helpers.flat2d(b.to(device, torch.float32))
            halves.append(_Half(a, b, None if t is None else t.to(device, torch.float32)))
            if halves[-1].rows != weight_shape[0]:
                return None
        halves[0] = halves[0].scaled(c)
        return lyco_helpers.dora_rows(self, HadaRows(*halves), weight_shape, multiplier)


class _Half:
    """One Hadamard factor W = a @ b (a: out × r, b: r × cols), or Tucker W[p, q, ...] = Σ t[i, j, ...]·a[i, p]·
    b[j, q] (a: r × out, b: r × in), rebuilt a block of rows at a time."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None):
        self.a, self.b, self.t = a, b, t
        self.rows = a.shape[1] if t is not None else a.shape[0]

    def scaled(self, c: float) -> _Half:
        return _Half(self.a * c, self.b, self.t)  # a is the smallest factor

    def rows_into(self, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        if self.t is None:
            return torch.mm(self.a[r0:r1], self.b, out=out)
        return out.copy_(lyco_helpers.make_weight_cp(self.t, self.a[:, r0:r1], self.b).reshape(out.shape))


class HadaRows(lyco_helpers.RowDelta):
    """LoHa's ΔW = W1 ⊙ W2 (scale and multiplier folded into W1's first factor), two small GEMMs per block."""

    block_temporaries = 2  # W1's and W2's rows

    def __init__(self, w1: _Half, w2: _Half):
        self.w1, self.w2 = w1, w2
        self.nbytes = 4 * w1.a.numel()  # W1's first factor, scaled per job

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        t2 = self.w2.rows_into(scratch.get("hada_w2", torch.float32, out.numel()).view(out.shape), r0, r1)
        if accumulate:
            t1 = self.w1.rows_into(scratch.get("hada_w1", torch.float32, out.numel()).view(out.shape), r0, r1)
            out.addcmul_(t1, t2)
        else:
            self.w1.rows_into(out, r0, r1).mul_(t2)

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        rows, cols = weight.shape
        # two block-sized temporaries next to the weight's rows: a third of the block keeps the bytes in cache about
        # the same as a one-term delta's
        step = max(1, (block_elements // (1 + self.block_temporaries)) // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * cols
            t1 = self.w1.rows_into(scratch.get("hada_w1", torch.float32, n).view(r1 - r0, cols), r0, r1)
            t2 = self.w2.rows_into(scratch.get("hada_w2", torch.float32, n).view(r1 - r0, cols), r0, r1)
            weight[r0:r1].addcmul_(t1, t2)
