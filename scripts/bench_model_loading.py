"""Benchmark: the host's checkpoint loader against a naive load, on an SD1.5-shaped single-file checkpoint.

Writes a .safetensors with random weights, the real SD1.5 shapes (UNet 860M, VAE 84M, CLIP-L 123M parameters) and
the original ldm key layout (through modules.sd_models_ldm.to_ldm_state_dict, from components built on meta and
filled with random values), then loads it in fresh subprocesses, one per mode, so each peak RSS is clean:

  naive  what a loader without the managers does: build the diffusers UNet/VAE and CLIP normally (random init,
         fp32), read the whole file (safetensors.torch.load_file), map the keys, load_state_dict (copies), convert
         to the model dtype
  host   modules.sd_models_diffusers.load_single_file: configs from the shapes, skeletons on meta without init,
         the file memory-mapped (for the tensor layout only) and each tensor read out of it with pread() into
         process memory by sd_disable_initialization.load_state_dict_lean, also when the file already has the
         model's dtype (the model must not live on the file), converted where needed, then the pipeline

Each mode then touches one byte of every page of every parameter, as the first generation would, so a lazy map
cannot hide a read: `load+touch` is the number to compare with reading the file. The yardstick is mode `read`: a
child with the same imports reading the file once in order (8 MiB read()s, what `cat` does; `cat FILE >
/dev/null` is printed too). With --cold the file's pages are dropped from the page cache (posix_fadvise DONTNEED,
no root needed) before each child; otherwise every number is warm-cache.

usage: python scripts/bench_model_loading.py [--dtype fp16|fp32] [--model-dtype fp16|fp32] [--cold]
                                             [--modes naive host] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
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

MODES = ("read", "naive", "host")
PAGE = os.sysconf("SC_PAGE_SIZE")

# SD1.5 (v1-inference.yaml) as diffusers configs
UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 +
                   ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                   attention_head_dim=8, norm_num_groups=32)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
CLIP_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# buffers an SD1.5 file carries that no diffusers component takes (the loader must leave them alone)
EXTRA_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")


def _dtype(name: str):
    import torch
    return {"fp16": torch.float16, "fp32": torch.float32}[name]


# --- writing the file ---------------------------------------------------------------------------------------------
def sd15_components(dtype) -> dict:
    """The three SD1.5 components built on meta, then given real storage of `dtype` filled with small random
    values (seeded): about 2 GiB in fp16, 4 GiB in fp32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**UNET_CONFIG), "vae": AutoencoderKL(**VAE_CONFIG),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))}
    generator = torch.Generator().manual_seed(0)
    for module in components.values():
        module.to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
                else:
                    tensor.copy_(torch.arange(tensor.numel()).view(tensor.shape))
    return components


def write_safetensors(path: str, tensors: dict) -> int:
    """A plain safetensors file written one tensor at a time (widest dtypes first keeps every tensor aligned)."""
    import torch

    codes = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}
    keys = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            f.write(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return os.path.getsize(path)


def write_checkpoint(path: str, dtype_name: str) -> tuple[int, int]:
    """Writes the SD1.5-shaped file; returns (file bytes, parameter count)."""
    import torch

    from modules import sd_models_ldm

    components = sd15_components(_dtype(dtype_name))
    tensors = sd_models_ldm.to_ldm_state_dict("sd1", components)
    params = sum(p.numel() for m in components.values() for p in m.parameters())
    for name in EXTRA_BUFFERS:
        tensors[name] = torch.linspace(0.9991, 0.0047, 1000)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).view(1, 77)
    size = write_safetensors(path, tensors)
    return size, params


