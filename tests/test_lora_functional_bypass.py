"""Functional mode's per-type bypass forwards (NetworkModule.bypass): for every adapter type, on Linear and Conv2d
layers (stride, padding, a reflect-padded conv), the layer's output plus the branch equals the layer run with its
merged weights, and where lycoris-lora has the algorithm (locon, loha, lokr, diag-oft, boft) the branch equals
LyCORIS's own `bypass_forward_diff` (its pure-torch backend). Branches on CPU fp32 layers hold no copies.
"""
import types

import lora_bypass
import lora_loader
import network
import network_lora
import pytest
import torch
import torch.nn.functional as F
from lycoris.functional import boft as ly_boft  # a required test dependency: missing fails, never skips
from lycoris.functional import diag_oft as ly_oft
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr

G = torch.Generator().manual_seed(77)


def rnd(*shape, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * scale


def linear(out_f: int = 8, in_f: int = 6) -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(in_f, out_f)


def conv(out_c: int = 8, in_c: int = 4, k: int = 3, stride: int = 2, mode: str = "zeros") -> torch.nn.Conv2d:
    torch.manual_seed(2)
    return torch.nn.Conv2d(in_c, out_c, k, stride=stride, padding=k // 2, padding_mode=mode)


def x_for(layer) -> torch.Tensor:
    if isinstance(layer, torch.nn.Linear):
        return rnd(2, 5, layer.in_features, scale=1.0)
    if isinstance(layer, torch.nn.Conv2d):
        return rnd(2, layer.in_channels, 7, 7, scale=1.0)
    return rnd(2, 6, 3, 3, scale=1.0) if isinstance(layer, torch.nn.GroupNorm) else rnd(2, 5, 6, scale=1.0)


def build(parts: dict, layer, key: str = "lora_unet_layer", metadata: dict | None = None):
    disk = None if metadata is None else types.SimpleNamespace(metadata=metadata, mtime=0.0, identity=("t",))
    net = network.Network("t", disk)
    weights = network.NetworkWeights(network_key=key, sd_key="unet.layer", w=dict(parts), sd_module=layer)
    module = lora_loader.build_module(net, weights)
    assert module is not None, f"no type claimed {sorted(parts)}"
    return module


def merged_out(module, layer, x, m: float, dyn=None) -> torch.Tensor:
    """The layer run with W + ΔW and b + Δb (compute(): the patcher's delta)."""
    bias = None if layer.bias is None else layer.bias.detach()
    dw, db = module.compute(layer.weight.detach(), m, dyn, orig_bias=bias)
    b = bias if db is None else (db if bias is None else bias + db.reshape(bias.shape))
    return lora_bypass.LayerOp(layer)(x, layer.weight.detach() + dw, b)


def branch_out(module, layer, x, m: float, dyn=None) -> tuple[torch.Tensor, torch.Tensor, lora_bypass.Bypass]:
    """(y0, Δy, branch) of the module's bypass forward."""
    branch = module.bypass(layer, m, dyn)
    with torch.no_grad():
        y0 = layer(x)
        return y0, branch(x, y0), branch


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err < tol, f"relative error {err:.2e}"


def check_merged(module, layer, m: float = 0.7, dyn=None, kind=None) -> torch.Tensor:
    """Bypass = merge; no copies on a CPU fp32 layer; returns Δy."""
    x = x_for(layer)
    y0, dy, branch = branch_out(module, layer, x, m, dyn)
    with torch.no_grad():
        close(y0 + dy, merged_out(module, layer, x, m, dyn))
    if kind is not None:
        assert isinstance(branch, kind), type(branch)
    return dy


def conv_args(layer) -> dict:
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}


# --- LoRA / LoCon / Tucker ----------------------------------------------------------------------------------------
def test_lora_linear_and_locon_conv_match_lycoris_and_the_merge():
    lin = linear()
    up, down = rnd(8, 3), rnd(3, 6)
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)}, lin)
    dy = check_merged(module, lin, 0.7, kind=network_lora.LowRankBypass)
    x = x_for(lin)
    ref = ly_locon.bypass_forward_diff(x, None, down, up, None, gamma=0.7 * 1.5 / 3, backend="torch")
    close(module.bypass(lin, 0.7)(x, lin(x)), ref)
    assert module.bypass(lin, 0.7).nbytes == 0 and dy.shape == (2, 5, 8)
    for layer in (conv(), conv(mode="reflect")):
        up, down = rnd(8, 2, 1, 1), rnd(2, 4, 3, 3)
        module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}, layer)
        check_merged(module, layer, 1.3, kind=network_lora.LowRankBypass)
        if layer.padding_mode == "zeros":
            x = x_for(layer)
            ref = ly_locon.bypass_forward_diff(x, None, down, up, None, gamma=1.3 * 0.5, extra_args=conv_args(layer),
                                               backend="torch")
            close(module.bypass(layer, 1.3)(x, layer(x)), ref)


