"""Hypernetworks: module options, A1111 file compatibility, K/V hooks, the <hypernet:> tag, and training."""
import math
import os
import pickle
import types

import pytest
import torch
import torch.nn.functional as F

from modules import extra_networks, shared
from modules.extra_networks_hypernet import ExtraNetworkHypernet
from modules.hypernetworks import hypernetwork as hn
from modules.hypernetworks import learn_schedule, storage

pytestmark = pytest.mark.usefixtures("hypernetwork_dir")  # conftest: a private folder, state reset


def _mlp_types(module: hn.HypernetworkModule) -> list[str]:
    return [type(m).__name__ for m in module.linear]


# --- constructor options ---

def test_layer_structure_is_validated():
    for bad in (None, [2, 1], [1, 2], [1], [1, 0, 1], "1, x, 1"):
        with pytest.raises(ValueError):
            hn.HypernetworkModule(8, layer_structure=bad)
    module = hn.HypernetworkModule(8, layer_structure="1, 1.5, 1")
    assert [(m.in_features, m.out_features) for m in module.linear] == [(8, 12), (12, 8)]


def test_structure_activation_layer_norm_dropout_and_activate_output():
    module = hn.HypernetworkModule(8, layer_structure=[1, 2, 2, 1], activation_func="relu", add_layer_norm=True,
                                   dropout_structure=[0, 0.3, 0.2, 0])
    assert _mlp_types(module) == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "ReLU", "LayerNorm",
                                  "Dropout", "Linear", "LayerNorm"]
    assert [m.p for m in module.linear if isinstance(m, torch.nn.Dropout)] == [0.3, 0.2]
    out = hn.HypernetworkModule(8, layer_structure=[1, 2, 1], activation_func="tanh", activate_output=True)
    assert _mlp_types(out) == ["Linear", "Tanh", "Linear", "Tanh"]
    plain = hn.HypernetworkModule(8, layer_structure=[1, 2, 1], activation_func="linear")
    assert _mlp_types(plain) == ["Linear", "Linear"]
    for bad in ([0, 1.0, 0], [0, 0.3], [0, -0.1, 0]):
        with pytest.raises(ValueError):
            hn.HypernetworkModule(8, layer_structure=[1, 2, 1], dropout_structure=bad)


@pytest.mark.parametrize("name,cls", [("relu", torch.nn.ReLU), ("leakyrelu", torch.nn.LeakyReLU),
                                      ("elu", torch.nn.ELU), ("swish", torch.nn.Hardswish), ("tanh", torch.nn.Tanh),
                                      ("sigmoid", torch.nn.Sigmoid), ("gelu", torch.nn.GELU),
                                      ("mish", torch.nn.Mish), ("softplus", torch.nn.Softplus)])
def test_activations_by_name(name, cls):
    module = hn.HypernetworkModule(4, layer_structure=[1, 2, 1], activation_func=name)
    assert isinstance(module.linear[1], cls)


def test_unknown_activation_and_weight_init_are_refused():
    with pytest.raises(ValueError, match="activation"):
        hn.HypernetworkModule(4, layer_structure=[1, 2, 1], activation_func="nope")
    with pytest.raises(ValueError, match="initialization"):
        hn.HypernetworkModule(4, layer_structure=[1, 2, 1], weight_init="Zeros")


