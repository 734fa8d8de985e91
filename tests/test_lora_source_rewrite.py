"""The patcher's one-pass rewrite from the host's source (issue 12 item 5): a multiplier change or a switch on a
layer held by `sd_model.original_weights` reads each block of original rows from the checkpoint file and merges it
while it is in cache (no weight-sized read of the original first). Same bits as a fresh apply, the exact merge
W0 + m·alpha/r·up@down, bit-exact restore, nothing held; a file that changes while it is read is reported."""
import copy
import os

import lora_layers
import lora_patcher
import lora_plan
import networks
import pytest
import torch
from safetensors.torch import save_file

from modules import leased_map
from modules.original_weights import OriginalWeights

RANK, ALPHA = 4, 2.0  # the test Loras' rank and alpha: scale alpha/rank = 0.5
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def host_source(model, folder) -> OriginalWeights:
    """The host's own source over one .safetensors file per component, as a loaded checkpoint offers it."""
    refs, dtypes = {}, {}
    for comp, module in model.components().items():
        if module is None:
            continue
        tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
        path = os.path.join(str(folder), f"{comp}.safetensors")
        save_file(tensors, path)
        for key, t in tensors.items():
            refs[(comp, key)], dtypes[(comp, key)] = (path, key, None), t.dtype
    return OriginalWeights(refs, dtypes)


def weights(model) -> dict:
    return {n: m.weight.detach().clone() for n, m in lora_layers.get_layer_map(model).layers.items()
            if getattr(m, "weight", None) is not None}


def exact_merge(original: dict, nets_and_multipliers) -> dict:
    """W0 + Σ m·(alpha/rank)·up@down in fp64 from the files' factors, cast once to the weight's dtype."""
    total: dict = {}
    for net, m in nets_and_multipliers:
        for name, mod in net.modules.items():
            up, down = mod.up.double().reshape(mod.up.shape[0], -1), mod.down.double().reshape(RANK, -1)
            d = (m * ALPHA / RANK * (up @ down)).reshape(original[name].shape)
            total[name] = total.get(name, 0) + d
    return {n: (original[n].double() + d).to(original[n].dtype) for n, d in total.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


@pytest.fixture
def patcher(monkeypatch):
    p = lora_patcher.Patcher()
    monkeypatch.setattr(networks, "patcher", p)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiplier_change_and_switch_merge_from_the_source_rows_in_one_pass(tiny_sd1, write_lora, patcher,
                                                                            tmp_path, dtype):
    model = tiny_sd1
    for comp in model.components().values():
        if comp is not None:
            comp.to(dtype)
    pristine = copy.deepcopy(model)
    model.original_weights = host_source(model, tmp_path)
    original = weights(model)
    write_lora("a", model, seed=1, rank=RANK, alpha=ALPHA)
    write_lora("b", model, seed=2, rank=RANK, alpha=ALPHA)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    first = None
    for names, multipliers in ((["a"], [1.0]), (["a"], [0.5]), (["b"], [1.0]), (["a", "b"], [0.7, -1.0])):
        report = networks.load_networks(names, multipliers, multipliers, sd_model=model)
        assert not report.fatal and all(not n.apply_errors for n in report.networks)
        first = report.layers_written if first is None else first
        now, want = weights(model), exact_merge(original, zip(report.networks, multipliers, strict=True))
        for name, w in want.items():
            torch.testing.assert_close(now[name].double(), w.double(), rtol=tol, atol=tol * 1e-2, msg=name)
        # the same set applied to a fresh copy (merged over the original in memory) gives the same bits
        fresh = lora_layers.LayerMap(copy.deepcopy(pristine))
        lora_patcher.Patcher().sync(fresh.layers, lora_plan.build_plan(fresh.layers, report.networks),
                                    model.original_weights, fresh.module_paths)
        for name, w in fresh.layers.items():
            if getattr(w, "weight", None) is not None:
                assert same_bits(now[name], w.weight.detach()), name
        assert report.held_bytes == 0
    # every rewrite after the first apply read its original rows from the file, one pass per layer
    assert patcher.stats["source_rows"] == patcher.stats["writes"] - first > 0
    assert patcher.stats["inexact"] == 0
    networks.load_networks([], sd_model=model)
    for name, w in weights(model).items():
        assert same_bits(w, original[name]), name


def test_a_file_that_changes_while_its_rows_are_read_is_reported(tiny_sd1, write_lora, patcher, tmp_path):
    model = tiny_sd1
    source = host_source(model, tmp_path)
    model.original_weights = source
    write_lora("a", model, seed=1, rank=RANK, alpha=ALPHA)
    networks.load_networks(["a"], [1.0], sd_model=model)
    open_rows = source.open_rows

    def open_then_touch(component, name, like):  # another program rewrites the checkpoint mid-job
        reader = open_rows(component, name, like)
        os.utime(source.refs[(component, name)][0], ns=(1, 1))
        return reader

    source.open_rows = open_then_touch
    report = networks.load_networks(["a"], [0.5], sd_model=model)
    assert patcher.stats["inexact"] > 0
    assert any("changed while it was read" in n for n in report.notes)


def test_removal_restores_every_layer_from_the_source_in_one_batch_under_one_lease(tiny_sd1, write_lora, patcher,
                                                                                  tmp_path, monkeypatch):
    model = tiny_sd1
    source = host_source(model, tmp_path)
    model.original_weights = source
    original = weights(model)
    write_lora("a", model, seed=1, rank=RANK, alpha=ALPHA)
    report = networks.load_networks(["a"], [1.0], sd_model=model)
    written = report.layers_written
    files = {source.refs[p][0] for p in source.refs}
    leases, reads_before = [], patcher.stats["source_reads"]
    acquire = leased_map.LeasedMap._acquire
    monkeypatch.setattr(leased_map.LeasedMap, "_acquire", lambda self: leases.append(self.filename) or acquire(self))
    monkeypatch.setattr(source, "read_into", lambda *a: pytest.fail(f"read one by one: {a[:2]}"))
    report = networks.load_networks([], sd_model=model)
    assert not report.notes and patcher.stats["inexact"] == 0
    assert patcher.stats["source_reads"] - reads_before == written > 10
    assert 1 <= len(leases) <= len(files)  # one lease per file read, not one per layer
    for name, w in weights(model).items():
        assert same_bits(w, original[name]), name


def test_a_file_that_changes_while_a_batch_restore_reads_it_is_reported(tiny_sd1, write_lora, patcher, tmp_path):
    model = tiny_sd1
    source = host_source(model, tmp_path)
    model.original_weights = source
    write_lora("a", model, seed=1, rank=RANK, alpha=ALPHA)
    networks.load_networks(["a"], [1.0], sd_model=model)
    leased = source._leased

    def leased_then_touched(filename):  # another program touches the checkpoint while the batch reads it
        m = leased(filename)
        fstat = m.fstat
        m.fstat = lambda: (os.utime(filename, ns=(1, 1)), fstat())[1]
        return m

    source._leased = leased_then_touched
    report = networks.load_networks([], sd_model=model)
    assert patcher.stats["inexact"] > 0
    assert any("changed while it was read" in n for n in report.notes)
    assert all(not lora_patcher.Patcher.current_state(m) and lora_patcher.Patcher.record(m) is None
               for m in lora_layers.get_layer_map(model).layers.values())
