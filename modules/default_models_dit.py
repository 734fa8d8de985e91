"""The tiny transformer-era default models, seeded random weights, built offline at set-up like tiny-sd1/tiny-sdxl:

- `tiny-flux`: a FLUX.1-dev-architecture FluxPipeline (CLIP-L and T5 text encoders, a 16-channel VAE, a
  FluxTransformer2DModel with two double and two single blocks and the guidance embedding);
- `tiny-sd3`: an SD3.5-architecture StableDiffusion3Pipeline (CLIP-L, CLIP-G and T5, a 16-channel VAE, an
  SD3Transformer2DModel with q/k RMS norms and one MMDiT-X dual-attention block, as SD3.5 Medium has).

Their widths follow the families' fixed rules (Flux: heads 32 wide so the rotary axes split 4/14/14, MLP 4x the
hidden size; SD3: CLIP-G wider than CLIP-L, T5 as wide as both), so they survive a round trip through the single-file
layouts unchanged. Each renders 64x64 on a CPU in well under a second.
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
SCHEDULERS["sd3"] = SCHEDULERS["sd3.5"] = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3's scheduler config
SEEDS = {"flux": 5678, "sd3": 8765}
SD3_TRANSFORMER = {"sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 32,
                   "num_attention_heads": 2, "joint_attention_dim": 96, "caption_projection_dim": 64,
                   "pooled_projection_dim": 64, "out_channels": 16, "pos_embed_max_size": 32,
                   "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
SD3_CLIP_L = dict(default_models.TEXT, hidden_size=32, intermediate_size=128, hidden_act="quick_gelu",
                  projection_dim=32, pad_token_id=1)
SD3_CLIP_G = dict(default_models.TEXT, hidden_size=48, intermediate_size=192, hidden_act="gelu", projection_dim=32,
                  pad_token_id=1)
SD3_T5 = dict(T5, d_model=96, d_kv=32, num_heads=3, d_ff=192)
SD3_VAE = dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)


def _tame_transformer(transformer) -> None:
    """As default_models._tame_unet: scale the output layer so the random model predicts unit-variance velocity
    (else a few steps saturate the image and nothing, a LoRA included, visibly changes it)."""
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    with torch.no_grad():
        tokens, text = 16, 8
        if "caption_projection_dim" in config:  # SD3
            out = transformer(hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=g),
                              encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
                              pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                              timestep=torch.tensor([500.0])).sample
        else:
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
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(SEEDS[family])
    if family == "sd3":
        components = {
            "transformer": SD3Transformer2DModel(**SD3_TRANSFORMER),
            "vae": AutoencoderKL(**SD3_VAE),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G)),
            "text_encoder_3": T5EncoderModel(T5Config(**SD3_T5, vocab_size=t5_tokenizer.TINY_VOCAB_SIZE)),
        }
    else:
        components = {
            "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
            "vae": AutoencoderKL(**FLUX_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**default_models.TEXT, hidden_act="quick_gelu",
                                                         pad_token_id=1)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5, vocab_size=t5_tokenizer.TINY_VOCAB_SIZE)),
        }
    for module in components.values():
        module.eval()
    _tame_transformer(components["transformer"])
    return components


def build_tiny_pipeline(family: str = "flux"):
    from modules import sd_models_dit
    return sd_models_dit.assemble_pipeline(family, "sd3.5" if family == "sd3" else "dev", build_components(family))