@pytest.mark.parametrize("weight_init,expected_std", [
    ("Normal", lambda fan_in, fan_out: 0.01),
    ("XavierUniform", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
    ("XavierNormal", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
    ("KaimingUniform", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
    ("KaimingNormal", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
])
def test_weight_initializations(weight_init, expected_std):
    torch.manual_seed(0)
    module = hn.HypernetworkModule(256, layer_structure=[1, 2, 1], activation_func="relu", weight_init=weight_init,
                                   add_layer_norm=True)
    first = module.linear[0]
    assert first.weight.std().item() == pytest.approx(expected_std(256, 512), rel=0.05)
    assert torch.count_nonzero(first.bias) == 0
    norm = module.linear[2]
    assert norm.weight.std().item() == pytest.approx(0.01, rel=0.1)  # A1111 initialises LayerNorm like Normal


def test_forward_is_residual_with_multiplier_outside_training():
    torch.manual_seed(0)
    module = hn.HypernetworkModule(8, layer_structure=[1, 2, 1], activation_func="relu").eval()
    x = torch.randn(2, 3, 8)
    mlp = module.linear(x)
    module.multiplier = 0.5
    assert torch.allclose(module(x), x + mlp * 0.5)
    module.train()
    assert torch.allclose(module(x), x + mlp)  # training always uses 1


def test_hypernetwork_layers_weights_train_eval_and_dropout_defaults():
    h = hn.Hypernetwork(name="h", enable_sizes=[8, 16], layer_structure=[1, 2, 1], activation_func="relu",
                        use_dropout=True, last_layer_dropout=False)
    assert set(h.layers) == {8, 16}
    k, v = h.layers[8]
    assert k is not v and isinstance(k, hn.HypernetworkModule)
    assert len(h.weights()) == 2 * 2 * 4
    assert h.dropout_structure == [0, 0, 0]
    assert all(not p.requires_grad for p in h.weights()) and not k.training
    h.train()
    assert all(p.requires_grad for p in h.weights()) and k.training
    h.eval()
    assert not any(p.requires_grad for p in h.weights())
    assert hn.parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    assert hn.parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert hn.parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    h.set_multiplier(0.25)
    assert all(m.multiplier == 0.25 for m in h.modules())


# --- files ---

def test_save_load_round_trip_with_all_metadata(hypernetwork_dir):
    torch.manual_seed(0)
    h = hn.Hypernetwork(name="round", enable_sizes=[8, 16], layer_structure=[1, 1.5, 1], activation_func="elu",
                        weight_init="XavierNormal", add_layer_norm=True, use_dropout=True,
                        dropout_structure=[0, 0.1, 0], activate_output=True)
    h.step, h.sd_checkpoint, h.sd_checkpoint_name, h.optional_info = 42, "abc123", "model-x", "notes"
    path = str(hypernetwork_dir / "round.pt")
    h.save(path)
    assert [f for f in os.listdir(hypernetwork_dir) if f.startswith(".tmp")] == []
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {8, 16} | set(hn.METADATA_KEYS)
    assert list(raw[8][0]) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                               "linear.4.weight", "linear.4.bias", "linear.6.weight", "linear.6.bias"]

    loaded = hn.Hypernetwork()
    loaded.load(path)
    for attr in ("name", "step", "layer_structure", "activation_func", "weight_init", "add_layer_norm",
                 "use_dropout", "dropout_structure", "activate_output", "sd_checkpoint", "sd_checkpoint_name",
                 "optional_info"):
        assert getattr(loaded, attr) == getattr(h, attr), attr
    x = torch.randn(1, 4, 16)
    assert torch.equal(loaded.layers[16][1](x), h.layers[16][1](x))


def _a1111_state(dim: int, hidden: int, legacy: bool = False) -> dict:
    if legacy:
        return {"linear1.weight": torch.randn(hidden, dim), "linear1.bias": torch.randn(hidden),
                "linear2.weight": torch.randn(dim, hidden), "linear2.bias": torch.randn(dim)}
    return {"linear.0.weight": torch.randn(hidden, dim), "linear.0.bias": torch.randn(hidden),
            "linear.2.weight": torch.randn(dim, hidden), "linear.2.bias": torch.randn(dim)}


def test_reads_a_file_written_in_a1111_layout(hypernetwork_dir):
    torch.manual_seed(0)
    k, v = _a1111_state(8, 16), _a1111_state(8, 16)
    torch.save({8: (k, v), "step": 7, "name": "anime", "layer_structure": [1, 2, 1], "activation_func": "relu",
                "is_layer_norm": False, "weight_initialization": "Normal", "use_dropout": False,
                "dropout_structure": [0, 0, 0], "activate_output": False, "last_layer_dropout": False,
                "sd_checkpoint": "925997e9", "sd_checkpoint_name": "sd15", "optional_info": None},
               hypernetwork_dir / "anime.pt")
    h = hn.Hypernetwork()
    h.load(str(hypernetwork_dir / "anime.pt"))
    assert (h.name, h.step, h.activation_func, h.sd_checkpoint_name) == ("anime", 7, "relu", "sd15")
    x = torch.randn(2, 3, 8)
    expected = x + F.linear(F.relu(F.linear(x, k["linear.0.weight"], k["linear.0.bias"])),
                            k["linear.2.weight"], k["linear.2.bias"])
    assert torch.allclose(h.layers[8][0](x), expected, atol=1e-5)


def test_reads_a_legacy_file_with_linear1_linear2_and_no_metadata(hypernetwork_dir):
    torch.manual_seed(0)
    k, v = _a1111_state(8, 16, legacy=True), _a1111_state(8, 16, legacy=True)
    torch.save({8: (k, v), "step": 1000}, hypernetwork_dir / "old.pt")
    h = hn.Hypernetwork()
    h.load(str(hypernetwork_dir / "old.pt"))
    assert h.name == "old" and h.layer_structure == [1, 2, 1] and h.activate_output is True
    x = torch.randn(1, 2, 8)
    expected = x + F.linear(F.linear(x, v["linear1.weight"], v["linear1.bias"]), v["linear2.weight"], v["linear2.bias"])
    assert torch.allclose(h.layers[8][1](x), expected, atol=1e-5)


class Sneaky:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/hypernet-test-should-not-exist",))


class Custom:
    pass


def test_a_file_that_needs_real_unpickling_is_refused(hypernetwork_dir):
    for i, payload in enumerate((Sneaky(), Custom())):
        path = hypernetwork_dir / f"evil{i}.pt"
        torch.save({8: (_a1111_state(8, 16), _a1111_state(8, 16)), "optional_info": payload}, path)
        with pytest.raises(storage.UnsafeFileError, match=f"evil{i}.pt") as err:
            hn.Hypernetwork().load(str(path))
        assert "nothing in it was unpickled" in str(err.value)
    assert not os.path.exists("/tmp/hypernet-test-should-not-exist")
    with pytest.raises(pickle.UnpicklingError):  # sanity: torch's own guard is what refuses it
        torch.load(hypernetwork_dir / "evil1.pt", weights_only=True)


def test_a_file_that_is_not_a_hypernetwork_is_refused(hypernetwork_dir):
    path = hypernetwork_dir / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 8)}, "name": "emb", "step": 3}, path)
    with pytest.raises(ValueError, match="no layers"):
        hn.Hypernetwork().load(str(path))


