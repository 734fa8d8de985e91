"""OFT / BOFT (A1111 file name): the weight's output channels rotated, W' = rescale · Rᵀ·W, ΔW = W' − W.

Variants, each computed as its trainer's forward does (strength m included):
- kohya OFT (`oft_blocks` (k, b, b), keys `oft_unet_*`): R = Cayley(B − Bᵀ) with ‖Q‖ clamped to alpha·out,
  R_m = m·R + (1−m)·I per block. kohya rotates the layer's output, so the bias turns too: Δbias = (R_mᵀ − I)·b.
- LyCORIS diag-OFT (`oft_blocks` (k, b, b), other keys): the same R (Q scaled only when ‖Q‖ > alpha·out > 0),
  the bias left as it is, optional `rescale` per output channel.
- old LyCORIS (`oft_diag` (k, b, b)): R stored as it is (already orthogonal), R_m = m·R + (1−m)·I.
- BOFT (`oft_blocks` (stages, k, b, b)): each stage's R_m = m·R + (1−m)·I applied in butterfly order (R·W).
`rescale` is applied at strength m as 1 + m·(rescale − 1), so strength 0 is the base model (LyCORIS applies it
fully at any strength). The file's `scale` and `dora_scale` do not apply to rotations.

Bypass forward: the output rotated instead of the weight, y' − y = rescale·R(z) − z with z = y0 − b (kohya: the
bias turns too), R rebuilt from the blocks in each call (Cayley of k b×b blocks): nothing weight-sized is formed
and nothing is kept.
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import torch


def rotate_rows(rows: torch.Tensor, r: torch.Tensor, boft: bool) -> torch.Tensor:
    """R applied to the rows of a (channels, ...) tensor: OFT's blocks (Rᵀ per block) or BOFT's butterfly stages.
    A weight's output rows and an output's channels turn the same way."""
    return lyco_helpers.butterfly(rows, r) if boft else lyco_helpers.rotate_blocks(rows, r)


class OftBypass(lora_bypass.Bypass):
    def __init__(self, op: lora_bypass.LayerOp, module: NetworkModuleOFT, multiplier: float):
        super().__init__()
        self.op, self.module, self.m = op, module, multiplier
        self.blocks = self.hold(module.blocks, op)
        self.rescale = self.hold(module.rescale, op)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        op, module = self.op, self.module
        r = module.rotation(op.out_channels, self.m, y0.device, self.blocks)
        bias = getattr(op.layer, "bias", None)
        z = y0.float()
        if bias is not None:
            b = bias.detach().float()
            z = z - op.per_channel(b, z)
        turned = op.on_channels(z, lambda rows: rotate_rows(rows, r, module.is_boft))
        if self.rescale is not None:
            turned = turned * op.per_channel(1 + self.m * (self.rescale.float().reshape(-1) - 1), z)
        out = turned - z
        if module.is_kohya and bias is not None:
            out = out + op.per_channel(rotate_rows(b.reshape(-1, 1), r, False).reshape(-1) - b, z)
        return out.to(y0.dtype)


class ModuleTypeOFT(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if "oft_blocks" in weights.w or "oft_diag" in weights.w:
            return NetworkModuleOFT(net, weights)
        return None


class NetworkModuleOFT(network.NetworkModule):
    supports_dora = False
    applies_multiplier = True

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.parts_used -= {"scale", "bias"}  # a rotation has no scale, and its bias comes from the layer
        self.scale = self.bias = None
        if "oft_blocks" in w:
            self.blocks = w["oft_blocks"]
            self.is_boft = self.blocks.dim() == 4
            self.is_kohya = not self.is_boft and weights.network_key.startswith("oft_")
            self.stored_r = False
            self.parts_used.add("oft_blocks")
        else:
            self.blocks = w["oft_diag"]
            self.is_boft = self.is_kohya = False
            self.stored_r = True
            self.parts_used.add("oft_diag")
        self.rescale = w.get("rescale")
        if self.rescale is not None:
            self.parts_used.add("rescale")
        if self.blocks.dim() not in (3, 4) or self.blocks.shape[-1] != self.blocks.shape[-2]:
            raise ValueError(f"OFT blocks of shape {tuple(self.blocks.shape)} must be (blocks, b, b) or "
                             "(stages, blocks, b, b)")
        self.block_size = self.blocks.shape[-1]
        self.num_blocks = self.blocks.shape[-3]
        self.dim = self.num_blocks

    def validate(self, weight_shape: tuple) -> None:
        out_dim = weight_shape[0] if weight_shape else 0
        if len(weight_shape) < 2 or self.num_blocks * self.block_size != out_dim:
            raise ValueError(f"{self.num_blocks} OFT blocks of size {self.block_size} do not cover the "
                             f"{out_dim} output channels of a weight of shape {tuple(weight_shape)}")
        if self.is_boft:
            stages = self.blocks.shape[0]
            if self.block_size % 2 or out_dim % (2 ** (stages - 1) * self.block_size):
                raise ValueError(f"{stages} BOFT stages of block size {self.block_size} do not fit {out_dim} "
                                 "output channels")
        if self.rescale is not None and self.rescale.numel() != out_dim:
            raise ValueError(f"rescale of shape {tuple(self.rescale.shape)} does not match the {out_dim} output "
                             "channels")

    def rotation(self, out_dim: int, multiplier: float, device, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """R at strength m: (blocks, b, b), or (stages, blocks, b, b) for BOFT."""
        blocks = (self.blocks if blocks is None else blocks).to(device, torch.float32)
        if self.stored_r:
            r = blocks
        else:
            constraint = None if self.alpha is None else self.alpha * out_dim
            r = lyco_helpers.skew_cayley(blocks, constraint, kohya_clamp=self.is_kohya)
        if multiplier != 1:
            eye = torch.eye(self.block_size, device=device, dtype=torch.float32)
            r = multiplier * r + (1 - multiplier) * eye
        return r

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        self.validate(tuple(orig_weight.shape))
        weight = orig_weight.to(torch.float32)
        r = self.rotation(weight.shape[0], multiplier, weight.device)
        rotated = rotate_rows(weight, r, self.is_boft)
        if self.rescale is not None:
            rescale = self.rescale.to(weight.device, torch.float32).reshape(-1, *([1] * (weight.dim() - 1)))
            rotated = rotated * (1 + multiplier * (rescale - 1))
        ex_bias = None
        if self.is_kohya and orig_bias is not None:
            bias = orig_bias.to(weight.device, torch.float32).reshape(-1, 1)
            ex_bias = (lyco_helpers.rotate_blocks(bias, r) - bias).reshape(-1)
        return rotated - weight, list(weight.shape), ex_bias

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW[rows] = rescale·Rᵀ·W0[rows] − W0[rows] per block of whole OFT blocks (one batched b×b GEMM), R at
        strength m. BOFT's butterfly mixes rows only within spans of 2^(stages − 1)·b rows, so its blocks are whole
        spans, each turned by the stages' blocks for those rows. None for a subclass's own math."""
        if not lyco_helpers.own_math(self, NetworkModuleOFT, "calc_delta", "delta_shape"):
            return None
        self.validate(tuple(weight_shape))
        r = self.rotation(weight_shape[0], multiplier, device)
        rescale = None if self.rescale is None else \
            1 + multiplier * (self.rescale.to(device, torch.float32).reshape(-1, 1) - 1)
        return OftRows(r, rescale, self.is_kohya, self.is_boft)

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        """The whole output change at strength `factor` (a rotation's strength is not a plain factor)."""
        if op.kind not in ("linear", "conv") or op.weight_shape != tuple(op.layer.weight.shape):
            return None
        return OftBypass(op, self, factor)


