"""Demo LoRAs for the tiny default models: small kohya-format files that visibly change their images.

    python scripts/make_demo_loras.py LORA_DIR SD1_MODEL_DIR SDXL_MODEL_DIR

Files (seeded, so every run writes the same bytes; an unchanged file is not rewritten):
- demo_sd1_style.safetensors     SD1 LoRA, kohya diffusers-flattened names (`lora_unet_down_blocks_...`,
                                 `lora_te_text_model_encoder_...`), with a `.preview.png` and a sidecar `.json`
- locon/demo_sd1_locon.safetensors   SD1 LoCon: also 3x3 resnet convs, down/upsamplers (alias `demo_locon`)
- demo_sdxl_style.safetensors    SDXL LoRA, kohya compvis names (`lora_unet_input_blocks_...`), `lora_te1_`/`lora_te2_`
- locon/demo_sdxl_locon.safetensors  SDXL LoCon, including the up-block upsamplers (`output_blocks_2_2_conv`)

The pieces (layer shapes from a diffusers folder, kohya key names, random factors, writing with a correct
`sshs_model_hash`) are importable for tests.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_EXT_DIR = os.path.join(ROOT, "extensions-builtin", "Lora")
for _p in (ROOT, LORA_EXT_DIR):
    if _p not in sys.path:
        sys.path.append(_p)

import lora_keys  # noqa: E402

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ATTENTION_PARTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
              "mlp.fc2")
CONV_PARTS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


# --- which layers, under which names ------------------------------------------------------------------------------
def layer_shapes_from_components(components: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """{canonical layer name: weight shape} for the Linear/Conv2d layers of in-memory components."""
    shapes = {}
    for comp, module in components.items():
        if module is None:
            continue
        for path, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes[f"{comp}.{path}"] = tuple(layer.weight.shape)
    return shapes


def _safetensors_shapes(filename: str) -> dict[str, tuple]:
    import lora_files
    _, tensors = lora_files.read_safetensors_header(filename)
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def layer_shapes_from_folder(model_dir: str) -> tuple[dict[str, tuple], lora_keys.UnetStructure]:
    """Layer shapes and UNet structure of a diffusers folder, from headers and config.json (no model built)."""
    shapes = {}
    for comp in COMPONENTS:
        folder = os.path.join(model_dir, comp)
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            if filename.endswith(".safetensors"):
                for key, shape in _safetensors_shapes(os.path.join(folder, filename)).items():
                    if key.endswith(".weight") and len(shape) in (2, 4) and "embedding" not in key.split(".")[-2]:
                        shapes[f"{comp}.{key[:-len('.weight')]}"] = shape
    with open(os.path.join(model_dir, "unet", "config.json"), encoding="utf8") as f:
        structure = lora_keys.UnetStructure.from_config(json.load(f))
    return shapes, structure


def select_layers(shapes: dict[str, tuple], locon: bool) -> dict[str, tuple]:
    """kohya's default LoRA targets (attention, feed-forward, proj, CLIP attention/MLP); LoCon adds the convs."""
    res = {}
    for name, shape in shapes.items():
        comp, _, path = name.partition(".")
        if comp == "unet":
            wanted = path.endswith(("proj_in", "proj_out")) or "transformer_blocks" in path and path.endswith(
                ATTENTION_PARTS)
            if locon and ("resnets" in path or "samplers" in path):
                wanted = wanted or path.endswith(CONV_PARTS)
        else:
            wanted = path.endswith(TEXT_PARTS)
        if wanted:
            res[name] = shape
    return res


def kohya_key(canonical: str, family: str, structure: lora_keys.UnetStructure | None) -> str | None:
    """The base name kohya's trainer writes: SD1 uses diffusers-flattened UNet names and `lora_te_`, SDXL uses
    compvis UNet names and `lora_te1_`/`lora_te2_`."""
    comp, _, path = canonical.partition(".")
    if comp == "unet":
        name = lora_keys.diffusers_to_compvis(path, structure) if family == "sdxl" else path
        return None if name is None else "lora_unet_" + name.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
    return prefix + "text_model_" + lora_keys.strip_text_model(path).replace(".", "_")


