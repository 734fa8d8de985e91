"""SD3 / SD3.5 Lora formats on the host's tiny-sd3 (64 wide, an MMDiT-X block, a last block whose text side only shifts
and scales), each against an independent reference:

- SAI-named files (kohya/sd-scripts `lora_unet_joint_blocks_…`, ComfyUI `diffusion_model.…` lora_A/B or up/down, the
  LyCORIS wrapper; LoHa/LoKr/full/DoRA through sd-scripts): the Lora merged into the SAI-layout state dict by the
  plain formula (LyCORIS types by lycoris-lora's functional modules), then converted by diffusers' own single-file
  converter, which says which rows of a fused qkv are which diffusers layer and swaps the adaLN halves;
- diffusers PEFT files (`transformer.…`, `text_encoder.…`, `text_encoder_2.…`): StableDiffusion3Pipeline's
  `load_lora_weights` + `fuse_lora`; the T5 part (`text_encoder_3.`, which diffusers 0.42.1 never loads) and
  OneTrainer / SimpleTuner / raw-PEFT spellings: W + m·alpha/r·up@down per layer;
- text encoders: CLIP-L `lora_te1_`, CLIP-G `lora_te2_`, T5 `lora_te3_` (sd-scripts), ComfyUI `text_encoders.…`.
Every targeted parameter within 1e-5 relative error (fp32), every other one bitwise unchanged, bitwise restore.
"""
import lycoris.functional.general as lyco_general
import lycoris.functional.loha as lyco_loha
import lycoris.functional.lokr as lyco_lokr
import networks
import pytest
import torch
from flux_lora_files import M, apply, assert_restored, check, model_state, write_factors, write_file
from sd3_lora_files import (
    comfy_text_base,
    convert_sai,
    delta,
    diffusers_fused,
    expected_text,
    factors,
    kohya_text_base,
    merged_sai,
    sai_layers,
    sai_state,
    sd3,
    text_linears,
)

__all__ = ["sd3", "write_file"]  # fixtures