def test_optimizer_sidecar_is_used_only_for_the_file_it_was_saved_with(hypernetwork_dir):
    h = hn.Hypernetwork(name="opt", enable_sizes=[8])
    optimizer = torch.optim.AdamW(h.train().weights(), lr=0.1)
    h.layers[8][0](torch.ones(1, 8)).sum().backward()
    optimizer.step()
    h.optimizer_name, h.optimizer_state_dict = "AdamW", optimizer.state_dict()
    path = str(hypernetwork_dir / "opt.pt")
    h.save(path)
    assert os.path.exists(path + ".optim")
    loaded = hn.Hypernetwork()
    loaded.load(path)
    assert loaded.optimizer_name == "AdamW" and loaded.optimizer_state_dict["state"]
    saved_state = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded.optimizer_state_dict["state"][0]["exp_avg"], saved_state)

    h.optimizer_state_dict = None
    h.step = 5
    h.save(path)  # a new file: the old sidecar no longer matches it
    loaded.load(path)
    assert loaded.optimizer_state_dict is None


def test_list_hypernetworks_is_recursive_sorted_case_insensitively_and_skips_none(hypernetwork_dir):
    (hypernetwork_dir / "sub").mkdir()
    for name in ("b.pt", "A.pt", "sub/c.pt", "None.pt", "notes.txt"):
        (hypernetwork_dir / name).write_bytes(b"")
    found = hn.list_hypernetworks(str(hypernetwork_dir))
    assert list(found) == ["A", "b", "c"]
    assert found["c"] == str(hypernetwork_dir / "sub" / "c.pt")


def test_create_hypernetwork_writes_a_loadable_file(hypernetwork_dir):
    path = hn.create_hypernetwork("my/style?", ["8", 16], False, layer_structure="1, 2, 1", activation_func="relu",
                                  weight_init="KaimingNormal", add_layer_norm=True, use_dropout=True,
                                  dropout_structure="0, 0.1, 0")
    assert path == str(hypernetwork_dir / "mystyle.pt")
    assert shared.hypernetworks["mystyle"] == path
    h = hn.load_hypernetwork("mystyle")
    assert set(h.layers) == {8, 16} and h.dropout_structure == [0, 0.1, 0] and h.weight_init == "KaimingNormal"
    with pytest.raises(FileExistsError):
        hn.create_hypernetwork("mystyle", [8], False)
    hn.create_hypernetwork("mystyle", [8], True)
    with pytest.raises(ValueError):
        hn.create_hypernetwork("??", [8], False)


