"""Pure tensor helpers shared by the network types (A1111 file name). No host imports, no globals."""
from __future__ import annotations

import torch


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP/Tucker rebuild used by LoHa: out[p,q,k,l] = sum_ij t[i,j,k,l] * wa[i,p] * wb[j,q]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape, dyn_dim: int | None = None) -> torch.Tensor:
    """up·down reshaped to `shape`; with dyn_dim only the first dyn_dim ranks are used."""
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    if dyn_dim is not None:
        up = up[:, :dyn_dim]
        down = down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def rebuild_cp_decomposition(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Tucker LoCon: U[i,j,k,l] = sum_np mid[n,p,k,l] * up[i,n] * down[p,j]."""
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)


def weight_decompose(delta: torch.Tensor, orig_weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA: M ⊙ V / ‖V‖ − W with V = W + delta.

    The norm is per input channel (dim 1) as in A1111 and LyCORIS `wd_on_out=False` (M of shape (1, in, ...)),
    or per output channel when M has shape (out, 1, ...) (LyCORIS `wd_on_out=True`)."""
    merged = orig_weight + delta
    ones = [1] * (merged.dim() - 1)
    per_output = dora_scale.dim() >= 2 and dora_scale.shape[0] == merged.shape[0] > 1 and dora_scale.shape[1] == 1
    if per_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *ones)
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *ones).transpose(0, 1))
    return merged * (dora_scale.reshape(norm.shape) / norm) - orig_weight


def reshape_to_weight(delta: torch.Tensor, weight_shape: torch.Size | tuple) -> torch.Tensor:
    """Reconciles a delta with its target: equal element counts reshape (Linear ↔ 1×1 conv); a 4-channel
    conv_in delta is zero-padded for a 9-channel inpainting conv_in. Anything else is a shape error."""
    weight_shape = torch.Size(weight_shape)
    if delta.shape == weight_shape:
        return delta
    if delta.numel() == weight_shape.numel():
        return delta.reshape(weight_shape)
    if (delta.dim() == 4 and len(weight_shape) == 4 and delta.shape[1] == 4 and weight_shape[1] == 9
            and delta.shape[0] == weight_shape[0] and delta.shape[2:] == weight_shape[2:]):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, 5))
    raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(weight_shape)}")
