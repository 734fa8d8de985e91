"""Per-block weights in the tag (LoRA Block Weight's `lbw=` syntax): block boundaries, syntax, and what a job does.

Block boundaries are checked against an independent reference: an ldm UNetModel (the compvis layout LBW names
blocks in) converted to diffusers names by diffusers' own single-file converter; LBW's rule (`input_blocks_N` → INnn,
`middle_block` → M00, `output_blocks_N` → OUTnn, anything else keeps 1) is applied to the ldm key, our block_of() to
the converted diffusers name, and the two must agree on every parameter.
"""
import extra_networks_lora
import lora_block_weights
import lora_keys
import lora_syntax
import networks
import pytest
import torch

from modules import extra_networks, processing

# LBW's BLOCKS list (its lora_block_weight.py): the first entry contained in a kohya-style key picks the block.
LBW_UNET_BLOCKS = ([f"diffusion_model_input_blocks_{i}_" for i in range(12)] + ["diffusion_model_middle_block_"]
                   + [f"diffusion_model_output_blocks_{i}_" for i in range(12)])
LBW_IDS = [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]

# Full-depth layouts at tiny width: SD1 (4 levels, attention on the first 3) and SDXL (3 levels, attention on 2, 3)
FULL_DEPTH = {
    "sd1": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                 attention_resolutions=[1, 2, 4], channel_mult=(1, 1, 1, 1), num_head_channels=16,
                 use_spatial_transformer=True, transformer_depth=1, context_dim=16, legacy=False),
            dict(sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=16,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=2,
                 norm_num_groups=32)),
    "sdxl": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                  attention_resolutions=[2, 4], channel_mult=(1, 1, 1), num_head_channels=16,
                  use_spatial_transformer=True, transformer_depth=1, context_dim=16, legacy=False,
                  use_linear_in_transformer=True),
             dict(sample_size=8, block_out_channels=(32, 32, 32), layers_per_block=2, cross_attention_dim=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                  norm_num_groups=32, use_linear_projection=True)),
}


def lbw_block(ldm_key: str) -> str | None:
    key = "diffusion_model_" + ldm_key.replace(".", "_")
    for block, block_id in zip(LBW_UNET_BLOCKS, LBW_IDS, strict=True):
        if block in key:
            return block_id
    return None


@pytest.mark.parametrize("family,expected_ids", [("sd1", 26 - 1), ("sdxl", 20 - 1)])
def test_block_of_every_unet_layer_agrees_with_lbw_on_the_compvis_layout(family, expected_ids):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    ldm_kwargs, diffusers_kwargs = FULL_DEPTH[family]
    ldm_unet = UNetModel(**ldm_kwargs)
    ldm_sd = ldm_unet.state_dict()
    marked = {}  # every ldm tensor holds its own index, so the converted tensor tells where it came from
    for i, (k, v) in enumerate(ldm_sd.items()):
        marked[f"model.diffusion_model.{k}"] = torch.full_like(v, float(i + 1))
    twin = UNet2DConditionModel(**diffusers_kwargs)
    converted = convert_ldm_unet_checkpoint(marked, dict(twin.config))
    assert converted.keys() == twin.state_dict().keys()
    ldm_keys = list(ldm_sd)
    structure = lora_keys.UnetStructure.from_unet(twin)

    seen: dict[str, set[str]] = {}
    for diffusers_key, tensor in converted.items():
        ldm_key = ldm_keys[int(tensor.flatten()[0].item()) - 1]
        module = diffusers_key.rsplit(".", 1)[0]
        expected = lbw_block(ldm_key)
        assert lora_block_weights.block_of(f"unet.{module}", structure) == expected, (diffusers_key, ldm_key)
        if expected:
            seen.setdefault(expected, set()).add(module)
    ids = lora_block_weights.ALL_IDS[family.upper()]
    assert sorted(seen) == sorted(ids[1:]) and len(seen) == expected_ids  # every block id has layers
    # hand-checked boundaries: downsamplers and upsamplers belong to the block they end
    assert "down_blocks.0.downsamplers.0.conv" in seen["IN03"]
    assert "up_blocks.0.upsamplers.0.conv" in seen["OUT02"]
    assert "time_embedding.linear_1" not in set().union(*seen.values())
    assert lora_block_weights.block_of("text_encoder_2.encoder.layers.0.mlp.fc1", structure) == "BASE"
    assert lora_block_weights.block_of("unet.conv_out", structure) is None


