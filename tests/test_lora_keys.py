"""Key formats: every trainer's spelling of a layer and its parts lands on the same canonical layer with the
same delta; the compvis names agree with diffusers' own single-file mapping; the key map has no collisions."""
import json
import re

import lora_keys
import lora_layers
import networks
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

RANK = 2
ATTENTION_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
                         "q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out"}


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _old_diffusers_key(component: str, path: str, side: str) -> str:
    """diffusers' pre-PEFT format: attention projections as `processor.to_q_lora` (UNet) or `to_q_lora`
    (CLIP), CLIP MLPs as `lora_linear_layer`, other UNet layers as `lora`."""
    head, _, last = path.rpartition(".")
    if path.endswith("to_out.0"):
        head, last = path[:-len(".to_out.0")], "to_out.0"
    if last in ATTENTION_PROJECTIONS:
        if component == "unet":
            return f"unet.{head}.processor.to_{ATTENTION_PROJECTIONS[last]}_lora.{side}.weight"
        return f"{component}.text_model.{head}.to_{ATTENTION_PROJECTIONS[last]}_lora.{side}.weight"
    if component == "unet":
        return f"{component}.{path}.lora.{side}.weight"
    return f"{component}.text_model.{path}.lora_linear_layer.{side}.weight"


# format → (keys for one layer: fn(component, path, compvis, sdxl) → (down key, up key, alpha key or None),
#           which components it covers, whether it needs PEFT metadata for alpha)
def _kohya(component, path, compvis, sdxl, *, unet_names="auto", te_names="text_model", prefix_te="auto"):
    if component == "unet":
        name = compvis if unet_names == "compvis" or (unet_names == "auto" and sdxl) else path
        base = "lora_unet_" + _flat(name)
    else:
        prefix = {"text_encoder": ("lora_te1_" if sdxl else "lora_te_") if prefix_te == "auto" else prefix_te,
                  "text_encoder_2": "lora_te2_"}[component]
        inner = path if te_names == "bare" or path == "text_projection" else "text_model." + path
        base = prefix + _flat(inner)
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"


def _peft(component, path, compvis, sdxl, *, te_names="text_model", adapter=""):
    inner = "text_model." + path if component != "unet" and te_names == "text_model" and path != "text_projection" \
        else path
    base = f"{component}.{inner}"
    return f"{base}.lora_A{adapter}.weight", f"{base}.lora_B{adapter}.weight", None


FORMATS = {
    "kohya": (_kohya, ("unet", "text_encoder", "text_encoder_2")),
    "kohya_compvis_unet": (lambda *a: _kohya(*a, unet_names="compvis"), ("unet",)),
    "kohya_diffusers_unet": (lambda *a: _kohya(*a, unet_names="diffusers"), ("unet",)),  # OneTrainer SDXL
    "kohya_transformers5_te": (lambda *a: _kohya(*a, te_names="bare"), ("text_encoder", "text_encoder_2")),
    "kohya_te1_on_one_encoder": (lambda *a: _kohya(*a, prefix_te="lora_te1_"), ("text_encoder",)),
    "oft_prefix": (lambda c, p, cv, x: tuple(k.replace("lora_unet_", "oft_unet_", 1) for k in _kohya(c, p, cv, x)),
                   ("unet",)),
    "lycoris": (lambda c, p, cv, x: (f"lycoris_{_flat(p)}.lora_down.weight", f"lycoris_{_flat(p)}.lora_up.weight",
                                     f"lycoris_{_flat(p)}.alpha"), ("unet",)),
    "peft": (_peft, ("unet", "text_encoder", "text_encoder_2")),
    "peft_transformers5_te": (lambda *a: _peft(*a, te_names="bare"), ("text_encoder", "text_encoder_2")),
    "peft_adapter_name": (lambda *a: _peft(*a, adapter=".default_0"), ("unet", "text_encoder")),
    "peft_base_model": (lambda c, p, cv, x: (f"base_model.model.{p}.lora_A.weight",
                                             f"base_model.model.{p}.lora_B.weight", None), ("unet",)),
    "diffusers_old": (lambda c, p, cv, x: (_old_diffusers_key(c, p, "down"), _old_diffusers_key(c, p, "up"), None),
                      ("unet", "text_encoder")),
    "ldm_generic": (lambda c, p, cv, x: tuple(f"diffusion_model.{cv}.{part}" for part in
                                              ("lora_down.weight", "lora_up.weight", "alpha")), ("unet",)),
}


