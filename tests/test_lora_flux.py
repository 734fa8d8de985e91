"""Flux.1 Lora formats on a tiny Flux model (2 double and 2 single blocks, 32 wide: not Flux.1-dev's 3072, so a
split hard-coded to 3072 would fail), each against an independent reference:

- BFL-named files (kohya/sd-scripts, ComfyUI, LyCORIS LoHa/LoKr/full/DoRA through sd-scripts): the Lora merged into a
  BFL-layout state dict by the plain formula (LyCORIS types by lycoris-lora's functional modules), then converted by
  diffusers' own single-file converter, which says which rows of a fused layer are which diffusers layer;
- diffusers-named files (ai-toolkit / PEFT), XLabs files and kohya double blocks: diffusers' `load_lora_weights` +
  `fuse_lora` on a FluxPipeline made of the same components;
- OneTrainer / SimpleTuner / raw-PEFT spellings and the text encoders (CLIP-L `lora_te1_`, T5 `lora_te2_`):
  W + m·alpha/r·up@down per layer.
Every targeted parameter within 1e-5 relative error (fp32), every other parameter bitwise unchanged, and bitwise
restored after the Lora is removed.
"""
import copy
import os

import flux_models
import lycoris.functional.general as lyco_general
import lycoris.functional.loha as lyco_loha
import lycoris.functional.lokr as lyco_lokr
import networks
import pytest
import safetensors.torch
import torch

M = 0.7  # the tag's multiplier in most cases


@pytest.fixture(scope="session")
def _tiny_flux() -> flux_models.TinyFluxModel:
    return flux_models.build_tiny_flux()


@pytest.fixture
def flux(_tiny_flux) -> flux_models.TinyFluxModel:
    return copy.deepcopy(_tiny_flux)


@pytest.fixture
def write_file(write_lora):
    """write_file(name, tensors, metadata=None) → path of a Lora file with only these tensors (and metadata)."""
    return lambda name, tensors, metadata=None: write_lora(name, tensors=tensors, metadata=metadata or {})


def _state(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in model.components().items()}


def assert_rel(got: torch.Tensor, want: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))
    assert err < tol, f"{name}: relative error {err:.2e}"


def check(got: dict, want: dict, original: dict) -> int:
    """Targeted (want ≠ original) within 1e-5 relative; the rest bitwise. Returns the targeted count."""
    changed = 0
    for component, state in want.items():
        assert got[component].keys() == state.keys()
        for key, value in state.items():
            name = f"{component}.{key}"
            if torch.equal(value, original[component][key]):
                assert torch.equal(got[component][key], value), f"{name} changed"
            else:
                assert_rel(got[component][key], value, name)
                changed += 1
    return changed


def apply(model, name: str, multiplier: float = M, te: float | None = None) -> dict:
    report = networks.load_networks([name], [M if te is None else te], [multiplier], sd_model=model)
    net = report.networks[0]
    assert not net.unmatched_keys and not net.unsupported_keys and not net.unused_keys, net.unmatched_keys[:5]
    assert not net.load_errors and not net.apply_errors and not report.fatal, (net.load_errors, net.apply_errors)
    return _state(model)


def assert_restored(model, original: dict) -> None:
    networks.load_networks([], sd_model=model)
    for component, state in _state(model).items():
        for key, value in state.items():
            assert torch.equal(value, original[component][key]), f"{component}.{key} not restored"


# --- file makers -------------------------------------------------------------------------------------------------
def bfl_linears(bfl: dict) -> list[str]:
    return [k[:-len(".weight")] for k, v in bfl.items() if k.endswith(".weight") and v.dim() == 2]


def lora_factors(shapes: dict[str, tuple[int, int]], rank: int = 2, seed: int = 0) -> dict:
    """{layer: (down, up, alpha)} with factors large enough that a wrong row split shows."""
    g = torch.Generator().manual_seed(seed)
    res = {}
    for i, (name, (out, inp)) in enumerate(sorted(shapes.items())):
        res[name] = (torch.randn(rank, inp, generator=g) * 0.5, torch.randn(out, rank, generator=g) * 0.5,
                     float(1 + i % 3))
    return res


