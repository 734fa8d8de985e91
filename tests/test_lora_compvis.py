"""The compvis (A1111) module layout: ldm UNetModel, CLIP under `cond_stage_model`/`conditioner.embedders`, and
OpenCLIP's fused MultiheadAttention, against a diffusers-layout twin holding the same weights.

The twin's weights come from diffusers' own single-file converters, so "the same file gives the same deltas on
corresponding layers" is checked against an independent name mapping: the patched ldm state dict, converted by
diffusers, must equal the patched twin.
"""
import lora_keys
import lora_layers
import networks
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

FAMILIES = ["sd1", "sd2", "sdxl"]


def ldm_to_diffusers(ldm, twin) -> dict[str, dict[str, torch.Tensor]]:
    """{component: diffusers state dict} of a compvis model, by diffusers' converters."""
    sd = {k: v.detach().clone() for k, v in ldm.ldm_state_dict().items()}
    res = {"unet": convert_ldm_unet_checkpoint(sd, dict(twin.unet.config))}
    towers = [("text_encoder", twin.text_encoder), ("text_encoder_2", twin.text_encoder_2)]
    prefixes = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
                "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}[_family(ldm)]
    for (name, model), prefix in zip(towers, prefixes, strict=False):
        if prefix.endswith("model."):
            converted = convert_open_clip_checkpoint(model, sd, prefix)
        else:
            converted = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        own = model.state_dict()
        res[name] = {(k if k in own else lora_keys.strip_text_model(k)): v for k, v in converted.items()
                     if (k if k in own else lora_keys.strip_text_model(k)) in own}
    return res


def _family(model) -> str:
    return "sdxl" if model.is_sdxl else "sd2" if model.is_sd2 else "sd1"


def twin_state(twin) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in twin.components().items() if module is not None}


def lora_tensors(layer_map, naming: str, rank: int = 2, seed: int = 0, dora_on: tuple = ()) -> dict:
    """A LoRA/LoCon for every Linear/Conv2d layer: kohya names (diffusers-flattened for one text encoder, sgm
    names and te1/te2 for two) or PEFT/diffusers dotted names. `dora_on`: canonical suffixes that get a kohya
    `dora_scale` (per input channel)."""
    gen = torch.Generator().manual_seed(seed)
    sdxl = "text_encoder_2" in layer_map.components
    res = {}
    for canonical, module in layer_map.layers.items():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, lora_layers.FusedSlice)):
            continue
        shape = tuple(module.weight.shape)
        component, _, path = canonical.partition(".")
        if naming == "kohya":
            if component == "unet":
                name = lora_keys.diffusers_to_compvis(path, layer_map.structure) if sdxl else path
                base = "lora_unet_" + name.replace(".", "_")
            else:
                prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
                base = prefix + ("" if path == "text_projection" else "text_model_") + path.replace(".", "_")
            down_name, up_name = "lora_down.weight", "lora_up.weight"
        else:
            base, down_name, up_name = canonical, "lora_A.weight", "lora_B.weight"
        down = torch.randn((rank, *shape[1:]), generator=gen) * 0.3
        up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=gen) * 0.3
        res[f"{base}.{down_name}"] = down
        res[f"{base}.{up_name}"] = up
        if naming == "kohya":
            res[f"{base}.alpha"] = torch.tensor(1.5)
            if canonical.endswith(dora_on):
                res[f"{base}.dora_scale"] = 1 + torch.rand((1, shape[1]), generator=gen)
    return res


