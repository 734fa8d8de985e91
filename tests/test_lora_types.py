"""Formula tests for every network type: each delta against the math written out independently here.

Covers scale (alpha/rank, `scale`), strength, dyn truncation, bias parts, DoRA on both axes (and the 1-D square
rule), conv kernels, and the kohya OFT forward (which turns the bias too). Modules are built the way the loader
builds them (`lora_loader.build_module`, validation against a real layer included).
"""
import types

import lora_loader
import network
import pytest
import torch

G = torch.Generator().manual_seed(1234)


def rnd(*shape, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * scale


def build(parts: dict, layer: torch.nn.Module, key: str = "lora_unet_layer", metadata: dict | None = None):
    disk = None if metadata is None else types.SimpleNamespace(metadata=metadata, mtime=0.0, identity=("t",))
    net = network.Network("t", disk)
    weights = network.NetworkWeights(network_key=key, sd_key="unet.layer", w=dict(parts), sd_module=layer)
    module = lora_loader.build_module(net, weights)
    assert module is not None, f"no type claimed {sorted(parts)}"
    return module


def delta(module, layer, m: float = 1.0, dyn=None, bias=None):
    return module.compute(layer.weight.detach(), m, dyn, orig_bias=bias)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    a, b = a.double(), b.double()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    assert err < tol, f"relative error {err:.2e}"


def linear(out_f: int = 6, in_f: int = 5, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def conv(out_c: int = 6, in_c: int = 4, k: int = 3) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(in_c, out_c, k, padding=k // 2)


# --- LoRA / LoCon / Tucker / DyLoRA --------------------------------------------------------------------------------
def test_lora_linear_scale_alpha_over_rank_and_strength():
    layer = linear()
    up, down = rnd(6, 3), rnd(3, 5)
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)}, layer)
    dw, db = delta(module, layer, 0.7)
    close(dw, 0.7 * (1.5 / 3) * up @ down)
    assert db is None and dw.dtype == torch.float32


def test_lora_scale_part_overrides_alpha_and_no_alpha_means_one():
    layer = linear()
    up, down = rnd(6, 3), rnd(3, 5)
    with_scale = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5),
                        "scale": torch.tensor(0.25)}, layer)
    close(delta(with_scale, layer)[0], 0.25 * up @ down)
    no_alpha = build({"lora_up.weight": up, "lora_down.weight": down}, layer)
    close(delta(no_alpha, layer)[0], up @ down)
    zero_alpha = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(0.0)}, layer)
    close(delta(zero_alpha, layer, dyn=2)[0], up[:, :2] @ down[:2])  # kohya/LyCORIS: alpha 0 = no scaling


def test_locon_conv_kernel_and_1x1_linear_shapes():
    layer = conv()
    up, down = rnd(6, 2, 1, 1), rnd(2, 4, 3, 3)
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}, layer)
    expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    close(delta(module, layer)[0], expected)
    # a Linear-shaped LoRA on a 1×1 conv (and the reverse) is the same matrix
    conv1 = conv(6, 5, 1)
    up2, down2 = rnd(6, 3), rnd(3, 5)
    module = build({"lora_up.weight": up2, "lora_down.weight": down2, "alpha": torch.tensor(3.0)}, conv1)
    close(delta(module, conv1)[0], (up2 @ down2).reshape(6, 5, 1, 1))


def test_tucker_locon_lora_mid():
    layer = conv()
    up, mid, down = rnd(6, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    module = build({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down,
                    "alpha": torch.tensor(1.0)}, layer)
    expected = torch.zeros(6, 4, 3, 3)
    for i in range(6):
        for j in range(4):
            for n in range(2):
                for p in range(2):
                    expected[i, j] += mid[n, p] * up[i, n, 0, 0] * down[p, j, 0, 0]
    close(delta(module, layer)[0], 0.5 * expected)


def test_dyn_keeps_first_ranks_and_scales_by_alpha_over_dyn():
    layer = linear()
    up, down = rnd(6, 4), rnd(4, 5)
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}, layer)
    close(delta(module, layer, dyn=2)[0], (2.0 / 2) * up[:, :2] @ down[:2])
    close(delta(module, layer, dyn=4)[0], (2.0 / 4) * up @ down)
    close(delta(module, layer, dyn=9)[0], (2.0 / 4) * up @ down)  # more than the rank: all of it