# --- tensors ------------------------------------------------------------------------------------------------------
def lora_tensors(layers: dict[str, tuple], family: str, structure, rank: int = 4, alpha: float = 2.0,
                 seed: int = 0, strength: float = 0.5, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random kohya LoRA/LoCon factors: ΔW entries are about `strength / sqrt(fan_in)` (a weight's own size).

    A 3x3 conv gets a 3x3 `lora_down` and 1x1 `lora_up` (LoCon); a 1x1 conv gets 1x1 factors."""
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    res = {}
    for canonical, shape in layers.items():
        key = kohya_key(canonical, family, structure)
        if key is None:
            continue
        out_dim, fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
        r = min(rank, out_dim, fan_in)
        down_shape = (r, *shape[1:]) if len(shape) == 4 else (r, shape[1])
        up_shape = (out_dim, r, 1, 1) if len(shape) == 4 else (out_dim, r)
        # std(ΔW) = scale · sqrt(r) · σ_up · σ_down; pick σ_up = σ_down = σ for the target size
        sigma = (strength / (fan_in ** 0.5) / (scale * r ** 0.5)) ** 0.5
        res[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=gen) * sigma).to(dtype)
        res[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=gen) * sigma).to(dtype)
        res[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return res


def tensor_data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's sshs_model_hash: sha256 of the file bytes after the safetensors header (metadata-independent)."""
    from safetensors.torch import save
    data = save(tensors)
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save
    metadata = dict(metadata)
    metadata["sshs_model_hash"] = tensor_data_hash(tensors)
    return save(tensors, metadata={k: str(v) for k, v in metadata.items()})


def kohya_metadata(output_name: str, family: str, locon: bool, rank: int, alpha: float, model_name: str,
                   tags: dict[str, int]) -> dict[str, str]:
    extra = {"ss_network_args": json.dumps({"algo": "locon", "conv_dim": str(rank), "conv_alpha": str(alpha)})} \
        if locon else {}
    return extra | {
        "ss_output_name": output_name,
        "ss_base_model_version": "sdxl_base_v1-0" if family == "sdxl" else "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "lycoris.kohya" if locon else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_sd_model_name": model_name,
        "ss_resolution": "(64, 64)",
        "ss_clip_skip": "None",
        "ss_num_train_images": "24",
        "ss_training_started_at": "1700000000.0",
        "ss_tag_frequency": json.dumps({"10_demo": tags}),
        "ss_dataset_dirs": json.dumps({"10_demo": {"n_repeats": 10, "img_count": 24}}),
        "ss_bucket_info": json.dumps({"buckets": {"0": {"resolution": [64, 64], "count": 24}}}),
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if family == "sdxl" else "stable-diffusion-v1")
        + ("/lycoris" if locon else "/lora"),
        "modelspec.title": output_name,
    }


def preview_png(seed: int, size: int = 64) -> bytes:
    """A small deterministic gradient picture for the card."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    colors = (torch.rand(2, 3, generator=gen) * 255).tolist()
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            t = (x + y) / (2 * size - 2)
            pixels[x, y] = tuple(int(a * (1 - t) + b * t) for a, b in zip(colors[0], colors[1], strict=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- the demo set -------------------------------------------------------------------------------------------------
DEMOS = (
    # stem, model, locon, alias, seed, tags
    ("demo_sd1_style", "sd1", False, "demo_sd1_style", 1, {"red house": 12, "blue sky": 9, "watercolor": 7}),
    ("locon/demo_sd1_locon", "sd1", True, "demo_locon", 2, {"stone wall": 10, "moss": 6}),
    ("demo_sdxl_style", "sdxl", False, "demo_sdxl_style", 3, {"neon city": 11, "night": 8}),
    ("locon/demo_sdxl_locon", "sdxl", True, "demo_sdxl_locon", 4, {"oil painting": 10, "portrait": 5}),
)
SIDECARS = {
    "demo_sd1_style": {"description": "A demo style LoRA for the tiny SD1 model (random factors).",
                       "activation text": "watercolor", "preferred weight": 0.8, "sd version": "SD1",
                       "notes": "Made by scripts/make_demo_loras.py"},
}


def _write_if_changed(path: str, data: bytes) -> bool:
    from modules.atomic import write_bytes_atomic
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    write_bytes_atomic(path, data)
    return True


def make_demo_loras(lora_dir: str, sd1_model_dir: str | None, sdxl_model_dir: str | None) -> list[str]:
    """Writes the demo files for the models given (a missing model folder skips its files). Returns the paths
    of the .safetensors files."""
    models = {}
    for family, model_dir in (("sd1", sd1_model_dir), ("sdxl", sdxl_model_dir)):
        if model_dir and os.path.isdir(os.path.join(model_dir, "unet")):
            models[family] = (layer_shapes_from_folder(model_dir), os.path.basename(os.path.normpath(model_dir)))
    written = []
    for stem, family, locon, alias, seed, tags in DEMOS:
        if family not in models:
            continue
        (shapes, structure), model_name = models[family]
        rank, alpha = 4, 2.0
        tensors = lora_tensors(select_layers(shapes, locon), family, structure, rank=rank, alpha=alpha, seed=seed)
        metadata = kohya_metadata(alias, family, locon, rank, alpha, model_name, tags)
        path = os.path.join(lora_dir, *stem.split("/")) + ".safetensors"
        _write_if_changed(path, safetensors_bytes(tensors, metadata))
        base = os.path.splitext(path)[0]
        if stem in SIDECARS:
            _write_if_changed(base + ".preview.png", preview_png(seed))
            _write_if_changed(base + ".json", json.dumps(SIDECARS[stem], indent=4, ensure_ascii=False).encode())
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    for p in make_demo_loras(sys.argv[1], sys.argv[2], sys.argv[3]):
        print(p)