def test_tucker_locon_and_dyn():
    layer = conv()
    up, mid, down = rnd(8, 3, 1, 1), rnd(3, 3, 3, 3), rnd(3, 4, 1, 1)
    module = build({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down,
                    "alpha": torch.tensor(2.0)}, layer)
    check_merged(module, layer, 0.8, kind=network_lora.LowRankBypass)
    check_merged(module, layer, 0.8, dyn=2, kind=network_lora.LowRankBypass)
    x = x_for(layer)
    ref = ly_locon.bypass_forward_diff(x, None, down, up, mid, gamma=0.8 * 2 / 3, extra_args=conv_args(layer),
                                       backend="torch")
    close(module.bypass(layer, 0.8)(x, layer(x)), ref)


def test_lora_1x1_conv_with_linear_factors_and_a1111_bias_part():
    layer = conv(8, 6, k=1, stride=1)
    up, down = rnd(8, 2), rnd(2, 6)
    check_merged(build({"lora_up.weight": up, "lora_down.weight": down}, layer), layer, 0.5,
                 kind=network_lora.LowRankBypass)
    lin = linear()
    module = build({"lora_up.weight": rnd(8, 2), "lora_down.weight": rnd(2, 6), "bias": rnd(8, 6),
                    "alpha": torch.tensor(1.0)}, lin)
    check_merged(module, lin, 0.6, kind=lora_bypass.Sum)


# --- LoHa ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_lycoris_and_the_merge(tucker):
    lin = linear()
    w1a, w1b, w2a, w2b = rnd(8, 2), rnd(2, 6), rnd(8, 2), rnd(2, 6)
    layer = conv()
    if tucker:
        a1, b1, a2, b2, t1, t2 = rnd(2, 8), rnd(2, 4), rnd(2, 8), rnd(2, 4), rnd(2, 2, 3, 3), rnd(2, 2, 3, 3)
        parts = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "hada_t1": t1, "hada_t2": t2,
                 "alpha": torch.tensor(1.0)}
        ly_weights = (b1, a1, b2, a2, t1, t2)  # LyCORIS: (w1d, w1u, w2d, w2u, t1, t2)
    else:
        c1a, c1b, c2a, c2b = rnd(8, 2), rnd(2, 4, 3, 3), rnd(8, 2), rnd(2, 4, 3, 3)
        parts = {"hada_w1_a": c1a, "hada_w1_b": c1b.flatten(1), "hada_w2_a": c2a, "hada_w2_b": c2b.flatten(1),
                 "alpha": torch.tensor(1.0)}
        ly_weights = (c1b, c1a, c2b, c2a, None, None)
        module = build({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                        "alpha": torch.tensor(1.0)}, lin)
        check_merged(module, lin, 0.9, kind=lora_bypass.Rebuilt)
        x = x_for(lin)
        ref = ly_loha.bypass_forward_diff(x, None, w1b, w1a, w2b, w2a, None, None, gamma=0.9 * 0.5, backend="torch")
        close(module.bypass(lin, 0.9)(x, lin(x)), ref)
    module = build(parts, layer)
    check_merged(module, layer, 0.9, kind=lora_bypass.Rebuilt)
    x = x_for(layer)
    ref = ly_loha.bypass_forward_diff(x, None, *ly_weights, gamma=0.9 * 0.5, extra_args=conv_args(layer),
                                      backend="torch")
    close(module.bypass(layer, 0.9)(x, layer(x)), ref)
    assert module.bypass(layer, 0.9).nbytes == 0