def test_dyn_on_tucker_truncates_mid_too():
    layer = conv()
    up, mid, down = rnd(6, 3, 1, 1), rnd(3, 3, 3, 3), rnd(3, 4, 1, 1)
    module = build({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down,
                    "alpha": torch.tensor(3.0)}, layer)
    expected = torch.einsum("nmkl,in,mj->ijkl", mid[:2, :2], up[:, :2, 0, 0], down[:2, :, 0, 0]) * (3.0 / 2)
    close(delta(module, layer, dyn=2)[0], expected)


def test_peft_and_diffusers_part_names():
    layer = linear()
    up, down = rnd(6, 3), rnd(3, 5)
    peft = build({"lora_B.weight": up, "lora_A.weight": down}, layer)
    close(delta(peft, layer)[0], up @ down)
    old = build({"lora.up.weight": up, "lora.down.weight": down}, layer)
    close(delta(old, layer)[0], up @ down)


def test_a1111_weight_shaped_bias_part_is_added_before_the_scale():
    layer = linear()
    up, down, extra = rnd(6, 3), rnd(3, 5), rnd(6, 5)
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5), "bias": extra},
                   layer)
    close(delta(module, layer, 0.5)[0], 0.5 * 0.5 * (up @ down + extra))


# --- DoRA ----------------------------------------------------------------------------------------------------------
def _dora_reference(w: torch.Tensor, dw: torch.Tensor, magnitude: torch.Tensor, axis: str, m: float):
    v = w + dw
    flat = v.reshape(v.shape[0], -1) if axis == "output" else v.transpose(0, 1).reshape(v.shape[1], -1)
    norms = flat.norm(dim=1)
    shape = [1] * v.dim()
    shape[0 if axis == "output" else 1] = -1
    dora = magnitude.reshape(shape) * v / norms.reshape(shape)
    return m * (dora - w)  # the whole DoRA delta scaled by the strength (A1111/Forge/ComfyUI convention)


@pytest.mark.parametrize("axis,magnitude_shape", [("output", (6, 1)), ("input", (1, 5)), ("output", (6,)),
                                                  ("input", (5,))])
def test_dora_linear_both_axes(axis, magnitude_shape):
    layer = linear(6, 5)
    up, down = rnd(6, 2), rnd(2, 5)
    magnitude = rnd(*magnitude_shape).abs() + 0.5
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0),
                    "dora_scale": magnitude}, layer)
    w = layer.weight.detach()
    for m in (1.0, 0.4):
        close(delta(module, layer, m)[0], _dora_reference(w, 0.5 * up @ down, magnitude, axis, m))


@pytest.mark.parametrize("axis,magnitude_shape", [("output", (6, 1, 1, 1)), ("input", (1, 4, 1, 1))])
def test_dora_conv_both_axes(axis, magnitude_shape):
    layer = conv(6, 4)
    up, down = rnd(6, 2, 1, 1), rnd(2, 4, 3, 3)
    magnitude = rnd(*magnitude_shape).abs() + 0.5
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0),
                    "dora_scale": magnitude}, layer)
    dw = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    close(delta(module, layer)[0], _dora_reference(layer.weight.detach(), dw, magnitude, axis, 1.0))


