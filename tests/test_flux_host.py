"""Flux.1 / Chroma in the host: every file layout loads offline and generates what diffusers' own pipelines generate.

References are diffusers only: `FluxPipeline.from_pretrained` on the tiny-flux folder, `ChromaPipeline` built from
the same modules, and diffusers' single-file converters (run at Flux.1's real widths on shape-only tensors) for
which BFL tensor (and which rows of it) is which diffusers parameter.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch

from modules import flux_layout, sd_models_diffusers
from modules.sd_models_ldm import CheckpointFormatError

CPU = torch.device("cpu")
PROMPT = "a photo of a cat"


def _render(pipe, steps=2, seed=7, **kwargs):
    return pipe(prompt=PROMPT, num_inference_steps=steps, width=64, height=64, max_sequence_length=64,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def reference(flux_files):
    """diffusers' own FluxPipeline from the tiny-flux folder, no host code involved."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_files["folder"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_image(reference):
    return _render(reference, guidance_scale=3.5)


def _assert_same(image, reference) -> None:
    """Equal up to float rounding (memory layout changes the order of a few sums): 1e-5 of the 0-1 range, well under
    one 8-bit level."""
    diff = np.abs(image - reference).max()
    assert diff < 1e-5, f"max difference {diff}"


def _modules(flux_files, *names):
    return [flux_files[n] for n in names]


def _assert_original_weights(model):
    """The Lora patcher's restore source re-reads every parameter exactly as loaded; no weight lives on a file's
    pages."""
    from modules import mapped_memory

    assert mapped_memory.file_backed_tensors(model.components()) == []
    source = model.original_weights
    loaded = {c: m.state_dict() for c, m in model.components().items() if m is not None}
    assert {c for c, _ in source.refs} == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    for component, key in source.refs:
        assert torch.equal(source.read(component, key), loaded[component][key]), (component, key)


# --- the layout against diffusers' converter, at Flux.1's own widths --------------------------------------------
def _bfl_shapes(variant: str, hidden: int = 3072, blocks: int = 2) -> dict[str, tuple]:
    """A BFL transformer's tensors with Flux.1's real row counts and one input column (all the converter looks at)."""
    shapes = {}

    def linear(name, rows):
        shapes[name + ".weight"], shapes[name + ".bias"] = (rows, 1), (rows,)

    linear("img_in", hidden)
    linear("txt_in", hidden)
    linear("final_layer.linear", 64)
    if variant == "chroma":
        linear("distilled_guidance_layer.in_proj", 5120)
        linear("distilled_guidance_layer.out_proj", hidden)
        for i in range(2):
            linear(f"distilled_guidance_layer.layers.{i}.in_layer", 5120)
            linear(f"distilled_guidance_layer.layers.{i}.out_layer", 5120)
            shapes[f"distilled_guidance_layer.norms.{i}.scale"] = (5120,)
    else:
        linear("time_in.in_layer", hidden)
        linear("time_in.out_layer", hidden)
        linear("vector_in.in_layer", hidden)
        linear("vector_in.out_layer", hidden)
        linear("final_layer.adaLN_modulation.1", 2 * hidden)
        if variant == "dev":
            linear("guidance_in.in_layer", hidden)
            linear("guidance_in.out_layer", hidden)
    for i in range(blocks):
        b = f"double_blocks.{i}."
        for side in ("img", "txt"):
            if variant != "chroma":
                linear(f"{b}{side}_mod.lin", 6 * hidden)
            linear(f"{b}{side}_attn.qkv", 3 * hidden)
            linear(f"{b}{side}_attn.proj", hidden)
            linear(f"{b}{side}_mlp.0", 4 * hidden)
            linear(f"{b}{side}_mlp.2", hidden)
            shapes[f"{b}{side}_attn.norm.query_norm.scale"] = shapes[f"{b}{side}_attn.norm.key_norm.scale"] = (128,)
        s = f"single_blocks.{i}."
        if variant != "chroma":
            linear(s + "modulation.lin", 3 * hidden)
        linear(s + "linear1", 7 * hidden)
        linear(s + "linear2", hidden)
        shapes[s + "norm.query_norm.scale"] = shapes[s + "norm.key_norm.scale"] = (128,)
    return shapes


