"""Patcher speed and memory behaviours (issue 5): zero work on an unchanged set, only changed layers touched,
bit-exact restore without a full copy (host source, rounding residual, per-layer clone), rollback after a failure
part-way, functional mode, the loaded-network cache. Tiny models; the real-size numbers are in
scripts/bench_lora_patcher.py."""
import copy
import os
import random

import lora_functional
import lora_patch_job
import lora_patcher
import lora_plan
import lora_residual
import lora_settings  # noqa: F401  (registers the options)
import lyco_helpers
import network
import network_lora
import networks
import pytest
import torch

from modules import safetensors_mmap, shared
from scripts import make_demo_loras as demo

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# --- helpers ------------------------------------------------------------------------------------------------------
class FileSource:
    """The host seam (`sd_model.original_weights`) the way the host builds it: each component's weights saved
    to a .safetensors file and re-read through a private memory map."""

    def __init__(self, model, folder):
        from safetensors.torch import save_file
        self.maps, self.files = {}, {}
        for comp, module in model.components().items():
            if module is None:
                continue
            path = os.path.join(str(folder), f"{comp}.safetensors")
            save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, path)
            self.files[comp] = (path, os.stat(path).st_mtime_ns)
            self.maps[comp] = safetensors_mmap.open_safetensors_mmap(path)
        self.reads = 0

    def read(self, component: str, param_name: str):
        t = self.maps.get(component, {}).get(param_name)
        if t is not None:
            self.reads += 1
        return t

    def valid(self) -> bool:
        return all(os.stat(p).st_mtime_ns == m for p, m in self.files.values())

    def release(self, tensor) -> None:
        safetensors_mmap.release_pages(tensor)


def state(model) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.components().items() if m is not None
            for k, v in m.state_dict().items()}


def versions(model) -> dict:
    return {f"{c}.{k}": v._version for c, m in model.components().items() if m is not None
            for k, v in m.named_parameters()}


def assert_bitwise(model, original: dict) -> None:
    now = state(model)
    assert now.keys() == original.keys()
    for k, v in now.items():
        o = original[k]
        assert v.dtype == o.dtype and v.shape == o.shape, k
        if v.dtype in INT_VIEW:
            assert torch.equal(v.view(INT_VIEW[v.dtype]), o.view(INT_VIEW[o.dtype])), k
        else:
            assert torch.equal(v, o), k


def layer_weights(model) -> dict:
    import lora_layers
    return {n: m.weight.detach().clone() for n, m in lora_layers.get_layer_map(model).layers.items()
            if getattr(m, "weight", None) is not None}


def reference_weights(model, original: dict, report) -> dict:
    """W0 + Σ m·ΔW from each network module's own compute() (independent of the patcher's fast path)."""
    import lora_layers
    layers = lora_layers.get_layer_map(model).layers
    res = {}
    for name in layers:
        contributions = lora_plan.contributions_for(name, report.networks)
        if not contributions:
            continue
        w0 = original[name + ".weight"]
        total = torch.zeros(w0.shape)
        for c in contributions:
            total += c.module.compute(w0, c.multiplier, c.dyn_dim)[0]
        res[name] = (w0.float() + total).to(w0.dtype)
    return res


def assert_close_to_reference(model, original, report) -> None:
    now = layer_weights(model)
    for name, ref in reference_weights(model, original, report).items():
        tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-4), torch.float16: (2e-3, 1e-5)}[ref.dtype]
        torch.testing.assert_close(now[name].float(), ref.float(), rtol=tol[0], atol=tol[1], msg=name)


def to_dtype(model, dtype):
    for comp in model.components().values():
        if comp is not None:
            comp.to(dtype)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds OpenMP barriers (slow on a shared machine); results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def use_patcher(monkeypatch):
    def use(prefer=None):
        p = lora_patcher.Patcher(prefer=prefer)
        monkeypatch.setattr(networks, "patcher", p)
        return p
    return use


@pytest.fixture
def opts(monkeypatch):
    def set_option(key, value):
        monkeypatch.setitem(shared.opts.data, key, value)
    return set_option


STRATEGIES = {
    "default": None,
    "source": (lora_patcher.SOURCE, lora_patcher.CLONE),
    "residual": (lora_patcher.RESIDUAL, lora_patcher.CLONE),
    "clone": (lora_patcher.CLONE,),
}