# --- LoKr ---------------------------------------------------------------------------------------------------------
def _lokr_ly(parts: dict) -> tuple:
    """LyCORIS's kron_bypass arguments; with Tucker its chain closes with w2_a as (out, rank), the transpose of the
    stored (rank, out), as its LokrModule passes it."""
    g = parts.get
    w2a = g("lokr_w2_a")
    if g("lokr_t2") is not None:
        w2a = w2a.T
    return (g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), w2a, g("lokr_w2_b"), g("lokr_t2"))


LOKR_LINEAR = [
    {"lokr_w1": rnd(2, 3), "lokr_w2": rnd(4, 2)},
    {"lokr_w1": rnd(2, 3), "lokr_w2_a": rnd(4, 1), "lokr_w2_b": rnd(1, 2), "alpha": torch.tensor(0.5)},
    {"lokr_w1_a": rnd(2, 1), "lokr_w1_b": rnd(1, 3), "lokr_w2": rnd(4, 2), "alpha": torch.tensor(2.0)},
]
LOKR_CONV = [
    {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(4, 2, 3, 3)},
    {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 2, 3, 3), "alpha": torch.tensor(1.0)},
    {"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(2, 4), "lokr_w2_b": rnd(2, 2), "lokr_t2": rnd(2, 2, 3, 3),
     "alpha": torch.tensor(1.0)},
]


@pytest.mark.parametrize("case", range(3))
def test_lokr_kronecker_forward_matches_lycoris_and_the_merge(case):
    import network_lokr

    for layer, parts in ((linear(8, 6), LOKR_LINEAR[case]), (conv(8, 4), LOKR_CONV[case])):
        module = build(parts, layer)
        check_merged(module, layer, 0.6, kind=network_lokr.KronBypass)
        x = x_for(layer)
        alpha = float(parts["alpha"]) if "alpha" in parts else 1.0
        extra = conv_args(layer) if isinstance(layer, torch.nn.Conv2d) else {}
        ref = ly_lokr.bypass_forward_diff(x, None, *_lokr_ly(parts), gamma=0.6 * alpha if module.dim else 1.0,
                                          extra_args=extra, backend="torch")
        if not module.dim:
            ref = ref * 0.6
        close(module.bypass(layer, 0.6)(x, layer(x)), ref)
        assert module.bypass(layer, 0.6).nbytes == 0


def test_lokr_flat_w2b_on_a_conv():
    layer = conv(8, 4)
    module = build({"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 2 * 9),
                    "alpha": torch.tensor(1.0)}, layer)
    import network_lokr
    check_merged(module, layer, 1.0, kind=network_lokr.KronBypass)


# --- IA3, GLoRA, full, norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_both_sides(on_input):
    for layer in (linear(), conv()):
        n = layer.weight.shape[1] if on_input else layer.weight.shape[0]
        module = build({"weight": rnd(n), "on_input": torch.tensor(int(on_input))}, layer)
        check_merged(module, layer, 0.6)
        assert module.bypass(layer, 0.6).nbytes == 0


