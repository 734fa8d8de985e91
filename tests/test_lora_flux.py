"""Flux.1 Lora formats on a tiny Flux model (2 double and 2 single blocks, 32 wide: not Flux.1-dev's 3072, so a
split hard-coded to 3072 would fail), each against an independent reference:

- BFL-named files (kohya/sd-scripts, ComfyUI, LyCORIS LoHa/LoKr/full/DoRA through sd-scripts): the Lora merged into a
  BFL-layout state dict by the plain formula (LyCORIS types by lycoris-lora's functional modules), then converted by
  diffusers' own single-file converter, which says which rows of a fused layer are which diffusers layer;
- diffusers-named files (ai-toolkit / PEFT), XLabs files and kohya double blocks: diffusers' `load_lora_weights` +
  `fuse_lora` on a FluxPipeline made of the same components;
- OneTrainer / SimpleTuner / raw-PEFT spellings and the text encoders (CLIP-L `lora_te1_`, T5 `lora_te3_`/`lora_te2_`):
  W + m·alpha/r·up@down per layer.
Every targeted parameter within 1e-5 relative error (fp32), every other parameter bitwise unchanged, and bitwise
restored after the Lora is removed.
"""
import flux_models
import lycoris.functional.general as lyco_general
import lycoris.functional.loha as lyco_loha
import lycoris.functional.lokr as lyco_lokr
import networks
import pytest
import torch
from flux_lora_files import (
    M,
    apply,
    assert_restored,
    bfl_linears,
    check,
    diffusers_fused,
    diffusers_linears,
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

__all__ = ["flux", "write_file"]  # fixtures


# --- BFL-named files against diffusers' single-file converter ------------------------------------------------------
@pytest.mark.parametrize("spelling", ["kohya", "comfyui_lora_A", "comfyui_up_down", "lycoris_wrapper"])
def test_bfl_named_lora_matches_the_merge_through_diffusers_converter(flux, write_file, spelling):
    """Every Linear of the BFL transformer (fused qkv, linear1 = q/k/v/mlp, modulation, embedders, final layer with
    its swapped halves) plus both text encoders; the split rows come from the tiny model's shapes."""
    bfl = flux_models.bfl_state_dict()
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in bfl_linears(bfl)})
    prefix, sep, down, up = {"kohya": ("lora_unet_", "_", "lora_down.weight", "lora_up.weight"),
                             "comfyui_lora_A": ("diffusion_model.", ".", "lora_A.weight", "lora_B.weight"),
                             "comfyui_up_down": ("model.diffusion_model.", ".", "lora_down.weight", "lora_up.weight"),
                             "lycoris_wrapper": ("lycoris_", "_", "lora_down.weight", "lora_up.weight")}[spelling]
    tensors = write_factors(factors, lambda n: prefix + (n if sep == "." else n.replace(".", "_")), down, up)
    te_factors = lora_factors(text_shapes(flux), seed=1)
    t5_prefix = "lora_te3_" if spelling == "kohya" else "lora_te2_"
    tensors.update(write_factors(te_factors, lambda n: kohya_text_keys(n, t5_prefix)))
    write_file("flux_bfl", tensors, metadata={"ss_base_model_version": "flux1"})

    want = {"transformer": flux_models.convert_bfl(
        merged_bfl(bfl, {n: lora_delta(*f) for n, f in factors.items()})), **expected_text(flux, te_factors)}
    original = model_state(flux)
    got = apply(flux, "flux_bfl")
    net = networks.loaded_networks[0]
    assert len({m.network_key for m in net.modules.values()}) == len(factors) + len(te_factors)
    assert check(got, want, original) == len(net.modules) > 60
    assert_restored(flux, original)


