"""Coverage report: layers matched, unmatched keys by group, and a plain warning (job comment, so infotext and UI)
when a Lora belongs to another model family, which then leaves the model untouched. The family shown on cards
comes from the tensors' keys and shapes first, the `ss_*` metadata second."""
import lora_coverage
import lora_files
import lora_layers
import network
import networks
import pytest
import torch
from diffusers import UNet2DConditionModel
from extra_networks_lora import ExtraNetworkLora

from modules import extra_networks, processing


def run_job(model, *tags: str):
    """A job's Lora activation and deactivation, as processing runs them; returns (p, comments)."""
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=" ".join(f"<lora:{t}:1>" for t in tags))
    handler = ExtraNetworkLora()
    handler.activate(p, [extra_networks.ExtraNetworkParams(items=[t, "1"]) for t in tags])
    handler.deactivate(p)
    return p, list(p.comments)


def _state(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.components().items() if m is not None
            for k, v in m.state_dict().items()}


def _file_layers(path: str) -> int:
    _, tensors = lora_files.read_safetensors_header(path)
    return len({k.split(".")[0] for k in tensors})


@pytest.mark.parametrize("file_family,model_family", [("sdxl", "sd1"), ("sd1", "sdxl")])
def test_lora_for_another_family_is_reported_and_leaves_the_model_untouched(request, write_lora, file_family,
                                                                             model_family):
    source = request.getfixturevalue(f"tiny_{file_family}")
    model = request.getfixturevalue(f"tiny_{model_family}")
    path = write_lora(f"for_{file_family}", source, family=file_family, locon=True)
    before = _state(model)
    p, comments = run_job(model, f"for_{file_family}")
    n = _file_layers(path)
    expected = (f"Lora for_{file_family}: 0 of {n} layers matched; it looks like an {file_family.upper()} LoRA, "
                f"the loaded model is {model_family.upper()}")
    assert expected in comments, comments
    assert not any("error" in c.lower() for c in comments), comments
    after = _state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert networks.loaded_networks[0].modules == {}


def test_real_size_sdxl_file_on_sd1_says_so(tiny_sd1, write_lora):
    """A few keys with SDXL's real widths (cross-attention 2048, OpenCLIP-bigG 1280): the widths alone decide."""
    tensors = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    write_lora("real_sdxl", tensors=tensors, metadata={"ss_network_module": "networks.lora"})  # kohya, no version
    _, comments = run_job(tiny_sd1, "real_sdxl")
    assert "Lora real_sdxl: 0 of 2 layers matched; it looks like an SDXL LoRA, the loaded model is SD1" in comments
    assert networks.available_networks["real_sdxl"].sd_version == network.SdVersion.SDXL  # A1111 would say SD1