def text_shapes(model) -> dict[str, tuple[int, int]]:
    return {f"{component}.{path}": tuple(m.weight.shape)
            for component, module in model.components().items() if component.startswith("text_encoder")
            for path, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def kohya_text_keys(name: str, t5_prefix: str = "lora_te3_") -> str:
    """kohya/sd-scripts: CLIP-L `lora_te1_text_model_…` (transformers 4's `text_model.` level kept), T5 `lora_te3_…`
    (OneTrainer and older forks: `lora_te2_`)."""
    component, _, path = name.partition(".")
    if ".block." not in path:
        return "lora_te1_text_model_" + path.removeprefix("text_model.").replace(".", "_")
    return t5_prefix + path.replace(".", "_")


def write_factors(factors: dict, base_of, down="lora_down.weight", up="lora_up.weight", alpha=True) -> dict:
    tensors = {}
    for name, (d, u, a) in factors.items():
        base = base_of(name)
        tensors[f"{base}.{down}"] = d
        tensors[f"{base}.{up}"] = u
        if alpha:
            tensors[f"{base}.alpha"] = torch.tensor(a)
    return tensors


def merged_bfl(bfl: dict, deltas: dict[str, torch.Tensor]) -> dict:
    res = dict(bfl)
    for name, delta in deltas.items():
        res[f"{name}.weight"] = bfl[f"{name}.weight"] + delta
    return res


def lora_delta(d, u, a, m=M, alpha=True) -> torch.Tensor:
    return m * (a / d.shape[0] if alpha else 1.0) * (u @ d)


def expected_text(model, factors: dict, m=M) -> dict:
    """W + m·alpha/r·up@down on the text encoders' own Linears."""
    res = {}
    for component in [c for c in model.components() if c.startswith("text_encoder")]:
        state = {k: v.detach().clone() for k, v in getattr(model, component).state_dict().items()}
        for name, (d, u, a) in factors.items():
            c, _, path = name.partition(".")
            if c == component:
                state[f"{path}.weight"] = state[f"{path}.weight"] + lora_delta(d, u, a, m)
        res[component] = state
    return res


def diffusers_fused(model, path: str, components=("transformer", "text_encoder"), scale: float = M) -> dict:
    ref = copy.deepcopy(model)
    pipe = flux_models.flux_pipeline(ref)
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="x",
                            low_cpu_mem_usage=False)
    pipe.fuse_lora(components=list(components), lora_scale=scale)
    pipe.unload_lora_weights()
    return _state(ref)


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
    original = _state(flux)
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
    original = _state(flux)
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
    want = {"transformer": flux_models.convert_bfl(merged), "text_encoder": _state(flux)["text_encoder"],
            "text_encoder_2": _state(flux)["text_encoder_2"]}
    original = _state(flux)
    got = apply(flux, f"flux_{algo}", multiplier=m)
    assert check(got, want, original) >= 12
    assert_restored(flux, original)