@pytest.mark.parametrize("naming", ["kohya", "peft"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_file_gives_the_same_weights_on_both_layouts(tiny_ldm_pair, write_lora, monkeypatch, family, naming):
    # restore by CPU copies: the layouts are under test here, not the patcher's residual restore (slow on CPU)
    monkeypatch.setattr(networks.patcher, "prefer", ("clone",))
    ldm, twin = tiny_ldm_pair(family)
    ldm_map, twin_map = lora_layers.LayerMap(ldm), lora_layers.LayerMap(twin)
    assert ldm_map.layout == "compvis" and twin_map.layout == "diffusers"
    # OpenCLIP's text_projection is a bare (transposed) parameter in the compvis layout, not a layer
    assert set(ldm_map.layers) == set(twin_map.layers) - {"text_encoder_2.text_projection"}
    tensors = lora_tensors(ldm_map, naming, dora_on=("self_attn.q_proj", "attn2.to_k"))
    write_lora(f"{family}_{naming}", tensors=tensors, metadata={})
    original_ldm = {k: v.clone() for k, v in ldm.ldm_state_dict().items()}
    original_twin = twin_state(twin)

    patched = {}
    for model in (ldm, twin):
        report = networks.load_networks([f"{family}_{naming}"], [1.0], [1.0], [None], sd_model=model)
        net = report.networks[0]
        assert not net.unmatched_keys and not net.load_errors and not net.apply_errors and not report.fatal
        assert len(net.modules) == sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in tensors)
        assert report.layers_written == len(net.modules)
        patched[id(model)] = twin_state(twin) if model is twin else ldm_to_diffusers(ldm, twin)

    from_ldm, from_twin = patched[id(ldm)], patched[id(twin)]
    changed = 0
    for component, state in from_twin.items():
        assert from_ldm[component].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(from_ldm[component][key], value, rtol=0, atol=2e-6, msg=f"{component}.{key}")
            changed += not torch.equal(value, original_twin[component][key])
    assert changed >= len(net.modules)  # every layer's weight moved (in_proj rows count once per slice)

    for model in (ldm, twin):
        networks.load_networks([], sd_model=model)
    for key, value in ldm.ldm_state_dict().items():
        assert torch.equal(value, original_ldm[key]), key
    for component, state in twin_state(twin).items():
        for key, value in state.items():
            assert torch.equal(value, original_twin[component][key]), f"{component}.{key}"


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fused_qkv_rows_are_separate_layers_for_the_patcher(tiny_ldm_pair, write_lora, family):
    """q, k and v share one in_proj_weight: patching them must not look like foreign writes to each other, so an
    unchanged job writes nothing and a restore is exact."""
    ldm, _ = tiny_ldm_pair(family)
    layer_map = lora_layers.get_layer_map(ldm)
    component = "text_encoder_2" if family == "sdxl" else "text_encoder"
    prefix = "lora_te2_" if family == "sdxl" else "lora_te_"
    write_lora("qkv", tensors={k: v for k, v in lora_tensors(layer_map, "kohya").items() if k.startswith(prefix)},
               metadata={})
    q = layer_map.layers[f"{component}.encoder.layers.0.self_attn.q_proj"]
    k = layer_map.layers[f"{component}.encoder.layers.0.self_attn.k_proj"]
    assert isinstance(q, lora_layers.FusedSlice)
    mha = q._owner
    original = mha.in_proj_weight.detach().clone()
    d = mha.embed_dim
    assert q.weight.data_ptr() == mha.in_proj_weight.data_ptr()
    assert k.weight.data_ptr() == mha.in_proj_weight.data_ptr() + d * d * mha.in_proj_weight.element_size()

    foreign_before = networks.patcher.stats["foreign_changes"]
    first = networks.load_networks(["qkv"], [1.0], [1.0], [None], sd_model=ldm)
    assert first.layers_written > 0 and not first.networks[0].apply_errors
    again = networks.load_networks(["qkv"], [1.0], [1.0], [None], sd_model=ldm)
    assert again.layers_written == 0
    assert networks.patcher.stats["foreign_changes"] == foreign_before
    halfway = networks.load_networks(["qkv"], [0.5], [0.5], [None], sd_model=ldm)
    assert halfway.layers_written == first.layers_written
    networks.load_networks([], sd_model=ldm)
    assert torch.equal(mha.in_proj_weight, original)


def test_fused_rows_follow_moved_memory_and_keep_a_foreign_write(tiny_ldm_pair, write_lora):
    ldm, _ = tiny_ldm_pair("sd2")
    layer_map = lora_layers.get_layer_map(ldm)
    tower = ldm.cond_stage_model.wrapped.model
    write_lora("sd2_te", tensors={k: v for k, v in lora_tensors(layer_map, "kohya").items()
                                  if k.startswith("lora_te_")}, metadata={})
    original = {k: v.clone() for k, v in tower.state_dict().items()}
    mha = tower.transformer.resblocks[1].attn

    networks.load_networks(["sd2_te"], sd_model=ldm)
    assert not torch.equal(mha.in_proj_weight, original["transformer.resblocks.1.attn.in_proj_weight"])
    old_ptr = mha.in_proj_weight.data_ptr()
    foreign_before = networks.patcher.stats["foreign_changes"]
    tower._apply(lambda t: t.clone())  # what .to(device) does: new memory under the same parameter objects
    assert mha.in_proj_weight.data_ptr() != old_ptr
    networks.load_networks([], sd_model=ldm)
    assert networks.patcher.stats["foreign_changes"] == foreign_before
    for key, value in tower.state_dict().items():
        assert torch.equal(value, original[key]), key

    networks.load_networks(["sd2_te"], sd_model=ldm)
    replacement = torch.randn_like(mha.in_proj_weight)
    with torch.no_grad():  # new weights loaded in place, as load_state_dict does
        mha.in_proj_weight.copy_(replacement)
    networks.load_networks([], sd_model=ldm)
    assert torch.equal(mha.in_proj_weight, replacement)  # kept as the new original, not overwritten
    assert torch.equal(tower.transformer.resblocks[0].attn.in_proj_weight,
                       original["transformer.resblocks.0.attn.in_proj_weight"])


def test_layer_names_and_unet_structure_match_the_twin(tiny_ldm_pair):
    for family in FAMILIES:
        ldm, twin = tiny_ldm_pair(family)
        ldm_map = lora_layers.assign_network_names_to_compvis_modules(ldm)
        twin_map = lora_layers.LayerMap(twin)
        assert ldm_map.structure == twin_map.structure
        assert ldm_map.family == twin_map.family == family.upper()
        assert set(ldm_map.layers) == set(twin_map.layers) - {"text_encoder_2.text_projection"}
        for name, module in ldm_map.layers.items():
            assert module.lora_layer_key == name
            # A1111's own name (other extensions match layers by it): the module's path, dots as underscores
            assert ldm.network_layer_mapping[module.network_layer_name] is module
            assert tuple(module.weight.shape) == tuple(twin_map.layers[name].weight.shape), name
        table = twin_map.structure.block_table()
        for canonical in twin_map.layers:
            component, _, path = canonical.partition(".")
            if component == "unet":
                compvis = lora_keys.diffusers_to_compvis(path, twin_map.structure)
                assert compvis is not None and lora_keys.compvis_to_diffusers(compvis, table) == path, path


def test_kohya_sdxl_upsampler_and_label_embedding_land_on_the_ldm_modules(tiny_ldm_pair, write_lora):
    """`output_blocks_2_2_conv` (A1111 maps it to `_2_1_`, 13B-7) and `label_emb_0_0` on the ldm UNetModel."""
    ldm, _ = tiny_ldm_pair("sdxl")
    unet = ldm.model.diffusion_model
    targets = {"lora_unet_output_blocks_2_2_conv": unet.output_blocks[2][2].conv,
               "lora_unet_label_emb_0_0": unet.label_emb[0][0], "lora_unet_input_blocks_0_0": unet.input_blocks[0][0]}
    tensors, expected = {}, {}
    for base, module in targets.items():
        shape = tuple(module.weight.shape)
        down = torch.randn((1, *shape[1:]))
        up = torch.randn((shape[0], 1, *([1, 1] if len(shape) == 4 else [])))
        tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                        f"{base}.alpha": torch.tensor(1.0)})
        expected[base] = module.weight.detach().clone() + (up.reshape(shape[0], 1) @ down.reshape(1, -1)).reshape(
            shape)
    write_lora("sdxl_edges", tensors=tensors, metadata={})
    report = networks.load_networks(["sdxl_edges"], sd_model=ldm)
    assert len(report.networks[0].modules) == 3 and not report.networks[0].unmatched_keys
    for base, module in targets.items():
        torch.testing.assert_close(module.weight, expected[base], rtol=0, atol=1e-6)
    networks.load_networks([], sd_model=ldm)
