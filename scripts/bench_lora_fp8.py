"""Measurement behind `lora_fp8_strategy` (extensions-builtin/Lora/lora_fp8.py): the layer-output error of each way
to put a Lora on fp8 weights, against a bf16-base reference (the same Lora merged into the bf16 weights the fp8
ones were rounded from), and each way's memory cost.

Per layer, W16 = bf16 weights (std 1/sqrt(fan_in)), W8 = W16 rounded to float8_e4m3fn (what an fp8 checkpoint holds),
ΔW a rank-r Lora with ΔW rms = strength × W rms, x = seeded inputs (N(0, 1) per feature; "aligned": half of x's
energy in the Lora's input directions, as real activations that a Lora was trained to react to):
    reference   x·cast_bf16(W16 + ΔW)ᵀ
    rtn         x·cast_fp8(W8 + ΔW)ᵀ                      (round to nearest: what merging into fp8 did before)
    upcast      x·cast_bf16(W8 + ΔW)ᵀ                     (LayerDelta.merge into a bf16 weight, as the patcher)
    stochastic  x·sr_fp8(W8 + ΔW, seed)ᵀ                   (lora_fp8.merge_stochastic, as the patcher)
    bypass      x·W8ᵀ + (x·downᵀ)·upᵀ in bf16             (the forward hook's sum)
Reported: relative output error ‖y − y_ref‖/‖y_ref‖ (it includes the fp8 base's own rounding, the same for all),
the Lora's strength kept (projection of the output change on the exact change x·ΔWᵀ: 1 = all of it), and the error
of the Lora's effect alone (‖y − y8‖/‖x·ΔWᵀ‖ with y8 = x·(W8 + ΔW)ᵀ exact). Layers: FLUX.1's real widths (fused qkv
9216×3072, attention out 3072×3072, MLP 12288×3072 / 3072×12288, single linear1 21504×3072, linear2 3072×15360).
Memory cost as a fraction of the FLUX.1 transformer stored in fp8 (block Linears fp8, the rest bf16), for a Lora on
every attention and MLP Linear of the 57 blocks.

    flock /tmp/bench.lock nice -n 15 venv/bin/python scripts/bench_lora_fp8.py [--ranks 16,32]
        [--strengths 0.02,0.05,0.1] [--tokens 256]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "extensions-builtin", "Lora")):
    if _p not in sys.path:
        sys.path.append(_p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
LAYERS = {"qkv": (9216, 3072), "attn out": (3072, 3072), "mlp in": (12288, 3072), "mlp out": (3072, 12288),
          "linear1": (21504, 3072), "linear2": (3072, 15360)}
STRATEGIES = ("rtn", "upcast", "stochastic", "bypass")


def layer_outputs(out_f: int, in_f: int, rank: int, strength: float, tokens: int, aligned: bool, seed: int):
    import lora_delta
    import lora_fp8
    import lora_residual
    import network_lora
    g = torch.Generator().manual_seed(seed)
    w16 = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(BF16)
    w8 = w16.to(FP8)
    down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    up = torch.randn(out_f, rank, generator=g)
    up *= strength * w16.float().norm() / (up @ down).norm()
    x = torch.randn(tokens, in_f, generator=g)
    if aligned:  # half the energy along the Lora's input directions
        inside = torch.randn(tokens, rank, generator=g) @ (down / down.norm(dim=1, keepdim=True))
        x = (x / x.norm(dim=1, keepdim=True) + inside / inside.norm(dim=1, keepdim=True)) * in_f ** 0.5 / 2 ** 0.5
    x = x.to(BF16).float()
    delta = lora_delta.LayerDelta(parts=[network_lora.LowRankRows(up, down)])
    scratch = lora_residual.Scratch(torch.device("cpu"), lora_delta.CPU_CHUNK)
    weights = {}
    weights["rtn"] = torch.empty_like(w8)
    delta.merge(weights["rtn"], w8, scratch)  # a 16-bit/fp8 out goes through fp32 blocks and rounds to nearest
    weights["upcast"] = torch.empty(w8.shape, dtype=BF16)
    delta.merge(weights["upcast"], w8, scratch)
    weights["stochastic"] = torch.empty_like(w8)
    lora_fp8.merge_stochastic(delta, weights["stochastic"], w8, scratch, seed, lora_delta.CPU_CHUNK)
    xb = x.to(BF16)
    ys = {k: F.linear(xb, w.to(BF16)).float() for k, w in weights.items()}
    ys["bypass"] = (F.linear(xb, w8.to(BF16)) + F.linear(F.linear(xb, down.to(BF16)), up.to(BF16))).float()
    exact = x @ (up @ down).T
    y8 = x @ w8.float().T
    ref = x @ (w16.float() + up @ down).to(BF16).float().T
    return ys, ref, y8, exact


def measure(rank: int, strength: float, tokens: int, aligned: bool) -> dict:
    sums = {s: [0.0, 0.0, 0.0] for s in STRATEGIES}  # ‖y−ref‖², <y−y8, exact>, ‖y − (y8 + exact)‖²
    ref_sq, eff_sq, base_sq = 0.0, 0.0, 0.0
    for i, (out_f, in_f) in enumerate(LAYERS.values()):
        ys, ref, y8, exact = layer_outputs(out_f, in_f, rank, strength, tokens, aligned, 100 + i)
        ref_sq += float(ref.square().sum())
        eff_sq += float(exact.square().sum())
        base_sq += float((y8 - ref).square().sum())
        for s, y in ys.items():
            sums[s][0] += float((y - ref).square().sum())
            sums[s][1] += float(((y - y8) * exact).sum())
            sums[s][2] += float((y - y8 - exact).square().sum())
    res = {s: ((v[0] / ref_sq) ** 0.5, v[1] / eff_sq, (v[2] / eff_sq) ** 0.5) for s, v in sums.items()}
    res["no lora"] = ((base_sq / ref_sq) ** 0.5, 0.0, 1.0)
    return res


def flux_memory(rank: int) -> dict:
    """Bytes of the FLUX.1 transformer in fp8 and of each strategy for a Lora on all attention/MLP Linears."""
    h, mlp = 3072, 12288
    double = 2 * (4 * h * h + 2 * h * mlp)  # per stream: q, k, v, out; MLP in/out (img and txt streams)
    double_mod = 2 * 6 * h * h
    single = (3 * h + mlp) * h + h * (h + mlp)
    single_mod = 3 * h * h
    touched = 19 * double + 38 * single
    model = touched + 19 * double_mod + 38 * single_mod  # fp8 bytes (1 per weight) of the block Linears
    model += 2 * 400_000_000 // 10  # embedders, norms, biases, final layer in bf16: about 80 MB
    layers = 19 * 2 * (4 * (h + h) + (h + mlp) * 2) + 38 * ((3 * h + mlp + 4 * h) + (h + mlp + h))
    return {"model": model, "touched": touched, "upcast": 2 * touched, "bypass": 2 * rank * layers,
            "stochastic": 0, "rtn": 0}


def tiny_flux(rank: int, strength: float) -> dict:
    """The same measurement through the extension on the host's tiny-flux model loaded with fp8 block weights."""
    import tempfile

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        from modules import default_models, fp8_storage, sd_models_diffusers, shared  # noqa: F401
    finally:
        sys.argv = argv
    import lora_fp8
    import lora_layers
    import lora_loader
    import lora_patcher
    import lora_plan
    import network
    from safetensors.torch import save_file

    work = tempfile.mkdtemp(prefix="bench-fp8-")
    folder = default_models.ensure_default_models(os.path.join(work, "models"))
    flux_dir = next(f for f in folder if f.endswith("tiny-flux"))
    ref_model = sd_models_diffusers.load(flux_dir, torch.device("cpu"), BF16)
    model = sd_models_diffusers.load(flux_dir, torch.device("cpu"), BF16)
    with torch.no_grad():  # the host's rule for fp8 checkpoints: block Linear weights stored in fp8
        for name, m in model.transformer.named_modules():
            if isinstance(m, torch.nn.Linear) and fp8_storage.keeps_fp8(model.transformer, name + ".weight"):
                m.weight = torch.nn.Parameter(m.weight.to(FP8), requires_grad=False)
    fp8_storage.enable(model.transformer)
    g = torch.Generator().manual_seed(7)
    tensors, deltas = {}, {}
    for path, m in model.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == FP8:
            down = torch.randn(rank, m.in_features, generator=g)
            up = torch.randn(m.out_features, rank, generator=g)
            up *= strength * m.weight.float().norm() / (up @ down).norm()
            tensors[f"transformer.{path}.lora_A.weight"] = down.to(BF16)
            tensors[f"transformer.{path}.lora_B.weight"] = up.to(BF16)
            deltas[path] = up.to(BF16).float() @ down.to(BF16).float()
    lora_path = os.path.join(work, "fp8.safetensors")
    save_file(tensors, lora_path)
    layer_map = lora_layers.LayerMap(model)
    net = lora_loader.load_network("fp8", network.NetworkOnDisk("fp8", lora_path), layer_map)
    net.te_multiplier = net.unet_multiplier = 1.0
    plan = lora_plan.build_plan(layer_map.layers, [net])
    originals = {p: model.transformer.get_submodule(p).weight.detach().clone() for p in deltas}
    cost = lora_fp8.costs(layer_map.layers, plan, model.components().values())
    res = {}
    for strategy in ("rtn", "upcast", "stochastic", "bypass"):
        patcher = lora_patcher.Patcher()
        patcher.fp8_strategy = None if strategy == "rtn" else strategy
        hooks = None
        if strategy == "bypass":
            import lora_functional
            hooks = lora_functional.FunctionalHooks()
            hooks.sync(layer_map.layers, plan)
        else:
            patcher.sync(layer_map.layers, plan)
        sq = dict.fromkeys(("err", "ref", "dot", "eff", "efferr"), 0.0)
        gx = torch.Generator().manual_seed(3)
        for path, delta in deltas.items():
            layer, ref = model.transformer.get_submodule(path), ref_model.transformer.get_submodule(path)
            x = torch.randn(64, layer.in_features, generator=gx).to(BF16)
            with torch.no_grad():
                y = layer(x).float()
                y_ref = F.linear(x.float(), (ref.weight.float() + delta).to(BF16).float(), ref.bias.float())
                y8 = F.linear(x.float(), originals[path].float(), layer.bias.float())
                exact = x.float() @ delta.T
            sq["err"] += float((y - y_ref).square().sum())
            sq["ref"] += float(y_ref.square().sum())
            sq["dot"] += float(((y - y8) * exact).sum())
            sq["eff"] += float(exact.square().sum())
            sq["efferr"] += float((y - y8 - exact).square().sum())
        if hooks is not None:
            hooks.clear(layer_map.layers)
        patcher.sync(layer_map.layers, {})
        exact_back = all(torch.equal(model.transformer.get_submodule(p).weight.view(torch.uint8), o.view(torch.uint8))
                         for p, o in originals.items())
        res[strategy] = ((sq["err"] / sq["ref"]) ** 0.5, sq["dot"] / sq["eff"], (sq["efferr"] / sq["eff"]) ** 0.5,
                         exact_back)
    res["memory"] = {"model": cost.model, "upcast": cost.upcast, "bypass": cost.bypass, "layers": cost.layers,
                     "auto": lora_fp8.resolve("auto", cost)}
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,32")
    parser.add_argument("--strengths", default="0.02,0.05,0.1")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--tiny-strength", type=float, default=0.03)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("### Tiny Flux (host's tiny-flux, block Linears in fp8, bf16 compute), rank 4, "
          f"ΔW = {args.tiny_strength:g} × ‖W‖ per layer, through the patcher / hooks")
    tiny = tiny_flux(4, args.tiny_strength)
    mem = tiny.pop("memory")
    print("| strategy | output error vs bf16 reference | Lora strength kept | Lora-effect error | restore bit-exact |")
    print("|---|---|---|---|---|")
    for s, (err, strength, eff, exact) in tiny.items():
        print(f"| {s} | {err:.4f} | {strength:.3f} | {eff:.3f} | {exact} |")
    print(f"memory for this Lora ({mem['layers']} layers): upcast {mem['upcast'] / mem['model']:.1%} of the model, "
          f"bypass {mem['bypass'] / mem['model']:.2%}; auto picks {mem['auto']}")
    for rank in (int(r) for r in args.ranks.split(",")):
        mem = flux_memory(rank)
        print(f"\n### FLUX.1 widths ({', '.join(LAYERS)}), rank {rank}, {args.tokens} tokens per layer")
        print(f"memory, a Lora on every attention/MLP Linear of the 57 blocks: model {mem['model'] / 2 ** 30:.1f} GiB "
              f"(fp8); upcast {mem['upcast'] / mem['model']:.0%}, bypass {mem['bypass'] / mem['model']:.2%}, "
              "stochastic 0 (restore from the checkpoint; without one a CPU copy of each touched fp8 layer)")
        print("| ΔW/W | inputs | strategy | output error vs bf16 reference | Lora strength kept | Lora-effect error |")
        print("|---|---|---|---|---|---|")
        for strength in (float(s) for s in args.strengths.split(",")):
            for aligned in (False, True):
                res = measure(rank, strength, args.tokens, aligned)
                for s, (err, kept, eff) in res.items():
                    print(f"| {strength:g} | {'aligned' if aligned else 'random'} | {s} | {err:.4f} | {kept:.3f} | "
                          f"{eff:.3f} |", flush=True)


if __name__ == "__main__":
    main()
