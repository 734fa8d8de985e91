"""Benchmark: the Lora patcher against each operation's floor and diffusers `load_lora_weights` + `fuse_lora`.

Builds SD1.5- and SDXL-shaped models (diffusers UNet + CLIP text encoders, on meta, then filled with random
weights, std 1/sqrt(fan_in)), writes rank-32 kohya LoRAs A, B, C, a LoHa H and a LoKr K (fp16, like real files)
for all their kohya targets (ΔW rms = --strength × W rms per file), and times, median of --repeats:

  apply 1 / apply 3   A / A+B+C from the original weights       loha, lokr   H / K from the original weights
  switch      A → B               multiplier  A at 1.0 → A at 0.7          same set   A again (must write nothing)
  remove      A → no LoRA         held        memory kept for exact restore after apply 1 / apply 3

for the patcher with the host's original-weights source (a checkpoint of the touched weights, re-read through the
host's own `OriginalWeights` as `sd_model.original_weights` offers it) and without it (rounding residual), as
ratios to the floor of the same operation, measured in the same run (scripts/bench_lora_floors.py: the cheapest
in-place loop with fp32 factors and, where needed, the originals ready in memory, at the block size that was
fastest for that operation in a calibration run). With the source, ours and the floor are timed in pairs, each repeat
both back to back, and each ratio is the median of the per-repeat ratios (scripts/bench_lora_paired.py: this
machine's speed drifts more than the goals' margins between two separate series). Neither side reads files or
plans. Ours and diffusers are
compared both ways: both excluding file reading and parsing (ours: the write; diffusers: fuse_lora / unfuse_lora
with the adapters already loaded) and both including it (ours plus the read+parse time of the op's files and the
plan; diffusers: load_lora_weights + fuse_lora, unfuse + unload). Every (model, dtype) runs in its own
subprocess, SDXL fp32 last. After the runs every weight is checked bit for bit against the original (a checksum).

usage: python scripts/bench_lora_patcher.py [--models sd15,sdxl] [--dtypes fp32,bf16] [--device cpu|cuda]
       [--dtype fp16] [--repeats N] [--rank 32] [--strength 0.03] [--threads N] [--no-diffusers] [--json FILE]
       [--other-types]   (then full, IA3, OFT, GLoRA, DoRA against their floors: scripts/bench_lora_types.py)
GPU:   python scripts/bench_lora_patcher.py --device cuda --models sdxl --dtype fp16 --repeats 5
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_DIR = os.path.join(ROOT, "extensions-builtin", "Lora")
for _p in (ROOT, LORA_DIR):
    if _p not in sys.path:
        sys.path.append(_p)
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
               ("DIFFUSERS_VERBOSITY", "error"), ("GRADIO_ANALYTICS_ENABLED", "False")):
    os.environ.setdefault(_k, _v)

from scripts import bench_lora_paired  # noqa: E402  (after the path set-up above)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=32)
MODELS = {  # family for kohya names, unet config, [(component, projection?, clip config)]
    "sd15": ("sd1", SD15_UNET, [("text_encoder", False, CLIP_L)]),
    "sdxl": ("sdxl", SDXL_UNET, [("text_encoder", False, CLIP_L), ("text_encoder_2", True, CLIP_G)]),
    "tiny": ("sd1", TINY_UNET, [("text_encoder", False, TINY_CLIP)]),  # smoke test of this script
}


# --- measuring ----------------------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Hands freed heap back to the OS so RSS shows what is held, not allocator slack."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Clock:
    def __init__(self, device):
        import torch
        self.cuda = device.type == "cuda"
        self.torch = torch

    def __call__(self, fn, *args, **kwargs):
        if self.cuda:
            self.torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t, result


def device_memory(device) -> int:
    import torch
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss()


# --- the model ----------------------------------------------------------------------------------------------------
class Model:
    """What the extension needs of the host's model: components() (and original_weights when offered)."""

    def __init__(self, components: dict):
        self._components = components
        self.original_weights = None

    def components(self) -> dict:
        return dict(self._components)


