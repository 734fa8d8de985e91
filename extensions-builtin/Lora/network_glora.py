"""GLoRA (A1111 file name): ΔW = m · s · (W·A + B), s = alpha/rank (LyCORIS; A1111 leaves alpha out).

LyCORIS layout (a1: in×r, a2: r×in, b1: out×r, b2: r×in[·kh·kw]): W·A = W ×₁ (a1·a2) along the input channels,
B = b1·b2, or with `bm.weight` (r×r×kh×kw) the Tucker rebuild B[i,j,...] = Σ bm[m,n,...]·b1[i,m]·b2[n,j].
Old LyCORIS layout (a1: r×in, a2: in×r, b1: r×in, b2: out×r): W·A = (W·a2)·a1, B = b2·b1; told apart by shapes
as ComfyUI/Forge do.

Bypass forward, low-rank both ways: W·A = W ×₁ (a1·a2) acts as a2 (1×1), then (W ×₁ a1) with the layer's kernel
geometry (old layout: a1 with the geometry, then W·a2 as a 1×1); B as its factors' chain. W ×₁ a1 (or W·a2) is
computed once from the layer's weight and kept: out × rank × kernel, rank/in of the weight.
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import torch

PARTS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


class ModuleTypeGLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(k in weights.w for k in PARTS):
            return NetworkModuleGLora(net, weights)
        return None


class GLoraBypass(lora_bypass.Bypass):
    """factor·(W·A + B)·x as two factor chains: `wa` (out × r[ × kernel]) is the weight-derived half, kept."""

    def __init__(self, op: lora_bypass.LayerOp, module: NetworkModuleGLora, factor: float):
        super().__init__()
        self.op, self.factor = op, factor
        shape = op.weight_shape
        weight = op.layer.weight.detach().float()
        a1, a2, b1, b2 = (self.hold(lyco_helpers.flat2d(t.float()), op) for t in
                          (module.a1, module.a2, module.b1, module.b2))
        self.old = module.layout_for(shape)
        if self.old:  # ΔW = b2·b1 + (W·a2)·a1 on the flattened weight: a1, b1 take the kernel
            wa = lyco_helpers.flat2d(weight) @ a2.float()
            self.a_first, self.a_then = a1.reshape(a1.shape[0], *shape[1:]), self.keep(wa.to(op.compute_dtype))
            self.b_chain = (b1.reshape(b1.shape[0], *shape[1:]), None, b2)
        else:  # ΔW = W ×₁ (a1·a2) + B: a2 mixes the input, then W ×₁ a1 with the layer's kernel
            wa = torch.einsum("o i ..., i r -> o r ...", weight, a1.float())
            self.a_first, self.a_then = a2, self.keep(wa.to(op.compute_dtype))
            if module.bm is not None:
                self.b_chain = (b2, self.hold(module.bm.float(), op), b1)
            else:
                self.b_chain = (b2.reshape(b2.shape[0], *shape[1:]), None, b1)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        op, c = self.op, lora_bypass.cast
        if self.old:
            a = op.pointwise(op.first(x, c(self.a_first, x)), c(self.a_then, x))
        else:
            a = op.first(op.pointwise(x, c(self.a_first, x)), c(self.a_then, x))
        down, mid, up = (c(t, x) for t in self.b_chain)
        h = op.first(x, down) if mid is None else op.first(op.pointwise(x, down), mid)
        return (a + op.pointwise(h, up)) * self.factor


def _a1111_name(part: str) -> property:
    """A1111 calls GLoRA's parts w1a, w1b, w2a, w2b (a1, b1, a2, b2); LoRA Block Weight scales `w1a` by that name."""
    return property(lambda self: getattr(self, part), lambda self, value: setattr(self, part, value))


