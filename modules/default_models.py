"""The embedded default models: tiny SD1-, SDXL-, FLUX.1- and SD3.5-architecture diffusers pipelines with seeded
random weights (the transformer ones are made by modules/default_models_dit.py).

Built offline at set-up (never fetched), into `models/Stable-diffusion/tiny-sd1`, `tiny-sdxl`, `tiny-flux` and
`tiny-sd3`, with a real CLIP tokenizer made from the BPE file of open_clip_torch. They keep the real block layout
(so LoRA key names are real kohya names) at a width that runs a 64x64 image in well under a second on a CPU, and
they follow the families' head and group-norm rules, so they survive a round trip through the single-file layout
unchanged.

    python -m modules.default_models MODELS_DIR      # builds what is missing, prints the folders
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch

BUILD_VERSION = 1  # bump when the recipe changes: folders with another version are rebuilt
STAMP = ".tiny-model-build"
TINY_SIZE = 64  # pixels; latents are 8x8

TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 1,
        "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
        "eos_token_id": 49407}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 32, 64, 64],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 1, "norm_num_groups": 32, "sample_size": TINY_SIZE}
UNET_SD1 = {
    "sample_size": TINY_SIZE // 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64],
    "layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64,
    "attention_head_dim": 8, "norm_num_groups": 32, "transformer_layers_per_block": [1, 1, 1],
}
UNET_SDXL = {
    "sample_size": TINY_SIZE // 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 128,
    "attention_head_dim": [1, 1, 1], "norm_num_groups": 32, "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 64,
}
SEEDS = {"sd1": 1234, "sdxl": 4321}
ALL_SEEDS = dict(SEEDS, flux=5678, sd3=8765)
FAMILIES = ("sd1", "sdxl", "flux", "sd3")  # built in this order; the first one is the model a fresh install loads


def _tame_unet(unet) -> None:
    """Random weights make a noise prediction far larger than unit variance, which saturates the image after a few
    steps (and then nothing, a LoRA included, visibly changes it). Scaling the output conv fixes the variance."""
    with torch.no_grad():
        sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        kwargs = {}
        if unet.config.addition_embed_type == "text_time":
            te2 = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, te2),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = unet(sample, 500, encoder_hidden_states=context, **kwargs).sample
        factor = 1.0 / max(float(out.std()), 1e-6)
        unet.conv_out.weight.mul_(factor)
        unet.conv_out.bias.mul_(factor)


def build_components(family: str) -> dict[str, torch.nn.Module]:
    """The tiny model's torch modules, seeded (the same weights on every machine and run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEEDS[family])
    components = {
        "unet": UNet2DConditionModel(**(UNET_SDXL if family == "sdxl" else UNET_SD1)),
        "vae": AutoencoderKL(**VAE, scaling_factor=0.13025 if family == "sdxl" else 0.18215,
                             force_upcast=family == "sdxl"),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu", pad_token_id=1)),
    }
    if family == "sdxl":
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**TEXT, hidden_act="gelu", projection_dim=64, pad_token_id=0))
    for module in components.values():
        module.eval()
    _tame_unet(components["unet"])
    return components


def build_tiny_pipeline(family: str):
    from modules import sd_models_diffusers
    if family in ("flux", "sd3"):
        from modules import default_models_dit
        return default_models_dit.build_tiny_pipeline(family)
    return sd_models_diffusers.assemble_pipeline(family, build_components(family))


def _is_complete(folder: str) -> bool:
    try:
        with open(os.path.join(folder, STAMP), encoding="utf8") as f:
            return json.load(f).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_tiny_model(family: str, folder: str) -> str:
    """Writes the tiny diffusers folder for family ("sd1", "sdxl", "flux" or "sd3") atomically (a temporary folder
    renamed)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        pipe = build_tiny_pipeline(family)
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, STAMP), "w", encoding="utf8") as f:
            json.dump({"version": BUILD_VERSION, "family": family, "seed": ALL_SEEDS[family]}, f)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_default_models(models_path: str) -> tuple[str, ...]:
    """The tiny SD1, SDXL, Flux and SD3 folders under models_path/Stable-diffusion, built when missing or outdated."""
    ckpt_dir = os.path.join(models_path, "Stable-diffusion")
    result = []
    for family in FAMILIES:
        folder = os.path.join(ckpt_dir, f"tiny-{family}")
        if not _is_complete(folder):
            print(f"Building the tiny default model {folder}", flush=True)
            build_tiny_model(family, folder)
        result.append(folder)
    return tuple(result)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    for path in ensure_default_models(sys.argv[1]):
        print(path)