def test_flux_lora_on_sd1(tiny_sd1, write_lora):
    tensors = {f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight": torch.zeros(4, 3072) for i in range(3)}
    tensors.update({f"transformer.single_transformer_blocks.{i}.attn.to_q.lora_A.weight": torch.zeros(4, 3072)
                    for i in range(2)})
    write_lora("flux_style", tensors=tensors, metadata={})
    _, comments = run_job(tiny_sd1, "flux_style")
    assert "Lora flux_style: 0 of 5 layers matched; it looks like a Flux LoRA, the loaded model is SD1" in comments
    assert networks.available_networks["flux_style"].sd_version == network.SdVersion.Flux


def test_partly_matching_lora_lists_unmatched_groups(tiny_sd1, write_lora):
    from scripts import make_demo_loras as demo

    shapes = demo.layer_shapes_from_components(tiny_sd1.components())
    layers = {k: v for k, v in demo.select_layers(shapes, False).items() if k.startswith("unet.")}
    layers = dict(list(layers.items())[:6])
    structure = lora_layers.LayerMap(tiny_sd1).structure
    tensors = demo.lora_tensors(layers, "sd1", structure, dtype=torch.float32)
    for i in range(2):  # a block no SD UNet has, and one stray text encoder key
        tensors[f"lora_unet_foo_blocks_{i}_proj.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"lora_unet_foo_blocks_{i}_proj.lora_up.weight"] = torch.zeros(8, 2)
    tensors["lora_te_text_model_encoder_layers_9_mlp_fc1.alpha"] = torch.tensor(1.0)
    write_lora("partial", tensors=tensors, metadata={})
    before = _state(tiny_sd1)
    _, comments = run_job(tiny_sd1, "partial")
    assert ("Lora partial: 6 of 9 layers matched; 5 keys unmatched: lora_unet_foo_blocks_* (4), "
            "lora_te_text_model_encoder_layers_* (1)") in comments, comments
    changed = [k for k, v in _state(tiny_sd1).items() if not torch.equal(v, before[k])]
    assert len(changed) == 6


def test_parts_no_network_type_reads_are_reported(tiny_sd1, write_lora):
    name = "unet.down_blocks.0.attentions.0.proj_in"
    layer = lora_layers.LayerMap(tiny_sd1).layers[name]
    out_dim, in_dim = layer.weight.shape[:2]
    tensors = {f"{name}.lora_A.weight": torch.randn(2, in_dim, 1, 1), f"{name}.lora_B.weight": torch.randn(out_dim, 2,
                                                                                                           1, 1),
               f"{name}.lora_B.bias": torch.randn(out_dim)}  # PEFT lora_bias=True: not a kohya part
    write_lora("with_bias", tensors=tensors, metadata={})
    _, comments = run_job(tiny_sd1, "with_bias")
    assert any(c.startswith("Lora with_bias: 1 keys of matched layers were not used") and "lora_B.bias (1)" in c
               for c in comments), comments


def test_fully_matching_lora_adds_no_comment(tiny_sdxl, write_lora):
    write_lora("clean", tiny_sdxl, family="sdxl", locon=True)
    _, comments = run_job(tiny_sdxl, "clean")
    assert not [c for c in comments if c.startswith("Lora clean")], comments


def test_coverage_messages_are_plain_text():
    cov = lora_coverage.Coverage(name="x", matched=0, file_layers=722, hint="SDXL", family="SD1",
                                 refused="it looks like an SDXL LoRA, the loaded model is SD1")
    assert lora_coverage.messages(cov) == ["Lora x: 0 of 722 layers matched; it looks like an SDXL LoRA, the loaded "
                                           "model is SD1"]
    unknown = lora_coverage.Coverage(name="y", matched=0, file_layers=3, unmatched=[("lora_unet_foo_*", 6)])
    assert lora_coverage.messages(unknown) == ["Lora y: 0 of 3 layers matched; is it made for another model "
                                               "family? Unmatched: lora_unet_foo_* (6)"]
    assert lora_coverage.messages(lora_coverage.Coverage(name="z", matched=0, file_layers=0)) == [
        "Lora z: the file names no layers"]


# --- the family from keys and shapes ------------------------------------------------------------------------------
def _real_headers(family: str) -> dict[str, dict[str, dict]]:
    """{format: header-like {key: {"shape"}}} of LoRA files for a real-size model (meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {
        "sd1": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), [(768, 12, 3072, "quick_gelu")]),
        "sd2": (dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True), [(1024, 23, 4096, "gelu")]),
        "sdxl": (dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(5, 10, 20), use_linear_projection=True,
                      transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                 [(768, 12, 3072, "quick_gelu"), (1280, 32, 5120, "gelu")]),
    }
    unet_config, clips = configs[family]
    from conftest import TinyDiffusersModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        encoders = [CLIPTextModel(CLIPTextConfig(hidden_size=w, num_hidden_layers=n, intermediate_size=i,
                                                 num_attention_heads=w // 64, hidden_act=a)) for w, n, i, a in clips]
    model = TinyDiffusersModel(family, unet, *encoders)
    layer_map = lora_layers.LayerMap(model)
    sdxl = family == "sdxl"
    headers = {"kohya": {}, "peft": {}, "unet_only": {}, "te_only": {}}
    import lora_keys
    for canonical, module in layer_map.layers.items():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        component, _, path = canonical.partition(".")
        shape = list(module.weight.shape)
        down = {"shape": [4, *shape[1:]]}
        if component == "unet":
            name = lora_keys.diffusers_to_compvis(path, layer_map.structure) if sdxl else path
            kohya = "lora_unet_" + name.replace(".", "_")
        else:
            prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
            kohya = prefix + "text_model_" + path.replace(".", "_")
        headers["kohya"][f"{kohya}.lora_down.weight"] = down
        headers["peft"][f"{canonical}.lora_A.weight"] = down
        headers["unet_only" if component == "unet" else "te_only"][f"{kohya}.lora_down.weight"] = down
    return headers


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_version_hint_from_real_size_keys_and_shapes(family):
    headers = _real_headers(family)
    for fmt in ("kohya", "peft", "unet_only"):
        assert lora_files.version_hint_from_keys(headers[fmt]) == family.upper(), fmt
    te_only = lora_files.version_hint_from_keys(headers["te_only"])
    assert te_only == family.upper()  # SD1 `lora_te_` 768, SD2 1024, SDXL a second encoder
    sdxl_clip_l_only = {k: v for k, v in _real_headers("sdxl")["te_only"].items() if k.startswith("lora_te1_")}
    assert lora_files.version_hint_from_keys(sdxl_clip_l_only) is None  # CLIP-L alone: SD1 or SDXL


def test_key_evidence_beats_ss_metadata():
    sdxl_keys = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": {"shape": [4, 2048]}}
    sd1_keys = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                {"shape": [4, 768]}}
    hint = lora_files.version_hint_from_keys
    assert network.detect_version({"ss_base_model_version": "sd_v1"}, hint(sdxl_keys)) == network.SdVersion.SDXL
    assert network.detect_version({"ss_v2": "True"}, hint(sd1_keys)) == network.SdVersion.SD1
    assert network.detect_version({"ss_network_dim": "4"}, None) == network.SdVersion.SD1  # A1111's rule
    assert network.detect_version({"ss_base_model_version": "sdxl_base_v1-0"}, None) == network.SdVersion.SDXL
    assert network.detect_version({"ss_v2": "True"}, None) == network.SdVersion.SD2
    assert network.detect_version({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, None) == \
        network.SdVersion.SDXL
    # the transformer families: from the keys first, else from kohya's / modelspec's names
    assert network.detect_version({"ss_base_model_version": "flux1"}, None) == network.SdVersion.Flux
    assert network.detect_version({"ss_base_model_version": "sd_v1"}, "Flux") == network.SdVersion.Flux
    assert network.detect_version({"modelspec.architecture": "flux-1-schnell/lora"}, "DiT") == network.SdVersion.Flux
    assert network.detect_version({"modelspec.architecture": "chroma/lora"}, None) == network.SdVersion.Chroma
    assert network.detect_version({"ss_base_model_version": "flux1", "ss_model_type": "chroma"}, None) == \
        network.SdVersion.Chroma
    assert network.detect_version({"modelspec.architecture": "stable-diffusion-v3-medium/lora"}, None) == \
        network.SdVersion.SD3
    assert network.detect_version({"ss_base_model_version": "sdxl_base_v1-0"}, "DiT") == network.SdVersion.Unknown
    assert network.detect_version({"modelspec.architecture": "flux-2-dev/lora"}, None) == network.SdVersion.Unknown
    assert network.detect_version({}, "Cascade") == network.SdVersion.Unknown
    assert network.detect_version({}, None) == network.SdVersion.Unknown