def tucker_tensors(model, family: str, rank: int = 3, seed: int = 5) -> dict:
    """Tucker LoCon (`lora_mid`) for the model's 3x3 convs: down (r,in,1,1), mid (r,r,3,3), up (out,r,1,1)."""
    import lora_layers
    gen = torch.Generator().manual_seed(seed)
    structure = lora_layers.LayerMap(model).structure
    res = {}
    for name, shape in demo.layer_shapes_from_components(model.components()).items():
        if len(shape) != 4 or shape[2:] != (3, 3) or "resnets" not in name:
            continue
        key = demo.kohya_key(name, family, structure)
        if key is None:
            continue
        r = min(rank, shape[0], shape[1])
        res[f"{key}.lora_down.weight"] = torch.randn((r, shape[1], 1, 1), generator=gen) * 0.3
        res[f"{key}.lora_mid.weight"] = torch.randn((r, r, 3, 3), generator=gen) * 0.3
        res[f"{key}.lora_up.weight"] = torch.randn((shape[0], r, 1, 1), generator=gen) * 0.3
        res[f"{key}.alpha"] = torch.tensor(float(r))
    return res


def dora_tensors(model, family: str, seed: int = 6) -> dict:
    """A plain LoRA file plus `dora_scale` (1, in) on every Linear target: a delta that depends on W0."""
    import lora_layers
    structure = lora_layers.LayerMap(model).structure
    shapes = demo.select_layers(demo.layer_shapes_from_components(model.components()), False)
    tensors = demo.lora_tensors(shapes, family, structure, rank=4, alpha=2.0, seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        key = demo.kohya_key(name, family, structure)
        if key is not None and len(shape) == 2:
            tensors[f"{key}.dora_scale"] = 1 + 0.1 * torch.rand((1, shape[1]), generator=gen)
    return tensors


# --- residual codec -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strength", [0.01, 0.3, 5.0])
def test_residual_restores_every_bit_including_special_values(dtype, strength):
    gen = torch.Generator().manual_seed(1)
    w0 = (torch.randn(300, 257, generator=gen) * 0.05).to(dtype)
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-38, float("inf"), -float("inf"), float("nan"), 6e4, -6e4])
    w0.view(-1)[:specials.numel()] = specials.to(dtype)
    w0.view(-1)[1000:1100] = 0  # a run of zeros next to a large delta
    delta = torch.randn(300, 257, generator=gen) * 0.05 * strength
    flat0, flat_d = w0.view(-1), delta.view(-1)
    w = w0.clone()
    flat_w = w.view(-1)
    scratch = lora_residual.Scratch(w0.device, 10_000)
    encoder = lora_residual.Encoder(dtype, w0.numel(), w0.device)
    for start in range(0, w0.numel(), 10_000):  # chunked like the patcher
        end = min(w0.numel(), start + 10_000)
        encoder.merge_into(start, flat_w[start:end], flat0[start:end], flat_d[start:end], scratch)
    residual = encoder.finish(lora_residual.fingerprint(delta))
    merged = torch.add(w0.float(), delta).to(dtype)  # the merge, written plainly
    assert torch.equal(w.view(INT_VIEW[dtype]), merged.view(INT_VIEW[dtype]))
    merged_bits = w.view(INT_VIEW[dtype]).clone()
    half = w0.numel() // 2  # a partial undo (what a failure inside one layer's write needs)
    lora_residual.guess_(flat_w[:half], flat_d[:half], scratch)
    lora_residual.correct_(flat_w, residual, 0, half)
    assert torch.equal(flat_w[:half].view(INT_VIEW[dtype]), flat0[:half].view(INT_VIEW[dtype]))
    assert torch.equal(flat_w[half:].view(INT_VIEW[dtype]), merged_bits.view(-1)[half:])
    lora_residual.guess_(flat_w[half:], flat_d[half:], scratch)
    lora_residual.correct_(flat_w, residual, half)
    assert torch.equal(w.view(INT_VIEW[dtype]), w0.view(INT_VIEW[dtype]))
    assert residual.mismatches > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_of_a_lora_sized_delta_is_under_5_percent(dtype):
    gen = torch.Generator().manual_seed(2)
    w0 = (torch.randn(640, 640, generator=gen) / 640 ** 0.5).to(dtype)
    up, down = torch.randn(640, 32, generator=gen), torch.randn(32, 640, generator=gen)
    delta = up @ down
    delta *= 0.05 * w0.float().std() / delta.std()  # ΔW rms = 5 % of W rms
    encoder = lora_residual.Encoder(dtype, w0.numel(), w0.device)
    encoder.merge_into(0, w0.clone().view(-1), w0.view(-1), delta.view(-1),
                       lora_residual.Scratch(w0.device, w0.numel()))
    residual = encoder.finish(0)
    assert residual.nbytes < 0.05 * w0.numel() * w0.element_size()


