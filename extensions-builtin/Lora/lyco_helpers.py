"""Pure tensor helpers shared by the network types (A1111 file name). No host imports, no globals.

Every function takes and returns fp32 tensors on the caller's device; the callers cast once, at the end.
"""
from __future__ import annotations

import torch

DORA_OUTPUT_AXIS = "output"
DORA_INPUT_AXIS = "input"


def factor(t: torch.Tensor | None) -> torch.Tensor | None:
    """A low-rank factor as the types keep it: fp32 (16-bit files are widened once, exactly, when the network is
    parsed, so no job pays for it; A1111 keeps LoRA factors in the model's dtype the same way)."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def flat2d(t: torch.Tensor) -> torch.Tensor:
    """A factor as a matrix: rows stay, everything else is flattened (a 1×1 conv kernel becomes Linear-shaped)."""
    return t.reshape(t.shape[0], -1)


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild used by LoHa/LoKr: out[p,q,...] = Σ_ij t[i,j,...]·wa[i,p]·wb[j,q] (wa: rank×out, wb: rank×in)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, flat2d(wa), flat2d(wb))


def rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape, dyn_dim: int | None = None) -> torch.Tensor:
    """up·down reshaped to `shape`; with dyn_dim only the first dyn_dim ranks are used."""
    up = flat2d(up)
    down = flat2d(down)
    if dyn_dim is not None:
        up = up[:, :dyn_dim]
        down = down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def rebuild_cp_decomposition(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor,
                             dyn_dim: int | None = None) -> torch.Tensor:
    """Tucker LoCon: U[i,j,...] = Σ_np mid[n,p,...]·up[i,n]·down[p,j]; dyn_dim keeps the first ranks of all three."""
    up = flat2d(up)
    down = flat2d(down)
    if dyn_dim is not None:
        up, down, mid = up[:, :dyn_dim], down[:dyn_dim, :], mid[:dyn_dim, :dyn_dim]
    return torch.einsum("n m ..., i n, m j -> i j ...", mid, up, down)


def make_kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2); a 2-D w1 with a conv-shaped w2 gets trailing 1s so the kernel comes from w2 alone."""
    if w2.dim() > w1.dim():
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron views its inputs


def dora_axis(scale_shape: tuple, weight_shape: tuple, square_default: str = DORA_INPUT_AXIS) -> str:
    """Which axis a DoRA magnitude vector belongs to, from its shape.

    2-D and wider shapes say it outright: (out, 1, ...) is per output channel (LyCORIS `wd_on_out=True`),
    (1, in, ...) per input channel (kohya/A1111, LyCORIS `wd_on_out=False`). A 1-D vector of length out ≠ in
    or in ≠ out is the axis it matches; a 1-D vector on a square layer takes `square_default`."""
    scale_shape, weight_shape = tuple(scale_shape), tuple(weight_shape)
    if len(weight_shape) < 2:
        raise ValueError(f"DoRA needs a 2-D or conv weight, not shape {weight_shape}")
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    numel = 1
    for n in scale_shape:
        numel *= n
    if len(scale_shape) >= 2:
        rest_is_one = all(n == 1 for n in scale_shape[2:])
        if scale_shape[0] == out_dim and scale_shape[1] == 1 and rest_is_one and (out_dim != 1 or in_dim == 1):
            return DORA_OUTPUT_AXIS
        if scale_shape[0] == 1 and scale_shape[1] == in_dim and rest_is_one:
            return DORA_INPUT_AXIS
    elif numel in (out_dim, in_dim):
        if out_dim == in_dim:
            return square_default
        return DORA_OUTPUT_AXIS if numel == out_dim else DORA_INPUT_AXIS
    raise ValueError(f"dora_scale of shape {scale_shape} fits neither the output ({out_dim}) nor the input "
                     f"({in_dim}) channels of a weight of shape {weight_shape}")


def dora_channel_scale(merged: torch.Tensor, dora_scale: torch.Tensor, axis: str = DORA_INPUT_AXIS) -> torch.Tensor:
    """DoRA's per-channel factor M / ‖V‖ for the merged weight V, shaped to broadcast over V (out, 1, ...) or
    (1, in, ...). ‖V‖ gets float32 eps added, as in LyCORIS's forward, so an all-zero channel does not divide by
    zero."""
    ones = [1] * (merged.dim() - 1)
    if axis == DORA_OUTPUT_AXIS:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *ones)
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
                .reshape(merged.shape[1], *ones).transpose(0, 1))
    norm = norm + torch.finfo(torch.float32).eps
    return dora_scale.reshape(norm.shape) / norm


