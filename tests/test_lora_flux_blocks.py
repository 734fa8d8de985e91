"""Per-block weights on transformer models: LoRA Block Weight's Flux ids (CLIP, T5, IN, Dnn, Snn, OUT; 61 for Flux.1,
as many as the model has otherwise) and numbered blocks for other DiTs.

The reference for which block a layer is in is LBW's own rule (its get_flux_blocks, on Forge's BFL-layout key with
dots as underscores), applied to the BFL key that diffusers' single-file converter says each diffusers parameter
comes from; the job test merges a BFL-layout copy with each BFL layer's delta scaled by LBW's block weight and
converts it with diffusers.
"""
import copy
import re

import flux_models
import lora_block_weights
import lora_layers
import lora_syntax
import networks
import pytest
import torch

from modules import extra_networks


def lbw_flux_block(key: str) -> str:
    """LBW's get_flux_blocks (sd-webui-lora-block-weight), on a Forge key with `.` → `_`."""
    if "vae" in key:
        return "VAE"
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    match = re.search(r"\_(\d+)\_", key)
    if "double_blocks" in key:
        return f"D{match.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{match.group(1).zfill(2)}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return "Not Merge"


def bfl_source_of_every_parameter() -> dict[str, str]:
    """{diffusers transformer parameter: the BFL key it is converted from}, by diffusers' converter: each BFL tensor
    holds its own index, so every converted tensor tells where it came from."""
    bfl = flux_models.bfl_state_dict()
    keys = sorted(bfl)
    marked = {k: torch.full_like(bfl[k], float(i)) for i, k in enumerate(keys)}
    converted = flux_models.convert_bfl(marked)
    res = {}
    for name, tensor in converted.items():
        values = tensor.unique()
        assert len(values) == 1, name
        res[name] = keys[int(values.item())]
    return res


@pytest.fixture(scope="module")
def tiny_flux_module() -> flux_models.TinyFluxModel:
    return flux_models.build_tiny_flux()


def test_flux_block_of_every_layer_agrees_with_lbw(tiny_flux_module):
    layer_map = lora_layers.LayerMap(tiny_flux_module)
    sources = bfl_source_of_every_parameter()
    checked = 0
    for name, module in layer_map.layers.items():
        if not name.startswith("transformer.") or getattr(module, "weight", None) is None:
            continue
        bfl_key = sources[f"{name[len('transformer.'):]}.weight"]
        expected = lbw_flux_block("diffusion_model_" + bfl_key.replace(".", "_"))
        assert lora_block_weights.block_of(name, None, flux=True) == expected, (name, bfl_key)
        checked += 1
    assert checked > 50
    # Forge names the text encoders text_encoders.clip_l / text_encoders.t5xxl
    assert lora_block_weights.block_of("text_encoder.encoder.layers.0.mlp.fc1", None, flux=True) == \
        lbw_flux_block("text_encoders_clip_l_transformer_text_model_encoder_layers_0_mlp_fc1") == "CLIP"
    assert lora_block_weights.block_of("text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi", None,
                                       flux=True) == lbw_flux_block("text_encoders_t5xxl_transformer_encoder") == "T5"
    # Chroma's only text encoder is T5, under the component name text_encoder
    assert lora_block_weights.block_of("text_encoder.encoder.block.1.layer.0.SelfAttention.q", None, flux=True) == "T5"


def test_flux_ids_follow_the_model_depth(tiny_flux_module):
    layers = list(lora_layers.LayerMap(tiny_flux_module).layers)
    assert lora_block_weights.block_ids("Flux", layers) == ("CLIP", "T5", "IN", "D00", "D01", "S00", "S01", "OUT")
    full = [f"transformer.transformer_blocks.{i}.attn.to_q" for i in range(19)] + \
        [f"transformer.single_transformer_blocks.{i}.proj_out" for i in range(38)]
    ids = lora_block_weights.block_ids("Flux", full)
    assert len(ids) == lora_block_weights.FLUX_COUNT == 61  # LBW's BLOCKIDFLUX
    assert ids[:4] == ("CLIP", "T5", "IN", "D00") and ids[21:23] == ("D18", "S00") and ids[-2:] == ("S37", "OUT")
    # a single-stream DiT (or SD3's joint blocks): numbered blocks
    dit = [f"transformer.transformer_blocks.{i}.attn.to_q" for i in range(3)] + ["transformer.proj_out"]
    assert lora_block_weights.block_ids("SD3", dit) == ("BASE", "IN", "B00", "B01", "B02", "OUT")
    assert lora_block_weights.block_of("transformer.transformer_blocks.2.ff.net.2", None) == "B02"
    assert lora_block_weights.block_of("transformer.pos_embed.proj", None) == "IN"
    assert lora_block_weights.block_of("text_encoder_2.encoder.layers.0.mlp.fc1", None) == "BASE"