# --- zero work, only what changed ---------------------------------------------------------------------------------
@pytest.mark.parametrize("functional", [False, True])
def test_unchanged_set_writes_nothing(tiny_sd1, write_lora, use_patcher, opts, functional):
    opts("lora_functional", functional)
    patcher = use_patcher()
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, locon=True, seed=2)
    first = networks.load_networks(["a", "b"], [1.0, 0.5], [0.8, 0.5], [None, None], sd_model=tiny_sd1)
    assert first.layers_written > 0 and not first.fatal
    before, writes = versions(tiny_sd1), patcher.stats["writes"]
    again = networks.load_networks(["a", "b"], [1.0, 0.5], [0.8, 0.5], [None, None], sd_model=tiny_sd1)
    assert again.layers_written == 0
    assert patcher.stats["writes"] == writes
    assert versions(tiny_sd1) == before


def test_a_change_rewrites_only_the_layers_it_targets(tiny_sd1, write_lora, use_patcher):
    patcher = use_patcher()
    shapes = demo.select_layers(demo.layer_shapes_from_components(tiny_sd1.components()), False)
    unet_layers = [n for n in shapes if n.startswith("unet.")]
    te_layers = [n for n in shapes if n.startswith("text_encoder.")]
    write_lora("u", tiny_sd1, layers=unet_layers, seed=1)
    write_lora("t", tiny_sd1, layers=te_layers, seed=2)
    start = versions(tiny_sd1)
    networks.load_networks(["u", "t"], [1.0, 1.0], sd_model=tiny_sd1)
    after_first = versions(tiny_sd1)
    touched = {k for k in start if start[k] != after_first[k]}
    assert touched == {n + ".weight" for n in unet_layers + te_layers}  # nothing untargeted was written

    writes = patcher.stats["writes"]
    report = networks.load_networks(["u", "t"], [1.0, 0.7], sd_model=tiny_sd1)  # only t's multiplier changes
    assert report.layers_written == len(te_layers) == patcher.stats["writes"] - writes
    now = versions(tiny_sd1)
    assert {k for k in now if now[k] != after_first[k]} == {n + ".weight" for n in te_layers}

    report = networks.load_networks(["u"], [1.0], sd_model=tiny_sd1)  # t removed: only its layers restored
    assert report.layers_written == len(te_layers)


# --- exact restore ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_random_cycles_never_drift_and_restore_bit_exactly(tiny_sd1, write_lora, use_patcher, tmp_path, dtype,
                                                            strategy):
    import lora_layers
    model = to_dtype(tiny_sd1, dtype)
    pristine = copy.deepcopy(model)
    model.original_weights = FileSource(model, tmp_path)
    patcher = use_patcher(STRATEGIES[strategy])
    original = state(model)
    write_lora("plain", model, seed=1)
    write_lora("locon", model, locon=True, seed=2, rank=6)
    write_lora("tucker", tensors=tucker_tensors(model, "sd1"))
    write_lora("dora", tensors=dora_tensors(model, "sd1"))
    names = ["plain", "locon", "tucker", "dora"]
    rng = random.Random(f"{strategy}{dtype}")
    for _ in range(10):
        chosen = rng.sample(names, rng.randint(0, 3))
        te = [rng.choice([0.0, 0.5, 1.0, -0.7]) for _ in chosen]
        unet = [rng.choice([0.0, 1.0, 1.3]) for _ in chosen]
        dyn = [rng.choice([None, None, 2]) for _ in chosen]
        report = networks.load_networks(chosen, te, unet, dyn, sd_model=model)
        assert not report.fatal
        assert all(not n.apply_errors for n in report.networks)
        assert_close_to_reference(model, original, report)
        # the same set applied to a fresh copy of the original gives the same bits: no drift across jobs
        fresh = copy.deepcopy(pristine)
        fresh_layers = lora_layers.LayerMap(fresh).layers
        lora_patcher.Patcher(prefer=STRATEGIES[strategy]).sync(
            fresh_layers, lora_plan.build_plan(fresh_layers, report.networks), model.original_weights)
        ours, theirs = layer_weights(model), layer_weights(fresh)
        for name in ours:
            assert torch.equal(ours[name].view(INT_VIEW[dtype]), theirs[name].view(INT_VIEW[dtype])), name
    networks.load_networks([], sd_model=model)
    assert_bitwise(model, original)
    assert patcher.stats["inexact"] == 0
    used = {k for k in ("source", "residual", "clone") if patcher.stats[k]}
    expected = {"default": {"source"}, "source": {"source"}, "residual": {"residual", "clone"},
                "clone": {"clone"}}[strategy]
    assert used == expected  # DoRA depends on W0: the residual strategy clones those layers


