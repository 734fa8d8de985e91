"""The tiny transformer-era default model: `tiny-flux`, a FLUX.1-dev-architecture diffusers pipeline (CLIP-L and T5
text encoders, a 16-channel VAE, a FluxTransformer2DModel with two double and two single blocks and the guidance
embedding) with seeded random weights, built offline at set-up like tiny-sd1/tiny-sdxl.

Its widths follow Flux's fixed rules (heads 32 wide so the rotary axes split 4/14/14, MLP 4x the hidden size), so
it survives a round trip through the BFL single-file layout unchanged. It renders 64x64 on a CPU in well under a
second.
"""
from __future__ import annotations

import torch

from modules import default_models, t5_tokenizer

T5 = {"d_model": 64, "d_kv": 32, "d_ff": 128, "num_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 32,
      "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
      "is_encoder_decoder": False, "use_cache": False, "decoder_start_token_id": 0, "pad_token_id": 0,
      "eos_token_id": 1}
FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
                    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
                    "pooled_projection_dim": 64, "guidance_embeds": True, "axes_dims_rope": (4, 14, 14)}
FLUX_VAE = dict(default_models.VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True)
SCHEDULERS = {  # FLUX.1-dev's and FLUX.1-schnell's scheduler configs (Chroma uses dev's)
    "dev": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}
SCHEDULERS["chroma"] = SCHEDULERS["dev"]
SEEDS = {"flux": 5678}


def _tame_transformer(transformer) -> None:
    """As default_models._tame_unet: scale the output layer so the random model predicts unit-variance velocity
    (else a few steps saturate the image and nothing, a LoRA included, visibly changes it)."""
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    with torch.no_grad():
        tokens, text = 16, 8
        out = transformer(
            hidden_states=torch.randn(1, tokens, config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
            img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3)).sample
        factor = 1.0 / max(float(out.std()), 1e-6)
        transformer.proj_out.weight.mul_(factor)
        transformer.proj_out.bias.mul_(factor)


def build_components(family: str = "flux") -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(SEEDS[family])
    components = {
        "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
        "vae": AutoencoderKL(**FLUX_VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**default_models.TEXT, hidden_act="quick_gelu", pad_token_id=1)),
        "text_encoder_2": T5EncoderModel(T5Config(**T5, vocab_size=t5_tokenizer.TINY_VOCAB_SIZE)),
    }
    for module in components.values():
        module.eval()
    _tame_transformer(components["transformer"])
    return components


def build_tiny_pipeline(family: str = "flux"):
    from modules import sd_models_dit
    return sd_models_dit.assemble_pipeline("flux", "dev", build_components(family))