def test_glora_both_layouts_linear_and_conv():
    lin = linear(8, 6)
    new = build({"a1.weight": rnd(6, 2), "a2.weight": rnd(2, 6), "b1.weight": rnd(8, 2), "b2.weight": rnd(2, 6),
                 "alpha": torch.tensor(1.0)}, lin)
    check_merged(new, lin, 0.5)
    old = build({"a1.weight": rnd(2, 6), "a2.weight": rnd(6, 2), "b1.weight": rnd(2, 6), "b2.weight": rnd(8, 2),
                 "alpha": torch.tensor(1.0)}, lin)
    assert old.layout_for((8, 6))
    check_merged(old, lin, 0.5)
    layer = conv(8, 4)
    a1, a2, b1 = rnd(4, 2, 1, 1), rnd(2, 4, 1, 1), rnd(8, 2, 1, 1)
    check_merged(build({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": rnd(2, 4, 3, 3),
                        "alpha": torch.tensor(2.0)}, layer), layer, 0.8)
    tucker = build({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": rnd(2, 4, 1, 1),
                    "bm.weight": rnd(2, 2, 3, 3), "alpha": torch.tensor(2.0)}, layer)
    check_merged(tucker, layer, 0.8)
    old_conv = build({"a1.weight": rnd(2, 36), "a2.weight": rnd(36, 2), "b1.weight": rnd(2, 36),
                      "b2.weight": rnd(8, 2), "alpha": torch.tensor(1.0)}, layer)
    check_merged(old_conv, layer, 0.8)
    assert 0 < tucker.bypass(layer, 0.8).nbytes <= 8 * 2 * 9 * 4  # W ×₁ a1 only: out × rank × kernel


def test_full_and_norm():
    lin = linear()
    check_merged(build({"diff": rnd(8, 6), "diff_b": rnd(8)}, lin), lin, 0.5)
    for layer in (torch.nn.LayerNorm(6), torch.nn.GroupNorm(2, 6)):
        check_merged(build({"w_norm": rnd(6), "b_norm": rnd(6)}, layer), layer, 0.5)


# --- OFT / BOFT ---------------------------------------------------------------------------------------------------
def test_diag_oft_rotates_the_output_like_lycoris():
    for layer in (linear(8, 6), conv(8, 4)):
        blocks, rescale = rnd(4, 2, 2), rnd(8, 1) + 1
        alpha = 0.05
        module = build({"oft_blocks": blocks, "rescale": rescale, "alpha": torch.tensor(alpha)}, layer)
        for m in (1.0, 0.4):
            check_merged(module, layer, m)
        x = x_for(layer)
        y0 = layer(x).detach()
        without_bias = y0 - module.bypass(layer, 1.0).op.per_channel(layer.bias.detach(), y0)
        conv_layer = isinstance(layer, torch.nn.Conv2d)
        ly_rescale = rescale.reshape(8, *([1] * (3 if conv_layer else 1)))
        ref = ly_oft.bypass_forward_diff(x, without_bias, blocks, ly_rescale, constraint=alpha * 8,
                                         need_transpose=conv_layer, backend="torch")
        close(module.bypass(layer, 1.0)(x, y0), ref)  # LyCORIS's merge leaves the bias; its bypass gets y0 − b
        assert module.bypass(layer, 1.0).nbytes == 0


def test_kohya_oft_and_old_oft_diag_and_boft():
    lin = linear(8, 6)
    check_merged(build({"oft_blocks": rnd(4, 2, 2), "alpha": torch.tensor(0.01)}, lin, key="oft_unet_layer"), lin, 0.7)
    q = rnd(4, 2, 2)
    q = q - q.transpose(1, 2)
    eye = torch.eye(2)
    check_merged(build({"oft_diag": (eye + q) @ torch.linalg.inv(eye - q)}, lin), lin, 0.5)
    for layer in (linear(8, 3), conv(8, 4)):
        blocks = rnd(2, 4, 2, 2)
        module = build({"oft_blocks": blocks, "alpha": torch.tensor(0.0)}, layer)
        check_merged(module, layer, 0.6)
        x = x_for(layer)
        y0 = layer(x).detach()
        z = y0 - module.bypass(layer, 0.6).op.per_channel(layer.bias.detach(), y0)
        ref = ly_boft.bypass_forward_diff(z, blocks, None, constraint=0.0, scale=0.6,
                                          need_transpose=isinstance(layer, torch.nn.Conv2d), backend="torch")
        close(module.bypass(layer, 0.6)(x, y0), ref)


