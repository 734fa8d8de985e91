"""Differential tests against lycoris-lora (test-only dependency): every algorithm it offers, trained-module math as
ground truth.

For each case a LyCORIS network is created on a tiny SD1 / SDXL model the way kohya's trainer does
(`lycoris.kohya.create_network` + `apply_to`), its factors are set to random non-zero values, and it is saved in
kohya format. The reference weight of every targeted layer is read off the patched layer's own forward pass in
fp64 (a black box: y(x) for identity / random inputs, solved for W and b), not from LyCORIS's `merge_to` or
`get_diff_weight` (which apply alpha/dim twice for LoHa and LoKr) and not from its loader (which fails on IA3,
input-axis DoRA and low-rank LoKr). The saved file is then merged with our loader and patcher into a fresh copy
of the model: every targeted layer must match within 1e-5 (relative, fp32), every other parameter bitwise.
"""
import copy
import logging

import lycoris.kohya as lycoris_kohya  # a required test dependency: missing fails, never skips
import networks
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

# (case id, algo, create_network kwargs, strength, std of the random factors added to LyCORIS's init)
CASES = [
    ("locon", "locon", {}, 1.0, 0.1),
    ("locon-strength", "locon", {}, 0.6, 0.1),
    ("locon-tucker", "locon", {"use_tucker": True}, 1.0, 0.1),
    ("locon-dora-out", "locon", {"dora_wd": True, "wd_on_output": True}, 1.0, 0.1),
    ("locon-dora-in", "locon", {"dora_wd": True, "wd_on_output": False}, 1.0, 0.1),
    ("locon-norm", "locon", {"train_norm": True}, 1.0, 0.1),
    ("loha", "loha", {}, 1.0, 0.2),
    ("loha-tucker", "loha", {"use_tucker": True}, 0.8, 0.2),
    ("loha-dora-out", "loha", {"dora_wd": True, "wd_on_output": True, "use_tucker": True}, 1.0, 0.2),
    ("lokr", "lokr", {"factor": 4, "network_dim": 2, "conv_dim": 2}, 1.0, 0.1),
    ("lokr-tucker", "lokr", {"factor": 4, "network_dim": 2, "conv_dim": 2, "use_tucker": True}, 0.7, 0.1),
    ("lokr-both-lowrank", "lokr", {"factor": 8, "network_dim": 2, "conv_dim": 2, "decompose_both": True,
                                   "unbalanced_factorization": True}, 1.0, 0.1),
    ("lokr-full-matrix", "lokr", {"full_matrix": True}, 1.0, 0.1),
    ("lokr-dora-in", "lokr", {"factor": 4, "network_dim": 2, "conv_dim": 2, "dora_wd": True,
                              "wd_on_output": False}, 1.0, 0.1),
    ("ia3-out", "ia3", {}, 1.0, 0.3),
    ("ia3-in", "ia3", {"train_on_input": True}, 0.5, 0.3),
    ("full", "full", {}, 1.0, 0.05),
    ("diag-oft", "diag-oft", {}, 1.0, 0.1),
    ("diag-oft-strength", "diag-oft", {}, 0.4, 0.1),
    ("diag-oft-constraint-rescale", "diag-oft", {"constraint": 1e-3, "rescaled": True}, 1.0, 0.1),
    ("boft", "boft", {}, 1.0, 0.1),
    ("boft-strength", "boft", {}, 0.4, 0.1),
    ("boft-constraint-rescale", "boft", {"constraint": 1e-3, "rescaled": True}, 1.0, 0.1),
    ("glora", "glora", {}, 1.0, 0.1),
]


# Cases whose file is rewritten with the other CLIP key spelling: LyCORIS on transformers 5 writes
# `lora_te_encoder_*` (CLIPTextModel has no `text_model.` level there) where real files have
# `lora_te_text_model_encoder_*`, and `lora_te2_text_model_encoder_*` for CLIPTextModelWithProjection.
SWAP_TE_SPELLING = {"locon-strength", "loha-tucker"}


def _swap_te_spelling(key: str) -> str:
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if key.startswith(prefix + "text_model_encoder_"):
            return prefix + key[len(prefix + "text_model_"):]
        if key.startswith(prefix + "encoder_"):
            return prefix + "text_model_" + key[len(prefix):]
    return key


@pytest.fixture(scope="module")
def preset_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text(PRESET)
    return str(path)


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """LyCORIS logs every module it makes; tiny tensors run fastest (and do not fight other jobs) on one thread."""
    logger = logging.getLogger("LyCORIS")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    logger.setLevel(level)


def _text_encoders(model):
    return model.text_encoder if model.text_encoder_2 is None else [model.text_encoder, model.text_encoder_2]


