"""Loras on the host's fp8 Flux transformer (setting `lora_fp8_strategy`): each strategy's layer outputs against a
reference independent of our code (the bf16 model with the same Lora loaded and fused by diffusers), against a plain
round-to-nearest fp8 merge computed here from the tensors, and a bit-exact restore of the fp8 bytes."""
import copy

import lora_fp8
import networks
import pytest
import torch
import torch.nn.functional as F

from modules import sd_models_diffusers, shared

CPU, BF16, FP8 = torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn
RANK, STRENGTH = 4, 0.03  # ||ΔW|| = STRENGTH·||W|| per layer: a strong-ish Lora, most of it under half an fp8 step


@pytest.fixture(scope="module")
def fp8_model(flux_files):
    return sd_models_diffusers.load(flux_files["fp8"], CPU, BF16, None,
                                    [flux_files[m] for m in ("clip_l", "t5", "ae")])


@pytest.fixture(scope="module")
def peft_lora(fp8_model):
    """{diffusers PEFT key: tensor} for every fp8 Linear of the transformer's blocks, {layer path: ΔW fp32},
    {layer path: its fp8 weight as loaded}."""
    g = torch.Generator().manual_seed(7)
    tensors, deltas, originals = {}, {}, {}
    for path, layer in fp8_model.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and layer.weight.dtype == FP8:
            w = layer.weight.detach().float()
            down = torch.randn(RANK, layer.in_features, generator=g)
            up = torch.randn(layer.out_features, RANK, generator=g)
            up *= STRENGTH * w.norm() / (up @ down).norm()
            tensors[f"transformer.{path}.lora_A.weight"] = down.to(BF16)
            tensors[f"transformer.{path}.lora_B.weight"] = up.to(BF16)
            deltas[path] = up.to(BF16).float() @ down.to(BF16).float()
            originals[path] = layer.weight.detach().clone()
    return tensors, deltas, originals


@pytest.fixture(scope="module")
def diffusers_reference(flux_files, peft_lora):
    """The bf16 transformer (the weights the fp8 file was rounded from) with the Lora fused by diffusers."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_files["folder"], local_files_only=True, torch_dtype=BF16)
    pipe.load_lora_weights(copy.deepcopy(peft_lora[0]), adapter_name="ref")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return dict(pipe.transformer.named_modules())


def _fp8_bytes(model) -> dict:
    return {k: (v.view(torch.uint8).clone() if v.dtype == FP8 else v.clone(), v.dtype)
            for k, v in model.transformer.state_dict().items()}


def _errors(model, peft_lora, reference) -> dict:
    """Over every targeted layer, on seeded inputs: Σ||y − y_ref||² / Σ||y_ref||² for the strategy's layer and for
    a round-to-nearest fp8 merge; and the Lora's strength (the projection of the output change on the exact one)."""
    g = torch.Generator().manual_seed(3)
    sums = dict.fromkeys(("ours", "rtn", "ref", "dot_ours", "dot_rtn", "effect"), 0.0)
    for path, delta in peft_lora[1].items():
        layer, ref = model.transformer.get_submodule(path), reference[path]
        x = torch.randn(32, layer.in_features, generator=g).to(BF16)
        with torch.no_grad():
            y = layer(x).float()
            fp8 = peft_lora[2][path].float()
            rtn = (fp8 + delta).to(FP8)
            y_rtn = F.linear(x, rtn.to(BF16), layer.bias).float()
            y_ref = F.linear(x.float(), ref.weight.float(), ref.bias.float())
            y0 = F.linear(x.float(), fp8, layer.bias.float())
            exact = F.linear(x.float(), delta)
        sums["ours"] += float((y - y_ref).square().sum())
        sums["rtn"] += float((y_rtn - y_ref).square().sum())
        sums["ref"] += float(y_ref.square().sum())
        sums["dot_ours"] += float(((y - y0) * exact).sum())
        sums["dot_rtn"] += float(((y_rtn - y0) * exact).sum())
        sums["effect"] += float(exact.square().sum())
    return {"ours": (sums["ours"] / sums["ref"]) ** 0.5, "rtn": (sums["rtn"] / sums["ref"]) ** 0.5,
            "strength": sums["dot_ours"] / sums["effect"], "strength_rtn": sums["dot_rtn"] / sums["effect"]}