# --- diffusers-named files ------------------------------------------------------------------------------------------
def _diffusers_linears(model) -> dict[str, tuple[int, int]]:
    return {path: tuple(m.weight.shape) for path, m in model.transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("dora", [False, True])
def test_peft_lora_and_dora_match_diffusers(flux, write_file, dora):
    """ai-toolkit / diffusers PEFT: `transformer.<module>.lora_A/lora_B` (no alpha: scale 1), with a DoRA magnitude
    per output channel, and CLIP-L `text_encoder.`, merged by diffusers. DoRA at strength 1:
    PEFT scales ΔW inside the norm, we scale the whole DoRA delta (README)."""
    m = 1.0 if dora else M
    factors = lora_factors(_diffusers_linears(flux))
    tensors = write_factors(factors, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight", alpha=False)
    g = torch.Generator().manual_seed(9)
    for name in factors if dora else []:  # PEFT's use_dora covers every layer of the adapter
        out = factors[name][1].shape[0]
        tensors[f"transformer.{name}.lora_magnitude_vector"] = 1 + torch.rand(out, generator=g)
    clip = {k: v for k, v in lora_factors(text_shapes(flux), seed=2).items() if k.startswith("text_encoder.")}
    tensors.update(write_factors(clip, lambda n: n, "lora_A.weight", "lora_B.weight", alpha=False))
    path = write_file("flux_peft", tensors)
    want = diffusers_fused(flux, path, scale=m)
    original = _state(flux)
    got = apply(flux, "flux_peft", multiplier=m, te=m)
    assert check(got, want, original) == len(networks.loaded_networks[0].modules) > 60


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_", "base_model.model."])
def test_onetrainer_simpletuner_and_raw_peft_spellings(flux, write_file, prefix):
    factors = lora_factors(_diffusers_linears(flux), seed=4)
    sep = "." if prefix.endswith(".") else "_"
    tensors = write_factors(factors, lambda n: prefix + (n if sep == "." else n.replace(".", "_")))
    write_file("flux_names", tensors)
    want = _state(flux)
    for name, (d, u, a) in factors.items():
        want["transformer"][f"{name}.weight"] = want["transformer"][f"{name}.weight"] + lora_delta(d, u, a)
    original = _state(flux)
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
    original = _state(flux)
    got = apply(flux, "flux_xlabs")
    assert check(got, want, original) >= 2 * 8 + 2 * 3 + 2 * (1 + (variant == "linear2_output"))
    assert_restored(flux, original)


# --- coverage: every key applied or named --------------------------------------------------------------------------
def test_flux_lora_parts_not_applied_are_named(flux, write_file):
    import lora_coverage
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
    import lora_coverage
    bfl = flux_models.bfl_state_dict()
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in bfl_linears(bfl)[:6]})
    write_file("flux_file", write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_")))
    write_lora("sdxl_file", tiny_sdxl, family="sdxl")
    before = _state(flux)
    networks.load_networks(["sdxl_file"], sd_model=flux)
    lines = lora_coverage.messages(lora_coverage.coverage_of(networks.loaded_networks[0], "Flux"))
    assert lines[0].endswith("it looks like an SDXL LoRA, the loaded model is Flux"), lines
    assert all(torch.equal(v, before[c][k]) for c, s in _state(flux).items() for k, v in s.items())
    networks.load_networks(["flux_file"], sd_model=tiny_sdxl)
    lines = lora_coverage.messages(lora_coverage.coverage_of(networks.loaded_networks[0], "SDXL"))
    assert lines[0].endswith("it looks like a Flux LoRA, the loaded model is SDXL"), lines
    networks.load_networks([], sd_model=tiny_sdxl)


def test_chroma_takes_flux_block_loras_and_its_own_layers(write_file):
    """Chroma: Flux.1's blocks without modulation Linears, plus a distilled guidance layer. A Flux LoRA's block
    layers apply, its modulation layers are named as unmatched."""
    import lora_coverage
    model = flux_models.build_tiny_flux(chroma=True)
    bfl = flux_models.bfl_state_dict(chroma=True)
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "distilled_guidance_layer.layers.0.in_layer"]
    factors = lora_factors({n: tuple(bfl[f"{n}.weight"].shape) for n in names})
    tensors = write_factors(factors, lambda n: "lora_unet_" + n.replace(".", "_"))
    tensors["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.zeros(2, 32)
    t5 = {k: v for k, v in lora_factors(text_shapes(model), seed=8).items() if ".SelfAttention." in k}
    tensors.update(write_factors(t5, kohya_text_keys))  # Chroma's T5 is its text_encoder: lora_te3_ still finds it
    write_file("chroma", tensors)
    original = _state(model)
    want = {"transformer": flux_models.convert_bfl(merged_bfl(bfl, {n: lora_delta(*f) for n, f in factors.items()}),
                                                   chroma=True), **expected_text(model, t5)}
    networks.load_networks(["chroma"], [M], [M], sd_model=model)
    net = networks.loaded_networks[0]
    assert net.unmatched_keys == ["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"]
    assert check(_state(model), want, original) == 3 + 4 + 1 + len(t5) > 10
    assert "1 keys unmatched" in lora_coverage.messages(lora_coverage.coverage_of(net, "Chroma"))[0]


def test_flux_hints_from_keys_and_shapes():
    import lora_files
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
    original = _state(flux)
    want = {"transformer": flux_models.convert_bfl(want_bfl), "text_encoder": original["text_encoder"],
            "text_encoder_2": original["text_encoder_2"]}
    assert check(apply(flux, "flux_bf16"), want, original) == 4


def test_functional_mode_gives_the_merged_layers(flux, write_file, monkeypatch):
    """lora_functional on: split low-rank pieces run as low-rank hooks, row pieces of other types and XLabs' output-side
    LoRA as dense hooks (with their bias deltas); each layer's output equals the merged layer's."""
    from modules import shared
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
    original = _state(flux)
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