class OftRows(lyco_helpers.RowDelta):
    """OFT's ΔW from the original's rows, a block of whole OFT blocks (BOFT: whole butterfly spans) at a time:
    Rᵀ·W0 − W0 (BOFT: the stages' R·W0 − W0), times the rescale."""

    block_temporaries = 1
    reads_original = True
    whole_runs = True

    def __init__(self, r: torch.Tensor, rescale: torch.Tensor | None, turns_bias: bool, boft: bool = False):
        self.r, self.boft = r, boft
        self.b = r.shape[-1]
        # W'_k = R_kᵀ·W_k as one bmm from the left
        self.rt = None if boft else r.transpose(1, 2).contiguous()
        self.rescale, self.turns_bias = rescale, turns_bias
        self.row_run = self.b * 2 ** (r.shape[0] - 1) if boft else self.b  # a butterfly span of rows
        self.block_temporaries = 3 if boft else 1
        self.nbytes = 4 * (2 * r.numel() + (0 if rescale is None else rescale.numel()))

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool,
             original: torch.Tensor | None = None) -> None:
        b, cols = self.b, out.shape[1]
        if self.boft:
            in_place = accumulate and original.data_ptr() == out.data_ptr()  # the rows hold W0: turn them
            turned = out if in_place else \
                scratch.get("oft", torch.float32, out.numel()).view(out.shape).copy_(original)
            lyco_helpers.butterfly_(turned, self.r[:, r0 // b:r1 // b], scratch.get("boft_grouped", torch.float32,
                                    out.numel()), scratch.get("boft_turned", torch.float32, out.numel()))
            if in_place:
                if self.rescale is not None:
                    out.mul_(self.rescale[r0:r1])
                return
        else:
            turned = scratch.get("oft", torch.float32, out.numel()).view(-1, b, cols)
            torch.bmm(self.rt[r0 // b:r1 // b], original.view(-1, b, cols), out=turned)
        turned = turned.reshape(out.shape)
        if self.rescale is not None:
            turned.mul_(self.rescale[r0:r1])
        if accumulate and original.data_ptr() == out.data_ptr():  # the rows hold their original: turn them
            out.copy_(turned)
        elif accumulate:
            out.add_(turned.sub_(original))
        else:
            torch.sub(turned, original, out=out)

    def bias_for(self, orig_bias: torch.Tensor | None) -> torch.Tensor | None:
        """kohya OFT turns the bias with the output: Δbias = (Rᵀ − I)·b."""
        if not self.turns_bias or orig_bias is None:
            return None
        bias = orig_bias.to(self.r.device, torch.float32).reshape(-1, 1)
        return (lyco_helpers.rotate_blocks(bias, self.r) - bias).reshape(-1)