def test_load_hypernetworks_orders_reuses_and_reloads_changed_files(hypernetwork_dir):
    hn.create_hypernetwork("a", [8], False)
    hn.create_hypernetwork("b", [8], False)
    failures = hn.load_hypernetworks(["b", "missing", "a"], [0.5, 1.0, 2.0])
    assert failures == [("missing", "Hypernetwork not found: missing")]
    b, a = shared.loaded_hypernetworks
    assert (b.name, a.name, b.multiplier, a.layers[8][0].multiplier) == ("b", "a", 0.5, 2.0)
    hn.load_hypernetworks(["a"], [1.0])
    assert shared.loaded_hypernetworks[0] is a  # reused while the file is unchanged
    hn.create_hypernetwork("a", [8], True)
    hn.load_hypernetworks(["a"])
    assert shared.loaded_hypernetworks[0] is not a
    hn.load_hypernetworks(["a", "a"], [0.3, 0.7])
    assert len(shared.loaded_hypernetworks) == 1 and shared.loaded_hypernetworks[0].multiplier == 0.7


# --- K/V hooks ---

def _attention_with_hooks(query_dim=16, cross_dim=8):
    """diffusers Attention: cross-attention from an 8-wide context, or self-attention with cross_dim=None."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=2, dim_head=8).eval()
    assert hn.install_hypernetwork_hooks(attn) == 1
    assert hn.install_hypernetwork_hooks(attn) == 0  # once only
    return attn


def _manual_attention(attn, x, context_k, context_v):
    q, k, v = attn.to_q(x), attn.to_k(context_k), attn.to_v(context_v)
    b, n, _ = q.shape

    def heads(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


def _random_hypernetwork(sizes, seed, multiplier=1.0):
    torch.manual_seed(seed)
    h = hn.Hypernetwork(name=f"h{seed}", enable_sizes=sizes, layer_structure=[1, 2, 1], activation_func="relu",
                        weight_init="XavierNormal")
    return h.set_multiplier(multiplier)


def test_kv_hooks_change_cross_and_self_attention_exactly_by_the_formula():
    attn = _attention_with_hooks()
    attn_self = _attention_with_hooks(cross_dim=None)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    h = _random_hypernetwork([8, 16], seed=1, multiplier=0.7)
    k_mod, v_mod = h.layers[8]
    k16, v16 = h.layers[16]
    with torch.no_grad():
        # references by hand, with nothing loaded (to_k/to_v are hooked, so the hooks must be idle here)
        plain = attn(x, encoder_hidden_states=context)
        assert torch.allclose(plain, _manual_attention(attn, x, context, context), atol=1e-5)
        expected = _manual_attention(attn, x, context + k_mod.linear(context) * 0.7,
                                     context + v_mod.linear(context) * 0.7)
        self_plain = attn_self(x)
        # self-attention: the context is x itself, so the width-16 pair applies
        self_expected = _manual_attention(attn_self, x, x + k16.linear(x) * 0.7, x + v16.linear(x) * 0.7)

        shared.loaded_hypernetworks[:] = [h]
        hooked = attn(x, encoder_hidden_states=context)
        self_hooked = attn_self(x)
        shared.loaded_hypernetworks[:] = []
        after = attn_self(x)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert not torch.allclose(self_hooked, self_plain, atol=1e-3)
    assert torch.allclose(self_hooked, self_expected, atol=1e-5)
    assert torch.equal(after, self_plain)


def test_several_hypernetworks_chain_in_order():
    attn = _attention_with_hooks()
    x, context = torch.randn(1, 5, 16), torch.randn(1, 7, 8)
    a, b = _random_hypernetwork([8], seed=1), _random_hypernetwork([8], seed=2, multiplier=0.5)
    with torch.no_grad():
        ck, cv = hn.apply_hypernetworks([a, b], context)
        assert torch.allclose(ck, b.layers[8][0](a.layers[8][0](context)))
        assert torch.allclose(cv, b.layers[8][1](a.layers[8][1](context)))
        expected = _manual_attention(attn, x, ck, cv)
        shared.loaded_hypernetworks[:] = [a, b]
        ab = attn(x, encoder_hidden_states=context)
        shared.loaded_hypernetworks[:] = [b, a]
        ba = attn(x, encoder_hidden_states=context)
    assert torch.allclose(ab, expected, atol=1e-5)
    assert not torch.allclose(ba, ab, atol=1e-4)


def test_hooks_follow_the_context_dtype():
    attn = _attention_with_hooks().to(torch.bfloat16)
    h = _random_hypernetwork([8], seed=3)
    shared.loaded_hypernetworks[:] = [h]
    context = torch.randn(1, 7, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = attn(torch.randn(1, 5, 16, dtype=torch.bfloat16), encoder_hidden_states=context)
    assert out.dtype == torch.bfloat16 and h.layers[8][0].linear[0].weight.dtype == torch.float32


class LdmCrossAttention(torch.nn.Module):
    """The compvis layout: ldm.modules.attention.CrossAttention's parameters and math."""

    def __init__(self, query_dim, context_dim, heads=2, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = torch.nn.Linear(query_dim, inner, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, query_dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1]))