class NetworkModuleGLora(network.NetworkModule):
    w1a, w1b, w2a, w2b = (_a1111_name(p) for p in ("a1", "b1", "a2", "b2"))

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.a1, self.a2, self.b1, self.b2 = (w[k] for k in PARTS)
        self.bm = w.get("bm.weight")
        self.parts_used |= set(PARTS) | ({"bm.weight"} if self.bm is not None else set())
        a1, a2, b1, b2 = (tuple(t.shape) for t in (self.a1, self.a2, self.b1, self.b2))
        self.old_layout = b2[1] == b1[0] == a1[0] == a2[1]
        new_layout = b2[0] == b1[1] == a1[1] == a2[0]
        if not (self.old_layout or new_layout):
            raise ValueError(f"a1 {a1}, a2 {a2}, b1 {b1}, b2 {b2} fit neither GLoRA layout")
        self.ambiguous_layout = self.old_layout and new_layout
        self.dim = a1[0] if self.old_layout else a2[0]
        weight = getattr(weights.sd_module, "weight", None)
        if self.ambiguous_layout and weight is not None:
            self.layout_for(tuple(weight.shape))

    def layout_for(self, weight_shape: tuple) -> bool:
        """True for the old layout. Shapes that fit both read as old only when a2's rows, the layer's rows and its
        columns are all equal (ComfyUI's rule); the rank follows the layout."""
        old = self.old_layout
        if self.ambiguous_layout:
            old = self.a2.shape[0] == weight_shape[0] == weight_shape[1]
        self.dim = self.a1.shape[0] if old else self.a2.shape[0]
        return old

    def validate(self, weight_shape: tuple) -> None:
        if len(weight_shape) < 2:
            raise ValueError(f"GLoRA needs a Linear or conv weight, not shape {tuple(weight_shape)}")
        out_dim, in_dim = weight_shape[0], weight_shape[1]
        flat_in = torch.Size(weight_shape[1:]).numel()
        if self.layout_for(weight_shape):
            ok = (self.a2.shape[0] == flat_in and self.a1.flatten(1).shape[1] == flat_in
                  and self.b2.shape[0] == out_dim and self.b1.flatten(1).shape[1] == flat_in)
        else:
            b_cols = self.b2.flatten(1).shape[1]
            if self.bm is not None:
                b_cols = self.b2.shape[1] * torch.Size(self.bm.shape[2:]).numel()
            ok = (self.a1.shape[0] == in_dim and self.a2.flatten(1).shape[1] == in_dim
                  and self.b1.shape[0] == out_dim and self.b1.flatten(1).shape[1] == self.dim
                  and b_cols == flat_in)
        if not ok:
            raise ValueError(f"a1 {tuple(self.a1.shape)}, a2 {tuple(self.a2.shape)}, b1 {tuple(self.b1.shape)}, "
                             f"b2 {tuple(self.b2.shape)} do not fit a weight of shape {tuple(weight_shape)}")
        if self.dora_scale is not None:
            lyco_helpers.dora_axis(self.dora_scale.shape, weight_shape, self.dora_square_default)

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW[rows] = c·(W0[rows] ×₁ (p·q) + B[rows]) through low-rank chains only (c = m·s; new layout p, q = a1, a2
        along the input channels at each kernel position, B = b1·b2 or its Tucker rebuild with `bm`; old layout
        p, q = a2, a1 on the flattened weight, B = b2·b1), never the in×in product; None where the generic compute()
        is needed (a subclass's own math). With DoRA: lyco_helpers.DoraRows over it."""
        weight_shape = tuple(weight_shape)
        if not lyco_helpers.own_math(self, NetworkModuleGLora, "calc_delta", "delta_shape"):
            return None
        self.validate(weight_shape)
        old = self.layout_for(weight_shape)
        a1, a2, b1, b2 = (lyco_helpers.flat2d(t.to(device, torch.float32)) for t in
                          (self.a1, self.a2, self.b1, self.b2))
        kernel = 1 if old else torch.Size(weight_shape[2:]).numel()
        bm = None if old or self.bm is None else \
            self.bm.to(device, torch.float32).reshape(self.bm.shape[0], self.bm.shape[1], -1)
        p, q, u, d = (a2, a1, b2, b1) if old else (a1, a2, b1, b2)
        m = 1.0 if self.dora_scale is not None else float(multiplier)  # DoRA takes m after its norms
        rows = GLoraRows(p, q, u, d, float(self.calc_scale(dyn_dim)) * m, kernel, bm)
        return lyco_helpers.dora_rows(self, rows, weight_shape, multiplier)

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        if not op.chainable or op.weight_shape != tuple(op.layer.weight.shape):
            return None
        return GLoraBypass(op, self, factor)

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        weight = orig_weight.to(torch.float32)
        parts = (self.a1, self.a2, self.b1, self.b2)
        a1, a2, b1, b2 = (lyco_helpers.flat2d(t.to(device, torch.float32)) for t in parts)
        shape = list(weight.shape)
        if self.layout_for(tuple(weight.shape)):
            updown = b2 @ b1 + (lyco_helpers.flat2d(weight) @ a2) @ a1
            return updown.reshape(shape), shape, None
        if self.bm is not None:
            wb = torch.einsum("m n ..., i m, n j -> i j ...", self.bm.to(device, torch.float32), b1, b2)
        else:
            wb = b1 @ b2
        wa = torch.einsum("o i ..., i j -> o j ...", weight, a1 @ a2)
        return wa + wb.reshape(shape), shape, None


class GLoraRows(lyco_helpers.RowDelta):
    """GLoRA's ΔW = c·(W0 ×₁ (p·q) + B) a block of rows at a time: W0's rows through the rank-r chain p, q (at each
    kernel position when `kernel` > 1; its rows × r product is the main temporary), plus B's rows from its factors."""

    reads_original = True

    def __init__(self, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, d: torch.Tensor, c: float,
                 kernel: int = 1, bm: torch.Tensor | None = None):
        self.p, self.q, self.u, self.d, self.c, self.kernel, self.bm = p, q, u, d, c, kernel, bm

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool,
             original: torch.Tensor | None = None) -> None:
        n = r1 - r0
        if self.kernel == 1:  # before anything is added: `original` may be `out`
            t = torch.mm(original, self.p, out=scratch.get("glora", torch.float32, n * self.p.shape[1]).view(n, -1))
            torch.addmm(out, t, self.q, beta=1 if accumulate else 0, alpha=self.c, out=out)
        else:  # W ×₁ A mixes input channels at each kernel position: (rows, in, k) → (rows, k, in) @ p @ q
            x = original.view(n, -1, self.kernel).transpose(1, 2)
            wa = torch.matmul(torch.matmul(x, self.p), self.q).transpose(1, 2).reshape(n, -1)
            if accumulate:
                out.add_(wa, alpha=self.c)
            else:
                torch.mul(wa, self.c, out=out)
        if self.bm is None:
            out.addmm_(self.u[r0:r1], self.d, alpha=self.c)
        else:  # B[i, j, ·] = Σ bm[m, n, ·]·b1[i, m]·b2[n, j]
            wb = torch.einsum("m n k, i m, n j -> i j k", self.bm, self.u[r0:r1], self.d)
            out.add_(wb.reshape(n, -1), alpha=self.c)
