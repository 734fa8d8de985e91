"""fp8 weight storage (modules/fp8_storage.py) at FLUX.1's real widths: memory held and forward time against the
floor of the same block with its weights stored in the compute dtype.

One FLUX.1 double block and one single block (hidden 3072, 24 heads, MLP 12288), seeded random weights, computed in
bf16 (what the host uses on GPUs; fp32 on CPU is the same code). Both sides run the same diffusers module on the same
inputs; the fp8 side keeps float8_e4m3fn weights in its block Linears and casts each one to bf16 for its matmul.
Reports medians of repeats, the ratio fp8 / floor, the bytes each holds and the output difference (fp8 rounding).

    flock /tmp/bench.lock venv/bin/python scripts/bench_fp8_storage.py [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules import fp8_storage  # noqa: E402


def build(hidden: int = 3072, heads: int = 24):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=hidden // heads, num_attention_heads=heads,
                                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    return model.eval().to(torch.bfloat16)


def to_fp8(model):
    """The host's rule: block Linear weights stored in fp8, everything else in the compute dtype."""
    res = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in res.named_modules():
            if isinstance(module, torch.nn.Linear) and fp8_storage.keeps_fp8(res, name + ".weight"):
                module.weight = torch.nn.Parameter(module.weight.to(torch.float8_e4m3fn), requires_grad=False)
    fp8_storage.enable(res)
    return res


def block_bytes(model) -> tuple[int, int]:
    """(bytes of the double block, bytes of the single block)."""
    return (fp8_storage.parameter_bytes(model.transformer_blocks[0]),
            fp8_storage.parameter_bytes(model.single_transformer_blocks[0]))


def timed(model, inputs, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    with torch.inference_mode():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**inputs).sample
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64, help="image tokens (text tokens: a quarter)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    floor = build()
    fp8 = to_fp8(floor)
    g = torch.Generator().manual_seed(1)
    text = max(1, args.tokens // 4)
    inputs = dict(hidden_states=torch.randn(1, args.tokens, 64, generator=g).to(torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, text, 4096, generator=g).to(torch.bfloat16),
                  pooled_projections=torch.randn(1, 768, generator=g).to(torch.bfloat16),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.zeros(args.tokens, 3), txt_ids=torch.zeros(text, 3))
    t_floor, out_floor = timed(floor, inputs, args.repeats)
    t_fp8, out_fp8 = timed(fp8, inputs, args.repeats)
    (double_floor, single_floor), (double_fp8, single_fp8) = block_bytes(floor), block_bytes(fp8)
    b_floor, b_fp8 = double_floor + single_floor, double_fp8 + single_fp8
    diff = (out_fp8.float() - out_floor.float()).norm() / out_floor.float().norm()
    print(f"FLUX.1 widths, 1 double + 1 single block, {args.tokens}+{text} tokens, bf16 compute, "
          f"median of {args.repeats}")
    full = (19 * double_floor + 38 * single_floor, 19 * double_fp8 + 38 * single_fp8)
    print(f"block weights: bf16 {b_floor / 2 ** 20:.0f} MiB, fp8 {b_fp8 / 2 ** 20:.0f} MiB ({b_fp8 / b_floor:.2f}x); "
          f"all 19 double + 38 single blocks: bf16 {full[0] / 2 ** 30:.1f} GiB, fp8 {full[1] / 2 ** 30:.1f} GiB")
    print(f"forward: bf16 floor {t_floor * 1000:.0f} ms, fp8 storage {t_fp8 * 1000:.0f} ms "
          f"({t_fp8 / t_floor:.2f}x the floor); output relative difference {float(diff):.4f} (fp8 rounding)")


if __name__ == "__main__":
    main()