@pytest.mark.parametrize("variant", ["dev", "schnell", "chroma"])
def test_bfl_layout_is_diffusers_converters(variant):
    from diffusers.loaders.single_file_utils import (
        convert_chroma_transformer_checkpoint_to_diffusers,
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    start, tensors = 0, {}
    for key, shape in _bfl_shapes(variant).items():  # every element numbered: a wrong row or key shows
        n = int(np.prod(shape))
        tensors["model.diffusion_model." + key] = torch.arange(start, start + n, dtype=torch.float64).reshape(shape)
        start += n
    prefix = flux_layout.find_prefix(tensors)
    assert prefix == "model.diffusion_model." and flux_layout.detect_variant(tensors, prefix) == variant
    convert = convert_chroma_transformer_checkpoint_to_diffusers if variant == "chroma" else \
        convert_flux_transformer_checkpoint_to_diffusers
    expected = convert(dict(tensors))
    config = {"attention_head_dim": 128, "num_attention_heads": 24}
    for key, want in expected.items():
        ref = flux_layout.transformer_ref(key, config, prefix)
        assert ref is not None and torch.equal(flux_layout.read_ref(ref, tensors), want), (key, ref)


def test_config_read_off_shapes_and_refused_widths(flux_files):
    from safetensors import safe_open

    with safe_open(flux_files["bfl"], "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = flux_layout.transformer_config(shapes, "", "dev")
    with open(os.path.join(flux_files["folder"], "transformer", "config.json")) as f:
        saved = json.load(f)
    saved["out_channels"] = saved["out_channels"] or saved["in_channels"]  # None means in_channels
    for key, value in config.items():
        assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    fill = dict(shapes, **{"img_in.weight": (shapes["img_in.weight"][0], 384)})
    with pytest.raises(CheckpointFormatError, match="384 input channels for 64 output ones: a FLUX.1 Fill"):
        flux_layout.transformer_config(fill, "", "dev")
    with pytest.raises(CheckpointFormatError, match="rotary axes"):
        flux_layout.rope_axes(48)  # 6/21/21: odd axes
    bad = dict(shapes, **{"double_blocks.0.img_mlp.0.weight": (3 * config["attention_head_dim"] * 2, 64)})
    with pytest.raises(CheckpointFormatError, match="MLP 4x"):
        flux_layout.transformer_config(bad, "", "dev")


# --- every layout generates diffusers' image ------------------------------------------------------------------
@pytest.mark.parametrize("layout,modules", [
    ("folder", ()), ("bfl", ("clip_l", "t5", "ae")), ("bfl_prefixed", ("clip_l", "t5", "ae")), ("full", ())])
def test_layouts_generate_the_folder_image(flux_files, reference_image, layout, modules):
    model = sd_models_diffusers.load(flux_files[layout], CPU, torch.float32, None, _modules(flux_files, *modules))
    assert model.is_flux and not model.is_chroma and model.variant == "dev" and model.unet is None
    assert set(model.components()) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    image = _render(model.pipe, guidance_scale=3.5)
    _assert_same(image, reference_image)
    _assert_original_weights(model)


def test_picked_files_replace_bundled_ones(flux_files, reference, tmp_path):
    """A picked VAE wins over the all-in-one file's own, as in Forge."""
    from flux_files import ae_tensors, write

    vae = reference.vae
    with torch.no_grad():
        changed = {k: v * 1.5 if k.endswith("decoder.conv_out.weight") else v for k, v in ae_tensors(vae).items()}
    other = write(changed, str(tmp_path / "VAE" / "other-ae.safetensors"))
    model = sd_models_diffusers.load(flux_files["full"], CPU, torch.float32, None, [other])
    assert torch.equal(model.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight * 1.5)
    assert model.original_weights.refs[("vae", "decoder.conv_out.weight")][0] == other


def test_fp8_weights_stay_fp8_and_compute_like_rounded_weights(flux_files, reference):
    """fp8 block weights keep 1 byte each; the image equals diffusers' pipeline whose weights were rounded through
    float8_e4m3fn as the files hold them (every 2-D weight of the transformer and T5), computed in fp32."""
    from diffusers import FluxPipeline

    from modules import fp8_storage

    model = sd_models_diffusers.load(flux_files["fp8"], CPU, torch.float32, None,
                                     _modules(flux_files, "clip_l", "t5_fp8", "ae"))
    fp8 = {(c, k) for c, m in model.components().items() for k, p in m.state_dict().items()
           if p.dtype == torch.float8_e4m3fn}
    assert ("transformer", "transformer_blocks.0.attn.to_q.weight") in fp8
    assert ("transformer", "single_transformer_blocks.1.proj_mlp.weight") in fp8
    assert ("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q.weight") in fp8
    assert ("transformer", "x_embedder.weight") not in fp8, "small layers outside the blocks compute in fp32"
    assert model.dtype == torch.float32 and model.transformer.dtype == torch.float32
    assert isinstance(model.transformer.transformer_blocks[0].attn.to_q, fp8_storage.Fp8Linear)
    rounded_modules = {c: [k for k, p in getattr(reference, c).named_parameters() if p.dim() == 2 and
                           k.endswith(".weight")] for c in ("transformer", "text_encoder_2")}
    rounded = FluxPipeline(**{k: copy.deepcopy(v) if k in rounded_modules else v
                              for k, v in reference.components.items()})
    rounded.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for component, keys in rounded_modules.items():
            params = dict(getattr(rounded, component).named_parameters())
            for key in keys:
                params[key].copy_(params[key].to(torch.float8_e4m3fn).float())
    _assert_same(_render(model.pipe, guidance_scale=3.5), _render(rounded, guidance_scale=3.5))
    full = fp8_storage.parameter_bytes(reference.transformer)
    assert fp8_storage.parameter_bytes(model.transformer) < 0.45 * full  # fp32 → fp8 for the block weights
    _assert_original_weights(model)
    assert model.original_weights.read("transformer", "transformer_blocks.0.attn.to_q.weight").dtype == \
        torch.float8_e4m3fn


# --- variants told apart by their tensors ---------------------------------------------------------------------
def _tiny_transformer(kind: str):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    torch.manual_seed(3)
    common = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 14, 14))
    if kind == "chroma":
        return ChromaTransformer2DModel(**common, approximator_num_channels=16, approximator_hidden_dim=32,
                                        approximator_layers=2).eval()
    return FluxTransformer2DModel(**common, pooled_projection_dim=64, guidance_embeds=False).eval()