def create_trained_network(model, algo: str, kwargs: dict, preset: str, std: float, seed: int):
    """A LyCORIS network applied to `model` as kohya's trainer does, with random non-zero factors."""
    kwargs = dict(kwargs)
    dim = kwargs.pop("network_dim", 4)
    kwargs.setdefault("conv_dim", dim)
    kwargs.setdefault("conv_alpha", 1.5)
    net = lycoris_kohya.create_network(1.0, dim, 1.5, None, _text_encoders(model), model.unet, algo=algo,
                                       preset=preset, **kwargs)
    net.apply_to(_text_encoders(model), model.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return net


def affine_of(layer: torch.nn.Module, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the fp64 function `fn`, affine in its input and shaped like `layer`, read off its outputs."""
    if isinstance(layer, torch.nn.Linear):
        n = layer.in_features
        x = torch.cat([torch.eye(n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)])
        y = fn(x)
        return (y[:n] - y[n]).T, y[n]
    if isinstance(layer, torch.nn.Conv2d):
        return _conv_affine(layer, fn)
    # norms: fn(x) = n(x)·w + b and n(−x) = −n(x)
    g = torch.Generator().manual_seed(2)
    if isinstance(layer, torch.nn.LayerNorm):
        x = torch.randn(1, 3, *layer.normalized_shape, dtype=torch.float64, generator=g)
        n = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        pick = (0, 0)
    else:
        x = torch.randn(1, layer.num_channels, 3, 3, dtype=torch.float64, generator=g)
        n = F.group_norm(x, layer.num_groups, eps=layer.eps)
        pick = (0, slice(None), 0, 0)
    y1, y2 = fn(x), fn(-x)
    return ((y1 - y2) / (2 * n))[pick], ((y1 + y2) / 2)[pick]


def _conv_affine(layer: torch.nn.Conv2d, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Impulse responses: a 1 at pixel (P, Q) of channel c shows W[:, c, a, b] at output (i, j) with
    i·stride + a − padding = P. One impulse per stride residue, so strided convs show every kernel tap."""
    assert layer.dilation == (1, 1) and layer.groups == 1
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    cin = layer.in_channels
    p0, q0 = kh + ph, kw + pw
    x = torch.zeros(cin, sh, sw, cin, p0 + sh + kh + 1, q0 + sw + kw + 1, dtype=torch.float64)
    for u in range(sh):
        for v in range(sw):
            x[torch.arange(cin), u, v, torch.arange(cin), p0 + u, q0 + v] = 1.0
    zero = fn(torch.zeros(1, *x.shape[3:], dtype=torch.float64))
    y = (fn(x.reshape(-1, *x.shape[3:])) - zero).reshape(cin, sh, sw, -1, *zero.shape[2:])
    weight = torch.empty(y.shape[3], cin, kh, kw, dtype=torch.float64)
    for a in range(kh):
        u = (a - ph - p0) % sh
        i = (p0 + u + ph - a) // sh
        for b in range(kw):
            v = (b - pw - q0) % sw
            j = (q0 + v + pw - b) // sw
            weight[:, :, a, b] = y[:, u, v, :, i, j].T
    return weight, zero[0, :, 0, 0]


def _to_double(model) -> None:
    for comp in model.components().values():
        if comp is not None:
            comp.double()


def _params(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, comp in model.components().items() if comp is not None
            for k, v in comp.state_dict().items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _run_case(request, lora_dir, preset_path, family: str, case_id: str, algo: str, kwargs: dict,
              strength: float, std: float):
    model = request.getfixturevalue(f"tiny_{family}")
    ours = copy.deepcopy(model)
    original = _params(ours)
    layers = networks.lora_layers.get_layer_map(ours).layers
    originals = {name: (layer.weight.detach().double(), None if getattr(layer, "bias", None) is None
                        else layer.bias.detach().double()) for name, layer in layers.items()
                 if getattr(layer, "weight", None) is not None}

    net = create_trained_network(model, algo, kwargs, preset_path, std, seed=len(case_id))
    name = f"lyco_{family}_{case_id}"
    path = str(lora_dir / f"{name}.safetensors")
    net.save_weights(path, torch.float32, {"ss_network_module": "lycoris.kohya"})
    rename = _swap_te_spelling if case_id in SWAP_TE_SPELLING else (lambda key: key)
    if case_id in SWAP_TE_SPELLING:
        tensors = safetensors.torch.load_file(path)
        assert any(rename(k) != k for k in tensors)
        safetensors.torch.save_file({rename(k): v for k, v in tensors.items()}, path)
    networks.list_available_networks()

    # ground truth: the trained modules' forward pass, in fp64, at the strength under test
    _to_double(model)
    if algo not in ("diag-oft", "boft"):  # LyCORIS inverts the OFT blocks in fp32 and cannot mix that with fp64
        net.double()
    for lora in net.loras:
        lora.multiplier = strength
    assert net.loras, "LyCORIS created no modules"

    report = networks.load_networks([name], [strength], [strength], [None], sd_model=ours)
    loaded = report.networks[0]
    assert not report.load_errors and not report.fatal
    assert not loaded.load_errors and not loaded.apply_errors, (loaded.load_errors, loaded.apply_errors)
    assert not loaded.unmatched_keys and not loaded.unsupported_keys and not loaded.unused_keys
    by_key = {module.network_key: canonical for canonical, module in loaded.modules.items()}
    assert len(by_key) == len(net.loras)

    ref_layers = networks.lora_layers.LayerMap(model).layers
    touched = set()
    with torch.no_grad():
        for lora in net.loras:
            canonical = by_key[rename(lora.lora_name)]
            layer = layers[canonical]
            ref_w, ref_b = affine_of(layer, ref_layers[canonical])
            base_w, b0 = originals[canonical]
            w0 = base_w.float()
            base_b = torch.zeros_like(ref_b) if b0 is None else b0
            if torch.equal(ref_w, base_w):  # e.g. diag-OFT on 4 channels: 1×1 blocks, no rotation in LyCORIS either
                assert torch.equal(layer.weight, w0), f"{canonical} was changed although LyCORIS leaves it as it is"
            else:
                assert not torch.equal(layer.weight, w0), f"{canonical} was not changed"
            err = _rel(layer.weight, ref_w)
            assert err < 1e-5, f"{canonical}: merged weight differs from LyCORIS by {err:.2e}"
            delta_err = _rel(layer.weight.double() - w0.double(), ref_w - base_w)
            assert delta_err < 1e-4, f"{canonical}: delta differs from LyCORIS by {delta_err:.2e}"
            bias_changed = not torch.allclose(ref_b, base_b, rtol=0, atol=1e-12)
            if bias_changed:
                assert _rel(layer.bias, ref_b) < 1e-5, f"{canonical}: bias differs from LyCORIS"
            elif layer.bias is not None:
                assert torch.equal(layer.bias.double(), b0), f"{canonical}: bias was changed"
            touched.add((id(layer), "weight"))
            if bias_changed:
                touched.add((id(layer), "bias"))

    touched_names = {f"{comp}.{path}.{attr}" for comp, module in ours.components().items() if module is not None
                     for path, layer in module.named_modules() for attr in ("weight", "bias")
                     if (id(layer), attr) in touched}
    now = _params(ours)
    assert now.keys() == original.keys()
    for key, value in now.items():
        if key not in touched_names:
            assert torch.equal(value, original[key]), f"{key} changed although no LyCORIS module targets it"
    assert len(touched_names) >= len(net.loras)


@pytest.mark.parametrize("case_id,algo,kwargs,strength,std", CASES, ids=[c[0] for c in CASES])
def test_sd1_matches_lycoris_forward(request, lora_dir, preset_path, case_id, algo, kwargs, strength, std):
    _run_case(request, lora_dir, preset_path, "sd1", case_id, algo, kwargs, strength, std)


@pytest.mark.parametrize("case_id,algo,kwargs,strength,std", CASES, ids=[c[0] for c in CASES])
def test_sdxl_matches_lycoris_forward(request, lora_dir, preset_path, case_id, algo, kwargs, strength, std):
    _run_case(request, lora_dir, preset_path, "sdxl", case_id, algo, kwargs, strength, std)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dyn_matches_lycoris_dylora_at_the_rank_it_trained(request, lora_dir, preset_path, family):
    """`dyn=d` on a DyLoRA file = LyCORIS DyLoRA's forward when it draws d ranks (unit blocks): the first d ranks
    scaled by alpha/d. The draw is `random.randint`, seeded here before every forward."""
    import random

    model = request.getfixturevalue(f"tiny_{family}")
    ours = copy.deepcopy(model)
    layers = networks.lora_layers.get_layer_map(ours).layers
    originals = {name: layer.weight.detach().double() for name, layer in layers.items()
                 if getattr(layer, "weight", None) is not None}
    net = create_trained_network(model, "dylora", {"block_size": 1}, preset_path, 0.1, seed=7)
    seed = 1
    random.seed(seed)
    drawn = random.randint(0, net.loras[0].block_count - 1)
    dyn = drawn + 1  # LyCORIS uses blocks [0, drawn], i.e. drawn + 1 ranks of size 1
    assert dyn < net.loras[0].lora_dim, "the seeded draw must truncate"
    name = f"dylora_{family}"
    net.save_weights(str(lora_dir / f"{name}.safetensors"), torch.float32, {})
    networks.list_available_networks()
    _to_double(model)
    net.double()

    report = networks.load_networks([name], [1.0], [1.0], [dyn], sd_model=ours)
    loaded = report.networks[0]
    assert not loaded.load_errors and not loaded.apply_errors and not loaded.unused_keys
    by_key = {module.network_key: canonical for canonical, module in loaded.modules.items()}
    ref_layers = networks.lora_layers.LayerMap(model).layers
    with torch.no_grad():
        for lora in net.loras:
            canonical = by_key[lora.lora_name]
            trained = ref_layers[canonical]

            def forward(x, trained=trained):
                random.seed(seed)
                return trained(x)

            ref_w, _ = affine_of(layers[canonical], forward)
            err = _rel(layers[canonical].weight.double() - originals[canonical], ref_w - originals[canonical])
            assert err < 1e-4, f"{canonical}: dyn={dyn} delta differs from LyCORIS DyLoRA by {err:.2e}"