def test_dora_square_1d_rule():
    layer = linear(5, 5)
    up, down = rnd(5, 2), rnd(2, 5)
    magnitude = rnd(5).abs() + 0.5
    parts = {"lora_up.weight": up, "lora_down.weight": down, "dora_scale": magnitude}
    w = layer.weight.detach()
    # no hint: the kohya/A1111 input-axis convention
    close(delta(build(parts, layer), layer)[0], _dora_reference(w, up @ down, magnitude, "input", 1.0))
    # the file's own training argument (LyCORIS wd_on_output) decides
    hinted = build(parts, layer, metadata={"ss_network_args": {"dora_wd": "True", "wd_on_output": "True"}})
    close(delta(hinted, layer)[0], _dora_reference(w, up @ down, magnitude, "output", 1.0))
    # PEFT's magnitude vector is per output row by definition
    peft = build({"lora_B.weight": up, "lora_A.weight": down, "lora_magnitude_vector": magnitude}, layer)
    close(delta(peft, layer)[0], _dora_reference(w, up @ down, magnitude, "output", 1.0))


def test_dora_scale_that_fits_no_axis_is_rejected():
    with pytest.raises(ValueError, match="dora_scale"):
        build({"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 5), "dora_scale": rnd(7)}, linear(6, 5))


# --- LoHa ----------------------------------------------------------------------------------------------------------
def test_loha_linear():
    layer = linear()
    w1a, w1b, w2a, w2b = rnd(6, 3), rnd(3, 5), rnd(6, 3), rnd(3, 5)
    module = build({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                    "alpha": torch.tensor(1.5)}, layer)
    close(delta(module, layer, 0.8)[0], 0.8 * 0.5 * (w1a @ w1b) * (w2a @ w2b))


def test_loha_conv_flat_and_tucker():
    layer = conv()
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 36), rnd(6, 2), rnd(2, 36)
    module = build({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                    "alpha": torch.tensor(1.0)}, layer)
    close(delta(module, layer)[0], (0.5 * (w1a @ w1b) * (w2a @ w2b)).reshape(6, 4, 3, 3))
    t1, t2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3)
    a1, b1, a2, b2 = rnd(2, 6), rnd(2, 4), rnd(2, 6), rnd(2, 4)
    tucker = build({"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "hada_t1": t1,
                    "hada_t2": t2, "alpha": torch.tensor(1.0)}, layer)
    r1 = torch.einsum("ijkl,ip,jq->pqkl", t1, a1, b1)
    r2 = torch.einsum("ijkl,ip,jq->pqkl", t2, a2, b2)
    close(delta(tucker, layer)[0], 0.5 * r1 * r2)


# --- LoKr ----------------------------------------------------------------------------------------------------------
def test_lokr_full_factors_ignore_alpha():
    layer = linear(6, 4)
    w1, w2 = rnd(2, 2), rnd(3, 2)
    module = build({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}, layer)
    close(delta(module, layer, 0.5)[0], 0.5 * torch.kron(w1, w2))


def test_lokr_low_rank_halves_scale_by_rank():
    layer = linear(6, 8)
    w1a, w1b, w2a, w2b = rnd(2, 1), rnd(1, 2), rnd(3, 2), rnd(2, 4)
    module = build({"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b,
                    "alpha": torch.tensor(1.0)}, layer)
    close(delta(module, layer)[0], (1.0 / 2) * torch.kron(w1a @ w1b, w2a @ w2b))