def _tag(text: str, presets=None) -> lora_syntax.LoraTag:
    _, data = extra_networks.parse_prompt(text)
    (params,) = data["lora"]
    return lora_syntax.parse_lora_params(params, presets)


def test_vectors_presets_and_the_readable_form():
    ones17 = ",".join(["1"] * 17)
    w = _tag(f"<lora:x:0.8:lbw={ones17}>").blocks.for_family("SD1")
    # the 17-value form leaves IN00, IN03, IN06, IN09-11 and OUT00-02 out: LBW gives them 0
    assert [b for b, v in w.items() if v == 0] == ["IN00", "IN03", "IN06", "IN09", "IN10", "IN11",
                                                   "OUT00", "OUT01", "OUT02"]
    outd = _tag("<lora:x:1:w=OUTD>").blocks.for_family("SD1")  # w= is lbw='s alias
    assert outd["BASE"] == 1 and outd["IN01"] == 0 and outd["M00"] == 0 and outd["OUT03"] == 1 \
        and outd["OUT06"] == 1 and outd["OUT07"] == 0
    old_form = _tag("<lora:x:0.6:OUTALL>")  # LBW's positional preset: no unet multiplier
    assert (old_form.te, old_form.unet) == (0.6, 0.6) and old_form.blocks.for_family("SD1")["OUT11"] == 1
    assert _tag("<lora:x:1:lbw=ALL>").blocks.for_family("SDXL") == dict.fromkeys(
        lora_block_weights.BLOCK_IDS_20, 1.0)  # uniform presets fit every family
    xl12 = _tag("<lora:x:1:lbw=1,0,0,0,0,1,1,1,1,1,1,1>").blocks.for_family("SDXL")
    assert xl12["IN00"] == 0 and xl12["M00"] == 1 and xl12["IN04"] == 0 and xl12["OUT05"] == 1
    readable = _tag("<lora:x:1:in=0.5:mid=0:out=0.2:out03=1>").blocks.for_family("SD1")
    assert readable["BASE"] == 1 and readable["IN00"] == 0.5 and readable["IN11"] == 0.5
    assert readable["M00"] == 0 and readable["OUT02"] == 0.2 and readable["OUT03"] == 1
    user = _tag("<lora:x:1:lbw=MINE>", {"MINE": ",".join(["0.25"] * 26)})
    assert set(user.blocks.for_family("SD1").values()) == {0.25}


@pytest.mark.parametrize("text,family,message", [
    ("<lora:x:1:lbw=1,0,1>", "SD1", "has 3 values; SD1 block weights take 17 or 26"),
    (f"<lora:x:1:lbw={','.join(['1', '0'] * 8 + ['1'])}>", "SDXL", "SDXL block weights take 12 or 20"),
    ("<lora:x:1:lbw=outall>", "SD1", "unknown block-weight preset 'outall'"),  # case-sensitive, as in LBW
    ("<lora:x:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,nan>", "SD1", "not a finite number"),
    ("<lora:x:1:in=1:out=abc>", "SD1", "not a number"),
    ("<lora:x:1:lbw=ALL:in=1>", "SD1", "not both"),
    ("<lora:x:1:out11=1>", "SDXL", "SDXL has no block OUT11"),
])
def test_bad_block_weights_name_the_problem(text, family, message):
    with pytest.raises((lora_syntax.LoraTagError, lora_block_weights.BlockWeightError), match=message):
        _tag(text).blocks.for_family(family)


def test_user_presets_file_in_lbw_format(tmp_path):
    folder = tmp_path / "extensions" / "sd-webui-lora-block-weight" / "scripts"
    folder.mkdir(parents=True)
    (folder / "lbwpresets.txt").write_text("# my presets\nHALF:" + ",".join(["0.5"] * 17)
                                           + "\nBROKEN:1,2,3\nXL:" + ",".join(["1"] * 12) + "\n")
    presets = lora_block_weights.all_presets(str(tmp_path))
    assert presets["HALF"].count(",") == 16 and presets["XL"].count(",") == 11 and "BROKEN" not in presets
    assert presets["OUTALL"] == lora_block_weights.BUILTIN_PRESETS["OUTALL"]