def _targets(layer_map) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in layer_map.layers.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def build_file(model, fmt: str, alpha: float = 3.0, peft_alpha: float = 5.0, seed: int = 0):
    """(tensors, metadata, {canonical: expected ΔW}) for every Linear/Conv2d layer the format can name."""
    keys_for, components = FORMATS[fmt]
    layer_map = lora_layers.LayerMap(model)
    sdxl = "text_encoder_2" in layer_map.components
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    uses_peft_alpha = False
    for canonical, module in _targets(layer_map).items():
        component, _, path = canonical.partition(".")
        if component not in components:
            continue
        compvis = lora_keys.diffusers_to_compvis(path, layer_map.structure) if component == "unet" else None
        if component == "unet" and compvis is None:
            continue
        down_key, up_key, alpha_key = keys_for(component, path, compvis, sdxl)
        shape = tuple(module.weight.shape)
        down = torch.randn((RANK, *shape[1:]), generator=gen)
        up = torch.randn((shape[0], RANK, *([1, 1] if len(shape) == 4 else [])), generator=gen)
        tensors[down_key], tensors[up_key] = down, up
        if alpha_key:
            tensors[alpha_key] = torch.tensor(alpha)
            scale = alpha / RANK
        elif ".lora_A" in down_key:
            uses_peft_alpha = True
            scale = peft_alpha / RANK
        else:
            scale = 1.0
        expected[canonical] = (up.reshape(shape[0], RANK) @ down.reshape(RANK, -1)).reshape(shape) * scale
    metadata = {}
    if uses_peft_alpha:
        config = {}
        for component in components:
            config.update({f"{component}.r": RANK, f"{component}.lora_alpha": peft_alpha})
        metadata["lora_adapter_metadata"] = json.dumps(config)
    return tensors, metadata, expected


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in _targets(lora_layers.LayerMap(model)).items()}


ONE_ENCODER_ONLY = {"kohya_te1_on_one_encoder"}


@pytest.mark.parametrize("family,fmt", [(family, fmt) for family in ("sd1", "sdxl") for fmt in FORMATS
                                        if not (family == "sdxl" and fmt in ONE_ENCODER_ONLY)])
