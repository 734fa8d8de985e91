"""LoKr (A1111 file name): ΔW = m · s · kron(W1, W2).

W1 = lokr_w1 or lokr_w1_a·lokr_w1_b; W2 = lokr_w2, lokr_w2_a·lokr_w2_b (w2_b may carry the conv kernel, flat
or 4-D), or with `lokr_t2` the Tucker rebuild W2[p,q,...] = Σ t2[i,j,...]·w2_a[i,p]·w2_b[j,q].
s = alpha/rank when a half is low-rank (rank = w2_b rows, else w1_b rows), else 1 (alpha unused), as LyCORIS.

Bypass forward by the Kronecker identity, never forming ΔW: kron(W1, W2)·vec(X) = vec(W1·X·W2ᵀ) with the
input's channels read as X (b × d): Linear X @ W2ᵀ, then W1 over the b groups; Conv2d the b groups of d channels
through W2 as a conv (the layer's stride/padding), then W1 across the groups (as LyCORIS's lokr bypass).
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import torch


class ModuleTypeLokr(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        w = weights.w
        has_1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
        has_2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
        if has_1 and has_2:
            return NetworkModuleLokr(net, weights)
        return None


def _half(w: dict, n: str) -> tuple:
    full = lyco_helpers.factor(w.get(f"lokr_w{n}"))
    if full is not None:
        return full, None, None, {f"lokr_w{n}"}
    return None, lyco_helpers.factor(w[f"lokr_w{n}_a"]), lyco_helpers.factor(w[f"lokr_w{n}_b"]), \
        {f"lokr_w{n}_a", f"lokr_w{n}_b"}


def rebuild_half(full, a, b, t) -> torch.Tensor:
    """One Kronecker factor: the full matrix, a·b (b may carry the conv kernel, flat or 4-D), or Tucker with t."""
    if full is not None:
        return full
    if t is not None:
        return lyco_helpers.make_weight_cp(t, a, b)
    return (a @ lyco_helpers.flat2d(b)).reshape(a.shape[0], *b.shape[1:])


def diff_weight(w1: torch.Tensor, w2: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """factor · kron(W1, W2) (a 2-D W1 with a conv W2: the kernel comes from W2)."""
    return lyco_helpers.make_kron(w1 * factor, w2)


def forward_diff(x: torch.Tensor, op: lora_bypass.LayerOp, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(W1, W2) applied to x (W1: a × b, W2: c × d[ × kh × kw], x's channels b·d): never forms ΔW."""
    a, b = w1.shape
    if op.kind == "linear":
        h = x.unflatten(-1, (b, -1)) @ lyco_helpers.flat2d(w2).T  # (..., b, c)
        return (w1 @ h).flatten(-2)  # (..., a, c) → a·c channels
    n = x.shape[0]
    h = op.first(x.reshape(n * b, -1, *x.shape[2:]), w2)  # (n·b, c, H', W'): W2 with the layer's geometry
    h = h.reshape(n, b, *h.shape[1:])
    return torch.einsum("i j, n j c ... -> n i c ...", w1, h).flatten(1, 2)


class KronBypass(lora_bypass.Bypass):
    """The factors held as they are; W1 (a × b) and W2 (c × d·kernel) rebuilt in each call (both are small)."""

    def __init__(self, op: lora_bypass.LayerOp, module, factor: float, w2_shape: tuple):
        super().__init__()
        self.op, self.factor, self.w2_shape = op, factor, w2_shape
        self.parts = [self.hold(t, op) for t in module.factors()]

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        w1f, w1a, w1b, w2f, w2a, w2b, t2 = (lora_bypass.cast(t, x) for t in self.parts)
        w1 = rebuild_half(w1f, w1a, w1b, None) * self.factor
        return forward_diff(x, self.op, w1, rebuild_half(w2f, w2a, w2b, t2).reshape(self.w2_shape))


