"""Merge LoRAs into a checkpoint with the web UI's own parser, loader and patcher.

    python scripts/merge_lora.py --model PATH --lora-dir DIR --prompt "<lora:a:0.8> <lora:b:1:0.5>" \\
        --out OUT.safetensors [--dtype fp32|bf16|fp16] [--modules FILE ...]

PATH is a diffusers folder or a single-file checkpoint (SD1/SD2/SDXL, Flux.1/Chroma, SD3), the way the web UI loads
it; a BFL/ComfyUI file that holds only the transformer takes its text encoders (and VAE) from --modules, as Forge's
"VAE / Text Encoder" selector does. OUT holds every UNet or transformer and text-encoder parameter of the merged
model, keyed `unet.<key>` / `transformer.<key>`, `text_encoder.<key>`, `text_encoder_2.<key>`, `text_encoder_3.<key>`
(the diffusers component folder name, then that component's own state-dict key), in the model's dtype unless
--dtype says otherwise. One line per LoRA tells what matched. Any bad input ends the run with a message and exit
status 1.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_EXT_DIR = os.path.join(ROOT, "extensions-builtin", "Lora")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class MergeError(RuntimeError):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers folder or single-file checkpoint")
    parser.add_argument("--lora-dir", required=True, help="folder with the LoRA files named in --prompt")
    parser.add_argument("--prompt", required=True, help='the tags to merge, e.g. "<lora:a:0.8> <lora:b:1:0.5>"')
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: the model's)")
    parser.add_argument("--modules", nargs="*", default=[],
                        help="text encoder / VAE files for a single-file transformer (clip_l, t5xxl, ae)")
    return parser.parse_args(argv)


def _host_argv(args: argparse.Namespace) -> list[str]:
    """Flags for the host modules: the Lora folder, CPU, and the model's own dtype for loading."""
    return ["--lora-dir", os.path.abspath(args.lora_dir), "--device", "cpu", "--no-hashing"]


def model_file_dtype(path: str):
    """The dtype most UNet tensors have in the file (so an fp16 checkpoint is merged and written as fp16)."""
    import collections

    import torch

    from modules import safetensors_header

    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if os.path.isdir(path):
        folder = next((os.path.join(path, c) for c in ("unet", "transformer") if os.path.isdir(os.path.join(path, c))),
                      os.path.join(path, "unet"))
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
        path = os.path.join(folder, files[0] if files else "diffusion_pytorch_model.safetensors")
    if not path.lower().endswith(".safetensors") or not os.path.isfile(path):
        return torch.float32
    header = safetensors_header.read_header_file(path)
    counts = collections.Counter(entry.dtype for entry in header.tensors.values())
    return next((names[d] for d, _ in counts.most_common() if d in names), torch.float32)


def merge(args: argparse.Namespace) -> dict:
    """Loads the model, applies the prompt's tags, writes the result; returns {lora name: (matched, unmatched)}."""
    import extra_networks_lora
    import lora_discovery
    import networks
    import torch

    from modules import extra_networks, processing, sd_models, sd_models_diffusers
    from modules.atomic import write_bytes_atomic

    if not os.path.exists(args.model):
        raise MergeError(f"--model {args.model}: no such file or folder")
    if not os.path.isdir(args.lora_dir):
        raise MergeError(f"--lora-dir {args.lora_dir}: no such folder")
    _, tags = extra_networks.parse_prompt(args.prompt)
    params = list(tags.get("lora", [])) + list(tags.get("lyco", []))
    if not params:
        raise MergeError(f"--prompt {args.prompt!r} holds no <lora:...> tag")
    unknown = sorted(set(tags) - {"lora", "lyco"})
    if unknown:
        raise MergeError(f"--prompt: only <lora:...> tags can be merged, not <{unknown[0]}:...>")

    load_dtype = model_file_dtype(args.model)
    out_dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else load_dtype
    try:
        model = sd_models_diffusers.load(os.path.abspath(args.model), torch.device("cpu"), load_dtype,
                                         sd_models.CheckpointInfo(args.model),
                                         [os.path.abspath(m) for m in args.modules] or None)
    except Exception as e:
        raise MergeError(f"--model {args.model}: cannot load: {e}") from None

    lora_discovery.list_available_networks()
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=args.prompt)
    p.all_prompts = [args.prompt]
    handler = extra_networks_lora.ExtraNetworkLora()
    handler.activate(p, params)
    report = networks.last_report
    handler.deactivate(p)

    summary = {}
    problems = [c for c in p.comments if c.startswith("Bad Lora tag")]
    for net in report.networks if report else []:
        name = net.mentioned_name or net.name
        summary[name] = (len(net.modules), net.unmatched_count)
        if not net.modules:
            problems.append(f"{name} matched no layer of this model")
        if net.error_count():
            failed = list({**net.load_errors, **net.apply_errors}.items())[:3]
            problems.append(f"{name}: {net.error_count()} layers failed: " + "; ".join(f"{k}: {v}" for k, v in failed))
    if report is None or report.fatal or report.missing or report.load_errors or problems:
        raise MergeError("; ".join(problems + [c for c in p.comments if c not in problems]
                                   or ["no LoRA could be applied"]))

    tensors, seen = {}, set()
    for component in COMPONENTS:
        module = getattr(model, component, None)
        if module is None:
            continue
        for key, value in module.state_dict().items():
            value = value.detach().to("cpu", out_dtype).contiguous()
            if value.data_ptr() in seen:  # tied weights (T5's shared / embed_tokens): each key gets its own copy
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[f"{component}.{key}"] = value
    from safetensors.torch import save
    metadata = {"merged_from": os.path.abspath(args.model), "merged_prompt": args.prompt,
                "merged_loras": ", ".join(f"{k}: {v[0]} layers" for k, v in summary.items())}
    write_bytes_atomic(args.out, save(tensors, metadata=metadata))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for path in (ROOT, LORA_EXT_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    if "modules.shared" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        sys.argv = [sys.argv[0], *_host_argv(args)]
    try:
        from modules import shared
        shared.cmd_opts.lora_dir = os.path.abspath(args.lora_dir)
        summary = merge(args)
    except MergeError as e:
        print(f"merge_lora: {e}", file=sys.stderr)
        return 1
    import networks
    for net in networks.loaded_networks:
        unmatched = net.unmatched_keys + net.unsupported_keys + net.unused_keys
        groups = sorted({k.split(".")[0].rsplit("_", 1)[0] for k in unmatched})
        print(f"{net.mentioned_name or net.name}: {len(net.modules)} layers matched, {len(unmatched)} keys unmatched"
              + (f" ({', '.join(groups[:5])}{', ...' if len(groups) > 5 else ''})" if unmatched else ""))
    print(f"wrote {args.out} ({len(summary)} LoRA{'s' if len(summary) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