@pytest.mark.parametrize("kind", ["schnell", "chroma"])
def test_schnell_and_chroma_from_their_tensors(flux_files, reference, tmp_path, kind):
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from flux_files import write

    from modules import default_models_dit

    transformer = _tiny_transformer(kind)
    path = write(flux_layout.to_bfl_state_dict(transformer, "model.diffusion_model."),
                 str(tmp_path / f"{kind}.safetensors"))
    modules = _modules(flux_files, "t5", "ae") if kind == "chroma" else _modules(flux_files, "clip_l", "t5", "ae")
    model = sd_models_diffusers.load(path, CPU, torch.float32, None, modules)
    assert model.variant == kind and model.is_flux and model.is_chroma == (kind == "chroma")
    scheduler = FlowMatchEulerDiscreteScheduler(**default_models_dit.SCHEDULERS[kind])
    r = reference
    if kind == "chroma":
        assert set(model.components()) == {"transformer", "text_encoder", "vae"}
        assert type(model.text_encoder).__name__ == "T5EncoderModel"
        ref = ChromaPipeline(scheduler=scheduler, vae=r.vae, text_encoder=r.text_encoder_2, tokenizer=r.tokenizer_2,
                             transformer=transformer)
        kwargs = {"guidance_scale": 4.0, "negative_prompt": "blurry"}
    else:
        assert not model.transformer.config.guidance_embeds
        ref = FluxPipeline(scheduler=scheduler, vae=r.vae, text_encoder=r.text_encoder, tokenizer=r.tokenizer,
                           text_encoder_2=r.text_encoder_2, tokenizer_2=r.tokenizer_2, transformer=transformer)
        kwargs = {}
    ref.set_progress_bar_config(disable=True)
    assert dict(model.pipe.scheduler.config)["use_dynamic_shifting"] == (kind == "chroma")
    _assert_same(_render(model.pipe, **kwargs), _render(ref, **kwargs))


# --- clear messages ---------------------------------------------------------------------------------------------
def test_missing_parts_and_wrong_files_are_named(flux_files, tmp_path):
    from flux_files import write

    with pytest.raises(CheckpointFormatError, match=r"dev transformer without CLIP-L, T5, VAE: pick them under VAE"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32)
    with pytest.raises(CheckpointFormatError, match="without VAE"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32, None, _modules(flux_files, "clip_l", "t5"))
    with pytest.raises(CheckpointFormatError, match="holds only a T5, no Flux/Chroma/SD3 transformer"):
        sd_models_diffusers.prepare(flux_files["t5"], CPU, torch.float32)
    with pytest.raises(CheckpointFormatError, match="two T5 files are picked"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32, None,
                                    _modules(flux_files, "clip_l", "t5", "t5_fp8", "ae"))
    with pytest.raises(CheckpointFormatError, match="pick it as the checkpoint"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32, None, [flux_files["bfl"]])
    # scaled fp8 files would load with every weight off by its scale: refused by name
    from safetensors.torch import load_file
    scaled = load_file(flux_files["t5_fp8"])
    scaled["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(0.5)
    scaled_path = write(scaled, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    with pytest.raises(CheckpointFormatError, match="t5xxl_fp8_e4m3fn_scaled.safetensors: a scaled fp8 file"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32, None,
                                    [flux_files["clip_l"], scaled_path, flux_files["ae"]])
    # a real-size T5 vocabulary needs T5's own tokenizer, which is never downloaded
    t5 = load_file(flux_files["t5"])
    t5["shared.weight"] = torch.zeros(32128, t5["shared.weight"].shape[1])
    big = write(t5, str(tmp_path / "t5xxl_real_vocab.safetensors"))
    with pytest.raises(CheckpointFormatError, match="T5's own tokenizer .32128-row vocabulary"):
        sd_models_diffusers.prepare(flux_files["bfl"], CPU, torch.float32, None,
                                    [flux_files["clip_l"], big, flux_files["ae"]])