def test_every_format_lands_on_the_same_layers_with_the_same_delta(request, write_lora, family, fmt):
    model = request.getfixturevalue(f"tiny_{family}")
    tensors, metadata, expected = build_file(model, fmt)
    assert expected
    write_lora(f"{family}_{fmt}", tensors=tensors, metadata=metadata)
    before = _weights(model)

    report = networks.load_networks([f"{family}_{fmt}"], sd_model=model)
    net = report.networks[0]
    assert not net.unmatched_keys and not net.unsupported_keys and not net.unused_keys and not net.load_errors
    assert set(net.modules) == set(expected)
    after = _weights(model)
    for name, value in after.items():
        if name in expected:
            torch.testing.assert_close(value - before[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(value, before[name]), name
    networks.load_networks([], sd_model=model)


def test_part_spellings_become_one_vocabulary():
    cases = {
        "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
        "lora_A.default.weight": "lora_down.weight", "lora_B.default_0.weight": "lora_up.weight",
        "lora_A.my-style.weight": "lora_down.weight", "lora.down.weight": "lora_down.weight",
        "lora.up.weight": "lora_up.weight", "lora_linear_layer.down.weight": "lora_down.weight",
        "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
        "lora_magnitude_vector.default.weight": "dora_scale",
        "lora_down.weight": "lora_down.weight", "alpha": "alpha", "hada_w1_a": "hada_w1_a", "lokr_w1": "lokr_w1",
        "oft_blocks": "oft_blocks", "dora_scale": "dora_scale",
    }
    for spelling, canonical in cases.items():
        assert lora_keys.canonical_part(spelling) == canonical, spelling


def test_peft_dora_magnitude_is_stated_per_output_channel(tiny_sd1):
    """PEFT stores DoRA's magnitude per output channel, (out,) or (1, out, 1, 1) for convs; the parsed part is
    (out, 1), the shape that says "output axis" to every network type (even for a square layer)."""
    layer_map = lora_layers.LayerMap(tiny_sd1)
    name = "unet.down_blocks.0.attentions.0.proj_in"  # a square 1x1 conv
    shape = tuple(layer_map.layers[name].weight.shape)
    assert shape[0] == shape[1]
    state = {f"{name}.lora_A.weight": torch.randn(RANK, *shape[1:]),
             f"{name}.lora_B.weight": torch.randn(shape[0], RANK, 1, 1),
             f"{name}.lora_magnitude_vector": torch.rand(1, shape[0], 1, 1)}
    parsed = lora_keys.parse_state_dict(state, layer_map.key_map)
    parts = parsed.groups[name]
    assert set(parts) == {"lora_down.weight", "lora_up.weight", "dora_scale"}
    magnitude = parsed.tensors[parts["dora_scale"]]
    assert magnitude.shape == (shape[0], 1)
    assert torch.equal(magnitude.flatten(), state[f"{name}.lora_magnitude_vector"].flatten())


def test_peft_alpha_comes_from_the_adapter_metadata(tiny_sd1):
    """diffusers' `lora_adapter_metadata`: lora_alpha, alpha_pattern (PEFT's suffix match) and use_rslora."""
    layer_map = lora_layers.LayerMap(tiny_sd1)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    te = "text_encoder.encoder.layers.0.self_attn.q_proj"
    state = {}
    for name in (q, k, te):
        shape = tuple(layer_map.layers[name].weight.shape)
        state[f"{name}.lora_A.weight"] = torch.randn(4, shape[1])
        state[f"{name}.lora_B.weight"] = torch.randn(shape[0], 4)
    metadata = {"lora_adapter_metadata": {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2},
                                          "text_encoder.r": 4, "text_encoder.lora_alpha": 3,
                                          "text_encoder.use_rslora": True}}
    parsed = lora_keys.parse_state_dict(state, layer_map.key_map, metadata)
    alpha = {name: float(parsed.tensors[parsed.groups[name]["alpha"]]) for name in (q, k, te)}
    assert alpha[q] == 8 and alpha[k] == 2
    assert alpha[te] == pytest.approx(3 * 4 ** 0.5)  # rsLoRA: scale alpha/sqrt(r) = (alpha·sqrt(r))/r
    without = lora_keys.parse_state_dict(state, layer_map.key_map, {})
    assert "alpha" not in without.groups[q]  # no metadata: scale 1, as diffusers assumes lora_alpha = r


def test_two_spellings_of_one_layer_keep_the_first(tiny_sd1):
    layer_map = lora_layers.LayerMap(tiny_sd1)
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1),
             "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(1)}
    parsed = lora_keys.parse_state_dict(state, layer_map.key_map)
    assert parsed.unmatched == ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]
    assert set(parsed.groups["unet.down_blocks.0.attentions.0.proj_in"]) == {"lora_down.weight", "lora_up.weight"}


def test_bundled_embeddings_are_parsed_not_unmatched(request, write_lora):
    for family in ("sd1", "sdxl"):
        model = request.getfixturevalue(f"tiny_{family}")
        tensors, metadata, expected = build_file(model, "kohya")
        if family == "sd1":
            tensors["bundle_emb.mytoken.string_to_param.*"] = torch.randn(2, 16)
            want = {"mytoken": tensors["bundle_emb.mytoken.string_to_param.*"]}
        else:  # OneTrainer / A1111 SDXL form
            tensors["bundle_emb.mytoken.clip_l"] = torch.randn(2, 16)
            tensors["bundle_emb.mytoken.clip_g"] = torch.randn(2, 16)
            want = {"mytoken": {"clip_l": tensors["bundle_emb.mytoken.clip_l"],
                                "clip_g": tensors["bundle_emb.mytoken.clip_g"]}}
        tensors["bundle_emb.broken"] = torch.zeros(1)
        write_lora(f"bundle_{family}", tensors=tensors, metadata=metadata)
        net = networks.load_networks([f"bundle_{family}"], sd_model=model).networks[0]
        assert set(net.modules) == set(expected)
        assert net.unmatched_keys == ["bundle_emb.broken"]
        assert net.bundle_embeddings.keys() == want.keys()
        got, wanted = net.bundle_embeddings["mytoken"], want["mytoken"]
        if isinstance(wanted, dict):
            assert got.keys() == wanted.keys() and all(torch.equal(got[k], wanted[k]) for k in wanted)
        else:
            assert torch.equal(got, wanted)
        networks.load_networks([], sd_model=model)