def test_parameters_the_source_does_not_know_use_the_residual(tiny_sd1, write_lora, use_patcher, tmp_path):
    patcher = use_patcher()
    source = FileSource(tiny_sd1, tmp_path)
    tiny_sd1.original_weights = source
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    del source.maps["text_encoder"]  # the host does not know these parameters
    networks.load_networks(["a"], sd_model=tiny_sd1)
    networks.load_networks(["a"], [0.5], sd_model=tiny_sd1)
    assert patcher.stats["source"] > 0 and patcher.stats["residual"] > 0 and patcher.stats["source_reads"] > 0
    networks.load_networks([], sd_model=tiny_sd1)
    assert patcher.stats["inexact"] == 0
    assert_bitwise(tiny_sd1, original)


def test_source_finds_parameters_under_their_module_paths(tiny_sdxl, write_lora, use_patcher, tmp_path):
    """SDXL's second text encoder has a `text_model.` level that canonical layer names drop."""
    tiny_sdxl.original_weights = FileSource(tiny_sdxl, tmp_path)
    patcher = use_patcher()
    original = state(tiny_sdxl)
    write_lora("x", tiny_sdxl, family="sdxl", seed=1)
    report = networks.load_networks(["x"], sd_model=tiny_sdxl)
    assert any(n.startswith("text_encoder_2.") for n in report.networks[0].modules)
    assert patcher.stats["source"] == report.layers_written and patcher.stats["residual"] == 0
    networks.load_networks([], sd_model=tiny_sdxl)
    assert_bitwise(tiny_sdxl, original)


def test_an_invalid_source_is_not_used(tiny_sd1, write_lora, use_patcher, tmp_path):
    patcher = use_patcher()
    source = FileSource(tiny_sd1, tmp_path)
    os.utime(source.files["unet"][0], ns=(1, 1))  # the checkpoint changed on disk since it was loaded
    tiny_sd1.original_weights = source
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    networks.load_networks(["a"], sd_model=tiny_sd1)
    networks.load_networks([], sd_model=tiny_sd1)
    assert source.reads == 0 and patcher.stats["source"] == 0 and patcher.stats["residual"] > 0
    assert_bitwise(tiny_sd1, original)


def test_a_source_that_goes_invalid_while_patched_is_reported_not_trusted(tiny_sd1, write_lora, use_patcher,
                                                                          tmp_path, caplog):
    patcher = use_patcher()
    source = FileSource(tiny_sd1, tmp_path)
    tiny_sd1.original_weights = source
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    networks.load_networks(["a"], sd_model=tiny_sd1)
    os.utime(source.files["unet"][0], ns=(1, 1))
    with caplog.at_level("ERROR", logger="lora"):
        networks.load_networks([], sd_model=tiny_sd1)
    # the originals of the UNet were only in that file: they come back approximately, and the user is told
    assert patcher.stats["inexact"] > 0 and "reload the checkpoint" in caplog.text
    now = state(tiny_sd1)
    for k, v in now.items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)


def test_memory_held_is_a_few_percent_of_the_touched_bytes(write_lora, use_patcher, tmp_path):
    from conftest import TinyDiffusersModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(3)
    config = CLIPTextConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=100, projection_dim=256, max_position_embeddings=8)
    te = CLIPTextModel(config).eval()
    for m in te.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    model = TinyDiffusersModel("sd1", None, te)
    import lora_layers
    shapes = demo.select_layers(demo.layer_shapes_from_components(model.components()), False)
    tensors = demo.lora_tensors(shapes, "sd1", None, rank=32, alpha=16, seed=4, strength=0.05, dtype=torch.float32)
    write_lora("small", tensors=tensors)
    layers = lora_layers.get_layer_map(model).layers
    touched = sum(layers[n].weight.numel() * layers[n].weight.element_size() for n in shapes)

    patcher = use_patcher(STRATEGIES["residual"])
    report = networks.load_networks(["small"], sd_model=model)
    assert report.layers_written == len(shapes)
    assert 0 < report.held_bytes < 0.05 * touched
    networks.load_networks([], sd_model=model)

    patcher = use_patcher()
    model.original_weights = FileSource(model, tmp_path)
    report = networks.load_networks(["small"], sd_model=model)
    assert report.held_bytes == 0 and patcher.stats["source"] == len(shapes)