def _job(model, prompt: str):
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=prompt)
    p.all_prompts = [prompt]
    _, data = extra_networks.parse_prompt(prompt)
    handler = extra_networks_lora.ExtraNetworkLora()
    handler.activate(p, data["lora"] + data["lyco"])
    handler.deactivate(p)
    return p


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, comp in model.components().items() if comp is not None
            for k, v in comp.state_dict().items()}


def test_a_job_scales_each_block_and_restores_exactly(tiny_sd1, write_lora):
    """SD1 tiny model: IN01/IN02 (down_blocks.0), M00, OUT03-05 (up_blocks.1) and BASE. Each layer's change is
    its block's weight times the change the plain tag makes; unchanged tags write nothing; removal is exact."""
    write_lora("blk", tiny_sd1, seed=5, locon=True)
    base = _weights(tiny_sd1)
    _job(tiny_sd1, "<lora:blk:1>")
    full = {k: v - base[k] for k, v in _weights(tiny_sd1).items()}
    # BASE 0.5, IN01 0, IN02 1, M00 0.25, OUT03-11 alternating; IN00/03/06/09-11, OUT00-02 get 0 (17 form)
    vector = [0.5, 0, 1, 1, 1, 1, 1, 0.25, 1, 0, 2, 1, 1, 1, 1, 1, 1]
    p = _job(tiny_sd1, f"<lora:blk:1:lbw={','.join(map(str, vector))}>")
    assert any("block weights set these blocks to 0: IN00, IN01, IN03" in c for c in p.comments), p.comments
    got = {k: v - base[k] for k, v in _weights(tiny_sd1).items()}
    expect_factor = {"text_encoder.": 0.5, "unet.down_blocks.0.resnets.0.": 0, "unet.down_blocks.0.attentions.0.": 0,
                     "unet.down_blocks.0.resnets.1.": 1, "unet.down_blocks.0.downsamplers.": 0,
                     "unet.mid_block.": 0.25, "unet.up_blocks.1.resnets.0.": 1, "unet.up_blocks.1.attentions.0.": 1,
                     "unet.up_blocks.1.resnets.1.": 0, "unet.up_blocks.1.attentions.1.": 0,
                     "unet.up_blocks.1.resnets.2.": 2, "unet.up_blocks.1.attentions.2.": 2,
                     "unet.up_blocks.0.": 0, "unet.conv_in": 0, "unet.time_embedding.": 1}
    checked = 0
    for key, delta in full.items():
        factor = next((f for prefix, f in expect_factor.items() if key.startswith(prefix)), None)
        if factor is None or not delta.abs().max() > 0:
            continue
        torch.testing.assert_close(got[key], factor * delta, rtol=1e-5, atol=1e-6, msg=key)
        checked += 1
    assert checked > 20

    again = networks.load_networks(["blk"], [1.0], [1.0], [None], sd_model=tiny_sd1,
                                   block_weights=[networks.loaded_networks[0].block_weights])
    assert again.layers_written == 0  # the same block weights again: nothing to write
    _job(tiny_sd1, "no tags")
    assert all(torch.equal(v, base[k]) for k, v in _weights(tiny_sd1).items())


def test_a_bad_vector_skips_only_that_lora(tiny_sd1, write_lora):
    write_lora("good", tiny_sd1, seed=6)
    write_lora("bad", tiny_sd1, seed=7)
    base = _weights(tiny_sd1)
    p = _job(tiny_sd1, "<lora:good:1> <lora:bad:1:lbw=1,2,3>")
    assert any(c.startswith("Bad Lora tag <lora:bad:1:lbw=1,2,3>: '1,2,3' has 3 values") for c in p.comments)
    assert [n.name for n in networks.loaded_networks] == ["good"]
    _job(tiny_sd1, "")
    assert all(torch.equal(v, base[k]) for k, v in _weights(tiny_sd1).items())