def build_model(name: str, dtype, device):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    family, unet_config, clips = MODELS[name]
    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**unet_config)}
        for comp, projection, config in clips:
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            components[comp] = cls(CLIPTextConfig(**config))
    gen = torch.Generator(device=device).manual_seed(0)
    for module in components.values():
        module.to(dtype).to_empty(device=device).eval().requires_grad_(False)
        with torch.no_grad():
            for p in module.parameters():
                fan_in = p[0].numel() if p.dim() >= 2 else 0
                p.normal_(0, fan_in ** -0.5 if fan_in else 0.02, generator=gen)
            for bname, b in module.named_buffers():
                if bname.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1], device=device).expand_as(b))
    return family, Model(components)


def weights_checksum(model) -> int:
    """Order-independent exact checksum of every parameter's bits (no copy of the model needed)."""
    import torch
    total = 0
    for comp in model.components().values():
        for p in comp.parameters():
            iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
            bits = p.detach().reshape(-1).view(iv)
            total += int(bits.sum(dtype=torch.int64)) * 3 + int((bits.long() * bits.long() % 1000003).sum())
    return total


# --- files --------------------------------------------------------------------------------------------------------
def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Streams tensors to a .safetensors file (no second copy of them in memory)."""
    import torch
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            iv = {2: torch.int16, 4: torch.int32}[t.element_size()]
            f.write(t.detach().contiguous().cpu().view(iv).numpy().tobytes())


def _shape_info(shape) -> tuple[int, int, int]:
    out_dim = shape[0]
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return out_dim, fan_in, fan_in // shape[1] if len(shape) > 1 else 1


def loha_tensors(layers, family, structure, rank, alpha, seed, strength, dtype) -> dict:
    """LoHa (hada_w1/w2 a/b) with ΔW rms = strength × W rms: ΔW = s·(w1a@w1b)⊙(w2a@w2b), each factor ~ σ."""
    import torch

    from scripts import make_demo_loras as demo
    gen = torch.Generator().manual_seed(seed)
    res = {}
    for canonical, shape in layers.items():
        key = demo.kohya_key(canonical, family, structure)
        out_dim, fan_in, _ = _shape_info(shape)
        r, s = min(rank, out_dim, fan_in), alpha / min(rank, out_dim, fan_in)
        sigma = (strength / fan_in ** 0.5 / (s * r)) ** 0.25  # std(W1⊙W2) = r·σ⁴
        for half in ("w1", "w2"):
            res[f"{key}.hada_{half}_a"] = (torch.randn((out_dim, r), generator=gen) * sigma).to(dtype)
            res[f"{key}.hada_{half}_b"] = (torch.randn((r, fan_in), generator=gen) * sigma).to(dtype)
        res[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return res


def lokr_tensors(layers, family, structure, rank, alpha, seed, strength, dtype, factor: int = 8) -> dict:
    """LoKr: full lokr_w1 (f×f, f = the largest of 8, 4, 2, 1 dividing both channel counts) and low-rank
    lokr_w2_a/b: ΔW = s·kron(w1, w2a@w2b) with ΔW rms = strength × W rms."""
    import torch

    from scripts import make_demo_loras as demo
    gen = torch.Generator().manual_seed(seed)
    res = {}
    for canonical, shape in layers.items():
        key = demo.kohya_key(canonical, family, structure)
        out_dim, fan_in, kernel = _shape_info(shape)
        f = next(n for n in (factor, 4, 2, 1) if out_dim % n == 0 and shape[1] % n == 0)
        c, d = out_dim // f, fan_in // f
        r = min(rank, c, d)
        s = alpha / r
        sigma = (strength / fan_in ** 0.5 / (s * r ** 0.5)) ** (1 / 3)  # std = s·√r·σ³
        res[f"{key}.lokr_w1"] = (torch.randn((f, f), generator=gen) * sigma).to(dtype)
        res[f"{key}.lokr_w2_a"] = (torch.randn((c, r), generator=gen) * sigma).to(dtype)
        res[f"{key}.lokr_w2_b"] = (torch.randn((r, d), generator=gen) * sigma).to(dtype)
        res[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return res


def write_loras(folder: str, model, family: str, targets: dict, rank: int, strength: float) -> dict:
    """A, B, C: kohya LoRAs of rank `rank`; H: a LoHa of rank rank/2 (ΔW rank (rank/2)²); K: a LoKr (w2 rank)."""
    import lora_layers
    import torch

    from scripts import make_demo_loras as demo
    structure = lora_layers.LayerMap(model).structure
    paths = {}
    for i, name in enumerate("ABCHK"):
        args = (targets, family, structure)
        if name == "H":
            tensors = loha_tensors(*args, rank // 2, rank / 4, 20, strength, torch.float16)
        elif name == "K":
            tensors = lokr_tensors(*args, rank, rank / 2, 30, strength, torch.float16)
        else:
            tensors = demo.lora_tensors(*args, rank=rank, alpha=rank / 2, seed=10 + i, strength=strength,
                                        dtype=torch.float16)
        paths[name] = os.path.join(folder, f"{name}.safetensors")
        write_safetensors(paths[name], tensors, {"ss_network_dim": str(rank), "ss_output_name": name})
    return paths


def checkpoint_source(folder: str, model, layer_names):
    """The host's own `sd_model.original_weights` (modules.sd_models_diffusers.OriginalWeights) over a .safetensors
    file per component holding the touched weights, so the benchmark measures the path a generation takes."""
    from modules.sd_models_diffusers import OriginalWeights

    by_component: dict[str, dict] = {}
    for name in layer_names:
        comp, _, path = name.partition(".")
        module = model.components()[comp].get_submodule(path)
        by_component.setdefault(comp, {})[f"{path}.weight"] = module.weight
    refs, dtypes = {}, {}
    for comp, tensors in by_component.items():
        path = os.path.join(folder, f"checkpoint-{comp}.safetensors")
        write_safetensors(path, tensors)
        for key, tensor in tensors.items():
            refs[(comp, key)] = (path, key, None)
            dtypes[(comp, key)] = tensor.dtype
    return OriginalWeights(refs, dtypes)


# --- the contenders ----------------------------------------------------------------------------------------------
OPS = bench_lora_paired.OPS  # ours and each op's floor are timed in pairs (scripts/bench_lora_paired.py)


def bench_diffusers(model, family, paths, repeats, clock, device) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    comps = model.components()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        layers_per_block=1).to(device)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=comps["text_encoder"],
                                         text_encoder_2=comps["text_encoder_2"], tokenizer=None, tokenizer_2=None,
                                         unet=comps["unet"], scheduler=DDIMScheduler())
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=comps["text_encoder"], tokenizer=None,
                                       unet=comps["unet"], scheduler=DDIMScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def load(*names):
        """Read + parse + convert the files and put their adapters into the model (no weight written yet)."""
        for n in names:
            pipe.load_lora_weights(paths[n], adapter_name=n)
        if len(names) > 1:
            pipe.set_adapters(list(names), [1.0] * len(names))

    def fuse(*names, scale=1.0):
        pipe.fuse_lora(adapter_names=list(names), lora_scale=scale)

    def remove():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    def refuse(name, scale=1.0):
        pipe.unfuse_lora()
        fuse(name, scale=scale)

    # incl.: the whole operation from files (load_lora_weights + fuse_lora, unload for a switch); excl.: only the
    # weight work, the files already loaded (what ours is timed with: parsed networks, no file read, no plan)
    incl: dict[str, list] = {k: [] for k in ("apply 1", "apply 3", "switch", "multiplier", "remove")}
    excl: dict[str, list] = {k: [] for k in incl}
    held = {}
    with torch.no_grad():
        for _ in range(repeats):
            trim()
            before = device_memory(device)
            t_load, t_fuse = clock(load, "A")[0], clock(fuse, "A")[0]
            incl["apply 1"].append(t_load + t_fuse)
            excl["apply 1"].append(t_fuse)
            trim()
            held.setdefault("held 1 (memory growth)", []).append(device_memory(device) - before)
            t = clock(refuse, "A", 0.7)[0]  # reads nothing either way
            incl["multiplier"].append(t)
            excl["multiplier"].append(t)
            refuse("A")
            incl["switch"].append(clock(remove)[0] + clock(load, "B")[0] + clock(fuse, "B")[0])
            remove()
            load("A")
            load("B")  # both loaded (loading unmerges a fused model, so before fusing): a switch is unfuse + fuse
            fuse("A")
            excl["switch"].append(clock(refuse, "B")[0])
            remove()
            load("A")
            fuse("A")
            t = clock(remove)[0]  # reads nothing either way
            incl["remove"].append(t)
            excl["remove"].append(t)
            trim()
            before = device_memory(device)
            t_load, t_fuse = clock(load, "A", "B", "C")[0], clock(fuse, "A", "B", "C")[0]
            incl["apply 3"].append(t_load + t_fuse)
            excl["apply 3"].append(t_fuse)
            trim()
            held.setdefault("held 3 (memory growth)", []).append(device_memory(device) - before)
            remove()
    res = {k: statistics.median(v) for k, v in incl.items()}
    res["excl"] = {k: statistics.median(v) for k, v in excl.items()}
    res.update({k: statistics.median(v) for k, v in held.items()})
    return res


# --- one (model, dtype) -------------------------------------------------------------------------------------------
def run_child(args) -> dict:
    argv, sys.argv = sys.argv, sys.argv[:1]  # the host's flag parser must not see ours
    work = tempfile.mkdtemp(prefix="bench-lora-")
    atexit.register(shutil.rmtree, work, True)  # its checkpoint and Loras are GiBs
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
    sys.argv = argv
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.child_dtype])
    clock = Clock(device)
    result = {"model": args.child_model, "dtype": args.child_dtype, "device": args.device,
              "threads": torch.get_num_threads(), "patcher block": lora_delta.CPU_CHUNK}

    t = time.perf_counter()
    family, model = build_model(args.child_model, dtype, device)
    result["build s"] = time.perf_counter() - t
    layer_map = lora_layers.LayerMap(model)
    layers = layer_map.layers
    shapes = demo.layer_shapes_from_components(model.components())
    targets = demo.select_layers(shapes, False)
    result["targets"] = len(targets)
    result["touched bytes"] = sum(model.components()[n.partition(".")[0]].get_submodule(n.partition(".")[2]).weight
                                  .nbytes for n in targets)  # targets: module paths, not canonical names
    paths = write_loras(work, model, family, targets, args.rank, args.strength)
    result["lora file bytes"] = os.path.getsize(paths["A"])

    use_source = args.child_model != "sdxl" or dtype != torch.float32 or args.device != "cpu"
    source = checkpoint_source(work, model, list(targets)) if use_source else None
    checksum = weights_checksum(model)

    nets, load_times = {}, {}
    for name, path in paths.items():
        times = []
        for _ in range(2):
            t = time.perf_counter()
            nets[name] = lora_loader.load_network(name, network.NetworkOnDisk(name, path), layer_map)
            times.append(time.perf_counter() - t)
        load_times[name] = min(times)
        assert len(nets[name].modules) == len(targets), (name, len(nets[name].modules), len(targets))
        assert not nets[name].load_errors, nets[name].load_errors
    result["load"] = load_times  # read + parse of each file (what ours excludes and diffusers includes)

    result["ours"] = {}
    strategies = ("source", "residual") if source is not None else ("residual",)
    ours = {st: bench_lora_paired.Ours(layers, layer_map.module_paths, nets, st, source, clock, trim,
                                       lambda: device_memory(device), paired=i == 0)
            for i, st in enumerate(strategies)}
    t = time.perf_counter()
    floor = bench_lora_paired.Floor(layers, nets, device, clock)
    print(f"  floor calibration: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    for i, strategy in enumerate(strategies):
        t = time.perf_counter()
        if i == 0:  # the first strategy is timed in pairs with the floor
            ratios = bench_lora_paired.run_pairs(ours[strategy], floor, args.repeats)
            result["ours"][strategy] = ours[strategy].result(ratios)
        else:
            bench_lora_paired.run_alone(ours[strategy], args.residual_repeats or args.repeats)
            result["ours"][strategy] = ours[strategy].result()
        print(f"  ours ({strategy}{', paired with the floor' if i == 0 else ''}): {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)
        result["ours"][strategy]["exact"] = weights_checksum(model) == checksum
    result["floor"] = floor.result()
    result["floor"]["exact"] = weights_checksum(model) == checksum
    del floor, ours
    del nets
    trim()
    if not args.no_diffusers:
        try:
            result["diffusers"] = bench_diffusers(model, family, paths, args.repeats, clock, device)
        except Exception as e:  # report the rest
            result["diffusers error"] = f"{type(e).__name__}: {e}"
    result["peak rss"] = peak_rss()
    if device.type == "cuda":
        result["peak device memory"] = torch.cuda.max_memory_allocated(device)
    return result


# --- the table ----------------------------------------------------------------------------------------------------
FILES_READ = {"apply 1": "A", "apply 3": "ABC", "loha": "H", "lokr": "K", "switch": "B", "multiplier": "",
              "same set": "", "remove": ""}  # the files a host reads for each op when nothing is cached
# issue 10: apply, switch and multiplier change ≤ 1.1× their fused floor, restore ≤ 1.2× one write of the originals
GOAL = {"apply 1": 1.1, "apply 3": 1.1, "loha": 1.1, "lokr": 1.1, "switch": 1.1, "multiplier": 1.1, "remove": 1.2}
BELOW_FLOOR = 0.9  # ours this much under a floor: that floor is not the cheapest loop (or the run was noisy)


def fmt_s(x) -> str:
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s")


def fmt_ratio(a, b, goal=None, paired=None) -> str:
    """a / b, or `paired` (the median of per-repeat ratios) when the two were timed in pairs."""
    if a is None or not b:
        return "-"
    ratio = a / b if paired is None else paired
    text = f"{ratio:.2f}x"
    if goal is not None and ratio > goal:
        return f"{text} (MISSED, goal {goal:g}x)"
    if goal is not None and ratio < BELOW_FLOOR:
        return f"{text} (under the floor: not a floor)"
    return text


def fmt_bytes(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.0f} MiB"


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['model']} {r['dtype']}: {r['error']}")
            continue
        touched = r["touched bytes"]
        lines.append(f"\n### {r['model'].upper()} {r['dtype']} on {r['device']} ({r['threads']} threads): "
                     f"{r['targets']} layers, {fmt_bytes(touched)} touched, LoRA file {fmt_bytes(r['lora file bytes'])}"
                     f", read+parse {fmt_s(r['load']['A'])} per LoRA file, peak RSS {r['peak rss'] / 2 ** 30:.1f} GiB"
                     + (f", patcher blocks 2^{r['patcher block'].bit_length() - 1}" if r.get("patcher block") else ""))
        strategies = list(r["ours"])
        floor, diff = r["floor"], r.get("diffusers")
        blocks = floor.get("blocks", {})
        head = ["op", "floor (block)"] + [f"ours ({s})" for s in strategies] + \
            [f"{s} / floor" for s in strategies] + ["diffusers, excl. read+parse"] + \
            [f"{s} / diffusers, both excl." for s in strategies] + ["diffusers, incl. read+parse"] + \
            [f"{s} / diffusers, both incl." for s in strategies]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for op in OPS:
            read = sum(r["load"][n] for n in FILES_READ[op])  # what reading and parsing the op's files costs ours
            ours = {s: r["ours"][s][op] for s in strategies}
            ours_incl = {s: ours[s] + read + r["ours"][s].get("plan", {}).get(op, 0.0) for s in strategies}
            f = floor.get(op)
            row = [op, "-" if f is None else fmt_s(f) + (f" ({blocks[op]})" if op in blocks else "")]
            row += [fmt_s(ours[s]) for s in strategies]
            row += [fmt_ratio(ours[s], f, GOAL.get(op), r["ours"][s].get("paired ratio", {}).get(op))
                    for s in strategies]
            d_excl = diff["excl"].get(op) if diff else None
            d_incl = diff.get(op) if diff else None
            row += [fmt_s(d_excl)] + [fmt_ratio(ours[s], d_excl) for s in strategies]
            row += [fmt_s(d_incl)] + [fmt_ratio(ours_incl[s], d_incl) for s in strategies]
            lines.append("| " + " | ".join(row) + " |")
        for n in (1, 3):
            row = [f"held, {n} LoRA{'s' if n > 1 else ''}", "0"]
            row += [f"{fmt_bytes(r['ours'][s][f'held {n} (accounted)'])} = "
                    f"{100 * r['ours'][s][f'held {n} (accounted)'] / touched:.2f} % "
                    f"(growth {fmt_bytes(r['ours'][s][f'held {n} (memory growth)'])})" for s in strategies]
            row += ["" for _ in strategies]
            row += [""] + ["" for _ in strategies]
            row += [f"growth {fmt_bytes(diff[f'held {n} (memory growth)'])}" if diff else "-"]
            row += ["" for _ in strategies]
            lines.append("| " + " | ".join(row) + " |")
        exact = ", ".join(f"{s}: {'bit-exact' if r['ours'][s]['exact'] else 'NOT EXACT'}" for s in strategies)
        lines.append(f"restore after every run: {exact}; floor: {'bit-exact' if floor['exact'] else 'NOT EXACT'}; "
                     "patcher stats " + "; ".join(f"{s} {r['ours'][s]['stats']}" for s in strategies))
        if "diffusers error" in r:
            lines.append(f"diffusers failed: {r['diffusers error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--dtype", default=None, help="one dtype (overrides --dtypes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--residual-repeats", type=int, default=0,
                        help="repeats of the path without a source when a source is benchmarked too (0: --repeats)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--strength", type=float, default=0.03, help="ΔW rms / W rms of each LoRA")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--other-types", action="store_true",
                        help="then full, IA3, OFT, GLoRA and DoRA against their own floors (scripts/bench_lora_types.py"
                             ", first model, same dtypes, repeats and threads)")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_model:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    dtypes = [args.dtype] if args.dtype else args.dtypes.split(",")
    jobs = [(m, d) for m in args.models.split(",") for d in dtypes]
    jobs.sort(key=lambda j: (j[0] == "sdxl" and j[1] == "fp32"))  # the biggest alone, last
    results = []
    for model, dtype in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child-model", model, "--child-dtype", dtype,
               "--device", args.device, "--repeats", str(args.repeats), "--rank", str(args.rank),
               "--strength", str(args.strength), "--threads", str(args.threads),
               "--residual-repeats", str(args.residual_repeats)] + \
            (["--no-diffusers"] if args.no_diffusers else [])
        print(f"running {model} {dtype} on {args.device} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)  # progress shows on stderr
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results.append({"model": model, "dtype": dtype, "error": f"exit {proc.returncode} (see its stderr above)"})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        print(table(results[-1:]), flush=True)  # each model as soon as it is done
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(f"rank {args.rank} kohya LoRAs (LoHa rank {args.rank // 2}, LoKr w2 rank {args.rank}), ΔW rms = "
          f"{args.strength:g} × W rms each; median of {args.repeats} (with the source, each ratio is the median of "
          "per-repeat ratios of ours and the floor timed back to back); floor = the cheapest in-place loop for that "
          "op with factors (and originals) ready in memory (scripts/bench_lora_floors.py), at the block size of "
          "rows that was fastest for it in this run; ours and the floor exclude reading files and planning. "
          "Against diffusers both ways: both excl. (ours: the patcher's write; diffusers: fuse_lora/unfuse_lora with "
          "the files already loaded) and both incl. (ours + read+parse of the op's files + planning; diffusers: "
          "load_lora_weights + fuse_lora, unload for a switch). Goals (issue 10): apply, switch, multiplier "
          "≤ 1.1x their floor, remove ≤ 1.2x")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.other_types:
        from scripts import bench_lora_types
        bench_lora_types.main(["--model", args.models.split(",")[0], "--dtypes", ",".join(dtypes),
                               "--repeats", str(args.repeats), "--threads", str(args.threads), "--rank", str(args.rank),
                               "--strength", str(args.strength)])


if __name__ == "__main__":
    main()