@pytest.mark.parametrize("strategy", ["source", "residual", "clone"])
def test_non_contiguous_weights_round_trip(tiny_sd1, write_lora, use_patcher, tmp_path, strategy):
    import lora_layers
    layers = lora_layers.get_layer_map(tiny_sd1).layers
    names = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and "to_q" in n][:2]
    for n in names:  # e.g. a checkpoint that stores these transposed
        w = layers[n].weight.detach()
        layers[n].weight = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=False)
        assert not layers[n].weight.is_contiguous()
    tiny_sd1.original_weights = FileSource(tiny_sd1, tmp_path)
    use_patcher(STRATEGIES[strategy])
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    report = networks.load_networks(["a"], [0.8], sd_model=tiny_sd1)
    assert not report.fatal and all(not n.apply_errors for n in report.networks)
    assert_close_to_reference(tiny_sd1, original, report)
    networks.load_networks([], sd_model=tiny_sd1)
    assert_bitwise(tiny_sd1, original)


def test_a1111_layer_doors_restore_and_reapply_one_layer(tiny_sd1, write_lora, use_patcher):
    use_patcher()
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    networks.load_networks(["a"], sd_model=tiny_sd1)
    merged = layer_weights(tiny_sd1)
    layers = networks.lora_layers.get_layer_map(tiny_sd1).layers
    name = next(n for n in merged if "attn1.to_q" in n)
    networks.network_restore_weights_from_backup(layers[name])
    assert torch.equal(layers[name].weight, original[name + ".weight"])
    networks.network_apply_weights(layers[name])
    assert torch.equal(layers[name].weight, merged[name])
    networks.network_apply_weights(layers[name])  # already there: nothing written
    assert torch.equal(layers[name].weight, merged[name])
    networks.load_networks([], sd_model=tiny_sd1)
    assert_bitwise(tiny_sd1, original)


# --- failure part-way ---------------------------------------------------------------------------------------------
class ExplodingModule(network_lora.NetworkModuleLora):
    """A real LoRA module whose delta runs out of memory (what a too-large job does on a GPU)."""

    def calc_delta(self, orig_weight, *args, **kwargs):
        raise torch.OutOfMemoryError("test: CUDA out of memory")


class ExplodingRows(lyco_helpers.RowDelta):
    """A fused term that runs out of memory when it is written (in a batch's write phase, not while planning)."""

    def rows(self, out, r0, r1, scratch, accumulate):
        raise torch.OutOfMemoryError("test: CUDA out of memory")

    def add_to(self, weight, scratch, block_elements):
        raise torch.OutOfMemoryError("test: CUDA out of memory")


class ExplodingWriteModule(network_lora.NetworkModuleLora):
    def row_delta(self, weight_shape, device, multiplier, dyn_dim=None):
        return ExplodingRows()


def _explode_last(model, name: str, cls):
    """Network `name` with the module of the last layer a job writes swapped for a `cls` copy; (network, layer, the
    good module) to put back."""
    net = networks.lora_loader.get_network(name, networks.find_network(name), networks.lora_layers.get_layer_map(model))
    order = list(networks.lora_layers.get_layer_map(model).layers)
    last = max(net.modules, key=order.index)
    good = net.modules[last]
    boom = cls.__new__(cls)
    boom.__dict__.update(good.__dict__)
    net.modules[last] = boom
    return net, last, good


def _assert_every_layer_back(model, patcher, original) -> None:
    assert networks.loaded_networks == []
    assert_bitwise(model, original)
    layers = networks.lora_layers.get_layer_map(model).layers
    assert all(patcher.current_state(m) == () and patcher.record(m) is None for m in layers.values())


