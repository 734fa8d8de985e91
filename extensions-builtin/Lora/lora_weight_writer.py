"""The writer: W = cast(W0 + Σ ΔW) into a layer's weight, and its bias, chunked and dtype-aware.

- fused: each term of Σ ΔW is added straight into the weight (fp32 in place, 16-bit through one cache-sized fp32
  block, no ΔW buffer); a single plain LoRA on an fp32 weight whose original is elsewhere is one addmm into it.
- rows: as fused, over a weight that holds an old merge, each block's original read in just before it is merged.
- residual: Σ ΔW block by block, the rounding residual's misses recorded as it goes (lora_residual).
A write that fails part-way puts the part already written back before the error goes on. Only the restore
methods (lora_restore_methods) and the patcher call this; nothing else writes weights.
"""
from __future__ import annotations

from typing import Callable

import lora_delta
import lora_fp8
import lora_residual
import network_lora
import torch
from lora_layer_state import BiasBackup, RestoreRecord, bias_attr, bias_of, no_grad_for


def write(job, weight: torch.Tensor, original: torch.Tensor, delta: lora_delta.LayerDelta, rec: RestoreRecord,
          method) -> None:
    """Merges Σ ΔW over `original` into `weight` the way `method` (its restore method) needs; counts the write."""
    if not weight.is_contiguous():  # flat chunks need one block of memory
        target = weight.detach().contiguous()
        if original.data_ptr() == weight.data_ptr():
            original = target.clone() if method.reads_original_while_writing else target
        write(job, target, original, delta, rec, method)
        with no_grad_for(weight):
            weight.copy_(target)
        return
    job.stats[rec.how] += 1
    with no_grad_for(weight):
        method.write(job, weight, original, delta, rec)


def write_fused(job, weight: torch.Tensor, original: torch.Tensor, delta: lora_delta.LayerDelta,
                put_back: Callable[[torch.Tensor], None], fp8: lora_fp8.Fp8State | None = None) -> None:
    """weight = cast(original + Σ ΔW), each term added straight into the weight. On failure the weight gets
    `original` back, or `put_back(weight)` when the original was the weight itself."""
    term = delta.single
    if isinstance(term, network_lora.LowRankRows) and weight.dtype == torch.float32 and \
            original.data_ptr() != weight.data_ptr() and original.is_contiguous():
        out = weight.view(weight.shape[0], -1)  # one GEMM from the original into the weight
        torch.addmm(original.reshape(out.shape), term.up, term.down, alpha=term.alpha, out=out)
        return
    try:
        if fp8 is not None:  # seeded stochastic rounding into the fp8 weight
            lora_fp8.merge_stochastic(delta, weight, original if original.is_contiguous() else
                                      original.contiguous(), job.scratch(weight.device),
                                      fp8.seed, lora_delta.chunk_elements(weight.device))
            job.stats["fp8_stochastic"] += 1
        else:
            delta.merge(weight, original if original.is_contiguous() else original.contiguous(),
                        job.scratch(weight.device))
    except BaseException:
        if original.data_ptr() != weight.data_ptr():
            weight.copy_(original)
        else:
            put_back(weight)
        raise


def write_rows(job, weight: torch.Tensor, delta: lora_delta.LayerDelta, rec: RestoreRecord,
               fill: lora_delta.RowFill, put_back: Callable[[torch.Tensor], None], fill_block: bool = False) -> None:
    """weight = cast(original + Σ ΔW) where each block of rows first gets its original from fill(r0, r1, rows):
    one pass over a weight that holds an old merge (the source's rewrite). `fill_block`: fill reads the weight's
    dtype, so a 16-bit weight's block may take it straight in fp32 (lora_delta.LayerDelta.merge). On failure
    `put_back(weight)`."""
    job.stats[rec.how] += 1
    with no_grad_for(weight):
        try:
            delta.merge(weight, weight, job.scratch(weight.device), fill, fill_block)
        except BaseException:
            put_back(weight)
            raise


def write_residual(job, weight: torch.Tensor, original: torch.Tensor, delta: lora_delta.LayerDelta
                   ) -> lora_residual.Residual:
    """weight = cast(original + Σ ΔW) block by block (the restore recomputes the same blocks); returns the misses
    of the inverse guess. On failure the part already written gets its original back."""
    scratch = job.scratch(weight.device)
    encoder = lora_residual.Encoder(weight.dtype, weight.numel(), weight.device)
    flat_w, flat_o = weight.view(-1), original.reshape(-1)
    done, fp = 0, 0
    try:
        for start, end, d in delta.blocks(weight.shape, weight.device, scratch):
            encoder.merge_into(start, flat_w[start:end], flat_o[start:end], d, scratch)
            fp += lora_residual.fingerprint(d)
            done = end
    except BaseException:
        _undo_prefix(weight, done, encoder, original, delta, scratch)
        raise
    return encoder.finish(fp)


def _undo_prefix(weight, done: int, encoder, original, delta, scratch) -> None:
    """A failure inside one layer's residual write: the part already written gets its original back."""
    if done == 0:
        return
    flat_w, flat_o = weight.view(-1), original.reshape(-1)
    if flat_o.data_ptr() != flat_w.data_ptr():
        flat_w[:done].copy_(flat_o[:done])
        return
    partial = encoder.finish(0)
    for start, end, d in delta.blocks(weight.shape, weight.device, scratch):
        if start >= done:
            break
        lora_residual.guess_(flat_w[start:end], d, scratch)
    lora_residual.correct_(flat_w, partial, 0, done)


# --- bias ----------------------------------------------------------------------------------------------------------
def original_bias(module, rec: RestoreRecord | None) -> torch.Tensor | None:
    if rec is not None and rec.bias is not None:
        return rec.bias.original
    bias = bias_of(module)
    return None if bias is None else bias.detach()


def write_bias(module, weight: torch.Tensor, delta_bias: torch.Tensor | None, rec: RestoreRecord) -> None:
    """bias = original bias + Σ Δbias (a layer without a bias gets one); the original is kept in `rec.bias`."""
    name = bias_attr(module)
    bias = bias_of(module)
    if delta_bias is None:
        if rec.bias is not None:  # the previous state changed the bias, this one does not
            restore_bias(module, rec)
            rec.bias = None
        return
    if rec.bias is None:
        rec.bias = BiasBackup(bias is not None, None if bias is None else bias.detach().clone())
    base = rec.bias.original
    new = delta_bias.reshape(-1) if base is None else base.float() + delta_bias.reshape(base.shape)
    with no_grad_for(weight):
        if bias is None:
            setattr(module, name, torch.nn.Parameter(new.to(weight.device, weight.dtype), requires_grad=False))
        else:
            bias.copy_(new)


def restore_bias(module, rec: RestoreRecord) -> None:
    if rec.bias is None:
        return
    name = bias_attr(module)
    bias = getattr(module, name, None)
    if not rec.bias.had_bias:
        if bias is not None:
            setattr(module, name, None)
    elif bias is not None:
        with no_grad_for(bias):
            bias.copy_(rec.bias.original)
