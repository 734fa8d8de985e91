"""Benchmark: the Lora patcher at real DiT widths (issue 12 item 5), each operation against its fused in-place floor.

Builds diffusers transformers with real layer widths and a few blocks (seeded random weights, std 1/sqrt(fan_in),
bf16, on CPU), writes rank-16/32 Loras A and B in diffusers PEFT layout (`transformer.<module>.lora_A/B.weight`,
bf16 like real files) for every attention and MLP Linear of those blocks (not the adaLN modulations, which trainers
leave out by default), loads them with the extension's own loader, and times, median of --repeats:

  apply       no Lora → A                 same set     A → A again (must write nothing)
  multiplier  A at 1.0 → A at 0.7         switch       A → B
  restore     A → no Lora

through the patcher with the host's original-weights source (a safetensors file of the touched weights read
through the host's `OriginalWeights`, as `sd_model.original_weights` offers it) and without one (rounding
residual), each divided by the floor of that operation measured in the same run (scripts/bench_lora_floors.py:
`W.view(out, -1).addmm_(up, down)` with fp32 accumulation for 16-bit in blocks of rows, the block size calibrated
per operation; from the in-memory original for switch/multiplier; restore: one copy of the original bytes). Each
repeat runs each op on ours and the floor back to back, who goes first alternating (scripts/bench_lora_paired.py);
ratios are medians of the per-repeat ratios. Neither side reads Lora
files or plans. The per-layer cost is extrapolated to the full model by touched bytes (each op is memory-bound:
time ∝ bytes): FLUX.1 19 double + 38 single blocks, SD3.5 Large 38 joint blocks. Memory held for restore is shown
as % of the touched weights.

  flock /tmp/bench.lock nice -n 15 venv/bin/python scripts/bench_lora_dit.py [--models flux,sd35] [--ranks 16,32]
      [--repeats 5] [--residual-repeats N] [--flux-blocks 2,3] [--sd35-blocks 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "extensions-builtin", "Lora")):
    if _p not in sys.path:
        sys.path.append(_p)
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("GRADIO_ANALYTICS_ENABLED", "False")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

OPS = ("apply", "same set", "multiplier", "switch", "restore")
GOAL = 1.1
FULL = {"flux": (19, 38), "sd35": (38, 0)}  # (double/joint blocks, single blocks) of the full model


class Model:
    """What the extension's layer map reads from a host model: components() and the family flag."""

    def __init__(self, transformer, family: str):
        self.transformer = transformer
        self.is_flux = family == "flux"
        self.is_sd3 = family == "sd35"
        self.is_sd1 = self.is_sd2 = self.is_sdxl = False

    def components(self) -> dict:
        return {"transformer": self.transformer}


def build(family: str, double: int, single: int):
    """A real-width transformer with `double` (joint) and `single` blocks, random weights (std 1/sqrt(fan_in)), bf16."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    with torch.device("meta"):
        if family == "flux":  # FLUX.1: hidden 3072 (24 × 128), MLP 12288; single linear1 3072→21504, linear2 15360→3072
            t = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True)
        else:  # SD3.5 Large: hidden 2432 (38 × 64), MLP 9728
            t = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=double,
                                      attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                      caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=192, qk_norm="rms_norm")
    t = t.to_empty(device="cpu").to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for p in t.buffers():
            p.zero_()
    return t


def targets(transformer) -> dict[str, torch.nn.Linear]:
    """Every attention and MLP Linear of the blocks (q/k/v/out, add_*, ff, ff_context, proj_mlp, proj_out)."""
    res = {}
    for path, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and "blocks." in path and ".norm" not in path:
            res[path] = m
    return res


def write_lora(path: str, layers: dict, rank: int, seed: int, strength: float) -> None:
    """PEFT-layout bf16 Lora, ΔW rms = strength × W rms per layer (alpha = rank)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in layers.items():
        down = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
        up = torch.randn(m.out_features, rank, generator=g) * (strength / rank ** 0.5 / m.in_features ** 0.5)
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16).contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16).contiguous()
    save_file(tensors, path)