def test_compvis_layout_is_hooked_through_model_diffusion_model():
    torch.manual_seed(0)
    layer = LdmCrossAttention(16, 8)
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Sequential(layer)))
    assert hn.install_hypernetwork_hooks(sd_model) == 1
    h = _random_hypernetwork([8], seed=4)
    x, context = torch.randn(1, 5, 16), torch.randn(1, 7, 8)
    with torch.no_grad():
        plain = layer(x, context)
        shared.loaded_hypernetworks[:] = [h]
        ck, cv = hn.apply_hypernetworks([h], context)
        hooked = layer(x, context)
        shared.loaded_hypernetworks[:] = []
        # the same math with the transformed contexts fed by hand
        hn.remove_hypernetwork_hooks(sd_model)
        q = layer.to_q(x)
        k, v = layer.to_k(ck), layer.to_v(cv)
        q, k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * layer.scale).softmax(-1)
        manual = layer.to_out((weights @ v).transpose(1, 2).reshape(1, -1, 16))
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert torch.allclose(hooked, manual, atol=1e-5)


# --- the <hypernet:> tag ---

def _job(prompt: str):
    from modules.processing import StableDiffusionProcessingTxt2Img

    p = StableDiffusionProcessingTxt2Img(prompt=prompt)
    p.all_prompts = [prompt]
    return p


def test_tag_handler_loads_comments_and_writes_hashes(hypernetwork_dir, monkeypatch):
    hn.create_hypernetwork("style", [8], False)
    p = _job("a cat <hypernet:style:0.6> <hypernet:ghost> <hypernet:style2:lots>")
    _, data = extra_networks.parse_prompt(p.all_prompts[0])
    handler = ExtraNetworkHypernet()
    handler.activate(p, data["hypernet"])
    assert [(h.name, h.multiplier) for h in shared.loaded_hypernetworks] == [("style", 0.6)]
    assert "Hypernetwork not found: ghost" in p.comments
    assert any("<hypernet:style2:lots>" in c and "not a number" in c for c in p.comments)
    value = p.extra_generation_params["Hypernet hashes"]
    assert value.startswith("style: ") and len(value.split(": ")[1]) == 10
    handler.deactivate(p)
    assert shared.loaded_hypernetworks == []

    # the option acts like a tag with the default multiplier, added to the prompt once
    monkeypatch.setitem(shared.opts.data, "sd_hypernetwork", "style")
    p = _job("a dog")
    handler.activate(p, [])
    handler.activate(p, [])
    assert p.all_prompts == ["a dog<hypernet:style:1.0>"]
    assert shared.loaded_hypernetworks[0].multiplier == 1.0


def test_registered_under_hypernet():
    saved = dict(extra_networks.extra_network_registry)
    try:
        extra_networks.register_default_extra_networks()
        assert isinstance(extra_networks.extra_network_registry["hypernet"], ExtraNetworkHypernet)
    finally:
        extra_networks.extra_network_registry.clear()
        extra_networks.extra_network_registry.update(saved)


# --- training ---

