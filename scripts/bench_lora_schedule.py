"""Benchmark: step-scheduled Lora weights (`<lora:A:0@0,1@0.5>`, `stop=`) over a 20-step pass on SD1.5 shapes.

Builds the SD1.5-shaped model of scripts/bench_lora_patcher.py (UNet + CLIP-L, random weights, fp32 or bf16, the host's
original-weight source over a checkpoint of the touched weights), one rank-32 kohya LoRA on all targets, and runs
each schedule through the extension's own path: ExtraNetworkLora.activate, then A1111's cfg_denoiser callback before
each of the 20 steps (no sampling in between: the schedule's own cost is what is measured).

  merged      total time of the pass's weight changes / (k × one apply), k = the distinct weights the schedule
              takes over the steps (one apply = the median time of `<lora:A:1>` merged from the originals, the
              network already parsed, as in the schedule's runs): goal ≤ 1
  functional  the median re-sync time of a step whose weight changed / the median time of one UNet forward at
              64×64 latents (512 px), batch 2 (cond + uncond): goal ≤ 3 %
After the runs every weight is checked bit for bit against the original.

usage: python scripts/bench_lora_schedule.py [--dtype fp32|bf16] [--steps 20] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_DIR = os.path.join(ROOT, "extensions-builtin", "Lora")
for _p in (ROOT, LORA_DIR):
    if _p not in sys.path:
        sys.path.append(_p)

SCHEDULES = ["<lora:A:0@0,1@1>", "<lora:A:0@0,1@0.5>", "<lora:A:1:stop=10>", "<lora:A:0.2@0,1@5,1@15,0.2@19>"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the host's flag parser must not see ours
    work = tempfile.mkdtemp(prefix="bench-schedule-")
    os.environ.setdefault("SD_WEBUI_DATA_DIR", work)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import extra_networks_lora
    import networks

    from modules import extra_networks, processing, script_callbacks, shared
    from scripts import bench_lora_patcher as bench
    from scripts import make_demo_loras as demo
    sys.argv = argv

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    family, model = bench.build_model("sd15", dtype, torch.device("cpu"))
    shapes = demo.layer_shapes_from_components(model.components())
    targets = demo.select_layers(shapes, False)
    bench.write_loras(work, model, family, targets, 32, 0.03, ("A",))
    model.original_weights = bench.checkpoint_source(work, model, list(targets))
    checksum = bench.weights_checksum(model)
    shared.cmd_opts.lora_dir = work
    networks.list_available_networks()
    networks.load_networks(["A"], [1.0], [1.0], [None], sd_model=model)  # parse once: runs below exclude reading
    networks.load_networks([], sd_model=model)

    def timed(fn, *a):
        t = time.perf_counter()
        res = fn(*a)
        return time.perf_counter() - t, res

    apply_times = []
    for _ in range(args.repeats):
        apply_times.append(timed(lambda: networks.load_networks(["A"], [1.0], [1.0], [None], sd_model=model))[0])
        networks.load_networks([], sd_model=model)
    one_apply = statistics.median(apply_times)

    def run_pass(prompt: str) -> tuple[float, list[float], int]:
        p = processing.StableDiffusionProcessing(sd_model=model, prompt=prompt)
        p.all_prompts, p.steps = [prompt], args.steps
        _, data = extra_networks.parse_prompt(prompt)
        handler = extra_networks_lora.ExtraNetworkLora()
        t = time.perf_counter()
        handler.activate(p, data["lora"])
        total = time.perf_counter() - t
        changed = []
        for step in range(1, args.steps):
            before = handler.step_weights.resyncs
            t, _ = timed(script_callbacks.cfg_denoiser_callback, script_callbacks.CFGDenoiserParams(
                None, None, None, step, args.steps, None, None))
            total += t
            if handler.step_weights.resyncs > before:
                changed.append(t)
        tag = next(iter(handler.step_weights.tags.values()))
        distinct = len({tag.multipliers(s, args.steps)[1] for s in range(args.steps)})
        handler.deactivate(p)
        script_callbacks.remove_callbacks_for_function(handler.before_step)
        networks.load_networks([], sd_model=model)
        return total, changed, distinct

    rows = []
    shared.opts.data["lora_functional"] = False
    for prompt in SCHEDULES:
        runs = [run_pass(prompt) for _ in range(args.repeats)]
        total = statistics.median(r[0] for r in runs)
        k = runs[0][2]
        rows.append((prompt, k, total, total / (k * one_apply)))

    shared.opts.data["lora_functional"] = True
    unet = model.components()["unet"]
    latents = torch.randn(2, 4, 64, 64, dtype=dtype)
    context = torch.randn(2, 77, 768, dtype=dtype)
    networks.load_networks(["A"], [1.0], [1.0], [None], sd_model=model)
    forward = []
    with torch.no_grad():
        for _ in range(args.repeats):
            forward.append(timed(lambda: unet(latents, 10, encoder_hidden_states=context))[0])
    networks.load_networks([], sd_model=model)
    step_time = statistics.median(forward)
    functional = []
    for prompt in SCHEDULES:
        runs = [run_pass(prompt) for _ in range(args.repeats)]
        changed = [t for r in runs for t in r[1]]
        functional.append((prompt, statistics.median(changed) if changed else 0.0))
    shared.opts.data["lora_functional"] = False
    exact = bench.weights_checksum(model) == checksum

    print(f"SD1.5 shapes, {args.dtype}, CPU, {torch.get_num_threads()} threads, {args.steps} steps, median of "
          f"{args.repeats}; one apply of `<lora:A:1>` (rank 32, {len(targets)} layers): {one_apply * 1000:.0f} ms; "
          f"one UNet forward (64x64 latents, batch 2): {step_time:.2f} s; weights exact after all runs: {exact}")
    print()
    print("| schedule | distinct weights k | merged: all steps | / (k × one apply) | functional: re-sync per "
          "changed step | / UNet step |")
    print("|---|---|---|---|---|---|")
    for (prompt, k, total, ratio), (_, resync) in zip(rows, functional, strict=True):
        print(f"| `{prompt}` | {k} | {total * 1000:.0f} ms | {ratio:.2f}× | {resync * 1000:.1f} ms | "
              f"{resync / step_time * 100:.2f} % |")


if __name__ == "__main__":
    main()
