"""Flux Loras: every part applied or named in the coverage line, family refusals and hints, Chroma, bf16 files, and
functional mode (see test_lora_flux for the references)."""
import flux_models
import lora_coverage
import lora_files
import networks
import safetensors.torch
import torch
from flux_lora_files import (
    M,
    apply,
    bfl_linears,
    check,
    expected_text,
    flux,
    kohya_text_keys,
    lora_delta,
    lora_factors,
    merged_bfl,
    model_state,
    text_shapes,
    write_factors,
    write_file,
)

from modules import shared

__all__ = ["flux", "write_file"]  # fixtures


# --- coverage: every key applied or named --------------------------------------------------------------------------
def test_flux_lora_parts_not_applied_are_named(flux, write_file):
    bfl = flux_models.bfl_state_dict()
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in ["double_blocks.0.img_attn.qkv"]})
    tensors = write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(2, 32)  # no such block here
    # DoRA per input channel on a fused layer needs the whole fused weight: named, not applied
    base = "lora_unet_single_blocks_0_linear1"
    tensors.update({f"{base}.lora_down.weight": torch.randn(2, 32), f"{base}.lora_up.weight": torch.randn(224, 2),
                    f"{base}.dora_scale": torch.rand(1, 32)})
    write_file("flux_partial", tensors)
    networks.load_networks(["flux_partial"], sd_model=flux)
    net = networks.loaded_networks[0]
    lines = lora_coverage.messages(lora_coverage.coverage_of(net, "Flux"))
    assert lines[0].startswith("Lora flux_partial: 1 of 3 layers matched; 1 keys unmatched: "
                               "lora_unet_double_blocks_* (1)"), lines
    assert "lora_unet_single_blocks_0_linear1" in net.load_errors["transformer.single_blocks.0.linear1"]
    assert "per input channel" in net.load_errors["transformer.single_blocks.0.linear1"]
    assert set(net.modules) == {f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"}


def test_flux_lora_on_sdxl_and_sdxl_lora_on_flux_are_refused_by_name(flux, tiny_sdxl, write_lora, write_file):
    bfl = flux_models.bfl_state_dict()
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in bfl_linears(bfl)[:6]})
    write_file("flux_file", write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_")))
    write_lora("sdxl_file", tiny_sdxl, family="sdxl")
    before = model_state(flux)
    networks.load_networks(["sdxl_file"], sd_model=flux)
    lines = lora_coverage.messages(lora_coverage.coverage_of(networks.loaded_networks[0], "Flux"))
    assert lines[0].endswith("it looks like an SDXL LoRA, the loaded model is Flux"), lines
    assert all(torch.equal(v, before[c][k]) for c, s in model_state(flux).items() for k, v in s.items())
    networks.load_networks(["flux_file"], sd_model=tiny_sdxl)
    lines = lora_coverage.messages(lora_coverage.coverage_of(networks.loaded_networks[0], "SDXL"))
    assert lines[0].endswith("it looks like a Flux LoRA, the loaded model is SDXL"), lines
    networks.load_networks([], sd_model=tiny_sdxl)


def test_chroma_takes_flux_block_loras_and_its_own_layers(write_file):
    """Chroma: Flux.1's blocks without modulation Linears, plus a distilled guidance layer. A Flux LoRA's block
    layers apply, its modulation layers are named as unmatched."""
    model = flux_models.build_tiny_flux(chroma=True)
    bfl = flux_models.bfl_state_dict(chroma=True)
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "distilled_guidance_layer.layers.0.in_layer"]
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in names})
    tensors = write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.zeros(2, 32)
    t5 = {k: v for k, v in lora_factors(text_shapes(model), seed=8).items() if ".SelfAttention." in k}
    tensors.update(write_factors(t5, kohya_text_keys))  # Chroma's T5 is its text_encoder: lora_te3_ still finds it
    write_file("chroma", tensors)
    original = model_state(model)
    want = {"transformer": flux_models.convert_bfl(merged_bfl(bfl, {n: lora_delta(*f) for n, f in factors.items()}),
                                                   chroma=True), **expected_text(model, t5)}
    networks.load_networks(["chroma"], [M], [M], sd_model=model)
    net = networks.loaded_networks[0]
    assert net.unmatched_keys == ["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"]
    assert check(model_state(model), want, original) == 3 + 4 + 1 + len(t5) > 10
    assert "1 keys unmatched" in lora_coverage.messages(lora_coverage.coverage_of(net, "Chroma"))[0]


