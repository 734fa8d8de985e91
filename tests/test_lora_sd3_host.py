"""SD3 Loras on the host's own tiny-sd3 loaded from its diffusers folder and from SAI's all-in-one single file (whose
originals are re-read from the file's fused tensors on restore), the coverage line across families, block weights on
the joint blocks, the merge tool on the single file, and card families. References as in test_lora_sd3: the merge in
SAI's layout converted by diffusers' single-file converter."""

import flux_models
import lora_block_weights
import lora_coverage
import lora_layers
import lora_syntax
import networks
import safetensors.torch
import torch
from flux_lora_files import M, model_state, write_factors, write_file
from sd3_lora_files import (
    CPU,
    convert_sai,
    delta,
    expected_text,
    factors,
    kohya_text_base,
    merged_sai,
    sai_layers,
    sai_state,
    sd3,
    text_linears,
)

from modules import extra_networks, sd_models_diffusers

__all__ = ["sd3", "write_file"]  # fixtures


def _kohya_file(model, seed: int = 0) -> tuple[dict, dict, dict, dict]:
    """(tensors, SAI factors, SAI shapes, text factors): every SAI Linear/conv and every text-encoder Linear."""
    sai = sai_state(model.transformer)
    shapes = sai_layers(sai)
    f = factors(shapes, seed=seed)
    te = factors(text_linears(model), seed=seed + 1)
    tensors = write_factors(f, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors.update(write_factors(te, kohya_text_base))
    return tensors, f, shapes, te


def _assert_merged(model, want: dict, original: dict) -> int:
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
    return changed


def test_kohya_sd3_lora_on_the_sai_single_file_model(sd3_files, write_lora):
    """The folder-loaded model is test_lora_sd3's; here the all-in-one file, restored from its fused tensors."""
    model = sd_models_diffusers.load(sd3_files["full"], CPU, torch.float32)
    tensors, f, shapes, te = _kohya_file(model)
    write_lora("host_sd3", tensors=tensors, metadata={"ss_base_model_version": "sd3"})
    sai = sai_state(model.transformer)
    want = {"transformer": convert_sai(merged_sai(sai, {n: delta(*f[n], shapes[n]) for n in f})),
            **expected_text(model, te)}
    original = {c: {k: v.detach().clone() for k, v in getattr(model, c).state_dict().items()} for c in want}

    report = networks.load_networks(["host_sd3"], [M], [M], sd_model=model)
    net = report.networks[0]
    assert not (net.unmatched_keys or net.unsupported_keys or net.unused_keys or net.load_errors or net.apply_errors)
    assert _assert_merged(model, want, original) == len(net.modules) > 70
    networks.load_networks([], sd_model=model)
    for component, state in original.items():
        got = getattr(model, component).state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items()), component


def _messages(name: str, model, family: str) -> list[str]:
    networks.load_networks([name], sd_model=model)
    return lora_coverage.messages(lora_coverage.coverage_of(networks.loaded_networks[0], family))


def test_coverage_names_the_family_across_sd3_flux_and_sdxl(sd3, tiny_sdxl, write_file, write_lora):
    """An SD3 file on Flux, a Flux file on SD3 and an SDXL file on SD3 are refused by name; an SD3 file's keys for a
    block this model lacks are named."""
    tensors, *_ = _kohya_file(sd3)
    write_file("sd3_file", {k: v for k, v in tensors.items() if k.startswith("lora_unet_joint_blocks_0_")})
    bfl = flux_models.bfl_state_dict()
    write_file("flux_file", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
                             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)})
    assert tuple(bfl["double_blocks.0.img_attn.qkv.weight"].shape) == (96, 32)
    write_lora("sdxl_file", tiny_sdxl, family="sdxl")
    flux = flux_models.build_tiny_flux()
    before = model_state(sd3)
    assert _messages("sd3_file", flux, "Flux")[0].endswith("it looks like an SD3 LoRA, the loaded model is Flux")
    peft = {f"transformer.transformer_blocks.0.{p}.lora_{x}.weight": torch.zeros(2, 64) if x == "A" else
            torch.zeros(64, 2) for p in ("attn.add_q_proj", "attn2.to_q") for x in "AB"}  # SD3.5 Medium's MMDiT-X
    write_file("sd3_peft", peft)
    assert _messages("sd3_peft", flux, "Flux")[0].endswith("it looks like an SD3 LoRA, the loaded model is Flux")
    assert _messages("flux_file", sd3, "SD3")[0].endswith("it looks like a Flux LoRA, the loaded model is SD3")
    assert _messages("sdxl_file", sd3, "SD3")[0].endswith("it looks like an SDXL LoRA, the loaded model is SD3")
    assert all(torch.equal(v, before[c][k]) for c, s in model_state(sd3).items() for k, v in s.items())

    extra = dict(tensors)
    extra["lora_unet_joint_blocks_7_x_block_attn_qkv.lora_down.weight"] = torch.zeros(2, 64)  # no such block here
    write_file("sd3_partial", {k: v for k, v in extra.items() if "joint_blocks" in k})
    lines = _messages("sd3_partial", sd3, "SD3")
    assert len(lines) == 1 and lines[0].endswith("; 1 keys unmatched: lora_unet_joint_blocks_* (1)"), lines
    networks.load_networks([], sd_model=sd3)


