"""Checkpoint loading on the host: tiny default models, single-file checkpoints in the original layout, bad files."""
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules import sd_models, sd_models_diffusers, sd_models_ldm, shared

CPU = torch.device("cpu")


def _generate(model, seed: int = 1, prompt: str = "a red house") -> np.ndarray:
    generator = [torch.Generator().manual_seed(seed)]
    image = model.pipe(prompt=[prompt], negative_prompt=[""], num_inference_steps=3, guidance_scale=7.0, width=64,
                       height=64, generator=generator).images[0]
    return np.array(image)


def _params(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c, m in model.components().items() if m is not None for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_models(default_models_dir) -> dict:
    root = os.path.join(default_models_dir, "Stable-diffusion")
    return {family: sd_models_diffusers.load(os.path.join(root, f"tiny-{family}"), CPU, torch.float32)
            for family in ("sd1", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tiny_default_model_is_a_working_pipeline(tiny_models, family):
    model = tiny_models[family]
    assert model.family == family and model.is_sdxl == (family == "sdxl") and model.is_sd1 == (family == "sd1")
    assert (model.text_encoder_2 is not None) == (family == "sdxl")
    assert model.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    first, again, other = _generate(model, 1), _generate(model, 1), _generate(model, 2)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again), "the same seed must give the same image"
    assert not np.array_equal(first, other)
    assert 20 < first.std() and first.min() < 64 and first.max() > 192, "the image is flat or saturated"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_checkpoint_round_trip(tiny_models, tmp_path, family):
    """A file in the original single-file layout loads offline into the same weights and the same image."""
    model = tiny_models[family]
    components = {k: v for k, v in model.components().items() if v is not None}
    ldm = sd_models_ldm.to_ldm_state_dict(family, components)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in ldm)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in ldm)
    prefix = "conditioner.embedders." if family == "sdxl" else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(prefix) for k in ldm)
    path = str(tmp_path / f"tiny-{family}.safetensors")
    save_file(ldm, path)

    loaded = sd_models_diffusers.load(path, CPU, torch.float32)
    assert loaded.family == family
    expected, actual = _params(model), _params(loaded)
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    assert np.array_equal(_generate(model), _generate(loaded))

    # the Lora patcher's source of original weights gives back exactly what was loaded
    source = loaded.original_weights
    assert source is not None and source.valid()
    by_component = {c: m.state_dict() for c, m in loaded.components().items() if m is not None}
    for component, key in source.refs:
        assert torch.equal(source.read(component, key), by_component[component][key]), (component, key)
    assert len(source.refs) == len(expected)

    # its in-place and sampled reads too, also for a fp16 file loaded as fp32 (cast block by block)
    half_path = str(tmp_path / f"tiny-{family}-fp16.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in ldm.items()}, half_path)
    for model in (loaded, sd_models_diffusers.load(half_path, CPU, torch.float32)):
        source = model.original_weights
        by_component = {c: m.state_dict() for c, m in model.components().items() if m is not None}
        row_reads = 0
        for component, key in source.refs:
            want = by_component[component][key]
            out = torch.full_like(want, float("nan")) if want.is_floating_point() else torch.empty_like(want)
            assert source.read_into(component, key, out) and torch.equal(out, want), (component, key)
            assert torch.equal(source.sample(component, key, 3), want.reshape(-1)[::3]), (component, key)
            if want.dim() >= 2 and want.is_floating_point():  # row blocks, as the patcher's one-pass rewrite reads
                rows = source.open_rows(component, key, out)
                if rows is not None:  # None: reshaped on load (conv1x1, transposed), read whole instead
                    out.fill_(float("nan"))
                    for r0 in range(0, want.shape[0], 3):
                        rows.read(r0, min(r0 + 3, want.shape[0]), out[r0:r0 + 3])
                    assert rows.close() and torch.equal(out, want), (component, key)  # unchanged file: True
                    row_reads += 1
        assert row_reads > 0


def test_ckpt_files_load_through_weights_only(tiny_models, tmp_path):
    model = tiny_models["sd1"]
    ldm = sd_models_ldm.to_ldm_state_dict("sd1", {k: v for k, v in model.components().items() if v is not None})
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm, "global_step": 1}, path)
    loaded = sd_models_diffusers.load(str(path), CPU, torch.float32)
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight)
    assert loaded.original_weights is None  # no memory map to re-read from: the patcher keeps its own copies

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": ldm, "x": Evil()}, f)
    with pytest.raises(sd_models_ldm.CheckpointFormatError, match="weights_only"):
        sd_models_diffusers.load(str(evil), CPU, torch.float32)
    assert not (tmp_path / "pwned").exists()