def test_flux_hints_from_keys_and_shapes():
    hint = lora_files.version_hint_from_keys
    assert hint({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072)}) == "Flux"
    assert hint({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, 8)}) == "Flux"
    assert hint({"lora_unet_distilled_guidance_layer_in_proj.lora_down.weight": torch.zeros(2, 8),
                 "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}) == "Chroma"
    # T5 alone, or diffusers-named double blocks alone, say only "a DiT": never refused on a Flux model
    assert hint({"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 8)}) == "DiT"
    assert hint({"lycoris_transformer_blocks_1_attn_to_q.lora_down.weight": torch.zeros(2, 8)}) == "DiT"
    assert hint({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 8)}) == "SD3"


def test_saved_file_round_trip(flux, write_file):
    """A kohya Flux file read from disk by safetensors (bf16 factors) applies like its fp32 values."""
    bfl = flux_models.bfl_state_dict()
    factors = lora_factors({"single_blocks.0.linear1": tuple(bfl["single_blocks.0.linear1.weight"].shape)})
    factors = {k: (d.bfloat16(), u.bfloat16(), a) for k, (d, u, a) in factors.items()}
    path = write_file("flux_bf16", write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_")))
    assert safetensors.torch.load_file(path)["lora_unet_single_blocks_0_linear1.lora_up.weight"].dtype == \
        torch.bfloat16
    want_bfl = merged_bfl(bfl, {n: lora_delta(d.float(), u.float(), a) for n, (d, u, a) in factors.items()})
    original = model_state(flux)
    want = {"transformer": flux_models.convert_bfl(want_bfl), "text_encoder": original["text_encoder"],
            "text_encoder_2": original["text_encoder_2"]}
    assert check(apply(flux, "flux_bf16"), want, original) == 4


def test_functional_mode_gives_the_merged_layers(flux, write_file, monkeypatch):
    """lora_functional on: split low-rank pieces run as low-rank hooks, row pieces of other types and XLabs' output-side
    LoRA as dense hooks (with their bias deltas); each layer's output equals the merged layer's."""
    bfl = flux_models.bfl_state_dict()
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"]
    tensors = write_factors(lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in names}),
                            lambda n: "lora_unet_" + n.replace(".", "_"))
    g = torch.Generator().manual_seed(12)
    tensors.update({"lora_unet_single_blocks_1_linear1.diff": torch.randn(7 * 32, 32, generator=g) * 0.1,
                    "lora_unet_single_blocks_1_linear1.diff_b": torch.randn(7 * 32, generator=g) * 0.1})
    write_file("flux_kohya", tensors)
    write_file("flux_xlabs_old", {"single_blocks.0.processor.proj_lora.down.weight": torch.randn(2, 32, generator=g),
                                  "single_blocks.0.processor.proj_lora.up.weight": torch.randn(32, 2, generator=g)})
    names, mults = ["flux_kohya", "flux_xlabs_old"], [M, 0.5]
    networks.load_networks(names, mults, mults, sd_model=flux)
    layers = sorted({k for n in networks.loaded_networks for k in n.modules})
    modules = dict(flux.transformer.named_modules())
    merged = {k: (modules[k[len("transformer."):]].weight.detach().clone(),
                  modules[k[len("transformer."):]].bias.detach().clone()) for k in layers}
    networks.load_networks([], sd_model=flux)
    original = model_state(flux)
    monkeypatch.setitem(shared.opts.data, "lora_functional", True)
    networks.load_networks(names, mults, mults, sd_model=flux)
    assert all(not n.apply_errors for n in networks.loaded_networks)
    assert all(torch.equal(v, original["transformer"][k]) for k, v in flux.transformer.state_dict().items())
    for name in layers:
        layer = modules[name[len("transformer."):]]
        w, b = merged[name]
        x = torch.randn(3, layer.in_features, generator=g)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-5, msg=name)
    assert len(layers) == 3 + 4 + 1 + 4 + 1  # qkv, two linear1 (LoRA, full), adaLN, XLabs' proj_out
    networks.load_networks([], sd_model=flux)