def test_block_weights_zero_the_right_joint_blocks(sd3, write_file):
    """BASE (text encoders), IN (embedders), B00, B01, OUT: `lbw=0,1,1,0,0.5` leaves the text encoders and joint block
    1 (its fused qkv rows and swapped context adaLN included) untouched and halves the final layer."""
    tensors, f, shapes, te = _kohya_file(sd3, seed=5)
    write_file("sd3_blocks", tensors)
    layers = list(lora_layers.LayerMap(sd3).layers)
    assert lora_block_weights.block_ids("SD3", layers) == ("BASE", "IN", "B00", "B01", "OUT")
    _, data = extra_networks.parse_prompt("<lora:x:1:lbw=0,1,1,0,0.5>")
    weights = lora_syntax.parse_lora_params(data["lora"][0], lora_block_weights.all_presets(None)).blocks \
        .for_family("SD3", layers)
    assert weights == {"BASE": 0, "IN": 1, "B00": 1, "B01": 0, "OUT": 0.5}

    def weight(name: str) -> float:  # the SAI layer's block by hand
        if name.startswith("joint_blocks."):
            return {"0": 1.0, "1": 0.0}[name.split(".")[1]]
        return 0.5 if name.startswith("final_layer.") else 1.0

    sai = sai_state(sd3.transformer)
    want = {"transformer": convert_sai(merged_sai(sai, {n: weight(n) * delta(*f[n], shapes[n]) for n in f}))}
    original = model_state(sd3)
    report = networks.load_networks(["sd3_blocks"], [M], [M], sd_model=sd3, block_weights=[weights])
    assert not report.networks[0].load_errors and not report.networks[0].unmatched_keys
    assert _assert_merged(sd3, want, original) > 0
    got = sd3.transformer.state_dict()
    for key in ("transformer_blocks.1.attn.to_k.weight", "transformer_blocks.1.norm1_context.linear.weight"):
        assert torch.equal(got[key], original["transformer"][key]), key
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        state = getattr(sd3, component).state_dict()
        assert all(torch.equal(v, original[component][k]) for k, v in state.items()), component
    networks.load_networks([], sd_model=sd3)