# --- real model sizes (meta device: names and shapes only) --------------------------------------------------------
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def _meta_model(family: str):
    from conftest import TinyDiffusersModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    with torch.device("meta"):
        if family == "sd1":
            return TinyDiffusersModel("sd1", UNet2DConditionModel(**SD15_UNET), CLIPTextModel(clip_l))
        clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                                projection_dim=1280, hidden_act="gelu")
        return TinyDiffusersModel("sdxl", UNet2DConditionModel(**SDXL_UNET), CLIPTextModel(clip_l),
                                  CLIPTextModelWithProjection(clip_g))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_size_key_map_has_every_alias_come_back(family):
    """(Its build time is a benchmark's business, not a test's: this machine is shared.)"""
    model = _meta_model(family)
    layer_map = lora_layers.LayerMap(model)
    assert not layer_map.key_map.collisions
    assert len(layer_map.key_map.aliases) >= 6 * len(layer_map.layers)
    for alias, canonical in layer_map.key_map.aliases.items():
        assert layer_map.key_map.split(f"{alias}.lora_A.weight") == (canonical, alias, "lora_down.weight"), alias


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_compvis_names_agree_with_diffusers_single_file_mapping(family):
    """diffusers_to_compvis against diffusers' own ldm → diffusers checkpoint converter: every UNet parameter,
    renamed to its compvis name by us, must come back to the same diffusers name through diffusers."""
    model = _meta_model(family)
    unet = model.unet
    structure = lora_keys.UnetStructure.from_unet(unet)
    assert structure == lora_keys.UnetStructure.from_config(dict(unet.config))
    markers, checkpoint = {}, {}
    for key in unet.state_dict():
        path, _, param = key.rpartition(".")
        compvis = lora_keys.diffusers_to_compvis(path, structure)
        assert compvis is not None, path
        marker = torch.empty(0)
        markers[key] = marker
        checkpoint[f"model.diffusion_model.{compvis}.{param}"] = marker
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert converted.keys() == markers.keys()
    wrong = [k for k, v in converted.items() if v is not markers[k]]
    assert not wrong, wrong[:5]
    table = structure.block_table()
    for key in markers:
        path = key.rpartition(".")[0]
        assert lora_keys.compvis_to_diffusers(lora_keys.diffusers_to_compvis(path, structure), table) == path


@pytest.mark.parametrize("family,fmt", [("sdxl", "kohya_diffusers_unet"), ("sdxl", "kohya"), ("sd1", "kohya")])
def test_kohya_spellings_name_the_layers_diffusers_converter_names(request, family, fmt):
    """OneTrainer's SDXL spelling (kohya keys over diffusers UNet names), kohya SDXL (sgm names, lora_te1_/te2_) and
    kohya SD1: every file key names the layer that diffusers' own kohya converter
    (`lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`, sgm names mapped first as its loader does)
    turns it into; build_file's expected layers are where our loader puts the deltas (test above)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    model = request.getfixturevalue(f"tiny_{family}")
    tensors, _, expected = build_file(model, fmt)
    state = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), model.unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    named = {_diffusers_layer(key) for key in converted}
    # SDXL's add_embedding.linear_1/_2 under diffusers names are the converter's blind spot (both become
    # `add.embedding.linear`); from sgm names (label_emb) it gets them right
    unhandled = {k for k in expected if k.startswith("unet.add_embedding.")} - named
    assert named - {"unet.add.embedding.linear"} == set(expected) - unhandled
    assert len(named) > 50


def _diffusers_layer(key: str) -> str:
    """The layer a diffusers LoRA key names, in our canonical form: its old processor spelling
    (`attn.processor.to_q_lora.up.weight` → `attn.to_q`, `to_out_lora` → `to_out.0`, CLIP `self_attn.to_q_lora`
    → `self_attn.q_proj`), `.lora.up`/`.lora_linear_layer.up` and PEFT's `lora_A`/`lora_B`."""
    path = re.sub(r"\.(lora_linear_layer|lora)\.(up|down)\.weight$|\.lora_[AB]\.weight$", "", key)
    match = re.search(r"(\.processor)?\.to_(q|k|v|out)_lora\.(up|down)\.weight$", path)
    if match:
        proj = match.group(2)
        head = path[:match.start()]
        if head.startswith("unet."):
            path = f"{head}.to_out.0" if proj == "out" else f"{head}.to_{proj}"
        else:
            path = f"{head}.{proj}_proj" if proj != "out" else f"{head}.out_proj"
    component, _, rest = path.partition(".")
    return f"{component}.{rest.removeprefix('text_model.')}"