def test_kohya_double_blocks_and_clip_match_diffusers_load_lora_weights(flux, write_file):
    """diffusers' kohya converter reads double blocks (qkv split by a third of the rows) and lora_te1_ at any width;
    its single-block split is hard-coded to 3072, so this file has none."""
    bfl = flux_models.bfl_state_dict()
    names = [n for n in bfl_linears(bfl) if n.startswith("double_blocks.")]
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in names})
    te_factors = {k: v for k, v in lora_factors(text_shapes(flux), seed=1).items() if k.startswith("text_encoder.")}
    tensors = write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors.update(write_factors(te_factors, kohya_text_keys))
    path = write_file("flux_kohya_double", tensors)
    want = diffusers_fused(flux, path)
    original = model_state(flux)
    got = apply(flux, "flux_kohya_double", te=M)
    assert check(got, want, original) == len(networks.loaded_networks[0].modules) > 30


@pytest.mark.parametrize("algo", ["loha", "lokr", "full", "dora"])
def test_lycoris_types_on_fused_bfl_layers(flux, write_file, algo):
    """kohya-named LyCORIS LoHa, LoKr (the kind diffusers accepts and loads nothing from), full weights (with
    bias) and DoRA per output channel, on fused and plain BFL layers; references: lycoris-lora's functional
    modules on the BFL weights, then diffusers' converter."""
    bfl = flux_models.bfl_state_dict()
    names = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
             "single_blocks.1.linear2", "final_layer.adaLN_modulation.1", "double_blocks.0.img_mlp.0"]
    g = torch.Generator().manual_seed(3)
    tensors, deltas, bias_deltas = {}, {}, {}
    m = 1.0 if algo == "dora" else M
    for i, name in enumerate(names):
        weight = bfl[f"{name}.weight"]
        out, inp = weight.shape
        base = "lora_unet_" + name.replace(".", "_")
        alpha = float(1 + i % 2)
        if algo == "loha":
            w1a, w1b, w2a, w2b = (torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g),
                                  torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g))
            tensors.update({f"{base}.hada_w1_a": w1a, f"{base}.hada_w1_b": w1b, f"{base}.hada_w2_a": w2a,
                            f"{base}.hada_w2_b": w2b, f"{base}.alpha": torch.tensor(alpha)})
            deltas[name] = m * lyco_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=alpha / 2)
        elif algo == "lokr":  # w1 full (a × b), w2 low-rank (c × d): kron rows do not align with q/k/v
            a, b = (4, 4) if out % 4 == 0 else (2, 4)
            w1 = torch.randn(a, b, generator=g)
            w2a, w2b = torch.randn(out // a, 2, generator=g), torch.randn(2, inp // b, generator=g)
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
            merged = lyco_general._weight_decompose(weight + alpha / 2 * up @ down, scale, 1, True)
            deltas[name] = merged - weight
    write_file(f"flux_{algo}", tensors)
    merged = merged_bfl(bfl, deltas)
    for name, db in bias_deltas.items():
        merged[f"{name}.bias"] = bfl[f"{name}.bias"] + db
    want = {"transformer": flux_models.convert_bfl(merged), "text_encoder": model_state(flux)["text_encoder"],
            "text_encoder_2": model_state(flux)["text_encoder_2"]}
    original = model_state(flux)
    got = apply(flux, f"flux_{algo}", multiplier=m)
    assert check(got, want, original) >= 12
    assert_restored(flux, original)


# --- diffusers-named files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_peft_lora_and_dora_match_diffusers(flux, write_file, dora):
    """ai-toolkit / diffusers PEFT: `transformer.<module>.lora_A/lora_B` (no alpha: scale 1), with a DoRA magnitude
    per output channel, and CLIP-L `text_encoder.`, merged by diffusers. DoRA at strength 1:
    PEFT scales ΔW inside the norm, we scale the whole DoRA delta (README)."""
    m = 1.0 if dora else M
    factors = lora_factors(diffusers_linears(flux))
    tensors = write_factors(factors, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight", alpha=False)
    g = torch.Generator().manual_seed(9)
    for name in factors if dora else []:  # PEFT's use_dora covers every layer of the adapter
        out = factors[name][1].shape[0]
        tensors[f"transformer.{name}.lora_magnitude_vector"] = 1 + torch.rand(out, generator=g)
    clip = {k: v for k, v in lora_factors(text_shapes(flux), seed=2).items() if k.startswith("text_encoder.")}
    tensors.update(write_factors(clip, lambda n: n, "lora_A.weight", "lora_B.weight", alpha=False))
    path = write_file("flux_peft", tensors)
    want = diffusers_fused(flux, path, scale=m)
    original = model_state(flux)
    got = apply(flux, "flux_peft", multiplier=m, te=m)
    assert check(got, want, original) == len(networks.loaded_networks[0].modules) > 60


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_", "base_model.model."])
def test_onetrainer_simpletuner_and_raw_peft_spellings(flux, write_file, prefix):
    factors = lora_factors(diffusers_linears(flux), seed=4)
    sep = "." if prefix.endswith(".") else "_"
    tensors = write_factors(factors, lambda n: prefix + (n if sep == "." else n.replace(".", "_")))
    write_file("flux_names", tensors)
    want = model_state(flux)
    for name, (d, u, a) in factors.items():
        want["transformer"][f"{name}.weight"] = want["transformer"][f"{name}.weight"] + lora_delta(d, u, a)
    original = model_state(flux)
    assert check(apply(flux, "flux_names"), want, original) == len(factors)


@pytest.mark.parametrize("variant", ["linear2_input", "linear2_output"])
def test_xlabs_lora(flux, write_file, variant):
    """XLabs processors: double blocks qkv_lora1/2 (image/text q, k, v rows) and proj_lora1/2, single blocks
    qkv_lora (q, k, v rows of linear1, not the MLP rows) and proj_lora. Newer XLabs code feeds proj_lora linear2's
    input (a LoRA on proj_out; diffusers reads it so); its first release added a hidden→hidden proj_lora to
    linear2's output, which diffusers cannot load: there the reference is that forward, out + B·A·out."""
    h, g = flux_models.HIDDEN, torch.Generator().manual_seed(6)
    tensors, outputs = {}, {}
    for i in range(flux_models.DOUBLE):
        for s in ("1", "2"):
            for kind, out in (("qkv", 3 * h), ("proj", h)):
                base = f"double_blocks.{i}.processor.{kind}_lora{s}"
                tensors[f"{base}.down.weight"] = torch.randn(4, h, generator=g) * 0.5
                tensors[f"{base}.up.weight"] = torch.randn(out, 4, generator=g) * 0.5
    for i in range(flux_models.SINGLE):
        base = f"single_blocks.{i}.processor"
        tensors[f"{base}.qkv_lora.down.weight"] = torch.randn(4, h, generator=g) * 0.5
        tensors[f"{base}.qkv_lora.up.weight"] = torch.randn(3 * h, 4, generator=g) * 0.5
        width = h + flux_models.MLP if variant == "linear2_input" else h
        tensors[f"{base}.proj_lora.down.weight"] = down = torch.randn(4, width, generator=g) * 0.5
        tensors[f"{base}.proj_lora.up.weight"] = up = torch.randn(h, 4, generator=g) * 0.5
        outputs[f"single_transformer_blocks.{i}.proj_out"] = up @ down
    if variant == "linear2_input":
        path = write_file("flux_xlabs", tensors)
        want = diffusers_fused(flux, path, components=("transformer",))
    else:  # diffusers' reference for the rest, the output-side LoRA by hand
        rest = {k: v for k, v in tensors.items() if ".proj_lora." not in k or "double" in k}
        path = write_file("flux_xlabs_rest", rest)
        want = diffusers_fused(flux, path, components=("transformer",))
        write_file("flux_xlabs", tensors)
        state = flux.transformer.state_dict()
        for name, mix in outputs.items():
            want["transformer"][f"{name}.weight"] = state[f"{name}.weight"] + M * mix @ state[f"{name}.weight"]
            want["transformer"][f"{name}.bias"] = state[f"{name}.bias"] + M * mix @ state[f"{name}.bias"]
    original = model_state(flux)
    got = apply(flux, "flux_xlabs")
    assert check(got, want, original) >= 2 * 8 + 2 * 3 + 2 * (1 + (variant == "linear2_output"))
    assert_restored(flux, original)