def weight_decompose(delta: torch.Tensor, orig_weight: torch.Tensor, dora_scale: torch.Tensor,
                     axis: str = DORA_INPUT_AXIS) -> torch.Tensor:
    """DoRA as a delta: M ⊙ V / ‖V‖ − W with V = W + delta, the norm taken per channel of `axis`."""
    merged = orig_weight + delta
    return merged * dora_channel_scale(merged, dora_scale, axis) - orig_weight


def fits_weight(delta_shape, weight_shape) -> bool:
    """Whether reshape_to_weight accepts a delta of this shape for this weight."""
    delta_shape, weight_shape = torch.Size(delta_shape), torch.Size(weight_shape)
    if delta_shape == weight_shape or delta_shape.numel() == weight_shape.numel():
        return True
    return (len(delta_shape) == 4 and len(weight_shape) == 4 and delta_shape[1] == 4 and weight_shape[1] == 9
            and delta_shape[0] == weight_shape[0] and delta_shape[2:] == weight_shape[2:])


def reshape_to_weight(delta: torch.Tensor, weight_shape: torch.Size | tuple) -> torch.Tensor:
    """Reconciles a delta with its target: equal element counts reshape (Linear ↔ 1×1 conv); a 4-channel
    conv_in delta is zero-padded for a 9-channel inpainting conv_in. Anything else is a shape error."""
    weight_shape = torch.Size(weight_shape)
    if delta.shape == weight_shape:
        return delta
    if delta.numel() == weight_shape.numel():
        return delta.reshape(weight_shape)
    if fits_weight(delta.shape, weight_shape):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, 5))
    raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(weight_shape)}")