SPELLINGS = {  # transformer prefix, separator, down/up parts, text encoder naming
    "kohya": ("lora_unet_", "_", "lora_down.weight", "lora_up.weight", kohya_text_base),
    "comfyui_lora_A": ("diffusion_model.", ".", "lora_A.weight", "lora_B.weight", comfy_text_base),
    "comfyui_up_down": ("model.diffusion_model.", ".", "lora_down.weight", "lora_up.weight", comfy_text_base),
    "lycoris_wrapper": ("lycoris_", "_", "lora_down.weight", "lora_up.weight", kohya_text_base),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_sai_named_lora_matches_the_merge_through_diffusers_converter(sd3, write_file, spelling):
    """Every Linear and the patch-embedding conv of the SAI transformer (fused x/context/attn2 qkv, the adaLN of the
    last block and of the final layer with swapped halves, embedders) plus CLIP-L, CLIP-G and T5."""
    sai = sai_state(sd3.transformer)
    shapes = sai_layers(sai)
    assert "x_embedder.proj" in shapes and "joint_blocks.0.x_block.attn2.qkv" in shapes
    f = factors(shapes)
    prefix, sep, down, up, text_base = SPELLINGS[spelling]
    tensors = write_factors(f, lambda n: prefix + (n if sep == "." else n.replace(".", "_")), down, up)
    te = factors(text_linears(sd3), seed=1)
    tensors.update(write_factors(te, text_base, down, up))
    write_file("sd3_sai", tensors, metadata={"ss_base_model_version": "sd3"})

    want = {"transformer": convert_sai(merged_sai(sai, {n: delta(*f[n], shapes[n]) for n in f})),
            **expected_text(sd3, te)}
    original = model_state(sd3)
    got = apply(sd3, "sd3_sai")
    net = networks.loaded_networks[0]
    assert len({m.network_key for m in net.modules.values()}) == len(f) + len(te)
    assert check(got, want, original) == len(net.modules) > 70
    assert_restored(sd3, original)


@pytest.mark.parametrize("algo", ["loha", "lokr", "full", "dora"])
def test_lycoris_types_on_fused_sai_layers(sd3, write_file, algo):
    """kohya-named LyCORIS LoHa, LoKr, full weights (with bias) and DoRA per output channel on fused qkv, swapped
    adaLN and plain SAI layers; references: lycoris-lora's functional modules on the SAI weights, then diffusers'
    converter."""
    sai = sai_state(sd3.transformer)
    names = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.attn.qkv",
             "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.1.context_block.adaLN_modulation.1",
             "final_layer.adaLN_modulation.1", "joint_blocks.0.x_block.mlp.fc1"]
    g = torch.Generator().manual_seed(3)
    tensors, deltas, bias_deltas = {}, {}, {}
    m = 1.0 if algo == "dora" else M
    for i, name in enumerate(names):
        weight = sai[f"{name}.weight"]
        out, inp = weight.shape
        base = "lora_unet_" + name.replace(".", "_")
        alpha = float(1 + i % 2)
        if algo == "loha":
            w1a, w1b, w2a, w2b = (torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g),
                                  torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g))
            tensors.update({f"{base}.hada_w1_a": w1a, f"{base}.hada_w1_b": w1b, f"{base}.hada_w2_a": w2a,
                            f"{base}.hada_w2_b": w2b, f"{base}.alpha": torch.tensor(alpha)})
            deltas[name] = m * lyco_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=alpha / 2)
        elif algo == "lokr":  # w1 full, w2 low-rank: the Kronecker rows do not align with q/k/v
            w1 = torch.randn(4, 4, generator=g)
            w2a, w2b = torch.randn(out // 4, 2, generator=g), torch.randn(2, inp // 4, generator=g)
            tensors.update({f"{base}.lokr_w1": w1, f"{base}.lokr_w2_a": w2a, f"{base}.lokr_w2_b": w2b,
                            f"{base}.alpha": torch.tensor(alpha)})
            deltas[name] = m * lyco_lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=alpha)
        elif algo == "full":
            diff, diff_b = torch.randn(out, inp, generator=g) * 0.1, torch.randn(out, generator=g) * 0.1
            tensors.update({f"{base}.diff": diff, f"{base}.diff_b": diff_b})
            deltas[name], bias_deltas[name] = m * diff, m * diff_b
        else:  # LyCORIS DoRA, wd_on_output: magnitude (out, 1)
            down, up = torch.randn(2, inp, generator=g) * 0.5, torch.randn(out, 2, generator=g) * 0.5
            scale = weight.norm(dim=1, keepdim=True) * (1 + 0.2 * torch.rand(out, 1, generator=g))
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(alpha), f"{base}.dora_scale": scale})
            deltas[name] = lyco_general._weight_decompose(weight + alpha / 2 * up @ down, scale, 1, True) - weight
    write_file(f"sd3_{algo}", tensors)
    original = model_state(sd3)
    want = dict(original, transformer=convert_sai(merged_sai(sai, deltas, bias_deltas)))
    got = apply(sd3, f"sd3_{algo}", multiplier=m)
    assert check(got, want, original) == 12 * (2 if algo == "full" else 1)  # 3 qkv × 3 + 3 layers (+ biases)
    assert_restored(sd3, original)