def _tag(text: str) -> lora_syntax.LoraTag:
    _, data = extra_networks.parse_prompt(text)
    (params,) = data["lora"]
    return lora_syntax.parse_lora_params(params, lora_block_weights.all_presets(None))


def test_flux_vectors_presets_and_readable_form(tiny_flux_module):
    layers = list(lora_layers.LayerMap(tiny_flux_module).layers)
    w = _tag("<lora:x:1:lbw=1,0,1,0.5,1,1,0,1>").blocks.for_family("Flux", layers)
    assert w == {"CLIP": 1, "T5": 0, "IN": 1, "D00": 0.5, "D01": 1, "S00": 1, "S01": 0, "OUT": 1}
    assert set(_tag("<lora:x:1:lbw=ALL0.5>").blocks.for_family("Flux", layers).values()) == {0.5}
    readable = _tag("<lora:x:1:double=0.5:s01=0:base=0.2>").blocks.for_family("Flux", layers)
    assert readable == {"CLIP": 0.2, "T5": 0.2, "IN": 1, "D00": 0.5, "D01": 0.5, "S00": 1, "S01": 0, "OUT": 1}
    full = [f"transformer.transformer_blocks.{i}.attn.to_q" for i in range(19)] + \
        [f"transformer.single_transformer_blocks.{i}.proj_out" for i in range(38)]
    assert set(_tag("<lora:x:1:lbw=FLUXALL>").blocks.for_family("Flux", full).values()) == {1.0}
    full_vector = ",".join(["1", "0"] * 30 + ["1"])
    assert len(_tag(f"<lora:x:1:lbw={full_vector}>").blocks.for_family("Flux", full)) == 61
    with pytest.raises(lora_block_weights.BlockWeightError, match="has 61 values; Flux block weights take 8"):
        _tag(f"<lora:x:1:lbw={full_vector}>").blocks.for_family("Flux", layers)
    with pytest.raises(lora_block_weights.BlockWeightError, match="Flux has no block D02"):
        _tag("<lora:x:1:d02=0>").blocks.for_family("Flux", layers)
    info = lora_block_weights.editor_info("Flux", None, layers)
    assert info["blocks"] == list(w) and info["forms"] == {"8": list(w)}


def test_flux_block_weights_in_a_job_match_lbw_on_the_bfl_layout(tiny_flux_module, write_lora):
    """kohya file on every BFL Linear; lbw zeroes T5 and D01, halves S00 and IN. Reference: each BFL layer's delta
    times LBW's weight for its Forge key, merged in the BFL layout and converted by diffusers."""
    model = copy.deepcopy(tiny_flux_module)
    bfl = flux_models.bfl_state_dict()
    g = torch.Generator().manual_seed(11)
    tensors, deltas = {}, {}
    for key, value in bfl.items():
        if not key.endswith(".weight") or value.dim() != 2:
            continue
        name = key[:-len(".weight")]
        down, up = torch.randn(2, value.shape[1], generator=g), torch.randn(value.shape[0], 2, generator=g)
        base = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up})
        deltas[name] = (up @ down, "diffusion_model_" + name.replace(".", "_"))
    for path, module in model.text_encoder_2.named_modules():  # T5 layers, whose block weight is 0
        if isinstance(module, torch.nn.Linear):
            base = "lora_te2_" + path.replace(".", "_")
            tensors.update({f"{base}.lora_down.weight": torch.randn(2, module.in_features, generator=g),
                            f"{base}.lora_up.weight": torch.randn(module.out_features, 2, generator=g)})
    write_lora("flux_blocks", tensors=tensors, metadata={})
    layers = list(lora_layers.LayerMap(model).layers)
    weights = _tag("<lora:x:1:lbw=1,0,0.5,1,0,0.5,1,1>").blocks.for_family("Flux", layers)
    original = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in model.components().items()}
    report = networks.load_networks(["flux_blocks"], [0.8], [0.8], sd_model=model, block_weights=[weights])
    assert not report.networks[0].load_errors and not report.networks[0].unmatched_keys
    merged = dict(bfl)
    for name, (delta, forge_key) in deltas.items():
        merged[f"{name}.weight"] = bfl[f"{name}.weight"] + 0.8 * weights[lbw_flux_block(forge_key)] * delta
    want = flux_models.convert_bfl(merged)
    got = model.transformer.state_dict()
    for key, value in want.items():
        if torch.equal(value, original["transformer"][key]):
            assert torch.equal(got[key], value), key
        else:
            err = float((got[key] - value).abs().max() / value.abs().max())
            assert err < 1e-5, (key, err)
    assert all(torch.equal(v, original["text_encoder_2"][k]) for k, v in model.text_encoder_2.state_dict().items())
    d01 = "transformer_blocks.1.attn.to_q.weight"
    assert torch.equal(got[d01], original["transformer"][d01])  # D01 = 0: untouched
    networks.load_networks([], sd_model=model)