def skew_cayley(blocks: torch.Tensor, constraint: float | None, kohya_clamp: bool = False) -> torch.Tensor:
    """Blocks B → orthogonal R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ (the last two axes), the Frobenius norm of all
    of Q limited to `constraint`.

    LyCORIS scales Q by c/(‖Q‖+1e-8) when ‖Q‖+1e-8 > c and c > 0; kohya always clamps,
    Q·(min(‖Q‖, c)+1e-8)/(‖Q‖+1e-8), so c = 0 there means no rotation at all."""
    q = blocks - blocks.transpose(-1, -2)
    if kohya_clamp and constraint is not None:
        norm = torch.norm(q)
        q = q * ((torch.clamp(norm, max=float(constraint)) + 1e-8) / (norm + 1e-8))
    elif constraint is not None and constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_blocks(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Rᵀ applied to consecutive row blocks of `weight` (OFT): W'[k·b + m] = Σ_n R[k,n,m]·W[k·b + n]."""
    k, b, _ = r.shape
    rest = weight.shape[1:]
    out = torch.einsum("k n m, k n ... -> k m ...", r, weight.reshape(k, b, *rest))
    return out.reshape(weight.shape)


def butterfly(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT: the m butterfly stages of r (m, blocks, b, b) applied to the rows of `weight` (a new tensor)."""
    x = weight.reshape(weight.shape[0], -1).clone(memory_format=torch.contiguous_format)
    butterfly_(x, r, torch.empty(x.numel(), dtype=x.dtype, device=x.device),
               torch.empty(x.numel(), dtype=x.dtype, device=x.device))
    return x.reshape(weight.shape)


def butterfly_(rows: torch.Tensor, r: torch.Tensor, grouped: torch.Tensor, turned: torch.Tensor) -> None:
    """BOFT's stages applied in place to `rows` (2-D, contiguous; a whole number of butterfly spans of
    2^(m−1)·b rows), r (m, rows/b, b, b) the stages' blocks for those rows, as LyCORIS does: stage i groups the rows
    (c, 2, 2^i·b/2) → (c, 2^i·b/2, 2) (a copy into `grouped`), multiplies each b-row block by R (R·W, not Rᵀ; one
    batched GEMM into `turned`) and ungroups (a copy back). `grouped`, `turned`: flat buffers of rows.numel()."""
    stages, _, b, _ = r.shape
    cols = rows.shape[1]
    grouped, turned = grouped[:rows.numel()], turned[:rows.numel()]
    for i in range(stages):
        k = 2 ** i * b // 2
        grouped.view(-1, k, 2, cols).copy_(rows.view(-1, 2, k, cols).transpose(1, 2))
        torch.bmm(r[i], grouped.view(-1, b, cols), out=turned.view(-1, b, cols))
        rows.view(-1, 2, k, cols).copy_(turned.view(-1, k, 2, cols).transpose(1, 2))


class RowDelta:
    """A type's ΔW for one layer, computed a block of rows at a time without forming the whole ΔW (the fused
    path of the patcher). Rows and columns are those of the weight's 2-D view (rows = out channels, columns =
    everything else); every value is fp32, multiplier and scale already applied. `bias`: Δbias or None.

    `scratch.get(name, dtype, n)` hands out reusable buffers (the patcher's, cache-sized); a type names its own."""

    bias: torch.Tensor | None = None
    # block-sized fp32 temporaries `rows` uses next to `out`: the patcher shrinks its blocks by (1 + this), so a
    # block's bytes stay about as cache-sized as a one-buffer merge's
    block_temporaries = 0
    # rows of ΔW one op writes at once (LoKr: the c rows of kron(W1, W2) per row of W1); the patcher's blocks hold
    # whole runs, or cut one into equal pieces, so a block is never split into a part-run op
    row_run = 1
    # the rows of a run depend on each other (OFT's rotation mixes the rows of its block): a run is never cut
    whole_runs = False
    # ΔW reads the original weight (IA3, OFT, GLoRA): `rows` then takes `original=`, the fp32 original of rows
    # r0:r1, which may be `out` itself before anything was added to it (so compute into a temporary, then add).
    # Such a term is only merged over its original (never recomputed from a merged weight by a residual restore)
    reads_original = False

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        """out (r1 − r0, cols) = (or +=, when `accumulate`) ΔW[r0:r1]."""
        raise NotImplementedError

    def bias_for(self, orig_bias: torch.Tensor | None) -> torch.Tensor | None:
        """Δbias (fp32) for a layer whose original bias is `orig_bias`: `bias`, unless the type reads the bias."""
        return self.bias

    # bytes of the tensors this term made for itself (a rebuilt factor, a scaled copy), not the network's factors it
    # reads: what holding it adds, for the patcher's batch budget (lora_patch_job.WriteBatch)
    nbytes = 0

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        """weight (2-D fp32 view) += ΔW, block by block (a type may do it in one fused op). A term that reads the
        original reads it from the weight's own rows, each block's ΔW made before it is added."""
        rows, cols = weight.shape
        step = max(1, block_elements // (1 + self.block_temporaries) // max(cols, 1))
        if self.whole_runs:
            step = max(self.row_run, step - step % self.row_run)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if self.reads_original:
                self.rows(weight[r0:r1], r0, r1, scratch, accumulate=True, original=weight[r0:r1])
                continue
            d = scratch.get("row_delta", torch.float32, (r1 - r0) * cols).view(r1 - r0, cols)
            self.rows(d, r0, r1, scratch, accumulate=False)
            weight[r0:r1].add_(d)


def dora_rows(module, rows: RowDelta | None, weight_shape, multiplier: float) -> RowDelta | None:
    """A type's fused ΔW (`rows`, made at strength 1 with the scale in it) as DoRA's when the module has a
    `dora_scale`, at strength m; `rows` as it is otherwise."""
    if rows is None or getattr(module, "dora_scale", None) is None:
        return rows
    axis = dora_axis(module.dora_scale.shape, tuple(weight_shape), module.dora_square_default)
    return DoraRows(rows, module.dora_scale, axis, tuple(weight_shape), float(multiplier))


class DoraRows(RowDelta):
    """DoRA over another type's fused ΔW U: ΔW = m·(M ⊙ V/‖V‖ − W0) with V = W0 + U, ‖V‖ per channel of `axis`
    (+ float32 eps, as weight_decompose). The norms need every row of V: `prepare` makes them in one pass over the
    original before the merge (U computed once there, once more in the merge, as any 16-bit merge must)."""

    reads_original = True
    needs_whole_original = True

    def __init__(self, inner: RowDelta, magnitude: torch.Tensor, axis: str, weight_shape: tuple, m: float):
        self.inner, self.axis, self.m = inner, axis, m
        self.magnitude = magnitude.reshape(-1).to(torch.float32)
        self.kernel = torch.Size(weight_shape[2:]).numel()
        self.row_run, self.whole_runs = inner.row_run, inner.whole_runs
        self.block_temporaries = inner.block_temporaries + 1
        self.bias = None if inner.bias is None else inner.bias * m
        self.nbytes = inner.nbytes + 8 * self.magnitude.numel()
        self.scale: torch.Tensor | None = None

    def prepare(self, original: torch.Tensor, scratch, blocks, merge_into: bool = False) -> None:
        """The channel factors M/‖V‖ from the original (a 2-D fp32-castable view) over `blocks` of rows. With
        `merge_into` (an fp32 weight holding W0) V is made in the weight's own rows rather than in a buffer."""
        rows, cols = original.shape
        squares = torch.zeros(cols if self.axis == DORA_INPUT_AXIS else rows, dtype=torch.float32,
                              device=original.device)
        for r0, r1 in blocks:
            buffer = scratch.get("dora_v", torch.float32, (r1 - r0) * cols).view(r1 - r0, cols)
            v = original[r0:r1] if merge_into else buffer.copy_(original[r0:r1])
            self._add_inner(v, r0, r1, scratch)
            if self.axis == DORA_INPUT_AXIS:
                squares.add_(torch.mul(v, v, out=buffer).sum(0))
            else:
                squares[r0:r1] = torch.mul(v, v, out=buffer).sum(1)
        if self.axis == DORA_INPUT_AXIS and self.kernel > 1:  # an input channel covers its kernel's columns
            squares = squares.view(-1, self.kernel).sum(1)
        scale = self.magnitude.to(squares.device) / (squares.sqrt_() + torch.finfo(torch.float32).eps)
        if self.axis == DORA_INPUT_AXIS and self.kernel > 1:
            scale = scale.repeat_interleave(self.kernel)
        self.scale = scale

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        """weight (fp32, holding W0) becomes the merge. At strength 1 in place, as DoRA's own loop would: V = W0 + U
        into the weight while summing its squares, then each channel scaled (one pass of U, not two)."""
        rows, cols = weight.shape
        step = max(1, block_elements // (1 + self.block_temporaries) // max(cols, 1))
        if self.whole_runs:
            step = max(self.row_run, step - step % self.row_run)
        blocks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
        self.prepare(weight, scratch, blocks, merge_into=self.m == 1)
        if self.m != 1:
            super().add_to(weight, scratch, block_elements)
            return
        for r0, r1 in blocks:
            weight[r0:r1].mul_(self._scale(r0, r1))

    def _add_inner(self, v: torch.Tensor, r0: int, r1: int, scratch) -> None:
        """v (rows r0:r1 holding W0) += U; an inner type that reads the original reads it from v itself."""
        if self.inner.reads_original:
            self.inner.rows(v, r0, r1, scratch, accumulate=True, original=v)
        else:
            self.inner.rows(v, r0, r1, scratch, accumulate=True)

    def _scale(self, r0: int, r1: int) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("DoRA's norms were not prepared from the original weight")
        return self.scale if self.axis == DORA_INPUT_AXIS else self.scale[r0:r1, None]

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool,
             original: torch.Tensor | None = None) -> None:
        if accumulate and self.m == 1 and original.data_ptr() == out.data_ptr():  # the rows hold W0: W = V·M/‖V‖
            self._add_inner(out, r0, r1, scratch)
            out.mul_(self._scale(r0, r1))
            return
        v = scratch.get("dora_v", torch.float32, out.numel()).view(out.shape).copy_(original)
        self._add_inner(v, r0, r1, scratch)
        v.mul_(self._scale(r0, r1)).sub_(original)
        if self.m != 1:
            v.mul_(self.m)
        if accumulate:
            out.add_(v)
        else:
            out.copy_(v)


_OWN_MATH: dict[tuple, bool] = {}


def own_math(module, cls, *names: str) -> bool:
    """Whether `module` computes its delta with `cls`'s own methods: a subclass that overrides one of `names` (or
    compute / finalize_updown) may compute something else, so it keeps the generic path."""
    key = (type(module), cls, names)
    own = _OWN_MATH.get(key)
    if own is None:  # a class's methods do not change after import: asked once per (type, names)
        own = _OWN_MATH[key] = all(getattr(key[0], n, None) is getattr(cls, n, None)
                                   for n in (*names, "compute", "finalize_updown"))
    return own