# --- DoRA, generic paths, dtype -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_wrapper_on_lora_loha_lokr(axis):
    for layer in (linear(8, 6), conv(8, 4)):
        out_c, in_c = layer.weight.shape[:2]
        extra = [1] * (layer.weight.dim() - 2)
        magnitude = (rnd(out_c, 1, *extra) if axis == "output" else rnd(1, in_c, *extra)).abs() + 0.5
        flat_in = layer.weight[0].numel()
        for parts in ({"lora_up.weight": rnd(out_c, 2), "lora_down.weight": rnd(2, flat_in)},
                      {"hada_w1_a": rnd(out_c, 2), "hada_w1_b": rnd(2, flat_in), "hada_w2_a": rnd(out_c, 2),
                       "hada_w2_b": rnd(2, flat_in)},
                      {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(out_c // 2, in_c // 2, *layer.weight.shape[2:])}):
            module = build({**parts, "alpha": torch.tensor(1.0), "dora_scale": magnitude}, layer)
            for m in (1.0, 0.4):
                check_merged(module, layer, m, kind=lora_bypass.DoraBypass)
            assert module.bypass(layer, 1.0).nbytes == 4 * (out_c if axis == "output" else in_c)


def test_subclass_with_its_own_math_and_padded_conv_in_take_the_computed_path():
    layer = linear()

    class Doubled(network_lora.NetworkModuleLora):
        def calc_delta(self, *args, **kwargs):
            updown, shape, bias = super().calc_delta(*args, **kwargs)
            return updown * 2, shape, bias

    module = build({"lora_up.weight": rnd(8, 2), "lora_down.weight": rnd(2, 6)}, layer)
    module.__class__ = Doubled
    check_merged(module, layer, 0.5, kind=lora_bypass.ComputedBypass)
    assert module.delta_depends_on_weight  # changed math: the residual restore must not trust it
    inpaint = conv(8, 9, stride=1)
    padded = build({"lora_up.weight": rnd(8, 2, 1, 1), "lora_down.weight": rnd(2, 4, 3, 3)}, inpaint)
    check_merged(padded, inpaint, 1.0, kind=lora_bypass.ComputedBypass)


def test_bf16_layer_follows_the_merge():
    layer = linear(64, 48).to(torch.bfloat16)
    module = build({"lora_up.weight": rnd(64, 4), "lora_down.weight": rnd(4, 48), "alpha": torch.tensor(4.0)}, layer)
    x = rnd(3, 48, scale=1.0).to(torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x)
        got = (y0.float() + module.bypass(layer, 1.0)(x, y0).float())
        dw, _ = module.compute(layer.weight.detach(), 1.0)
        want = F.linear(x.float(), layer.weight.float() + dw, layer.bias.float())
    close(got, want, 2e-2)


def test_on_another_device_a_branch_holds_one_copy_of_its_factors_in_the_compute_dtype():
    """A layer whose device is not the factors' (meta stands for an accelerator): each branch keeps one copy of the
    factors there in the layer's dtype, plus what it derives from the weight; never a weight-sized tensor."""
    with torch.device("meta"):
        lin = torch.nn.Linear(48, 64, dtype=torch.bfloat16)
    cases = {
        "lora": ({"lora_up.weight": rnd(64, 4), "lora_down.weight": rnd(4, 48)}, (64 + 48) * 4),
        "loha": ({"hada_w1_a": rnd(64, 4), "hada_w1_b": rnd(4, 48), "hada_w2_a": rnd(64, 4),
                  "hada_w2_b": rnd(4, 48)}, 2 * (64 + 48) * 4),
        "lokr": ({"lokr_w1": rnd(8, 6), "lokr_w2": rnd(8, 8)}, 8 * 6 + 8 * 8),
        "oft": ({"oft_blocks": rnd(8, 8, 8)}, 8 * 8 * 8),
        "glora": ({"a1.weight": rnd(48, 4), "a2.weight": rnd(4, 48), "b1.weight": rnd(64, 4),
                   "b2.weight": rnd(4, 48)}, 4 * (48 + 48 + 64 + 48) + 64 * 4),
    }
    for kind, (parts, elements) in cases.items():
        branch = build(parts, lin).bypass(lin, 0.5)
        assert branch.nbytes == 2 * elements, kind
