"""Sparse rounding residual: the original weight back, bit for bit, from the merged weight and the delta.

A merge writes W1 = cast(W0 + Δ) (Δ in fp32). Its inverse guess g = cast(W1 − Δ) equals W0 at most positions;
where it does not (the rounding of W1 lost a bit of W0: mostly where |W1| crossed into a larger binade, or where
|W0| is small next to |Δ|), the residual records the difference. Positions are not stored as indices but as a
byte stream, one byte per mismatch:

    byte = code << 6 | gap      gap: positions skipped since the previous byte (0..63)
    code 1 / 2                  W0's bits are g's bits − 1 / + 1 (the neighbouring float of the same sign)
    code 3                      W0 is the next entry of `exceptions` (its raw bits)
    code 0                      nothing to correct here (a 64-position skip, for long gaps)

so the memory is about one byte per mismatch (a few % of positions for LoRA-sized deltas; see the README).
Restoring needs the same Δ bit for bit, so a strided sample of Δ's bits is kept to notice a Δ that does not
reproduce (other device, other kernel).

The elementwise work runs on chunks through preallocated buffers (`Scratch`): on CPU a fresh temporary per op
costs page faults, and a mixed-dtype op (bf16 + fp32) is many times slower than a cast followed by a same-dtype
op. Pure tensor code: no model, no host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
SUPPORTED_DTYPES = tuple(_INT_VIEW)
_GAP_BITS = 6
_MAX_GAP = (1 << _GAP_BITS) - 1
_SKIP = _MAX_GAP  # code 0, gap 63: advance 64 positions
_SAMPLE_STRIDE = 61  # delta fingerprint: every 61st element (prime, so it does not follow row strides)


class Scratch:
    """Reusable chunk buffers for one device (fp32 pair, one pair per weight dtype, a mask)."""

    def __init__(self, device: torch.device, size: int):
        self.device, self.size = device, size
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (name, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, self.size if buf is None else buf.numel()), dtype=dtype, device=self.device)
            self._buffers[key] = buf
        return buf[:n]


def _sum32(original: torch.Tensor, delta: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """original + Δ in fp32 (the exact sum, rounded once to fp32), in a scratch buffer."""
    s = scratch.get("a", torch.float32, original.numel())
    if original.dtype == torch.float32:
        return torch.add(original, delta, out=s)
    s.copy_(original)
    return s.add_(delta)


def merge_into(out: torch.Tensor, original: torch.Tensor, delta: torch.Tensor, scratch: Scratch) -> None:
    """out = cast(original + Δ), the merge the patcher writes (Δ in fp32, one cast to the weight's dtype).
    `out` may be `original` itself."""
    if out.dtype == torch.float32 and original.dtype == torch.float32:
        if out.data_ptr() == original.data_ptr():
            out.add_(delta)
        else:
            torch.add(original, delta, out=out)
        return
    out.copy_(_sum32(original, delta, scratch))


def _guess_into(dst: torch.Tensor, w1: torch.Tensor, delta: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """dst = cast(W1 − Δ): the inverse of the merge, exact except at the residual's positions."""
    if w1.dtype == torch.float32:
        return torch.sub(w1, delta, out=dst)
    s = scratch.get("b", torch.float32, w1.numel())
    s.copy_(w1)
    s.sub_(delta)
    return dst.copy_(s)


def guess_(w: torch.Tensor, delta: torch.Tensor, scratch: Scratch) -> None:
    """In place: w = cast(w − Δ)."""
    _guess_into(w, w, delta, scratch)


def fingerprint(delta: torch.Tensor) -> int:
    """Exact sum of a strided sample of Δ's bits; changes when Δ does not reproduce."""
    sample = delta.reshape(-1)[::_SAMPLE_STRIDE]
    return int(sample.view(torch.int32).sum(dtype=torch.int64)) if sample.dtype == torch.float32 else \
        int(sample.double().sum())


@dataclass
class Residual:
    """What W0 needs besides W1 and Δ. `stream` and `exceptions` live on the weight's device."""

    dtype: torch.dtype
    numel: int
    stream: torch.Tensor  # uint8
    exceptions: torch.Tensor  # int view of the original values at code-3 positions, in position order
    delta_fingerprint: int
    mismatches: int

    @property
    def nbytes(self) -> int:
        return self.stream.numel() + self.exceptions.numel() * self.exceptions.element_size()


class Encoder:
    """Merges one weight chunk by chunk (increasing offsets) and collects where the guess misses W0."""

    def __init__(self, dtype: torch.dtype, numel: int, device: torch.device):
        if dtype not in _INT_VIEW:
            raise TypeError(f"no rounding residual for {dtype}")
        self.dtype, self.numel, self.device = dtype, numel, device
        self.positions: list[torch.Tensor] = []
        self.originals: list[torch.Tensor] = []  # int bits of W0 at the mismatches
        self.guesses: list[torch.Tensor] = []  # int bits of the guess there

    def merge_into(self, offset: int, out: torch.Tensor, original: torch.Tensor, delta: torch.Tensor,
                   scratch: Scratch) -> None:
        """out = cast(original + Δ) for the flat chunk at `offset`, recording the guess's misses."""
        iv = _INT_VIEW[self.dtype]
        n = original.numel()
        if self.dtype == torch.float32:
            w1 = _sum32(original, delta, scratch)
        else:
            w1 = scratch.get("w1", self.dtype, n).copy_(_sum32(original, delta, scratch))
        g = _guess_into(scratch.get("g", self.dtype, n), w1, delta, scratch)
        g_bits, w0_bits = g.view(iv), original.view(iv)
        mask = torch.ne(g_bits, w0_bits, out=scratch.get("mask", torch.bool, n))
        where = mask.nonzero().view(-1)
        if where.numel():
            self.positions.append(where + offset)
            self.originals.append(w0_bits[where])
            self.guesses.append(g_bits[where])
        out.copy_(w1)

    def finish(self, delta_fingerprint: int) -> Residual:
        iv = _INT_VIEW[self.dtype]
        if not self.positions:
            return Residual(self.dtype, self.numel, torch.empty(0, dtype=torch.uint8, device=self.device),
                            torch.empty(0, dtype=iv, device=self.device), delta_fingerprint, 0)
        positions = torch.cat(self.positions)
        originals = torch.cat(self.originals)
        step = originals.long() - torch.cat(self.guesses).long()
        self.positions, self.originals, self.guesses = [], [], []
        index = step + 1
        index = torch.where((index >= 0) & (index <= 2), index, 3)
        codes = _CODE_OF_STEP.to(step.device)[index]  # step −1 → code 1, +1 → 2, anything else → 3
        gaps = torch.diff(positions, prepend=positions.new_full((1,), -1)) - 1
        entries = (codes << _GAP_BITS) | (gaps & _MAX_GAP).to(torch.uint8)
        long_gaps = gaps > _MAX_GAP
        if bool(long_gaps.any()):  # rare: skip bytes in front of the entries that follow a long gap
            at = torch.cumsum((gaps >> _GAP_BITS) + 1, 0) - 1
            stream = torch.full((int(at[-1]) + 1,), _SKIP, dtype=torch.uint8, device=positions.device)
            stream[at] = entries
        else:
            stream = entries
        exceptions = originals[codes == 3]
        return Residual(self.dtype, self.numel, stream, exceptions, delta_fingerprint, int(positions.numel()))


_CODE_OF_STEP = torch.tensor([1, 3, 2, 3], dtype=torch.uint8)  # index: step + 1 (3: out of range)


def _step_of_code(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, -1, 1, 0], dtype=dtype, device=device)  # a skip byte rewrites its element unchanged


def correct_(flat_weight: torch.Tensor, residual: Residual, start: int = 0, end: int | None = None) -> None:
    """After flat_weight[start:end] holds the guess: puts W0 back at the residual's positions in that range."""
    if residual.mismatches == 0:
        return
    end = residual.numel if end is None else end
    iv = _INT_VIEW[residual.dtype]
    bits = flat_weight.view(iv)
    stream = residual.stream.to(flat_weight.device)
    positions = torch.cumsum((stream & _MAX_GAP).long() + 1, 0) - 1
    codes = (stream >> _GAP_BITS).long()
    values = bits[positions] + _step_of_code(iv, flat_weight.device)[codes]
    is_exception = codes == 3
    if residual.exceptions.numel():
        values[is_exception] = residual.exceptions.to(flat_weight.device)
    if start > 0 or end < residual.numel:  # a partial undo (a failure inside one layer's write)
        keep = (positions >= start) & (positions < end)
        positions, values = positions[keep], values[keep]
    bits[positions] = values