@pytest.mark.parametrize("strategy", ["upcast", "bypass", "stochastic"])
def test_fp8_strategy_against_diffusers_bf16_fuse(fp8_model, peft_lora, diffusers_reference, write_lora, monkeypatch,
                                                  strategy):
    monkeypatch.setitem(shared.opts.data, "lora_fp8_strategy", strategy)
    write_lora("fp8_peft", tensors=peft_lora[0], metadata={})
    before = _fp8_bytes(fp8_model)
    report = networks.load_networks(["fp8_peft"], [1.0], [1.0], sd_model=fp8_model)
    net = report.networks[0]
    assert not (net.unmatched_keys or net.load_errors or net.apply_errors) and len(net.modules) == len(peft_lora[1])
    line = next(n for n in report.notes if n.startswith("Lora on fp8 weights"))
    assert f"({len(peft_lora[1])} layers): {strategy};" in line, line
    layer = fp8_model.transformer.transformer_blocks[0].attn.to_q
    if strategy == "upcast":
        assert layer.weight.dtype == BF16 and lora_fp8.fp8_weight(layer).dtype == FP8
        assert "layers upcast" in line and "MiB" in line
    else:
        assert layer.weight.dtype == FP8
        changed = not torch.equal(layer.weight.view(torch.uint8), before["transformer_blocks.0.attn.to_q.weight"][0])
        assert changed == (strategy == "stochastic")
    err = _errors(fp8_model, peft_lora, diffusers_reference)
    if strategy == "stochastic":
        # unbiased: the Lora keeps its strength (round-to-nearest loses most of it); but its noise makes the
        # outputs no closer to the bf16 reference than round-to-nearest's (see README: fp8 strategies)
        assert err["strength_rtn"] < 0.9 and abs(err["strength"] - 1) < 0.5 * (1 - err["strength_rtn"]), err
        again = layer.weight.view(torch.uint8).clone()
        networks.load_networks([], sd_model=fp8_model)
        networks.load_networks(["fp8_peft"], [1.0], [1.0], sd_model=fp8_model)
        assert torch.equal(layer.weight.view(torch.uint8), again), "the same set rounds the same way"
    else:
        # both errors include the fp8 base's own rounding (the same for both); measured ratio 0.78
        assert err["ours"] < 0.85 * err["rtn"] and abs(err["strength"] - 1) < 0.02, err
    networks.load_networks([], sd_model=fp8_model)
    after = _fp8_bytes(fp8_model)
    assert after.keys() == before.keys()
    for key, (value, dtype) in before.items():
        assert after[key][1] == dtype and torch.equal(after[key][0], value), key
    assert all(getattr(m, "network_functional", None) is None for m in fp8_model.transformer.modules())


def test_auto_picks_by_memory(fp8_model, peft_lora, monkeypatch):
    """auto: upcast when the touched layers in bf16 fit in 10 % of the model, bypass when its factors do."""
    from lora_plan import Contribution

    layers = {p: fp8_model.transformer.get_submodule(p) for p in peft_lora[1]}

    class Lowrank:  # a plain rank-4 LoRA module: its factors are what the hooks hold
        def __init__(self, layer):
            self.up, self.down = torch.zeros(layer.out_features, RANK), torch.zeros(RANK, layer.in_features)

    plan = {p: [Contribution(None, Lowrank(m), 1.0, None)] for p, m in layers.items()}
    components = fp8_model.components().values()
    cost = lora_fp8.costs(layers, plan, components)
    assert cost.layers == len(layers) and cost.upcast == sum(2 * m.weight.numel() for m in layers.values())
    assert cost.bypass == sum(2 * RANK * (m.in_features + m.out_features) for m in layers.values())
    assert lora_fp8.resolve("auto", cost) == ("upcast" if cost.upcast <= 0.1 * cost.model else "bypass")
    one = dict(list(plan.items())[:1])
    assert lora_fp8.resolve("auto", lora_fp8.costs(layers, one, components)) == "upcast"
    assert lora_fp8.resolve("auto", lora_fp8.Costs(1, 50, 50, 100)) == "stochastic"
    assert lora_fp8.resolve("stochastic", cost) == "stochastic"


def test_changing_the_strategy_rewrites_the_same_set(fp8_model, peft_lora, write_lora, monkeypatch):
    """The same Lora set under another strategy: each layer is brought to the new way; the end is bit-exact."""
    write_lora("fp8_peft", tensors=peft_lora[0], metadata={})
    before = _fp8_bytes(fp8_model)
    layer = fp8_model.transformer.single_transformer_blocks[0].proj_mlp
    original = peft_lora[2]["single_transformer_blocks.0.proj_mlp"]
    for strategy, dtype, hooked in (("upcast", BF16, False), ("stochastic", FP8, False), ("bypass", FP8, True),
                                    ("upcast", BF16, False)):
        monkeypatch.setitem(shared.opts.data, "lora_fp8_strategy", strategy)
        networks.load_networks(["fp8_peft"], [1.0], [1.0], sd_model=fp8_model)
        assert layer.weight.dtype == dtype and (getattr(layer, "network_functional", None) is not None) == hooked
        if strategy == "bypass":
            assert torch.equal(layer.weight.view(torch.uint8), original.view(torch.uint8))
    networks.load_networks([], sd_model=fp8_model)
    after = _fp8_bytes(fp8_model)
    assert all(torch.equal(after[k][0], v) and after[k][1] == d for k, (v, d) in before.items())
