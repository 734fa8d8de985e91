"""Benchmark: loading an SD1.5-shaped single-file checkpoint naively vs through sd_disable_initialization.

Writes a .safetensors with random weights in the ldm key layout and the real SD1.5 shapes (UNet 860M, VAE 84M,
CLIP-L 123M parameters), then loads it in fresh subprocesses, one per mode, so each peak RSS is clean:

  naive-fp32    build the diffusers UNet/VAE and the CLIP text model normally (random init, fp32), read the file
                with safetensors.torch.load_file, convert keys, load_state_dict (copies)
  naive-a1111   the same, then .half(): A1111's path without its RAM optimisation, for an fp16 model
  lean-fp32     skeletons on meta without init, the file mapped (modules.safetensors_mmap), keys converted,
                LoadStateDictOnMeta draining it with fp16->fp32 conversion and page release
  lean-fp16     the same at the file's dtype: parameters are the mapped file pages (zero-copy, pre-faulted)

Times are compared with reading the file once (`cat FILE > /dev/null`) after the page cache was warmed by a
first read: dropping caches needs root, so every number here is a warm-cache number.

usage: python scripts/bench_model_loading.py [--dtype fp16|fp32] [--dir DIR] [--modes ...] [--repeat N] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

MODES = ("naive-fp32", "naive-a1111", "lean-fp32", "lean-fp16")

# SD1.5 (v1-inference.yaml) as diffusers configs
UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                   mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                   cross_attention_dim=768, attention_head_dim=8)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512)
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def factories() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_config = CLIPTextConfig(**CLIP_CONFIG)
    return {"unet": lambda: UNet2DConditionModel(**UNET_CONFIG), "vae": lambda: AutoencoderKL(**VAE_CONFIG),
            "text_encoder": lambda: CLIPTextModel(clip_config)}


# --- diffusers -> ldm key names (the tables of diffusers' convert_diffusers_to_original_stable_diffusion.py) ---

def _unet_to_ldm(keys: list[str]) -> dict[str, str]:
    exact = {"time_embedding.linear_1.weight": "time_embed.0.weight",
             "time_embedding.linear_1.bias": "time_embed.0.bias",
             "time_embedding.linear_2.weight": "time_embed.2.weight",
             "time_embedding.linear_2.bias": "time_embed.2.bias",
             "conv_in.weight": "input_blocks.0.0.weight", "conv_in.bias": "input_blocks.0.0.bias",
             "conv_norm_out.weight": "out.0.weight", "conv_norm_out.bias": "out.0.bias",
             "conv_out.weight": "out.2.weight", "conv_out.bias": "out.2.bias"}
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
              ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    for i in range(4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))

    res = {}
    for key in keys:
        name = exact.get(key, key)
        if "resnets" in name:
            for ldm_part, hf_part in resnet:
                name = name.replace(hf_part, ldm_part)
        for ldm_part, hf_part in layer:
            name = name.replace(hf_part, ldm_part)
        res[key] = UNET_PREFIX + name
    return res


def _vae_to_ldm(keys: list[str]) -> dict[str, str]:
    table = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"),
             ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            table.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            table.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            table.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            table.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        table.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]
    res = {}
    for key in keys:
        name = key
        for ldm_part, hf_part in table:
            name = name.replace(hf_part, ldm_part)
        if "attentions" in key:
            for ldm_part, hf_part in attention:
                name = name.replace(hf_part, ldm_part)
        res[key] = VAE_PREFIX + name
    return res


def ldm_layout() -> dict[str, tuple[tuple[int, ...], str]]:
    """{ldm key: (shape, kind)} for the whole checkpoint; kind is "w" (weights), "i64" or "f32" (buffers)."""
    import torch

    res: dict[str, tuple[tuple[int, ...], str]] = {}
    with torch.device("meta"):
        models = {name: make() for name, make in factories().items()}
    unet = models["unet"].state_dict()
    for key, ldm in _unet_to_ldm(list(unet)).items():
        res[ldm] = (tuple(unet[key].shape), "w")
    vae = models["vae"].state_dict()
    for key, ldm in _vae_to_ldm(list(vae)).items():
        shape = tuple(vae[key].shape)
        if "attentions" in key and len(shape) == 2:
            shape = shape + (1, 1)  # ldm's VAE attention uses 1x1 convolutions
        res[ldm] = (shape, "w")
    clip = models["text_encoder"].state_dict()
    for key, value in clip.items():
        res[CLIP_PREFIX + "text_model." + key.removeprefix("text_model.")] = (tuple(value.shape), "w")
    res[CLIP_PREFIX + "text_model.embeddings.position_ids"] = ((1, 77), "i64")  # present in SD1.5 files
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        res[name] = ((1000,), "f32")
    return res


# --- ldm -> diffusers, as a checkpoint loader does it (diffusers' own converters) ---

def split_components(checkpoint) -> dict[str, dict]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = convert_ldm_unet_checkpoint(checkpoint, UNET_CONFIG)
    vae = convert_ldm_vae_checkpoint(checkpoint, VAE_CONFIG)
    clip = convert_ldm_clip_checkpoint(checkpoint)
    clip.pop("text_model.embeddings.position_ids", None)  # a buffer transformers now builds itself
    # transformers 5 dropped the text_model level from CLIPTextModel's own names
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    return {"unet": unet, "vae": vae, "text_encoder": clip}


def verify_layout(layout: dict) -> None:
    """The ldm names written here must convert back to exactly the diffusers models' names and shapes."""
    import torch

    fake = {k: torch.empty(shape, device="meta") for k, (shape, _) in layout.items()}
    converted = split_components(fake)
    with torch.device("meta"):
        models = {name: make() for name, make in factories().items()}
    for name, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted[name].items()}
        if expected != got:
            missing, extra = sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5]
            raise SystemExit(f"ldm layout does not round-trip for {name}: missing {missing}, extra {extra}")