@pytest.mark.parametrize("batch", ["each", "whole"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_failure_part_way_puts_every_layer_back(tiny_sd1, write_lora, use_patcher, tmp_path, strategy, batch,
                                                monkeypatch):
    """A delta that fails while a job is planned: with one write per batch ("each") many layers were written
    before it; with the whole job in one batch ("whole") the writes that can wait were not, the others were."""
    if batch == "each":
        monkeypatch.setattr(lora_patch_job, "BATCH_BYTES", 0)
    tiny_sd1.original_weights = FileSource(tiny_sd1, tmp_path)
    patcher = use_patcher(STRATEGIES[strategy])
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, locon=True, seed=2)
    assert not networks.load_networks(["a"], sd_model=tiny_sd1).fatal  # a previous job left layers patched
    b, last, good = _explode_last(tiny_sd1, "b", ExplodingModule)
    writes = patcher.stats["writes"]
    report = networks.load_networks(["a", "b"], sd_model=tiny_sd1)
    assert report.fatal and "out of memory" in report.fatal
    if batch == "each":
        assert patcher.stats["writes"] > writes + 10  # it failed part-way, after writing many layers
    _assert_every_layer_back(tiny_sd1, patcher, original)
    b.modules[last] = good
    report = networks.load_networks(["a", "b"], sd_model=tiny_sd1)  # and the next job works
    assert not report.fatal and report.layers_written > 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_failure_in_a_batch_write_puts_every_layer_back(tiny_sd1, write_lora, use_patcher, tmp_path, strategy):
    """The last layer's write fails after the rest of its batch was written (and others were rewritten from the
    previous job's merge): every layer gets its original back, bit for bit, and the next job works."""
    tiny_sd1.original_weights = FileSource(tiny_sd1, tmp_path)
    patcher = use_patcher(STRATEGIES[strategy])
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, seed=2)
    assert not networks.load_networks(["a"], sd_model=tiny_sd1).fatal
    b, last, good = _explode_last(tiny_sd1, "b", ExplodingWriteModule)
    writes = patcher.stats["writes"]
    report = networks.load_networks(["a", "b"], sd_model=tiny_sd1)
    assert report.fatal and "out of memory" in report.fatal and last in report.fatal
    assert patcher.stats["writes"] > writes + 10  # the failure came after the batch's other writes
    _assert_every_layer_back(tiny_sd1, patcher, original)
    b.modules[last] = good
    assert not networks.load_networks(["a", "b"], sd_model=tiny_sd1).fatal


# --- bias deltas and weights changed from outside -----------------------------------------------------------------
class BiasModule(network.NetworkModule):
    """A full-rank difference with a bias difference (ΔW = m·diff, Δb = m·diff_b)."""

    delta_depends_on_weight = False

    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.diff, self.diff_b = weights.w["diff"], weights.w["diff_b"]

    def calc_delta(self, orig_weight, *args, **kwargs):
        return self.diff.to(orig_weight.device, torch.float32), self.diff.shape, self.diff_b


def _bias_network(layers: dict, names: list) -> network.Network:
    net = network.Network("bias", None)
    gen = torch.Generator().manual_seed(9)
    for name in names:
        w = layers[name].weight
        weights = network.NetworkWeights(name, name, {"diff": torch.randn(w.shape, generator=gen) * 0.01,
                                                      "diff_b": torch.randn(w.shape[0], generator=gen) * 0.01})
        net.modules[name] = BiasModule(net, weights)
    return net


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_bias_deltas_create_and_remove_biases_exactly(tiny_sd1, tmp_path, strategy):
    import lora_layers
    layers = lora_layers.get_layer_map(tiny_sd1).layers
    with_bias = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and m.bias is not None][:3]
    without = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and m.bias is None][:3]
    assert with_bias and without
    net = _bias_network(layers, with_bias + without)
    original = state(tiny_sd1)
    patcher = lora_patcher.Patcher(prefer=STRATEGIES[strategy])
    source = FileSource(tiny_sd1, tmp_path)
    for m in (1.0, 0.3):
        net.te_multiplier = net.unet_multiplier = m
        patcher.sync(layers, lora_plan.build_plan(layers, [net]), source)
        for name in with_bias + without:
            w0 = original[name + ".weight"]
            torch.testing.assert_close(layers[name].weight, w0 + m * net.modules[name].diff)
            b0 = original.get(name + ".bias", torch.zeros(w0.shape[0]))
            torch.testing.assert_close(layers[name].bias, b0 + m * net.modules[name].diff_b)
    patcher.sync(layers, {}, source)
    assert all(layers[n].bias is None for n in without)
    assert_bitwise(tiny_sd1, original)


def test_weights_loaded_in_place_become_the_new_original(tiny_sd1, write_lora, use_patcher):
    use_patcher()
    write_lora("a", tiny_sd1, seed=1)
    networks.load_networks(["a"], sd_model=tiny_sd1)
    new_weights = {k: torch.randn_like(v) for k, v in tiny_sd1.unet.state_dict().items() if v.is_floating_point()}
    tiny_sd1.unet.load_state_dict(new_weights, strict=False)  # e.g. the host loads another checkpoint in place
    expected = state(tiny_sd1)
    networks.load_networks([], sd_model=tiny_sd1)
    now = state(tiny_sd1)
    for k in new_weights:
        assert torch.equal(now["unet." + k], expected["unet." + k]), k


