"""diffusers + PEFT as the reference: files saved the way diffusers saves them, merged by diffusers
(`load_lora_weights` + `fuse_lora`), must give the weights our loader and patcher give.

- PEFT LoRA on SD1 and SDXL (UNet and text encoders), with lora_alpha ≠ r, an alpha_pattern and rsLoRA, saved
  by the pipeline's `save_lora_weights` (the alphas travel in its `lora_adapter_metadata`);
- PEFT DoRA (magnitude per output channel). diffusers drops the magnitudes of text-encoder DoRA layers when it
  loads them (its load report lists them as UNEXPECTED/MISSING), so there PEFT's own `merge()` on the adapter
  model that was saved is the reference;
- kohya files (SD1 diffusers-flattened names, SDXL sgm names with te1/te2, LoCon convs) through diffusers'
  kohya converter.
"""
import copy
import json
import os

import lora_layers
import networks
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _pipeline(model):
    if model.is_sdxl:
        return StableDiffusionXLPipeline(vae=None, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                                         tokenizer=None, tokenizer_2=None, unet=model.unet, scheduler=DDIMScheduler())
    return StableDiffusionPipeline(vae=None, text_encoder=model.text_encoder, tokenizer=None, unet=model.unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _state(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in model.components().items() if module is not None}


def diffusers_fused(model, path: str) -> dict[str, dict[str, torch.Tensor]]:
    """The weights diffusers merges from a Lora file (on a copy of the model)."""
    ref = copy.deepcopy(model)
    pipe = _pipeline(ref)
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return _state(ref)


def ours(model, name: str) -> dict[str, dict[str, torch.Tensor]]:
    report = networks.load_networks([name], sd_model=model)
    net = report.networks[0]
    assert not net.unmatched_keys and not net.unsupported_keys and not net.unused_keys, net.unmatched_keys[:5]
    assert not net.load_errors and not net.apply_errors and not report.fatal
    return _state(model)


def assert_same(got: dict, want: dict, original: dict, components=None, atol: float = 2e-6) -> int:
    """Equal weights everywhere (within fp32 rounding); returns how many tensors the Lora changed."""
    changed = 0
    for component, state in want.items():
        if components is not None and component not in components:
            continue
        assert got[component].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got[component][key], value, rtol=1e-5, atol=atol, msg=f"{component}.{key}")
            changed += not torch.equal(value, original[component][key])
    return changed


def save_peft_lora(model, folder: str, use_dora: bool, seed: int = 0) -> tuple[str, object]:
    """A PEFT adapter on copies of the model's components, saved with the pipeline's save_lora_weights.
    Returns (file, the adapter model)."""
    torch.manual_seed(seed)
    work = copy.deepcopy(model)
    unet_config = LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, alpha_pattern={"attn2.to_k": 2.0},
                             init_lora_weights=False, use_dora=use_dora)
    text_config = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False,
                             use_dora=use_dora, use_rslora=True)
    work.unet.add_adapter(unet_config)
    kwargs = {"unet_lora_layers": get_peft_model_state_dict(work.unet), "unet_lora_adapter_metadata":
              unet_config.to_dict()}
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(work, name, None)
        if module is None:
            continue
        config = copy.deepcopy(text_config)
        if name == "text_encoder_2":
            config.target_modules = set(TEXT_TARGETS) | {"text_projection"}
        module.add_adapter(config)
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    _pipeline(work).save_lora_weights(folder, weight_name="peft_lora.safetensors", **kwargs)
    return os.path.join(folder, "peft_lora.safetensors"), work


def peft_merged(work) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's own merge of every adapter layer of `work`, with the adapter layers' names taken back out."""
    for module in [m for comp in work.components().values() if comp is not None for m in comp.modules()]:
        if isinstance(module, LoraLayer):
            module.merge()
    res = {}
    for name, module in work.components().items():
        if module is None:
            continue
        res[name] = {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
                     if "lora_" not in k}
    return res


def _copy_into_lora_dir(path: str, lora_dir, name: str) -> None:
    with open(path, "rb") as src, open(os.path.join(str(lora_dir), f"{name}.safetensors"), "wb") as dst:
        dst.write(src.read())
    networks.list_available_networks()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_lora_saved_by_diffusers_merges_like_fuse_lora(request, lora_dir, tmp_path, family):
    model = request.getfixturevalue(f"tiny_{family}")
    path, _ = save_peft_lora(model, str(tmp_path), use_dora=False)
    import safetensors
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 6 and config["unet.r"] == 4  # alpha ≠ r: the metadata matters
    reference = diffusers_fused(model, path)
    original = _state(model)
    _copy_into_lora_dir(path, lora_dir, "peft_lora")
    changed = assert_same(ours(model, "peft_lora"), reference, original)
    layers = len(networks.loaded_networks[0].modules)
    assert changed >= layers > 50


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_dora_saved_by_diffusers_merges_like_peft(request, lora_dir, tmp_path, family):
    model = request.getfixturevalue(f"tiny_{family}")
    path, work = save_peft_lora(model, str(tmp_path), use_dora=True)
    reference_unet = diffusers_fused(model, path)
    reference_peft = peft_merged(work)
    original = _state(model)
    _copy_into_lora_dir(path, lora_dir, "peft_dora")
    got = ours(model, "peft_dora")
    net = networks.loaded_networks[0]
    assert sum(m.dora_scale is not None for m in net.modules.values()) == len(net.modules)
    assert assert_same(got, reference_unet, original, components=("unet",), atol=1e-5) > 0
    text = [c for c in got if c != "unet"]
    assert assert_same(got, reference_peft, original, components=text, atol=1e-5) > 0
    # and PEFT agrees with diffusers on the UNet, so the two references are one
    assert_same(reference_peft, reference_unet, original, components=("unet",), atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_through_diffusers_converter(request, write_lora, family):
    """kohya's own spellings (SD1: diffusers-flattened UNet names and lora_te_; SDXL: sgm UNet names, lora_te1_
    and lora_te2_), LoCon convs included, merged by diffusers' kohya converter and by us."""
    model = request.getfixturevalue(f"tiny_{family}")
    path = write_lora(f"kohya_{family}", model, family=family, locon=True, alpha=3.0, rank=4)
    reference = diffusers_fused(model, path)
    original = _state(model)
    got = ours(model, f"kohya_{family}")
    layers = len(networks.loaded_networks[0].modules)
    assert assert_same(got, reference, original) >= layers > 50
    assert any(k.startswith("text_encoder") for k in networks.loaded_networks[0].modules)
    if family == "sdxl":  # the up-block upsampler that A1111 misnames (13B-7) is among them
        assert "unet.up_blocks.0.upsamplers.0.conv" in networks.loaded_networks[0].modules
    networks.load_networks([], sd_model=model)
    restored = _state(model)
    for component, state in original.items():
        for key, value in state.items():
            assert torch.equal(restored[component][key], value), f"{component}.{key}"


def test_layer_map_names_every_peft_target(tiny_sdxl):
    """Every module PEFT wraps in the tiny SDXL model has a canonical layer (both CLIP namings)."""
    layer_map = lora_layers.LayerMap(tiny_sdxl)
    for component in ("text_encoder", "text_encoder_2"):
        module = getattr(tiny_sdxl, component)
        for path, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                canonical = f"{component}.{path.removeprefix('text_model.')}"
                assert layer_map.layers[canonical] is layer