class NetworkModuleLokr(network.NetworkModule):
    delta_reads_weight = False

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.w1, self.w1a, self.w1b, used1 = _half(w, "1")
        self.w2, self.w2a, self.w2b, used2 = _half(w, "2")
        self.t2 = lyco_helpers.factor(w.get("lokr_t2")) if self.w2 is None else None
        self.parts_used |= used1 | used2 | ({"lokr_t2"} if self.t2 is not None else set())
        self.shape1 = self._check_half("w1", self.w1, self.w1a, self.w1b, None)
        self.shape2 = self._check_half("w2", self.w2, self.w2a, self.w2b, self.t2)
        if self.w2b is not None:
            self.dim = self.w2b.shape[0]
        elif self.w1b is not None:
            self.dim = self.w1b.shape[0]

    @staticmethod
    def _check_half(name: str, full, a, b, t) -> tuple:
        if full is not None:
            if full.dim() not in (2, 4):
                raise ValueError(f"lokr_{name} {tuple(full.shape)} must be 2-D or 4-D")
            return tuple(full.shape)
        if t is not None:
            if a.dim() != 2 or b.dim() != 2 or t.dim() < 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                raise ValueError(f"lokr_t2 {tuple(t.shape)}, lokr_w2_a {tuple(a.shape)}, lokr_w2_b {tuple(b.shape)} "
                                 "do not fit a Tucker rebuild")
            return (a.shape[1], b.shape[1], *t.shape[2:])
        if a.dim() != 2 or b.dim() not in (2, 4) or a.shape[1] != b.shape[0]:
            raise ValueError(f"lokr_{name}_a {tuple(a.shape)} and lokr_{name}_b {tuple(b.shape)} do not multiply")
        return (a.shape[0], *b.shape[1:])

    def delta_shape(self) -> tuple:
        s1, s2 = self.shape1, self.shape2
        if len(s1) > 2:
            raise ValueError(f"lokr_w1 {s1} must be 2-D")
        shape = (s1[0] * s2[0], s1[1] * s2[1])
        return shape + tuple(s2[2:])

    def factors(self, device=None) -> list:
        """(w1, w1_a, w1_b, w2, w2_a, w2_b, t2), fp32, absent parts None."""
        parts = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        return [None if t is None else t.to(device or t.device, torch.float32) for t in parts]

    def halves(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        w1f, w1a, w1b, w2f, w2a, w2b, t2 = self.factors(device)
        return rebuild_half(w1f, w1a, w1b, None), rebuild_half(w2f, w2a, w2b, t2)

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        return diff_weight(*self.halves(orig_weight.device)), list(self.delta_shape()), None

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        """None for a grouped conv or a delta that is not the layer's shape (an inpainting conv_in's padding)."""
        s1, s2, shape = self.shape1, self.shape2, op.weight_shape
        if not op.chainable or len(s1) != 2 or s1[0] * s2[0] != shape[0] or shape[1] % s1[1]:
            return None
        w2_shape = (shape[0] // s1[0], shape[1] // s1[1], *shape[2:])  # W2 as a d-channel kernel (flat w2_b too)
        if torch.Size(s2).numel() != torch.Size(w2_shape).numel():
            return None
        return KronBypass(op, self, factor, w2_shape)

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW = kron(c·W1, W2) (c = m·s) written straight into rows of the weight's 2-D view, never formed
        whole; None where the generic compute() is needed (a weight-shaped `bias` part, a padded delta). With DoRA:
        lyco_helpers.DoraRows over it."""
        if self.bias is not None or \
                not lyco_helpers.own_math(self, NetworkModuleLokr, "calc_delta", "delta_shape"):
            return None
        weight_shape = torch.Size(weight_shape)
        shape = torch.Size(self.delta_shape())
        if len(weight_shape) < 2 or shape[0] != weight_shape[0] or shape.numel() != weight_shape.numel():
            return None
        w1, w2 = self.halves(device)
        if w1.dim() != 2:
            return None
        m = 1.0 if self.dora_scale is not None else float(multiplier)  # DoRA takes m after its norms
        c = float(self.calc_scale(dyn_dim)) * m
        return lyco_helpers.dora_rows(self, KronRows(w1 * c, lyco_helpers.flat2d(w2)), weight_shape, multiplier)


def kron_rows(out: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, r0: int, r1: int, accumulate: bool) -> None:
    """out (= or +=) rows r0:r1 of kron(w1, w2) as a 2-D matrix (w1: a × b, w2: c × D, out: (r1 − r0) × b·D).

    Row i·c + k of the product is w1[i, j]·w2[k, :] for j = 0..b−1 side by side: whole runs of c rows are one
    broadcast op, a run cut by the block's edges one more."""
    a, b = w1.shape
    c, d = w2.shape
    op = torch.Tensor.addcmul_ if accumulate else None
    r = r0
    while r < r1:
        i, k0 = divmod(r, c)
        if k0 == 0 and r + c <= r1:  # whole blocks i .. i + n − 1
            n = (r1 - r) // c
            dst = out[r - r0:r - r0 + n * c].view(n, c, b, d)
            x, y = w2.view(1, c, 1, d), w1[i:i + n].view(n, 1, b, 1)
            r += n * c
        else:  # part of block i
            k1 = min(c, k0 + (r1 - r))
            dst = out[r - r0:r - r0 + (k1 - k0)].view(k1 - k0, b, d)
            x, y = w2[k0:k1].view(k1 - k0, 1, d), w1[i].view(1, b, 1)
            r += k1 - k0
        if op is not None:
            op(dst, x, y)
        else:
            torch.mul(x, y, out=dst)


class KronRows(lyco_helpers.RowDelta):
    """LoKr's ΔW = kron(W1, W2) (scale and multiplier folded into the small W1); W2 is rebuilt once per job."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        self.w1, self.w2 = w1, w2
        self.nbytes = 4 * (w1.numel() + w2.numel())  # both made per job (scaled W1, rebuilt W2), fp32
        self.row_run = w2.shape[0]

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        kron_rows(out, self.w1, self.w2, r0, r1, accumulate)

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        a, b = self.w1.shape
        c, d = self.w2.shape
        weight.view(a, c, b, d).addcmul_(self.w2.view(1, c, 1, d), self.w1.view(a, 1, b, 1))  # one pass, in place