# --- writing the file (streamed: one tensor in memory at a time) ---

def write_checkpoint(path: str, layout: dict, dtype_name: str) -> int:
    import torch

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    codes = {"w": "F16" if dtype_name == "fp16" else "F32", "i64": "I64", "f32": "F32"}
    sizes = {"F16": 2, "F32": 4, "I64": 8}
    # widest dtypes first keeps every tensor aligned
    keys = sorted(layout, key=lambda k: (-sizes[codes[layout[k][1]]], k))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        shape, kind = layout[key]
        n = math.prod(shape) * sizes[codes[kind]]
        header[key] = {"dtype": codes[kind], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            shape, kind = layout[key]
            if kind == "i64":
                t = torch.arange(77, dtype=torch.int64).view(shape)
            elif kind == "f32":
                t = torch.linspace(0.9991, 0.0047, 1000)
            else:
                t = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            f.write(t.numpy().tobytes())
    return os.path.getsize(path)


# --- one measured load, in a child process ---

def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(mode: str, path: str) -> dict:
    import torch

    from modules import safetensors_mmap
    from modules.sd_disable_initialization import load_state_dict_lean

    makers = factories()
    split_components({})  # import the converters before measuring
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    models: dict = {}
    if mode.startswith("naive"):
        from safetensors.torch import load_file

        models = {name: make() for name, make in makers.items()}
        times["build"] = time.perf_counter() - t0
        checkpoint = load_file(path)
        components = split_components(checkpoint)
        del checkpoint
        times["read+convert"] = time.perf_counter() - t0 - times["build"]
        for name in list(components):
            models[name].load_state_dict(components.pop(name))
        if mode == "naive-a1111":
            for model in models.values():
                model.half()
    else:
        dtype = torch.float32 if mode == "lean-fp32" else torch.float16
        checkpoint = safetensors_mmap.open_safetensors_mmap(path, populate=(mode == "lean-fp16"))
        components = split_components(checkpoint)
        del checkpoint
        times["map+convert"] = time.perf_counter() - t0
        for name in list(components):
            part = components.pop(name)
            models[name], _ = load_state_dict_lean(makers[name], part, "cpu", dtype)
            assert not part, f"{name}: {len(part)} entries were not consumed"
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(t.numel() * t.element_size() for m in models.values()
                      for t in list(m.parameters()) + list(m.buffers()))
    rss_end = _rss_now()

    # spot check against the file (not timed)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        probes = {"unet": ("conv_in.weight", UNET_PREFIX + "input_blocks.0.0.weight"),
                  "vae": ("decoder.conv_out.weight", VAE_PREFIX + "decoder.conv_out.weight")}
        for name, (key, ldm_key) in probes.items():
            got = models[name].state_dict()[key]
            want = f.get_tensor(ldm_key).to(got.dtype)
            assert torch.equal(got, want), f"{mode}: {name}.{key} differs from the file"
    return {"mode": mode, "total_s": total, "times": times, "peak_rss": peak, "baseline_rss": baseline,
            "rss_end": rss_end, "model_bytes": model_bytes}