def test_learn_rate_schedule_syntax():
    assert learn_schedule.parse_learn_rate("0.005:2, 1e-3:4, 1e-4", 10) == [(0.005, 2), (1e-3, 4), (1e-4, 10)]
    s = learn_schedule.LearnRateScheduler("0.005:2, 1e-3", 5)
    assert [s.step(i) is not None and s.learn_rate for i in range(5)] == [0.005, 0.005, 1e-3, 1e-3, 1e-3]
    s.step(5)
    assert s.finished
    for bad in ("", "x", "0.1:5, 0.2:3", "0.1, 0.2:8"):
        with pytest.raises(ValueError):
            learn_schedule.parse_learn_rate(bad, 10)


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_pipeline():
    """A Stable Diffusion 1.x pipeline a few hundred kB big: byte-level CLIP tokenizer, 2-level UNet and VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=16,
                                                bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _write_dataset(folder, count=4):
    from PIL import Image

    folder.mkdir()
    colours = [(220, 30, 30), (30, 200, 40), (20, 40, 220), (230, 220, 30)]
    for i in range(count):
        img = Image.new("RGB", (40, 32), colours[i % 4])
        img.paste((255, 255, 255), (4 * i, 4, 4 * i + 12, 20))
        img.save(folder / f"{i:02d}-img.png")
        (folder / f"{i:02d}-img.txt").write_text(f"square, colour {i}")


def _fixed_batch_loss(pipe, latents, embeds, noise, timesteps) -> float:
    from modules.hypernetworks.training import _noise_scheduler

    scheduler = _noise_scheduler(pipe)
    with torch.no_grad():
        pred = pipe.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=embeds).sample
    return F.mse_loss(pred, noise).item()


@pytest.fixture
def one_thread():
    """The tiny model is far faster on one thread (and does not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_lowers_the_loss_saves_resumes_and_reports_progress(hypernetwork_dir, tmp_path, one_thread):
    from modules.hypernetworks import training
    from modules.hypernetworks.dataset import HypernetworkDataset

    pipe = tiny_pipeline()
    data = tmp_path / "data"
    _write_dataset(data)
    hn.create_hypernetwork("trained", [32], False, layer_structure=[1, 2, 1], activation_func="relu")
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    # a fixed evaluation batch: the dataset's latents with fixed noise and timesteps
    gen = torch.Generator().manual_seed(0)
    ds = HypernetworkDataset(str(data), pipe.vae, 32, 32, "deterministic", gen)
    latents = torch.stack([ds.latents(e) for e in ds.entries]).repeat(2, 1, 1, 1)
    embeds, _ = training._encode_prompts(training._pipeline(pipe), [e.caption for e in ds.entries] * 2, 32, 32, "cpu")
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=gen)

    shared.loaded_hypernetworks[:] = [hn.load_hypernetwork("trained").set_multiplier(1.0)]
    hn.install_hypernetwork_hooks(pipe)
    before = _fixed_batch_loss(pipe, latents, embeds, noise, timesteps)
    shared.loaded_hypernetworks.clear()

    seen_progress = []
    original_write = training._write_loss

    def spy(log_directory, step, loss, learn_rate):
        seen_progress.append((shared.state.job, shared.state.job_no, shared.state.job_count))
        original_write(log_directory, step, loss, learn_rate)

    training._write_loss = spy
    try:
        trained, filename = training.train_hypernetwork(
            "trained", data_root=str(data), steps=40, learn_rate="0.03:20, 0.01", batch_size=4,
            training_width=32, training_height=32, log_directory=str(tmp_path / "logs"), save_hypernetwork_every=20,
            create_image_every=40, preview_prompt="square", preview_steps=2, preview_width=32, preview_height=32,
            preview_seed=1, seed=0, sd_model=pipe)
    finally:
        training._write_loss = original_write

    assert filename == str(hypernetwork_dir / "trained.pt") and trained.step == 40
    assert seen_progress[0] == ("train-hypernetwork", 1, 40) and seen_progress[-1][1] == 40
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())  # only the hypernetwork
    assert all(p.requires_grad for p in pipe.unet.parameters())  # flags restored
    assert shared.loaded_hypernetworks == []

    shared.loaded_hypernetworks[:] = [hn.load_hypernetwork("trained").set_multiplier(1.0)]
    after = _fixed_batch_loss(pipe, latents, embeds, noise, timesteps)
    shared.loaded_hypernetworks.clear()
    assert after < before * 0.9, (before, after)

    logs = tmp_path / "logs"
    day = next(logs.iterdir())
    assert (day / "trained" / "hypernetworks" / "trained-20.pt").exists()
    assert (day / "trained" / "images" / "trained-40.png").exists()
    assert os.path.exists(filename + ".optim")

    # resume: step and optimizer state come back; interrupt stops after the current step and still saves
    resumed = hn.Hypernetwork()
    resumed.load(filename)
    assert resumed.step == 40 and resumed.optimizer_state_dict is not None
    shared.state.interrupted = False
    original_step = torch.optim.AdamW.step

    def interrupt_after_one(self, *args, **kwargs):
        shared.state.interrupted = True
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = interrupt_after_one
    try:
        trained, _ = training.train_hypernetwork("trained", data_root=str(data), steps=50, learn_rate=0.001,
                                                 training_width=32, training_height=32,
                                                 log_directory=str(tmp_path / "logs"), seed=1, sd_model=pipe)
    finally:
        torch.optim.AdamW.step = original_step
        shared.state.interrupted = False
    assert trained.step == 41
    assert hn.load_hypernetwork("trained").step == 41