def test_bad_checkpoints_give_clear_messages(tmp_path):
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(unrelated))
    with pytest.raises(sd_models_ldm.CheckpointFormatError, match="not a Stable Diffusion checkpoint"):
        sd_models_diffusers.load(str(unrelated), CPU, torch.float32)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(sd_models_ldm.CheckpointFormatError, match="truncated.safetensors"):
        sd_models_diffusers.load(str(truncated), CPU, torch.float32)
    partial = tmp_path / "partial.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 64)},
              str(partial))
    with pytest.raises(sd_models_ldm.CheckpointFormatError, match="missing tensor"):
        sd_models_diffusers.load(str(partial), CPU, torch.float32)


def test_listing_titles_and_selection(default_models_dir, monkeypatch):
    monkeypatch.setattr(shared.cmd_opts, "ckpt_dir", os.path.join(default_models_dir, "Stable-diffusion"))
    monkeypatch.setattr(shared.cmd_opts, "ckpt", None)
    monkeypatch.setitem(shared.opts.data, "sd_model_checkpoint", "tiny-sdxl")
    sd_models.list_models()
    names = [info.name for info in sd_models.checkpoints_list.values()]
    assert names == ["tiny-flux", "tiny-sd1", "tiny-sd3", "tiny-sdxl"]
    info = sd_models.select_checkpoint()
    assert info.name == "tiny-sdxl" and info.is_diffusers
    shorthash = info.calculate_shorthash()
    assert info.title == f"tiny-sdxl [{shorthash}]" and len(shorthash) == 10
    assert [i.name for i in sd_models.checkpoints_list.values()] == names, "order kept"
    assert sd_models.get_closet_checkpoint_match(info.title) is info
    assert sd_models.get_closet_checkpoint_match("tiny-sdxl") is info
    monkeypatch.setitem(shared.opts.data, "sd_model_checkpoint", "no-such-model")
    assert sd_models.select_checkpoint().name == "tiny-sd1", "the tiny SD1 model is the fallback, not tiny-flux"


def test_sd2_single_file_with_openclip_text_encoder(tmp_path):
    """SD2: OpenCLIP's fused q/k/v `in_proj_weight` and the extra final block of the file (diffusers reads the
    penultimate layer) map onto CLIPTextModel; v-prediction by default, eps when the A1111 sidecar yaml says so."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modules import default_models

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(default_models.UNET_SD1, attention_head_dim=[1, 1, 1],
                                       use_linear_projection=True, upcast_attention=True)).eval()
    text = CLIPTextModel(CLIPTextConfig(**dict(default_models.TEXT, num_hidden_layers=2), hidden_act="gelu")).eval()
    components = {"unet": unet, "vae": AutoencoderKL(**default_models.VAE).eval(), "text_encoder": text}
    ldm = sd_models_ldm.to_ldm_state_dict("sd2", components)
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in ldm  # the padded last block
    path = tmp_path / "tiny-sd2.safetensors"
    save_file(ldm, str(path))

    loaded = sd_models_diffusers.load(str(path), CPU, torch.float32)
    assert loaded.family == "sd2" and loaded.is_sd2
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"
    assert loaded.text_encoder.config.num_hidden_layers == 2
    expected = {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}
    actual = _params(loaded)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    (tmp_path / "tiny-sd2.yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    assert sd_models_diffusers.load(str(path), CPU, torch.float32).pipe.scheduler.config.prediction_type == "epsilon"