# --- the parent ---

def time_cat(path: str, runs: int = 3) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weights' dtype in the file")
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoint (default: system temp)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode; the fastest is reported")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.file)))
        return

    folder = tempfile.mkdtemp(prefix="bench-loading-", dir=args.dir)
    path = os.path.join(folder, "sd15-shaped.safetensors")
    try:
        layout = ldm_layout()
        verify_layout(layout)
        params = sum(math.prod(s) for s, kind in layout.values() if kind == "w")
        t0 = time.perf_counter()
        size = write_checkpoint(path, layout, args.dtype)
        print(f"wrote {path}: {len(layout)} tensors, {params / 1e6:.1f}M parameters as {args.dtype}, "
              f"{size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s (ldm layout verified against diffusers' "
              f"converters)")
        time_cat(path, runs=1)  # warms the page cache: dropping caches needs root, so all runs are warm
        cat_s = time_cat(path)
        print(f"cat FILE > /dev/null (page cache warm): {cat_s:.3f}s ({size / cat_s / 2**30:.2f} GiB/s)")

        rows = []
        for mode in args.modes:
            best = None
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--file", path],
                                     capture_output=True, text=True)
                lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode != 0 or not lines:
                    print(f"{mode} failed:\n{out.stderr[-3000:]}")
                    break
                result = json.loads(lines[-1][7:])
                if best is None or result["total_s"] < best["total_s"]:
                    best = result
            if best is not None:
                rows.append(best)
                print(f"  {mode}: {best['total_s']:.2f}s, peak RSS {best['peak_rss'] / 2**30:.2f} GiB")

        print()
        print(f"file: {size / 2**30:.2f} GiB ({args.dtype}); cat (warm) {cat_s:.3f}s; "
              f"RSS after imports ~{rows[0]['baseline_rss'] / 2**30:.2f} GiB" if rows else "")
        header = ("mode", "model", "time s", "x cat", "peak RSS GiB", "peak/model", "(peak-base)/model",
                  "peak/file")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            model = r["model_bytes"]
            print("| " + " | ".join([
                r["mode"], f"{model / 2**30:.2f} GiB", f"{r['total_s']:.2f}", f"{r['total_s'] / cat_s:.1f}",
                f"{r['peak_rss'] / 2**30:.2f}", f"{r['peak_rss'] / model:.2f}",
                f"{(r['peak_rss'] - r['baseline_rss']) / model:.2f}", f"{r['peak_rss'] / size:.2f}"]) + " |")
        for r in rows:
            detail = ", ".join(f"{k} {v:.2f}s" for k, v in r["times"].items())
            print(f"  {r['mode']}: {detail}")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
