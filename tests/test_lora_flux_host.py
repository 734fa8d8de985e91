"""A kohya Flux Lora on the host's own tiny-flux model, loaded from its diffusers folder and from the BFL single-file
layout with CLIP-L/T5/VAE picked separately: merged like the BFL-layout merge converted by diffusers' single-file
converter, every other parameter bitwise unchanged, and bitwise restored (the single-file model re-reads q/k/v rows
out of the file's fused tensors)."""
import flux_models
import networks
import pytest
import torch

from modules import flux_layout, sd_models_diffusers

CPU = torch.device("cpu")
M = 0.8


@pytest.mark.parametrize("layout,modules", [("folder", ()), ("bfl", ("clip_l", "t5", "ae"))])
def test_kohya_flux_lora_on_the_host_model(flux_files, write_lora, layout, modules):
    model = sd_models_diffusers.load(flux_files[layout], CPU, torch.float32, None, [flux_files[m] for m in modules])
    inner = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    bfl = flux_layout.to_bfl_state_dict(model.transformer)
    original = {c: {k: v.detach().clone() for k, v in m.state_dict().items()}
                for c, m in model.components().items() if c != "vae"}
    # the BFL copy is the model's own weights: diffusers' converter gives them back bitwise
    assert all(torch.equal(v, original["transformer"][k])
               for k, v in flux_models.convert_bfl(bfl, inner_dim=inner).items())
    g = torch.Generator().manual_seed(2)
    tensors, merged = {}, dict(bfl)
    for key, value in bfl.items():
        if key.endswith(".weight") and value.dim() == 2:
            name = key[:-len(".weight")]
            down, up = torch.randn(4, value.shape[1], generator=g), torch.randn(value.shape[0], 4, generator=g)
            base = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(2.0)})
            merged[key] = value + M * 0.5 * up @ down
    want = {"transformer": flux_models.convert_bfl(merged, inner_dim=inner)}
    for component, prefix in (("text_encoder", "lora_te1_text_model_"), ("text_encoder_2", "lora_te3_")):
        want[component] = dict(original[component])
        for path, module in getattr(model, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                base = prefix + path.removeprefix("text_model.").replace(".", "_")
                down = torch.randn(4, module.in_features, generator=g)
                up = torch.randn(module.out_features, 4, generator=g)
                tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up})
                want[component][f"{path}.weight"] = original[component][f"{path}.weight"] + M * up @ down
    write_lora("host_flux", tensors=tensors, metadata={"ss_base_model_version": "flux1"})

    report = networks.load_networks(["host_flux"], [M], [M], sd_model=model)
    net = report.networks[0]
    assert not (net.unmatched_keys or net.unsupported_keys or net.unused_keys or net.load_errors or net.apply_errors)
    changed = 0
    for component, state in want.items():
        got = getattr(model, component).state_dict()
        for key, value in state.items():
            if torch.equal(value, original[component][key]):
                assert torch.equal(got[key], value), f"{component}.{key}"
            else:
                err = float((got[key] - value).abs().max() / value.abs().max())
                assert err < 1e-5, (f"{component}.{key}", err)
                changed += 1
    assert changed == len(net.modules) > 70
    networks.load_networks([], sd_model=model)
    for component, state in original.items():
        got = getattr(model, component).state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()), component


def test_merge_tool_on_a_bfl_single_file_with_picked_modules(flux_files, write_lora, lora_dir, tmp_path, capsys):
    """scripts/merge_lora.py (in this process) on the BFL transformer file plus clip_l/t5xxl/ae: every transformer and
    text-encoder parameter written under its component folder name, the fused qkv split by rows as diffusers'
    converter splits the base, untargeted parameters equal to the loaded model's."""
    from safetensors.torch import load_file

    from scripts import merge_lora

    modules = [flux_files[m] for m in ("clip_l", "t5", "ae")]
    model = sd_models_diffusers.load(flux_files["bfl"], CPU, torch.float32, None, modules)
    inner = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    bfl = flux_layout.to_bfl_state_dict(model.transformer)
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, inner, generator=g), torch.randn(3 * inner, 4, generator=g)
    write_lora("merge_qkv", tensors={"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": down,
                                     "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": up}, metadata={})
    merged_bfl = dict(bfl)
    merged_bfl["double_blocks.1.txt_attn.qkv.weight"] = bfl["double_blocks.1.txt_attn.qkv.weight"] + 0.6 * up @ down
    want = flux_models.convert_bfl(merged_bfl, inner_dim=inner)

    out = str(tmp_path / "merged.safetensors")
    assert merge_lora.main(["--model", flux_files["bfl"], "--modules", *modules, "--lora-dir", str(lora_dir),
                            "--prompt", "<lora:merge_qkv:0.6>", "--out", out]) == 0
    assert "merge_qkv: 3 layers matched, 0 keys unmatched" in capsys.readouterr().out
    merged = load_file(out)
    expected_keys = {f"{c}.{k}" for c in ("transformer", "text_encoder", "text_encoder_2")
                     for k in getattr(model, c).state_dict()}
    assert set(merged) == expected_keys
    for key, value in want.items():
        got = merged[f"transformer.{key}"]
        if torch.equal(value, model.transformer.state_dict()[key]):
            assert torch.equal(got, value), key
        else:
            assert key.startswith("transformer_blocks.1.attn.add_") and key.endswith("_proj.weight"), key
            assert float((got - value).abs().max() / value.abs().max()) < 1e-5, key
    text = model.text_encoder_2.state_dict()
    assert all(torch.equal(merged[f"text_encoder_2.{k}"], v) for k, v in text.items())


@pytest.mark.parametrize("flags,family", [({"is_flux": True}, "Flux"), ({"is_flux": True, "is_chroma": True}, "Chroma"),
                                          ({"is_sd3": True}, "SD3")])
def test_card_filter_knows_the_transformer_families(monkeypatch, flags, family):
    """The card pane's version filter compares a card's version (network.SdVersion name) with this."""
    import types

    from modules import extra_networks_cards, sd_models
    monkeypatch.setattr(sd_models.model_data, "sd_model", types.SimpleNamespace(**flags))
    assert extra_networks_cards.loaded_model_family() == family