# --- page cache control -------------------------------------------------------------------------------------------
def drop_from_page_cache(path: str) -> None:
    """Evicts the file's clean pages (what a first read after boot would see), without root."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def time_cat(path: str, cold: bool, runs: int = 3) -> float:
    samples = []
    for _ in range(runs):
        if cold:
            drop_from_page_cache(path)
        t0 = time.perf_counter()
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# --- one measured load, in a child process ------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: that survives execve, so a child would report
    the parent's peak (the parent held the whole model while writing the file)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def naive_load(path: str, dtype) -> dict:
    """Build normally, read everything, copy into the model, convert: peak about model + file + conversion."""
    import safetensors.torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules import sd_models_ldm

    tensors = safetensors.torch.load_file(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    unet_config = sd_models_ldm.infer_unet_config(shapes, "sd1")
    vae_config = sd_models_ldm.infer_vae_config(shapes, "sd1")
    text_config = sd_models_ldm.infer_text_config(shapes, "sd1", "text_encoder")
    components = {"unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(**vae_config),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config))}
    levels = sd_models_ldm.UnetLevels.from_config(unet_config)
    for name, module in components.items():
        state = {}
        for key in module.state_dict():
            ref = sd_models_ldm.ldm_ref("sd1", name, key, levels, len(vae_config["block_out_channels"]))
            state[key] = sd_models_ldm.read_ref(ref, tensors)
        module.load_state_dict(state)
        module.to(dtype)
    del tensors
    return components


def host_load(path: str, dtype) -> dict:
    import torch

    from modules import sd_models_diffusers

    model = sd_models_diffusers.load_single_file(path, torch.device("cpu"), dtype)
    return {k: v for k, v in model.components().items() if v is not None}


def touch_every_page(components: dict) -> None:
    """Reads one byte of every page of every parameter and buffer (faults in what a lazy map left on disk)."""
    import torch

    step = PAGE
    for module in components.values():
        for t in list(module.parameters()) + list(module.buffers()):
            data = t.detach().reshape(-1).view(torch.uint8)
            data[::step].sum()


def run_child(mode: str, path: str, dtype_name: str) -> dict:
    # imports are not part of loading (diffusers and transformers import lazily, on first attribute access)
    import safetensors.torch  # noqa: F401
    import torch
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    from modules import clip_tokenizer, safetensors_mmap, sd_disable_initialization, sd_models_diffusers  # noqa: F401

    dtype = _dtype(dtype_name)
    baseline = _status_bytes("VmHWM")
    t0 = time.perf_counter()
    if mode == "read":  # the yardstick, in the same conditions as a load: read the file once, in order
        buf = bytearray(8 * 1024 * 1024)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return {"mode": mode, "load_s": time.perf_counter() - t0, "touch_s": 0.0, "peak_rss": _status_bytes("VmHWM"),
                "baseline_rss": baseline, "rss_end": _status_bytes("VmRSS"), "model_bytes": 0}
    components = naive_load(path, dtype) if mode == "naive" else host_load(path, dtype)
    loaded = time.perf_counter()
    touch_every_page(components)
    touched = time.perf_counter()
    peak = _status_bytes("VmHWM")
    model_bytes = sum(t.numel() * t.element_size() for m in components.values()
                      for t in list(m.parameters()) + list(m.buffers()))

    # spot checks (not timed): no weight lives in a map of the file; the loaded weights are the file's, at the model
    # dtype
    from modules import mapped_memory

    on_file = mapped_memory.file_backed_tensors(components)
    assert mode == "naive" or not on_file, f"{mode}: {len(on_file)} tensors share memory with the file"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        probes = {"unet": ("conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight"),
                  "vae": ("decoder.conv_out.weight", "first_stage_model.decoder.conv_out.weight"),
                  "text_encoder": ("embeddings.token_embedding.weight",
                                   "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")}
        for name, (key, ldm_key) in probes.items():
            got = components[name].state_dict()[key]
            assert got.dtype == dtype and torch.equal(got, f.get_tensor(ldm_key).to(dtype)), f"{mode}: {name}.{key}"
    return {"mode": mode, "load_s": loaded - t0, "touch_s": touched - loaded, "peak_rss": peak,
            "baseline_rss": baseline, "rss_end": _status_bytes("VmRSS"), "model_bytes": model_bytes}


# --- the parent ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weights' dtype in the file")
    parser.add_argument("--model-dtype", choices=["fp16", "fp32"], default=None,
                        help="the loaded model's dtype (default: the file's)")
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache before each run")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dir", default=None, help="folder for the temporary checkpoint (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    parser.add_argument("--file", help="use this SD1.5-shaped file instead of writing one")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dtype = args.model_dtype or args.dtype

    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.file, model_dtype)))
        return

    folder = None
    if args.file:
        path = args.file
        size = os.path.getsize(path)
        print(f"using {path}: {size / 2**30:.2f} GiB")
    else:
        folder = tempfile.mkdtemp(prefix="bench-loading-", dir=args.dir)
        path = os.path.join(folder, "sd15-shaped.safetensors")
        t0 = time.perf_counter()
        size, params = write_checkpoint(path, args.dtype)
        print(f"wrote {path}: {params / 1e6:.1f}M parameters as {args.dtype}, {size / 2**30:.2f} GiB in "
              f"{time.perf_counter() - t0:.1f}s (to_ldm_state_dict of SD1.5 components)")
    try:
        if not args.cold:
            time_cat(path, cold=False, runs=1)  # warms the page cache
        cat_s = time_cat(path, cold=args.cold)
        cache = "cold" if args.cold else "warm"
        print(f"cat FILE > /dev/null ({cache} page cache): {cat_s:.3f}s ({size / cat_s / 2**30:.2f} GiB/s)")

        rows = []
        for mode in args.modes:
            if args.cold:
                drop_from_page_cache(path)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--file", path,
                                  "--model-dtype", model_dtype], capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"{mode} failed:\n{out.stderr[-3000:]}")
                continue
            rows.append(json.loads(lines[-1][7:]))
            r = rows[-1]
            print(f"  {mode}: {r['load_s']:.2f}s + touch {r['touch_s']:.2f}s, peak RSS "
                  f"{r['peak_rss'] / 2**30:.2f} GiB")

        read = next((r for r in rows if r["mode"] == "read"), None)
        read_s = read["load_s"] if read else cat_s
        loads = [r for r in rows if r["mode"] != "read"]
        if loads:
            print(f"\nfile {args.dtype} -> model {model_dtype}: file {size / 2**30:.2f} GiB, model "
                  f"{loads[0]['model_bytes'] / 2**30:.2f} GiB; {cache} page cache: cat {cat_s:.2f}s, read in a "
                  f"child like a load {read_s:.2f}s; RSS after imports {loads[0]['baseline_rss'] / 2**30:.2f} GiB")
        header = ("mode", "load s", "load+touch s", "(load+touch)/read", "peak RSS GiB", "peak/model",
                  "(peak-imports)/model", "peak/file")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in loads:
            model, total = r["model_bytes"], r["load_s"] + r["touch_s"]
            print("| " + " | ".join([
                r["mode"], f"{r['load_s']:.2f}", f"{total:.2f}", f"{total / read_s:.2f}",
                f"{r['peak_rss'] / 2**30:.2f}", f"{r['peak_rss'] / model:.2f}",
                f"{(r['peak_rss'] - r['baseline_rss']) / model:.2f}", f"{r['peak_rss'] / size:.2f}"]) + " |")
    finally:
        if folder is not None:
            if args.keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
