"""What functional mode (`lora_functional`) holds per adapter type, on SD1.5 shapes: rank-32 LoRA, LoHa, LoKr, OFT
(LyCORIS's layouts for that rank), DoRA and GLoRA over every layer LyCORIS's default preset targets (UNet
Transformer2D/ResnetBlock2D/Down-/Upsample2D Linear and Conv2d layers, CLIP-L attention and MLP).

The model is built on the meta device. "accelerator": the network's factors are elsewhere (CPU), so each branch
(NetworkModule.bypass) holds one copy of them on the model's device in the model's dtype, plus what it derives from
the weight (GLoRA's W×a1, DoRA's per-channel scale), counted by the branch's `nbytes`. "same device": the factors
are already where the model is (a CPU host), so a branch holds only what it derives. The old functional mode kept
a weight-sized ΔW for every non-LoRA type: 100 % of the targeted weights. "held / 1 copy": what the branches hold
over one copy of the network's parts in the model's dtype (1.00x: nothing beyond the factors themselves; more:
what a type derives from the weight, DoRA's per-channel scale, GLoRA's W×a1).

usage: python scripts/bench_lora_functional_memory.py [--rank 32] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "extensions-builtin", "Lora"), os.path.join(ROOT, "scripts")):
    if _p not in sys.path:
        sys.path.append(_p)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNET_TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
GOAL_KINDS = ("loha", "lokr", "oft")  # issue 10: held ≤ 5 % of the targeted weights at rank 32 on SD1.5 shapes


def target_layers(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from bench_lora_patcher import CLIP_L, SD15_UNET
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(dtype)
    layers = {}
    for name, block in unet.named_modules():
        if type(block).__name__ in UNET_TARGETS:
            for sub, layer in block.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    layers[f"unet.{name}.{sub}"] = layer
    for name, layer in clip.named_modules():
        if isinstance(layer, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            layers[f"text_encoder.{name}"] = layer
    return layers


def parts_for(kind: str, shape: tuple, rank: int, g: torch.Generator) -> dict:
    """The file parts LyCORIS writes for this layer shape at this rank (its factorizations)."""
    from lycoris.functional import diag_oft
    from lycoris.functional.general import factorization

    out_dim, in_dim, *k = shape
    flat_in = in_dim * (k[0] * k[1] if k else 1)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.01

    if kind == "lora":
        return {"lora_up.weight": r(out_dim, rank), "lora_down.weight": r(rank, in_dim, *k), "alpha": torch.tensor(1.0)}
    if kind == "dora":
        return {**parts_for("lora", shape, rank, g), "dora_scale": r(1, in_dim, *([1] * len(k))).abs() + 1}
    if kind == "loha":
        return {"hada_w1_a": r(out_dim, rank), "hada_w1_b": r(rank, flat_in), "hada_w2_a": r(out_dim, rank),
                "hada_w2_b": r(rank, flat_in), "alpha": torch.tensor(1.0)}
    if kind == "lokr":  # LyCORIS factor -1: balanced halves, W2 low-rank only when rank < its size / 2
        out_m, out_n = factorization(out_dim, -1)
        in_m, in_n = factorization(in_dim, -1)
        parts = {"lokr_w1": r(out_m, in_m), "alpha": torch.tensor(1.0)}
        if rank < max(out_n, in_n) / 2:
            parts.update({"lokr_w2_a": r(out_n, rank), "lokr_w2_b": r(rank, in_n * (flat_in // in_dim))})
        else:
            parts["lokr_w2"] = r(out_n, in_n, *k)
        return parts
    if kind == "oft":
        blocks, _ = diag_oft.weight_gen(torch.empty(shape, device="meta"), rank)
        return {"oft_blocks": r(*blocks.shape)}
    if kind == "glora":
        a1 = r(in_dim, rank) if not k else r(in_dim, rank, 1, 1)
        a2 = r(rank, in_dim) if not k else r(rank, in_dim, 1, 1)
        b1 = r(out_dim, rank) if not k else r(out_dim, rank, 1, 1)
        return {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": r(rank, in_dim, *k),
                "alpha": torch.tensor(1.0)}
    raise ValueError(kind)


def measure(kind: str, layers: dict, rank: int, same_device: bool) -> tuple[int, int, int, int]:
    """(bytes the branches hold, bytes of the network's own parts (fp32), bytes of one copy of those parts in the
    model's dtype (the least a branch on another device can hold), targeted weight bytes)."""
    import lora_loader
    import network

    g = torch.Generator().manual_seed(0)
    net = network.Network("bench", None)
    held = parts_bytes = one_copy = weights = 0
    for name, layer in layers.items():
        parts = parts_for(kind, tuple(layer.weight.shape), rank, g)
        if same_device:
            parts = {k: v.to(layer.weight.device) if v.dim() else v for k, v in parts.items()}
        module = lora_loader.build_module(net, network.NetworkWeights(name, name, parts, layer))
        branch = module.bypass(layer, 1.0)
        held += branch.nbytes
        parts_bytes += sum(t.numel() * t.element_size() for t in parts.values() if t.dim())
        one_copy += sum(t.numel() for t in parts.values() if t.dim()) * layer.weight.element_size()
        weights += layer.weight.numel() * layer.weight.element_size()
    return held, parts_bytes, one_copy, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--kinds", default="lora,loha,lokr,oft,dora,glora")
    args = parser.parse_args()
    layers = target_layers(DTYPES[args.dtype])
    print(f"SD1.5 ({args.dtype}), {len(layers)} targeted layers, rank {args.rank}; held = what the hooks keep on "
          "the model's device, as a share of the targeted weights")
    print(f"{'type':<7}{'held, accelerator':>24}{'held, same device':>24}{'file parts (fp32)':>20}"
          f"{'targeted weights':>19}{'held / 1 copy':>15}  goal (≤ 5 %, LoHa/LoKr/OFT)")
    for kind in args.kinds.split(","):
        held, parts, one_copy, weights = measure(kind, layers, args.rank, same_device=False)
        same, _, _, _ = measure(kind, layers, args.rank, same_device=True)
        share = 100 * held / weights
        goal = "-" if kind not in GOAL_KINDS else "met" if share <= 5 else \
            f"MISSED (one copy of the factors alone is {100 * one_copy / weights:.2f} %)"
        print(f"{kind:<7}{held / 2**20:>12.1f}MB{share:>9.2f}% {same / 2**20:>12.1f}MB"
              f"{100 * same / weights:>9.2f}% {parts / 2**20:>17.1f}MB{weights / 2**20:>17.1f}MB"
              f"{held / one_copy:>14.2f}x  {goal}")


if __name__ == "__main__":
    main()
