"""Benchmark: applying each adapter type beyond LoRA / LoHa / LoKr (full, IA3, OFT, BOFT, GLoRA, DoRA) against that
type's fused floor (scripts/bench_lora_type_floors.py), on the layer shapes of scripts/bench_lora_patcher.py.

Builds the SD1.5-shaped model of bench_lora_patcher (random weights, std 1/sqrt(fan_in)), writes one file per type
for all kohya LoRA targets (fp16, ΔW rms ≈ --strength × W rms; OFT: LyCORIS diag-OFT blocks of --block; BOFT: 4
stages of --block/4-row blocks; GLoRA:
rank --rank; DoRA: a rank --rank kohya LoRA with kohya's per-input-channel `dora_scale`), and times applying each
from the original weights with the host's original-weights source, paired with the floor as bench_lora_patcher
does (each repeat both sides back to back, who goes first alternating; the ratio is the median of per-repeat
ratios). Neither side reads files or plans. After each type's first pair the two results are compared (max relative
error), so a floor that computes something else is caught; after the runs every weight is checked bit for bit
against the original. The goal (issue 9 item 2): each type's apply within 1.2× of its floor.

usage: python scripts/bench_lora_types.py [--model sd15] [--dtypes fp32,bf16] [--types full,ia3,oft,boft,glora,dora]
       [--repeats 5] [--threads 1] [--rank 32] [--block 32] [--json FILE]
(also run by `scripts/bench_lora_patcher.py --other-types`)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from scripts import bench_lora_patcher as bench  # noqa: E402  (sets up the paths and the offline environment)

TYPES = ("full", "ia3", "oft", "boft", "glora", "dora")
FILES = {"full": "F", "ia3": "I", "oft": "O", "boft": "T", "glora": "G", "dora": "D"}
GOAL = 1.2


def type_tensors(kind: str, targets: dict, family: str, structure, rank: int, block: int, strength: float,
                 seed: int) -> dict:
    """One file's tensors (fp16) for every target layer, with ΔW rms about `strength` × W rms."""
    import torch

    from scripts import make_demo_loras as demo
    gen = torch.Generator().manual_seed(seed)
    f16 = torch.float16
    res = demo.lora_tensors(targets, family, structure, rank=rank, alpha=rank / 2, seed=seed, strength=strength) \
        if kind == "dora" else {}
    for canonical, shape in targets.items():
        key = demo.kohya_key(canonical, family, structure)
        out_dim, fan_in, _ = bench._shape_info(shape)
        sigma_w = fan_in ** -0.5
        if kind == "full":
            res[f"{key}.diff"] = (torch.randn(shape, generator=gen) * strength * sigma_w).to(f16)
        elif kind == "ia3":
            res[f"{key}.weight"] = (torch.randn(out_dim, generator=gen) * strength).to(f16)
        elif kind == "oft":
            b = block if out_dim % block == 0 else next(n for n in (16, 8, 4, 2, 1) if out_dim % n == 0)
            # R ≈ I + 2Q for a small skew Q = (B − Bᵀ)/2: ΔW rms ≈ 2·σ_B·sqrt(b/2)·W rms
            res[f"{key}.oft_blocks"] = (torch.randn((out_dim // b, b, b), generator=gen)
                                        * strength / (2 * (b / 2) ** 0.5)).to(f16)
        elif kind == "boft":  # 4 stages of blocks of block/4 rows: butterfly spans of 2³·block/4 = 2·block rows
            stages = 4
            b = next(n for n in (max(2, block // 4), 4, 2) if out_dim % (n * 2 ** (stages - 1)) == 0)
            res[f"{key}.oft_blocks"] = (torch.randn((stages, out_dim // b, b, b), generator=gen)
                                        * strength / (2 * (b / 2) ** 0.5 * stages ** 0.5)).to(f16)
        elif kind == "glora":
            r = min(rank, out_dim, fan_in)
            sigma_a = (strength / (fan_in * r) ** 0.5) ** 0.5  # W·(a1·a2): σ_W·sqrt(in)·σ_a²·sqrt(r)
            sigma_b = (strength * sigma_w / r ** 0.5) ** 0.5  # b1·b2: σ_b²·sqrt(r)
            res[f"{key}.a1.weight"] = (torch.randn((fan_in, r), generator=gen) * sigma_a).to(f16)
            res[f"{key}.a2.weight"] = (torch.randn((r, fan_in), generator=gen) * sigma_a).to(f16)
            res[f"{key}.b1.weight"] = (torch.randn((out_dim, r), generator=gen) * sigma_b).to(f16)
            res[f"{key}.b2.weight"] = (torch.randn((r, fan_in), generator=gen) * sigma_b).to(f16)
            res[f"{key}.alpha"] = torch.tensor(float(r), dtype=f16)
        elif kind == "dora":  # kohya: the input channels' magnitudes, about the weight's own column norms
            in_dim = shape[1]
            norm = sigma_w * (out_dim * fan_in / in_dim) ** 0.5
            res[f"{key}.dora_scale"] = ((1 + strength * torch.randn((1, in_dim), generator=gen)) * norm).to(f16)
    return res


class OursTypes:
    """The patcher (source restore) applying one file at a time from the original weights."""

    def __init__(self, layers, module_paths, nets, source, clock):
        import lora_patcher
        self.patcher = lora_patcher.Patcher(prefer=(lora_patcher.SOURCE, lora_patcher.CLONE))
        self.layers, self.module_paths, self.nets, self.source, self.clock = layers, module_paths, nets, source, clock

    def sync(self, *names: str) -> int:
        import lora_plan
        plan = lora_plan.build_plan(self.layers, [self.nets[n] for n in names]) if names else {}
        return self.patcher.sync(self.layers, plan, self.source, self.module_paths)

    def run(self, kind: str, keep: bool = False) -> float:
        self.sync()
        self.sync("A")  # a known state after the floor's writes (as bench_lora_paired.Ours does), untimed
        self.sync()
        t, written = self.clock(self.sync, FILES[kind])
        assert written == len(self.nets[FILES[kind]].modules), (kind, written)
        if not keep:
            self.sync()
        return t


def relative_error(weights: dict, reference: dict) -> float:
    worst = 0.0
    for name, w in weights.items():
        ref = reference[name].float()
        worst = max(worst, float((w.float() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def run_child(args) -> dict:
    argv, sys.argv = sys.argv, sys.argv[:1]
    work = tempfile.mkdtemp(prefix="bench-lora-types-")
    os.environ.setdefault("SD_WEBUI_DATA_DIR", work)
    import torch
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lora_delta
    import lora_layers
    import lora_loader
    import network

    from scripts import make_demo_loras as demo
    from scripts.bench_lora_floors import chunk_name
    from scripts.bench_lora_type_floors import TypeFloors
    sys.argv = argv
    try:
        device, dtype = torch.device("cpu"), getattr(torch, bench.DTYPES[args.child_dtype])
        clock = bench.Clock(device)
        family, model = bench.build_model(args.model, dtype, device)
        layer_map = lora_layers.LayerMap(model)
        targets = demo.select_layers(demo.layer_shapes_from_components(model.components()), False)
        touched = sum(model.components()[n.partition(".")[0]].get_submodule(n.partition(".")[2]).weight.nbytes
                      for n in targets)
        result = {"model": args.model, "dtype": args.child_dtype, "threads": torch.get_num_threads(),
                  "patcher block": lora_delta.CPU_CHUNK, "targets": len(targets), "touched bytes": touched,
                  "types": {}}
        structure = layer_map.structure
        paths = {}
        for i, kind in enumerate(("lora",) + tuple(args.types)):
            name = "A" if kind == "lora" else FILES[kind]
            tensors = demo.lora_tensors(targets, family, structure, rank=args.rank, alpha=args.rank / 2, seed=10,
                                        strength=args.strength) if kind == "lora" else \
                type_tensors(kind, targets, family, structure, args.rank, args.block, args.strength, 40 + i)
            paths[name] = os.path.join(work, f"{name}.safetensors")
            bench.write_safetensors(paths[name], tensors, {"ss_output_name": name})
        source = bench.checkpoint_source(work, model, list(targets))
        checksum = bench.weights_checksum(model)
        nets = {}
        for name, path in paths.items():
            nets[name] = lora_loader.load_network(name, network.NetworkOnDisk(name, path), layer_map)
            assert len(nets[name].modules) == len(targets), (name, len(nets[name].modules), nets[name].load_errors)
        ours = OursTypes(layer_map.layers, layer_map.module_paths, nets, source, clock)
        floors = TypeFloors(layer_map.layers, {n: nets[n] for n in nets if n != "A"}, device)
        for kind in args.types:
            factors = getattr(floors, f"{kind}_factors")(FILES[kind])
            loop = getattr(floors, f"apply_{kind}")
            op = lambda loop=loop, factors=factors: loop(factors)  # noqa: E731
            chunk, calibration = floors.calibrate(op, clock)
            # the floor and ours compute the same weights (within rounding)
            floors.chunk = chunk
            op()
            floor_weights = {n: w.detach().clone() for n, w in floors.weights.items()}
            floors.remove()
            ours.run(kind, keep=True)
            error = relative_error(floors.weights, floor_weights)
            ours.sync()
            del floor_weights
            ratios, t_ours, t_floor = [], [], []
            for r in range(args.repeats):
                if r % 2 == 0:
                    to = ours.run(kind)
                    tf = clock(op)[0]
                    floors.remove()
                else:
                    tf = clock(op)[0]
                    floors.remove()
                    to = ours.run(kind)
                ratios.append(to / tf)
                t_ours.append(to)
                t_floor.append(tf)
            result["types"][kind] = {"ours": statistics.median(t_ours), "floor": statistics.median(t_floor),
                                     "ratio": statistics.median(ratios), "block": chunk_name(chunk),
                                     "calibration": calibration, "max relative error vs floor": error}
            del factors, op
            bench.trim()
            print(f"  {kind}: ratio {result['types'][kind]['ratio']:.2f}", file=sys.stderr, flush=True)
        ours.sync()
        result["exact"] = bench.weights_checksum(model) == checksum
        result["stats"] = dict(ours.patcher.stats)
        result["peak rss"] = bench.peak_rss()
        return result
    finally:
        shutil.rmtree(work, True)


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['model']} {r['dtype']}: {r['error']}")
            continue
        lines.append(f"\n### {r['model'].upper()} {r['dtype']} ({r['threads']} threads, patcher blocks "
                     f"2^{r['patcher block'].bit_length() - 1}): {r['targets']} layers, "
                     f"{r['touched bytes'] / 2 ** 20:.0f} MiB touched, restore "
                     f"{'bit-exact' if r['exact'] else 'NOT EXACT'}, peak RSS {r['peak rss'] / 2 ** 30:.1f} GiB")
        lines.append("| type | floor (block) | ours | ours / floor | max rel. error vs floor |")
        lines.append("|---|---|---|---|---|")
        for kind, t in r["types"].items():
            ratio = f"{t['ratio']:.2f}x" + (f" (MISSED, goal {GOAL:g}x)" if t["ratio"] > GOAL else "")
            lines.append(f"| {kind} | {bench.fmt_s(t['floor'])} ({t['block']}) | {bench.fmt_s(t['ours'])} | {ratio} | "
                         f"{t['max relative error vs floor']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=sorted(bench.MODELS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--block", type=int, default=32, help="OFT block size")
    parser.add_argument("--strength", type=float, default=0.03)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    unknown = set(args.types) - set(TYPES)
    if unknown:
        parser.error(f"unknown types {sorted(unknown)} (known: {', '.join(TYPES)})")
    if args.child_dtype:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    results = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child-dtype", dtype, "--model", args.model,
               "--types", ",".join(args.types), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--rank", str(args.rank), "--block", str(args.block), "--strength", str(args.strength)]
        print(f"running {args.model} {dtype} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else
                       {"model": args.model, "dtype": dtype, "error": f"exit {proc.returncode} (see stderr above)"})
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        print(table(results[-1:]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\nmedian of {args.repeats} paired repeats; floor = that type's fused in-place loop "
          f"(scripts/bench_lora_type_floors.py) at its fastest block size; goal ≤ {GOAL:g}x (issue 9 item 2)")
    print(table(results))


if __name__ == "__main__":
    main()