PAIRED = {"apply": "apply 1", "same set": "same set", "multiplier": "multiplier", "switch": "switch",
          "restore": "remove"}  # this table's names → scripts/bench_lora_paired's


def bench(layers, module_paths, nets, source, repeats, clock, residual_repeats: int | None = None) -> dict:
    """Ours (source, then residual) and the floor timed in pairs, op by op (scripts/bench_lora_paired.py: each
    repeat runs an op on both sides back to back, who goes first alternating, so this machine's drift over
    seconds hits both sides of a ratio); ratios are medians of the per-repeat ratios."""
    from scripts import bench_lora_paired as paired
    ops = tuple(PAIRED.values())
    floor = paired.Floor(layers, nets, torch.device("cpu"), clock, ops=tuple(o for o in ops if o != "same set"))
    res = {"floor chunks": dict(floor.blocks), "calibration": floor.calibration}
    for how in ("source", "residual"):
        side = paired.Ours(layers, module_paths, nets, how, source if how == "source" else None, clock,
                           trim=lambda: None, memory=lambda: 0)
        ratios = paired.run_pairs(side, floor, repeats if how == "source" else residual_repeats or repeats, ops=ops)
        got = side.result(ratios)
        res[how] = {op: got[PAIRED[op]] for op in OPS}
        res[how]["ratio"] = {op: got["paired ratio"][PAIRED[op]] for op in OPS if PAIRED[op] in floor.ops}
        res[how]["held"] = got["held 1 (accounted)"]
        res[how]["stats"] = got["stats"]
    got = floor.result()
    res["floor"] = {op: got[PAIRED[op]] for op in OPS if PAIRED[op] in floor.ops}
    return res