# --- functional mode ----------------------------------------------------------------------------------------------
def _outputs(model) -> list:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 7), generator=gen)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        hidden = model.text_encoder(ids).last_hidden_state
        out = model.unet(sample, 10, encoder_hidden_states=hidden).sample
    return [hidden, out]


@pytest.mark.parametrize("case", ["plain", "locon_dyn", "tucker", "dora", "stack"])
def test_functional_mode_matches_merged_output_and_writes_nothing(tiny_sd1, write_lora, use_patcher, opts, case):
    use_patcher()
    write_lora("plain", tiny_sd1, seed=1)
    write_lora("locon", tiny_sd1, locon=True, seed=2, rank=6)
    write_lora("tucker", tensors=tucker_tensors(tiny_sd1, "sd1"))
    write_lora("dora", tensors=dora_tensors(tiny_sd1, "sd1"))
    names, te, unet, dyn = {
        "plain": (["plain"], [0.8], [1.2], [None]),
        "locon_dyn": (["locon"], [1.0], [0.9], [3]),
        "tucker": (["tucker"], [1.0], [1.0], [None]),
        "dora": (["dora"], [0.7], [1.0], [None]),
        "stack": (["plain", "locon", "tucker", "dora"], [1.0, 0.5, 1.0, 0.5], [1.0, -0.5, 0.7, 1.0],
                  [None, 2, None, None]),
    }[case]
    original = state(tiny_sd1)
    base = _outputs(tiny_sd1)
    merged_report = networks.load_networks(names, te, unet, dyn, sd_model=tiny_sd1)
    merged = _outputs(tiny_sd1)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(merged, base, strict=True))

    opts("lora_functional", True)
    before = versions(tiny_sd1)
    report = networks.load_networks(names, te, unet, dyn, sd_model=tiny_sd1)
    assert_bitwise(tiny_sd1, original)  # the merge was undone and nothing else written
    assert report.layers_written >= merged_report.layers_written
    functional_out = _outputs(tiny_sd1)
    for a, b in zip(functional_out, merged, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(not n.apply_errors for n in report.networks)
    again = networks.load_networks(names, te, unet, dyn, sd_model=tiny_sd1)
    assert again.layers_written == 0
    networks.load_networks([], sd_model=tiny_sd1)
    for a, b in zip(_outputs(tiny_sd1), base, strict=True):
        assert torch.equal(a, b)
    layers = networks.lora_layers.get_layer_map(tiny_sd1).layers
    assert all(getattr(m, "network_functional", None) is None and not m._forward_hooks for m in layers.values())
    after = versions(tiny_sd1)
    assert {k for k in after if after[k] != before[k]} <= {k for k in before if "weight" in k}  # only the un-merge


def test_functional_plain_lora_keeps_only_factors(tiny_sd1, write_lora, use_patcher, opts):
    use_patcher()
    opts("lora_functional", True)
    write_lora("plain", tiny_sd1, seed=1)
    report = networks.load_networks(["plain"], sd_model=tiny_sd1)
    layers = networks.lora_layers.get_layer_map(tiny_sd1).layers
    hooks = [h for m in layers.values() if (h := getattr(m, "network_functional", None)) is not None]
    assert hooks and all(isinstance(b, network_lora.LowRankBypass) for h in hooks for b in h.branches)
    touched = sum(m.weight.numel() * m.weight.element_size() for m in layers.values()
                  if getattr(m, "network_functional", None) is not None)
    assert report.held_bytes < touched


def test_functional_bias_module_matches_merge(tiny_sd1):
    import lora_layers
    layers = lora_layers.get_layer_map(tiny_sd1).layers
    names = [n for n, m in layers.items() if isinstance(m, torch.nn.Linear) and n.startswith("text_encoder")]
    net = _bias_network(layers, names)
    base = _outputs(tiny_sd1)
    patcher = lora_patcher.Patcher()
    patcher.sync(layers, lora_plan.build_plan(layers, [net]))
    merged = _outputs(tiny_sd1)
    patcher.sync(layers, {})
    hooks = lora_functional.FunctionalHooks()
    hooks.sync(layers, lora_plan.build_plan(layers, [net]))
    functional = _outputs(tiny_sd1)
    torch.testing.assert_close(functional[0], merged[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(functional[0], base[0], atol=1e-4)
    hooks.clear(layers)
    assert torch.equal(_outputs(tiny_sd1)[0], base[0])


# --- loaded-network cache -----------------------------------------------------------------------------------------
def test_in_memory_cache_avoids_rereads_and_a_changed_file_is_reread(tiny_sd1, write_lora, use_patcher, opts):
    use_patcher()
    opts("lora_in_memory_limit", 2)
    original = state(tiny_sd1)
    write_lora("a", tiny_sd1, seed=1)
    path_b = write_lora("b", tiny_sd1, seed=2)
    net_a = networks.load_networks(["a"], sd_model=tiny_sd1).networks[0]
    net_b = networks.load_networks(["b"], sd_model=tiny_sd1).networks[0]
    assert networks.load_networks(["a"], sd_model=tiny_sd1).networks[0] is net_a  # not read again
    assert networks.load_networks(["b"], sd_model=tiny_sd1).networks[0] is net_b
    report = networks.load_networks(["b"], sd_model=tiny_sd1)
    assert report.layers_written == 0

    write_lora("b", tiny_sd1, seed=3)  # the same name, new content
    st = os.stat(path_b)
    os.utime(path_b, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    report = networks.load_networks(["b"], sd_model=tiny_sd1)
    assert report.networks[0] is not net_b and report.layers_written > 0
    reference = reference_weights(tiny_sd1, original, report)
    now = layer_weights(tiny_sd1)
    for name, ref in reference.items():
        torch.testing.assert_close(now[name], ref, rtol=1e-5, atol=1e-6)
    # the file was rewritten in place while the old network was merged: its restore still had the old tensors
    networks.load_networks([], sd_model=tiny_sd1)
    assert_bitwise(tiny_sd1, original)
    assert networks.patcher.stats["inexact"] == 0


def test_zero_limit_rereads_on_every_switch(tiny_sd1, write_lora, use_patcher, opts):
    use_patcher()
    opts("lora_in_memory_limit", 0)
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, seed=2)
    net_a = networks.load_networks(["a"], sd_model=tiny_sd1).networks[0]
    networks.load_networks(["b"], sd_model=tiny_sd1)
    assert networks.load_networks(["a"], sd_model=tiny_sd1).networks[0] is not net_a


# --- GPU (runs where CUDA is available) ---------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_models_cycle_and_restore_bit_exactly(tiny_sdxl, write_lora, use_patcher, tmp_path, dtype):
    model = to_dtype(tiny_sdxl, dtype)
    model.original_weights = FileSource(model, tmp_path)
    for comp in model.components().values():
        if comp is not None:
            comp.to("cuda")
    patcher = use_patcher()
    original = {k: v.cpu() for k, v in state(model).items()}
    write_lora("a", model, family="sdxl", seed=1)
    write_lora("b", model, family="sdxl", locon=True, seed=2)
    rng = random.Random(0)
    for _ in range(8):
        chosen = rng.sample(["a", "b"], rng.randint(0, 2))
        report = networks.load_networks(chosen, [rng.choice([0.5, 1.0]) for _ in chosen], sd_model=model)
        assert not report.fatal
    networks.load_networks([], sd_model=model)
    assert patcher.stats["residual"] > 0 and patcher.stats["inexact"] == 0
    now = {k: v.cpu() for k, v in state(model).items()}
    for k, v in now.items():
        assert torch.equal(v.view(INT_VIEW[dtype]) if v.dtype == dtype else v,
                           original[k].view(INT_VIEW[dtype]) if v.dtype == dtype else original[k]), k


@pytest.mark.parametrize("prefer", [("residual",), ("clone",)])
def test_model_cast_while_patched_still_restores_exactly(tiny_sd1, write_lora, prefer, monkeypatch):
    """A model cast to a wider dtype while a Lora is merged gets the original back, cast (no residue)."""
    write_lora("cast", tiny_sd1, seed=4)
    monkeypatch.setattr(networks.patcher, "prefer", prefer)
    original = {k: v.clone() for k, v in tiny_sd1.unet.state_dict().items()}
    networks.load_networks(["cast"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    assert any(not torch.equal(v, original[k]) for k, v in tiny_sd1.unet.state_dict().items())
    tiny_sd1.unet.to(torch.float64)
    networks.load_networks([], sd_model=tiny_sd1)
    for key, value in tiny_sd1.unet.state_dict().items():
        assert value.dtype == torch.float64 and torch.equal(value, original[key].double()), key
