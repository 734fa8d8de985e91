"""SD3 / SD3.5 in the host: SAI's single-file layout, separate encoder files and diffusers folders load offline and
generate what diffusers' StableDiffusion3Pipeline generates; the layout equals diffusers' own converter at SD3.5
Large widths."""
import numpy as np
import pytest
import torch

from modules import sd3_layout, sd_models_diffusers

CPU = torch.device("cpu")
RENDER = dict(prompt="a red house", negative_prompt="blurry", num_inference_steps=2, width=64, height=64,
              guidance_scale=5.0, max_sequence_length=64, output_type="np")


def _render(pipe):
    return pipe(**RENDER, generator=torch.Generator().manual_seed(3)).images


@pytest.fixture(scope="module")
def reference(sd3_files):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_files["folder"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_layout_is_diffusers_converter():
    """Every tensor numbered; SD3.5 Large's rows (hidden 2432, 38 heads), one MMDiT-X block, the last block's
    context side with only a (shift, scale) modulation."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    h, shapes = 2432, {"pos_embed": (1, 16, 2432), "x_embedder.proj.weight": (2432, 16, 2, 2),
                       "x_embedder.proj.bias": (2432,)}

    def linear(name, rows):
        shapes[name + ".weight"], shapes[name + ".bias"] = (rows, 1), (rows,)

    for name in ("t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.2"):
        linear(name, h)
    linear("y_embedder.mlp.0", h)  # one input column: all the converter looks at are the rows
    linear("context_embedder", h)
    linear("final_layer.linear", 64)
    linear("final_layer.adaLN_modulation.1", 2 * h)
    for i in range(3):
        b = f"joint_blocks.{i}."
        for name, rows in (("x_block.attn.qkv", 3 * h), ("x_block.attn.proj", h), ("x_block.mlp.fc1", 4 * h),
                           ("x_block.mlp.fc2", h), ("x_block.adaLN_modulation.1", 9 * h if i == 0 else 6 * h),
                           ("context_block.attn.qkv", 3 * h)):
            linear(b + name, rows)
        attentions = ("x_block.attn", "context_block.attn") + (("x_block.attn2",) if i == 0 else ())
        for attn in attentions:
            shapes[f"{b}{attn}.ln_q.weight"] = shapes[f"{b}{attn}.ln_k.weight"] = (64,)
        if i == 0:
            linear(b + "x_block.attn2.qkv", 3 * h)
            linear(b + "x_block.attn2.proj", h)
        if i < 2:
            for name, rows in (("context_block.attn.proj", h), ("context_block.mlp.fc1", 4 * h),
                               ("context_block.mlp.fc2", h), ("context_block.adaLN_modulation.1", 6 * h)):
                linear(b + name, rows)
        else:
            linear(b + "context_block.adaLN_modulation.1", 2 * h)
    start, tensors = 0, {}
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        tensors["model.diffusion_model." + key] = torch.arange(start, start + n, dtype=torch.float64).reshape(shape)
        start += n
    prefix = sd3_layout.find_prefix(tensors)
    config = sd3_layout.transformer_config({k: tuple(v.shape) for k, v in tensors.items()}, prefix)
    assert (config["num_attention_heads"], config["dual_attention_layers"], config["qk_norm"]) == (38, (0,), "rms_norm")
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))
    for key, want in expected.items():
        ref = sd3_layout.transformer_ref(key, config, prefix)
        assert ref is not None and torch.equal(sd3_layout.read_ref(ref, tensors), want), (key, ref)


@pytest.mark.parametrize("layout", ["folder", "full", "parts"])
def test_sd3_layouts_generate_the_folder_image(sd3_files, reference, layout):
    from modules import mapped_memory

    # separate CLIP files name neither CLIP: the wider one is CLIP-G (given in either order)
    modules = [sd3_files[k] for k in ("clip_g", "vae", "clip_l", "t5")] if layout == "parts" else []
    model = sd_models_diffusers.load(sd3_files["transformer" if layout == "parts" else layout], CPU, torch.float32,
                                     None, modules)
    assert model.is_sd3 and not model.is_flux and model.variant == "sd3.5" and model.unet is None
    assert set(model.components()) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    assert model.text_encoder.config.hidden_size < model.text_encoder_2.config.hidden_size
    diff = np.abs(_render(model.pipe) - _render(reference)).max()
    assert diff < 1e-5, diff
    assert mapped_memory.file_backed_tensors(model.components()) == []
    loaded = {c: m.state_dict() for c, m in model.components().items()}
    for component, key in model.original_weights.refs:
        assert torch.equal(model.original_weights.read(component, key), loaded[component][key]), (component, key)


def test_sd3_without_t5_and_a_job(sd3_files, reference):
    from diffusers import StableDiffusion3Pipeline

    from modules import processing

    model = sd_models_diffusers.load(sd3_files["no_t5"], CPU, torch.float32)
    assert model.text_encoder_3 is None
    no_t5 = StableDiffusion3Pipeline(**dict(reference.components, text_encoder_3=None, tokenizer_3=None))
    no_t5.set_progress_bar_config(disable=True)
    assert np.abs(_render(model.pipe) - _render(no_t5)).max() < 1e-5

    result = processing.process_images(processing.StableDiffusionProcessingTxt2Img(
        sd_model=model, prompt=RENDER["prompt"], negative_prompt=RENDER["negative_prompt"], steps=2, cfg_scale=5.0,
        width=64, height=64, seed=3, do_not_save_samples=True))
    assert "Sampler: Euler," in result.info and "Distilled CFG" not in result.info
    # without T5 the host encodes at diffusers' SD3 default of 256 T5 positions (zeros), as the pipeline itself does
    want = no_t5(**dict(RENDER, output_type="pil", max_sequence_length=256),
                 generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(want, dtype=int)).max() <= 1