# --- diffusers-named files ------------------------------------------------------------------------------------------
def _diffusers_linears(model) -> dict[str, tuple[int, int]]:
    return {path: tuple(m.weight.shape) for path, m in model.transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("dora", [False, True])
def test_peft_lora_matches_diffusers_and_t5_the_plain_merge(sd3, write_file, dora):
    """diffusers / PEFT: `transformer.<module>.lora_A/lora_B` (no alpha: scale 1, with a DoRA magnitude per output
    channel), CLIP-L `text_encoder.`, CLIP-G `text_encoder_2.` merged by diffusers; T5 `text_encoder_3.`, which
    diffusers 0.42.1 leaves out of StableDiffusion3Pipeline's Lora loading, by W + m·up@down."""
    m = 1.0 if dora else M
    f = factors(_diffusers_linears(sd3))
    tensors = write_factors(f, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight", alpha=False)
    g = torch.Generator().manual_seed(9)
    for name in f if dora else []:
        tensors[f"transformer.{name}.lora_magnitude_vector"] = 1 + torch.rand(f[name][1].shape[0], generator=g)
    te = factors(text_linears(sd3), seed=2)
    clip = {k: v for k, v in te.items() if not k.startswith("text_encoder_3.")}
    t5 = {k: v for k, v in te.items() if k.startswith("text_encoder_3.")}
    tensors.update(write_factors(clip, lambda n: n, "lora_A.weight", "lora_B.weight", alpha=False))
    reference = write_file("sd3_peft_ref", tensors)
    tensors.update(write_factors(t5, lambda n: n, "lora_A.weight", "lora_B.weight", alpha=False))
    write_file("sd3_peft", tensors)
    want = diffusers_fused(sd3, reference, scale=m)
    want["text_encoder_3"] = expected_text(sd3, t5, m, alpha=False)["text_encoder_3"]
    original = model_state(sd3)
    got = apply(sd3, "sd3_peft", multiplier=m, te=m)
    assert check(got, want, original) == len(networks.loaded_networks[0].modules) == len(f) + len(te)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_", "base_model.model."])
def test_onetrainer_simpletuner_and_raw_peft_spellings(sd3, write_file, prefix):
    f = factors(_diffusers_linears(sd3), seed=4)
    sep = "." if prefix.endswith(".") else "_"
    write_file("sd3_names", write_factors(f, lambda n: prefix + (n if sep == "." else n.replace(".", "_"))))
    want = model_state(sd3)
    for name, (d, u, a) in f.items():
        want["transformer"][f"{name}.weight"] = want["transformer"][f"{name}.weight"] + delta(d, u, a, (-1, d.shape[1]))
    original = model_state(sd3)
    assert check(apply(sd3, "sd3_names"), want, original) == len(f)


def test_the_extension_names_sd3_layers_as_the_host_loads_them():
    """The extension cannot import the host (it must run in A1111), so it keeps its own diffusers → SAI name table;
    every name the host's single-file loader maps must map the same way there."""
    import lora_sd3

    from modules import sd3_layout

    assert sd3_layout._SIMPLE.items() <= lora_sd3._SIMPLE.items()
    assert sd3_layout._BLOCK.items() <= lora_sd3._BLOCK.items()


def test_a_text_encoder_only_sdxl_lora_applies_to_sd3s_clip_l_and_clip_g(sd3, write_file, tiny_sdxl, write_lora):
    """kohya SDXL files that train only the text encoders (`lora_te1_` CLIP-L, `lora_te2_` CLIP-G) name layers SD3
    has under the same names (ComfyUI applies them there too): merged exactly, the coverage line says it was made
    for SDXL. A file with UNet parts stays refused."""
    import lora_coverage
    clip = factors({k: v for k, v in text_linears(sd3).items() if not k.startswith("text_encoder_3.")}, seed=5)
    assert any(k.startswith("text_encoder_2.") for k in clip)
    write_file("sdxl_te_only", write_factors(clip, kohya_text_base), metadata={"ss_base_model_version": "sdxl"})
    want = model_state(sd3)
    want.update(expected_text(sd3, clip))
    original = model_state(sd3)
    assert check(apply(sd3, "sdxl_te_only"), want, original) == len(clip)
    net = networks.loaded_networks[0]
    assert net.version_hint == "SDXL" and not net.refused
    assert lora_coverage.messages(lora_coverage.coverage_of(net, "SD3")) == [
        f"Lora sdxl_te_only: {len(clip)} of {len(clip)} layers matched; made for SDXL, applied to the text encoders "
        "the loaded SD3 model shares with it"]
    assert_restored(sd3, original)

    write_lora("sdxl_full", tiny_sdxl, family="sdxl")  # UNet and text encoders: not for this model
    networks.load_networks(["sdxl_full"], sd_model=sd3)
    net = networks.loaded_networks[0]
    assert not net.modules and net.refused == "it looks like an SDXL LoRA, the loaded model is SD3"