def run(family: str, double: int, single: int, rank: int, repeats: int, strength: float,
        residual_repeats: int | None = None) -> dict:
    work = tempfile.mkdtemp(prefix="bench-dit-")
    try:  # the checkpoint of the touched weights is GBs at these widths: never left behind
        return run_in(work, family, double, single, rank, repeats, strength, residual_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in(work: str, family: str, double: int, single: int, rank: int, repeats: int, strength: float,
           residual_repeats: int | None = None) -> dict:
    import lora_delta
    import lora_layers
    import lora_loader
    import network

    from scripts.bench_lora_patcher import Clock, checkpoint_source, weights_checksum
    t0 = time.perf_counter()
    model = Model(build(family, double, single), family)
    layer_map = lora_layers.LayerMap(model)
    chosen = targets(model.transformer)
    paths = {}
    for i, name in enumerate("AB"):
        paths[name] = os.path.join(work, f"{name}.safetensors")
        write_lora(paths[name], chosen, rank, 10 + i, strength)
    nets = {n: lora_loader.load_network(n, network.NetworkOnDisk(n, p), layer_map) for n, p in paths.items()}
    for n, net in nets.items():
        assert len(net.modules) == len(chosen) and not net.load_errors, (n, len(net.modules), len(chosen))
    names = list(nets["A"].modules)
    touched = sum(layer_map.layers[n].weight.nbytes for n in names)
    source = checkpoint_source(work, model, names)
    checksum = weights_checksum(model)
    res = {"family": family, "blocks": (double, single), "rank": rank, "layers": len(names), "touched": touched,
           "build s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    clock = Clock(torch.device("cpu"))
    layers = {n: layer_map.layers[n] for n in layer_map.layers}
    res.update(bench(layers, layer_map.module_paths, nets, source, repeats, clock, residual_repeats))
    res["patcher chunk"] = lora_delta.CPU_CHUNK
    res["exact"] = weights_checksum(model) == checksum
    res["full touched"] = full_touched(family, model.transformer, chosen, double, single)
    return res


def full_touched(family: str, transformer, chosen: dict, double: int, single: int) -> int:
    """Bytes of the same targets in the full model: per-block bytes × the full model's block counts."""
    per_double = sum(m.weight.nbytes for p, m in chosen.items() if p.startswith("transformer_blocks.")) / max(double, 1)
    per_single = sum(m.weight.nbytes for p, m in chosen.items()
                     if p.startswith("single_transformer_blocks.")) / max(single, 1)
    full_double, full_single = FULL[family]
    return int(per_double * full_double + per_single * full_single)


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 10 else f"{x:.1f} s"


def chunk_name(chunk) -> str:
    from scripts.bench_lora_floors import chunk_name as name
    return name(chunk)


def table(r: dict) -> str:
    name = {"flux": "FLUX.1", "sd35": "SD3.5 Large"}[r["family"]]
    d, s = r["blocks"]
    scale = r["full touched"] / r["touched"]
    lines = [f"\n### {name} widths, {d} {'double' if r['family'] == 'flux' else 'joint'}"
             + (f" + {s} single" if s else "") + f" blocks, rank {r['rank']}, bf16, CPU ({r['threads']} threads): "
             f"{r['layers']} layers, {r['touched'] / 2 ** 30:.2f} GiB touched (full model: "
             f"{r['full touched'] / 2 ** 30:.1f} GiB)",
             "| op | floor | ours (source) | ratio | ours (residual) | ratio | full model, ours (source) |",
             "|---|---|---|---|---|---|---|"]
    for op in OPS:
        floor = r["floor"].get(op)
        row = [op, fmt_s(floor) if floor is not None else "0 (nothing to do)"]
        for how in ("source", "residual"):
            t = r[how][op]
            row.append(fmt_s(t))
            if floor:
                ratio = r[how]["ratio"][op]
                row.append(f"{ratio:.2f}x" + (" (MISSED)" if ratio > GOAL else ""))
            else:
                row.append("-")
        row.append(fmt_s(r["source"][op] * scale))
        lines.append("| " + " | ".join(row) + " |")
    held = [f"{how} {r[how]['held'] / 2 ** 20:.1f} MiB = {100 * r[how]['held'] / r['touched']:.2f} %"
            for how in ("source", "residual")]
    lines.append(f"held for restore after apply: {'; '.join(held)} of the touched weights (goal <= 5 %)")
    lines.append(f"floor block sizes (calibrated): {r['floor chunks']}; the patcher's: "
                 f"{chunk_name(r['patcher chunk'])} elements")
    for op, by_size in r["calibration"].items():
        lines.append(f"  calibration, {op} (best of 2): " + ", ".join(f"{k} {fmt_s(t)}" for k, t in by_size.items()))
    lines.append(f"restore bit-exact after every run: {r['exact']}; patcher stats "
                 f"source {r['source']['stats']}, residual {r['residual']['stats']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,sd35")
    parser.add_argument("--ranks", default="16,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--residual-repeats", type=int, default=0,
                        help="repeats of the residual side (default: --repeats; it is 5-14x slower)")
    parser.add_argument("--strength", type=float, default=0.03, help="ΔW rms / W rms of each Lora")
    parser.add_argument("--flux-blocks", default="2,3", help="double,single blocks built")
    parser.add_argument("--sd35-blocks", default="3", help="joint blocks built")
    args = parser.parse_args()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the host's flag parser must not see ours
    try:
        import lora_layers  # noqa: F401  (imports the host's shared state before timing)
    finally:
        sys.argv = argv
    for family in args.models.split(","):
        blocks = [int(x) for x in (args.flux_blocks if family == "flux" else args.sd35_blocks).split(",")]
        double, single = blocks[0], (blocks[1] if len(blocks) > 1 else 0)
        for rank in (int(x) for x in args.ranks.split(",")):
            print(f"running {family} rank {rank} ...", file=sys.stderr, flush=True)
            print(table(run(family, double, single, rank, args.repeats, args.strength, args.residual_repeats)),
                  flush=True)
    print(f"\nmedian of {args.repeats} (residual: {args.residual_repeats or args.repeats}); "
          f"ΔW rms = {args.strength:g} × W rms; floor = fused in-place addmm_ (fp32 "
          "accumulate in cache-sized blocks), from the in-memory original for multiplier/switch, one copy of the "
          "original for restore; full-model column = ours × (full-model touched bytes / touched bytes)")


if __name__ == "__main__":
    main()