def test_lokr_conv_full_w2_flat_w2b_and_tucker():
    layer = conv(6, 4)
    w1 = rnd(2, 2)
    full = build({"lokr_w1": w1, "lokr_w2": rnd(3, 2, 3, 3)}, layer)
    w2 = full.w2
    expected = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            expected[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2] = w1[i, j] * w2
    close(delta(full, layer)[0], expected)
    w2a, w2b = rnd(3, 2), rnd(2, 2 * 9)
    flat = build({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}, layer)
    close(delta(flat, layer)[0], (0.5 * torch.kron(w1, w2a @ w2b)).reshape(6, 4, 3, 3))
    t2, a, b = rnd(2, 2, 3, 3), rnd(2, 3), rnd(2, 2)
    tucker = build({"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "lokr_t2": t2, "alpha": torch.tensor(1.0)},
                   layer)
    w2t = torch.einsum("ijkl,ip,jq->pqkl", t2, a, b)
    expected = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for j in range(2):
            expected[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2] = w1[i, j] * w2t
    close(delta(tucker, layer)[0], 0.5 * expected)


# --- IA3 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_linear_and_conv_both_ways(on_input):
    for layer in (linear(6, 5), conv(6, 4)):
        w = layer.weight.detach()
        n = w.shape[1] if on_input else w.shape[0]
        vec = rnd(n)
        stored = vec.reshape(1, n, *([1] * (w.dim() - 2))) if w.dim() == 4 else vec  # LyCORIS's conv layout
        module = build({"weight": stored, "on_input": torch.tensor(int(on_input))}, layer)
        shape = [1] * w.dim()
        shape[1 if on_input else 0] = n
        close(delta(module, layer, 0.6)[0], 0.6 * w * vec.reshape(shape))


def test_ia3_without_on_input_goes_by_length():
    layer = linear(6, 5)
    vec = rnd(5)
    module = build({"weight": vec}, layer)
    close(delta(module, layer)[0], layer.weight.detach() * vec.reshape(1, 5))
    with pytest.raises(ValueError, match="IA3"):
        build({"weight": rnd(7)}, layer)


# --- GLoRA ---------------------------------------------------------------------------------------------------------
def test_glora_lycoris_layout_linear_scales_by_alpha_over_rank():
    layer = linear(6, 5)
    a1, a2, b1, b2 = rnd(5, 2), rnd(2, 5), rnd(6, 2), rnd(2, 5)
    module = build({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2,
                    "alpha": torch.tensor(1.0)}, layer)
    w = layer.weight.detach()
    close(delta(module, layer, 0.5)[0], 0.5 * 0.5 * (w @ a1 @ a2 + b1 @ b2))


def test_glora_conv_with_and_without_bm():
    layer = conv(6, 4)
    w = layer.weight.detach()
    a1, a2, b1 = rnd(4, 2, 1, 1), rnd(2, 4, 1, 1), rnd(6, 2, 1, 1)
    b2 = rnd(2, 4, 3, 3)
    module = build({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2,
                    "alpha": torch.tensor(2.0)}, layer)
    wa = torch.einsum("oikl,ij->ojkl", w, a1[:, :, 0, 0] @ a2[:, :, 0, 0])
    wb = torch.einsum("or,rikl->oikl", b1[:, :, 0, 0], b2)
    close(delta(module, layer)[0], wa + wb)
    bm, b2t = rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    tucker = build({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2t, "bm.weight": bm,
                    "alpha": torch.tensor(2.0)}, layer)
    wb = torch.einsum("mnkl,im,nj->ijkl", bm, b1[:, :, 0, 0], b2t[:, :, 0, 0])
    close(delta(tucker, layer)[0], wa + wb)


def _small_linear(weight, bias=None) -> torch.nn.Linear:
    layer = torch.nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer


def test_glora_old_layout_hand_computed():
    """Old LyCORIS GLoRA (a1: r×in, a2: in×r, b1: r×in, b2: out×r): ΔW = b2·b1 + (W·a2)·a1, worked by hand:
    W·a2 = [7, 16]ᵀ, (W·a2)·a1 = [[7, 0, -7], [16, 0, -16]], b2·b1 = [[0, 2, 0], [0, -1, 0]]."""
    layer = _small_linear([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    module = build({"a1.weight": torch.tensor([[1.0, 0.0, -1.0]]), "a2.weight": torch.tensor([[1.0], [0.0], [2.0]]),
                    "b1.weight": torch.tensor([[0.0, 1.0, 0.0]]), "b2.weight": torch.tensor([[2.0], [-1.0]]),
                    "alpha": torch.tensor(1.0)}, layer)
    assert module.layout_for((2, 3))
    close(delta(module, layer)[0], torch.tensor([[7.0, 2.0, -7.0], [16.0, -1.0, -16.0]]))
    close(delta(module, layer, 0.5)[0], torch.tensor([[3.5, 1.0, -3.5], [8.0, -0.5, -8.0]]))


# --- Full, Norm ----------------------------------------------------------------------------------------------------
def test_full_diff_and_diff_b():
    layer = linear()
    diff, diff_b = rnd(6, 5), rnd(6)
    module = build({"diff": diff, "diff_b": diff_b}, layer)
    dw, db = delta(module, layer, 0.5)
    close(dw, 0.5 * diff)
    close(db, 0.5 * diff_b)


def test_norm_w_norm_b_norm():
    for layer in (torch.nn.LayerNorm(6), torch.nn.GroupNorm(2, 6)):
        w_norm, b_norm = rnd(6), rnd(6)
        module = build({"w_norm": w_norm, "b_norm": b_norm}, layer)
        dw, db = delta(module, layer, 0.5)
        close(dw, 0.5 * w_norm)
        close(db, 0.5 * b_norm)


# --- OFT / BOFT ----------------------------------------------------------------------------------------------------
def _cayley(blocks: torch.Tensor) -> torch.Tensor:
    q = blocks - blocks.transpose(-1, -2)
    eye = torch.eye(blocks.shape[-1])
    return (eye + q) @ torch.linalg.inv(eye - q)


def test_kohya_oft_hand_computed_including_the_bias():
    """kohya networks/oft.py on one 2×2 block: y' = org(x) @ (m·R + (1−m)·I), R = (I + Q)(I − Q)⁻¹ with
    Q = B − Bᵀ scaled to ‖Q‖ = min(‖Q‖, alpha·out_dim). Worked by hand: B = [[0, 0.5], [0, 0]] gives ‖Q‖ = √0.5,
    alpha 0.25 clamps it to 0.5 (q = √2/4, q² = 1/8), R = [[7/9, 4√2/9], [−4√2/9, 7/9]]; W = [[1, 2, 3],
    [4, 5, 6]], b = [0.5, −1], x = [1, 0, −1] give y = [−1.5, −3] and y·R = [−7/6 + 4√2·3/9, −2√2/3 − 7/3]."""
    layer = _small_linear([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [0.5, -1.0])
    blocks = torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])
    module = build({"oft_blocks": blocks, "alpha": torch.tensor(0.25)}, layer, key="oft_unet_layer")
    x = torch.tensor([1.0, 0.0, -1.0])
    for m, want in ((1.0, [0.71895141, -3.27614237]), (0.5, [-0.39052429, -3.13807119])):
        dw, db = delta(module, layer, m, bias=layer.bias.detach())
        y = (layer.weight + dw) @ x + layer.bias + db
        close(y.detach(), torch.tensor(want), 1e-6)
    # kohya clamps even at alpha 0: ‖Q‖ → 0, no rotation at all (LyCORIS reads 0 as unconstrained)
    zero = build({"oft_blocks": blocks, "alpha": torch.tensor(0.0)}, layer, key="oft_unet_layer")
    assert float(delta(zero, layer, bias=layer.bias.detach())[0].abs().max()) < 1e-6


def test_lycoris_diag_oft_strength_rescale_and_unconstrained():
    layer = linear(6, 5)
    blocks, rescale = rnd(3, 2, 2), rnd(6, 1) + 1
    module = build({"oft_blocks": blocks, "rescale": rescale, "alpha": torch.tensor(0.0)}, layer)
    r = _cayley(blocks)
    w = layer.weight.detach()
    for m in (1.0, 0.3):
        rm = torch.block_diag(*(m * r + (1 - m) * torch.eye(2)))
        rotated = rm.T @ w
        dw, db = delta(module, layer, m, bias=layer.bias.detach())
        close(dw, (1 + m * (rescale - 1)) * rotated - w)
        assert db is None  # LyCORIS leaves the bias alone


def test_old_lycoris_oft_diag_hand_computed():
    """Old LyCORIS `oft_diag` stores R itself; A1111 turns W's rows by Rᵀ per block, strength m·R + (1−m)·I.
    Worked by hand: R = [[0.6, 0.8], [−0.8, 0.6]], W = [[1, 2, 3], [4, 5, 6]] → Rᵀ·W = [[−2.6, −2.8, −3],
    [3.2, 4.6, 6]]; at m = 0.5, R_m = [[0.8, 0.4], [−0.4, 0.8]] → R_mᵀ·W = [[−0.8, −0.4, 0], [3.6, 4.8, 6]]."""
    layer = _small_linear([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    module = build({"oft_diag": torch.tensor([[[0.6, 0.8], [-0.8, 0.6]]])}, layer)
    close(delta(module, layer)[0], torch.tensor([[-3.6, -4.8, -6.0], [-0.8, -0.4, 0.0]]))
    close(delta(module, layer, 0.5)[0], torch.tensor([[-1.8, -2.4, -3.0], [-0.4, -0.2, 0.0]]))


def test_boft_and_diag_oft_against_lycoris_diff_weight():
    """BOFT's butterfly stages (strength folded into every stage) and diag-OFT with rescale and a binding
    constraint, against lycoris-lora's own diff_weight (its pure-torch backend)."""
    from lycoris.functional import boft as ly_boft
    from lycoris.functional import diag_oft as ly_oft

    for layer in (linear(8, 3), conv(8, 4)):
        w = layer.weight.detach()
        blocks = rnd(2, 4, 2, 2)  # 2 stages of 4 blocks of size 2
        module = build({"oft_blocks": blocks, "alpha": torch.tensor(0.0)}, layer)
        for m in (1.0, 0.6):
            close(delta(module, layer, m)[0], ly_boft.diff_weight(w, blocks, None, constraint=0.0, scale=m,
                                                                  backend="torch"))
        blocks, rescale = rnd(4, 2, 2), rnd(8, *([1] * (w.dim() - 1))) + 1
        module = build({"oft_blocks": blocks, "rescale": rescale, "alpha": torch.tensor(0.01)}, layer)
        close(delta(module, layer)[0], ly_oft.diff_weight(w, blocks, rescale, constraint=0.01 * 8, backend="torch"))


def test_oft_blocks_must_cover_the_output_channels():
    with pytest.raises(ValueError, match="output channels"):
        build({"oft_blocks": rnd(4, 2, 2)}, linear(6, 5))


# --- generic -------------------------------------------------------------------------------------------------------
def test_fp16_weights_give_fp32_deltas_from_exact_math():
    layer = linear(6, 5)
    layer.half()
    up, down = rnd(6, 3).half(), rnd(3, 5).half()
    module = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}, layer)
    dw, _ = module.compute(layer.weight.detach(), 1.0)
    assert dw.dtype == torch.float32
    close(dw, up.float() @ down.float(), 1e-6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"delta of shape \(6, 7\).*weight has shape \(6, 5\)"):
        build({"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 7)}, linear(6, 5))
    with pytest.raises(ValueError, match="disagree on the rank"):
        build({"lora_up.weight": rnd(6, 3), "lora_down.weight": rnd(2, 5)}, linear(6, 5))


def test_inpainting_conv_in_pads_a_four_channel_delta():
    layer = conv(6, 9)
    up, down = rnd(6, 2, 1, 1), rnd(2, 4, 3, 3)
    module = build({"lora_up.weight": up, "lora_down.weight": down}, layer)
    dw, _ = delta(module, layer)
    assert dw.shape == (6, 9, 3, 3)
    close(dw[:, :4], torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down))
    assert not dw[:, 4:].any()


def test_a1111_forward_api_matches_the_merged_layer(tiny_sd1, write_lora):
    """NetworkModule.forward(x, y) (what A1111 extensions call on its functional path) equals the merged layer."""
    import networks

    write_lora("fwd", tiny_sd1, seed=6)
    net = networks.load_networks(["fwd"], [0.7], [0.7], [None], sd_model=tiny_sd1).networks[0]
    module = next(m for m in net.modules.values() if isinstance(m.sd_module, torch.nn.Linear))
    networks.load_networks([], sd_model=tiny_sd1)  # the layer holds its original again
    layer = module.sd_module
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
        merged = torch.nn.functional.linear(x, layer.weight + module.calc_updown(layer.weight)[0], layer.bias)
        torch.testing.assert_close(module.forward(x, y), merged, rtol=1e-5, atol=1e-5)