def test_merge_tool_on_the_sai_single_file(sd3_files, write_lora, lora_dir, tmp_path, capsys):
    """scripts/merge_lora.py on SAI's all-in-one file with a kohya file of fused qkv and T5 layers: every transformer
    and text-encoder parameter written under its component folder name, merged as diffusers' converter splits."""
    from safetensors.torch import load_file

    from scripts import merge_lora

    model = sd_models_diffusers.load(sd3_files["full"], CPU, torch.float32)
    sai = sai_state(model.transformer)
    names = ["joint_blocks.1.context_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv"]
    f = factors({n: tuple(sai[f"{n}.weight"].shape) for n in names}, seed=7)
    te = {k: v for k, v in factors(text_linears(model), seed=8).items() if k.startswith("text_encoder_3.")}
    tensors = write_factors(f, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors.update(write_factors(te, kohya_text_base))
    write_lora("merge_sd3", tensors=tensors, metadata={})
    want = {"transformer": convert_sai(merged_sai(sai, {n: delta(*f[n], tuple(sai[f"{n}.weight"].shape), m=0.6)
                                                        for n in f})),
            "text_encoder_3": expected_text(model, te, m=0.6)["text_encoder_3"]}

    out = str(tmp_path / "merged.safetensors")
    assert merge_lora.main(["--model", sd3_files["full"], "--lora-dir", str(lora_dir),
                            "--prompt", "<lora:merge_sd3:0.6>", "--out", out]) == 0
    assert f"merge_sd3: {6 + len(te)} layers matched, 0 keys unmatched" in capsys.readouterr().out
    merged = load_file(out)
    components = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    assert set(merged) == {f"{c}.{k}" for c in components for k in getattr(model, c).state_dict()}
    changed = 0
    for component, state in want.items():
        loaded = getattr(model, component).state_dict()
        for key, value in state.items():
            got = merged[f"{component}.{key}"]
            if torch.equal(value, loaded[key]):
                assert torch.equal(got, value), key
            else:
                assert float((got - value).abs().max() / value.abs().max()) < 1e-5, key
                changed += 1
    assert changed == 6 + len(te)


def test_card_versions_and_the_filter_tell_flux_chroma_and_sd3(lora_dir, monkeypatch):
    """Cards from keys, shapes and metadata: an sd-scripts Chroma file (Flux's block names, no modulation) is Chroma by
    its `ss_model_type`, a Flux file with modulation layers stays Flux whatever the metadata says, SD3 Medium (kohya)
    and SD3.5 Large (diffusers PEFT, 2432 wide joint attention, no metadata) are both SD3, and an SD3.5 Medium PEFT
    file is SD3 by its MMDiT-X attention. The filter shows a card only on a model of its own family, except that an SDXL
    file training only CLIP-L/CLIP-G (which SD3 has under the same names) shows on SD3 too, unless the user set its
    version to another family in the editor (saving the editor with the file's own version changes nothing)."""
    import network
    import ui_extra_networks_lora

    qkv = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)}
    mod = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 32),
           "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(192, 2)}
    peft = "transformer.transformer_blocks.0.attn."
    files = {
        "chroma": (qkv, {"ss_base_model_version": "flux1", "ss_model_type": "chroma"}, "Chroma"),
        "chroma_spec": (qkv, {"modelspec.architecture": "chroma/lora"}, "Chroma"),
        "flux": ({**qkv, **mod}, {"ss_model_type": "chroma"}, "Flux"),
        "sd3_medium": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 1536)},
                       {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}, "SD3"),
        "sd35_large": ({peft + "add_q_proj.lora_A.weight": torch.zeros(2, 2432),
                        peft + "add_q_proj.lora_B.weight": torch.zeros(2432, 2)}, {}, "SD3"),
        "sd35_medium": ({peft + "add_k_proj.lora_A.weight": torch.zeros(2, 64),
                         "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.zeros(2, 64)}, {}, "SD3"),
        "dit": ({peft + "add_q_proj.lora_A.weight": torch.zeros(2, 3072)}, {}, "Unknown"),
        "sdxl_te": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1280)},
                    {}, "SDXL"),
        "sdxl_te_user": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 1280)},
                         {}, "SDXL"),
    }
    for name, (tensors, metadata, _) in files.items():
        safetensors.torch.save_file(tensors, str(lora_dir / f"card_{name}.safetensors"),
                                    metadata={**metadata, "ss_network_module": "networks.lora"})
    networks.list_available_networks()
    (lora_dir / "card_sdxl_te_user.json").write_text('{"sd version": "SD1"}')
    (lora_dir / "card_sdxl_te.json").write_text('{"sd version": "SDXL", "description": "saved as it was"}')
    versions = {name: network.SdVersion(networks.available_networks[f"card_{name}"].sd_version).name for name in files}
    assert versions == {name: family for name, (_, _, family) in files.items()}
    page = ui_extra_networks_lora.ExtraNetworksPageLora()
    items = {name: page.create_item(f"card_{name}", enable_filter=False) for name in files}
    assert {name: item["sd_also"] for name, item in items.items() if item["sd_also"]} == {"sdxl_te": ["SD3"]}
    from modules import extra_networks_cards  # what the browser's filter reads (javascript/extraNetworks.js)
    cards = {name: extra_networks_cards.card_from_item(page, item, 0) for name, item in items.items()}
    assert (cards["sdxl_te"]["sd"], cards["sdxl_te"]["sd_also"]) == ("SDXL", ["SD3"])
    assert "sd_also" not in cards["sdxl_te_user"] and cards["sdxl_te_user"]["sd"] == "SD1"
    for family in ("Flux", "Chroma", "SD3", "SDXL", "SD1"):
        monkeypatch.setattr(ui_extra_networks_lora, "_model_family", lambda f=family: f)
        shown = {name for name in files if page.create_item(f"card_{name}") is not None}
        expected = {name for name, item in items.items() if item["sd_version"] in (family, "Unknown")}
        assert shown == expected | ({"sdxl_te"} if family == "SD3" else set()), family
