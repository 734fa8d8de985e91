"""Tiny Flux.1 / Chroma models for the Lora tests, built from a BFL-layout state dict through diffusers' own
single-file converter (so which BFL tensor is which diffusers parameter is diffusers' answer, not ours).

diffusers 0.42.1's `convert_flux_transformer_checkpoint_to_diffusers` hard-codes Flux.1-dev's width
(`inner_dim = 3072`) for the single blocks' linear1 split; `convert_bfl` runs that function's own source with the
tiny model's width in its place (and fails loudly if diffusers changes the line), everything else untouched.
"""
from __future__ import annotations

import functools
import inspect

import torch

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16
MLP = 4 * HIDDEN
IN_CHANNELS, OUT_CHANNELS, JOINT, POOLED = 8, 8, 24, 16
DOUBLE, SINGLE = 2, 2
ROPE = (4, 6, 6)


class TinyFluxModel:
    """Stands in for the host's Flux model in Lora tests: `is_flux`, components() with the transformer, CLIP-L
    (text_encoder) and T5 (text_encoder_2); Chroma, as in the host, has T5 alone as its text_encoder."""

    def __init__(self, transformer, clip, t5, chroma: bool = False):
        self.transformer = transformer
        self.text_encoder, self.text_encoder_2 = (t5, None) if chroma else (clip, t5)
        self.is_flux = True
        self.is_chroma = chroma
        self.is_sd1 = self.is_sd2 = self.is_sdxl = False
        self.model_type = "Chroma" if chroma else "Flux"

    def components(self) -> dict:
        names = ("transformer", "text_encoder") if self.is_chroma else ("transformer", "text_encoder", "text_encoder_2")
        return {name: getattr(self, name) for name in names}


def bfl_state_dict(seed: int = 5, chroma: bool = False) -> dict[str, torch.Tensor]:
    """A random transformer in the BFL layout, shapes as BFL's Flux module defines them (fused qkv, linear1 =
    q, k, v, mlp rows; linear2 = attention + mlp columns; final adaLN = (shift, scale))."""
    g = torch.Generator().manual_seed(seed)
    h, sd = HIDDEN, {}

    def linear(name: str, out: int, inp: int, bias: bool = True) -> None:
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g) / inp ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1

    def norm(name: str, n: int) -> None:
        sd[f"{name}.scale"] = 1 + 0.1 * torch.randn(n, generator=g)

    linear("img_in", h, IN_CHANNELS)
    linear("txt_in", h, JOINT)
    if chroma:
        linear("distilled_guidance_layer.in_proj", h, 16)
        for i in range(2):
            linear(f"distilled_guidance_layer.layers.{i}.in_layer", h, h)
            linear(f"distilled_guidance_layer.layers.{i}.out_layer", h, h)
            norm(f"distilled_guidance_layer.norms.{i}", h)
        linear("distilled_guidance_layer.out_proj", h, h)
    else:
        for emb, inp in (("time_in", 256), ("guidance_in", 256), ("vector_in", POOLED)):
            linear(f"{emb}.in_layer", h, inp)
            linear(f"{emb}.out_layer", h, h)
    for i in range(DOUBLE):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            if not chroma:
                linear(f"{p}.{stream}_mod.lin", 6 * h, h)
            linear(f"{p}.{stream}_attn.qkv", 3 * h, h)
            norm(f"{p}.{stream}_attn.norm.query_norm", HEAD_DIM)
            norm(f"{p}.{stream}_attn.norm.key_norm", HEAD_DIM)
            linear(f"{p}.{stream}_attn.proj", h, h)
            linear(f"{p}.{stream}_mlp.0", MLP, h)
            linear(f"{p}.{stream}_mlp.2", h, MLP)
    for i in range(SINGLE):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + MLP, h)
        linear(f"{p}.linear2", h, h + MLP)
        norm(f"{p}.norm.query_norm", HEAD_DIM)
        norm(f"{p}.norm.key_norm", HEAD_DIM)
        if not chroma:
            linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", OUT_CHANNELS, h)
    if not chroma:
        linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


@functools.cache
def _converter(chroma: bool):
    from diffusers.loaders import single_file_utils
    fn = single_file_utils.convert_chroma_transformer_checkpoint_to_diffusers if chroma else \
        single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    source = inspect.getsource(fn)
    assert source.count("inner_dim = 3072") == 1, "diffusers' Flux converter changed; revisit this test helper"
    source = source.replace("inner_dim = 3072", "inner_dim = INNER_DIM")
    namespace = dict(vars(single_file_utils))
    exec(compile(source, single_file_utils.__file__, "exec"), namespace)  # noqa: S102
    return namespace[fn.__name__], namespace


def convert_bfl(state_dict: dict[str, torch.Tensor], chroma: bool = False, inner_dim: int = HIDDEN
                ) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter on a BFL-layout state dict of width `inner_dim` (default: the tiny one)."""
    fn, namespace = _converter(chroma)
    namespace["INNER_DIM"] = inner_dim
    return fn(dict(state_dict))


def _transformer(chroma: bool):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    common = dict(patch_size=1, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, num_layers=DOUBLE,
                  num_single_layers=SINGLE, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                  joint_attention_dim=JOINT, axes_dims_rope=ROPE)
    if chroma:
        return ChromaTransformer2DModel(**common, approximator_num_channels=16, approximator_hidden_dim=HIDDEN,
                                        approximator_layers=2)
    return FluxTransformer2DModel(**common, pooled_projection_dim=POOLED, guidance_embeds=True)


def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=POOLED, intermediate_size=2 * POOLED, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100, projection_dim=POOLED, bos_token_id=0,
                                        eos_token_id=2, pad_token_id=1, max_position_embeddings=16))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=JOINT, d_kv=8, d_ff=2 * JOINT, num_layers=2, num_heads=3,
                                 decoder_start_token_id=0))
    return clip.eval(), t5.eval()


def build_tiny_flux(chroma: bool = False, seed: int = 5) -> TinyFluxModel:
    """The tiny model with its transformer loaded (strictly) from `bfl_state_dict(seed)` through diffusers."""
    torch.manual_seed(seed)
    transformer = _transformer(chroma).eval()
    transformer.load_state_dict(convert_bfl(bfl_state_dict(seed, chroma), chroma), strict=True)
    clip, t5 = _text_encoders()
    return TinyFluxModel(transformer, clip, t5, chroma)


def flux_pipeline(model: TinyFluxModel):
    """A diffusers FluxPipeline around the model's own components (no VAE or tokenizers: Lora loading only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model.text_encoder,
                        tokenizer=None, text_encoder_2=model.text_encoder_2, tokenizer_2=None,
                        transformer=model.transformer)
