"""The A1111 checkpoint source (lora_checkpoint_source): originals re-read from the file an A1111 model was loaded
from, cast as A1111 casts them, trusted only while the file is the one it read. Tiny compvis models stand in for
A1111's; the file is written in A1111's single-file layout and the model is loaded from it the way A1111 does."""
import os
import types

import lora_checkpoint_source as lcs
import lora_layers
import lora_patcher
import networks
import pytest
import torch
from safetensors.torch import save_file
from test_lora_compvis import lora_tensors

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def components(ldm) -> list[torch.nn.Module]:
    return [m for m in (ldm.model, getattr(ldm, "cond_stage_model", None), getattr(ldm, "conditioner", None))
            if m is not None]


def load_from_checkpoint(ldm, path: str, file_dtype: torch.dtype, live_dtype: torch.dtype, note: bool = True):
    """Writes the model's weights as a `file_dtype` checkpoint and loads them back into a `live_dtype` model, as
    A1111 does (one cast from the file's dtype); `note`: as if A1111's read_state_dict had read it."""
    for m in components(ldm):
        m.to(live_dtype)
    state = ldm.ldm_state_dict()
    file_tensors = {k: v.detach().to(file_dtype).contiguous() for k, v in state.items()}
    save_file(file_tensors, path)
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(file_tensors[k].to(live_dtype))
    ldm.sd_checkpoint_info = types.SimpleNamespace(filename=path)
    if note:
        stamp = lcs.file_stamp(path)
        lcs.note_read(path, stamp, stamp)
    return ldm


def snapshot(ldm) -> dict:
    return {k: v.detach().clone() for k, v in ldm.ldm_state_dict().items()}


def assert_bitwise(ldm, original: dict) -> None:
    for k, v in ldm.ldm_state_dict().items():
        o = original[k]
        assert v.dtype == o.dtype, k
        if v.dtype in INT_VIEW:
            assert torch.equal(v.view(INT_VIEW[v.dtype]), o.view(INT_VIEW[o.dtype])), k
        else:
            assert torch.equal(v, o), k


@pytest.fixture
def patcher(monkeypatch):
    p = lora_patcher.Patcher()
    monkeypatch.setattr(networks, "patcher", p)
    return p


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("file_dtype,live_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.float32)])
def test_a1111_model_restores_from_its_checkpoint(tiny_ldm_pair, write_lora, patcher, tmp_path, family,
                                                  file_dtype, live_dtype):
    ldm = load_from_checkpoint(tiny_ldm_pair(family)[0], str(tmp_path / "model.safetensors"), file_dtype, live_dtype)
    layer_map = lora_layers.assign_network_names_to_compvis_modules(ldm)
    assert isinstance(ldm.original_weights, lcs.CheckpointSource)
    original = snapshot(ldm)
    write_lora(f"{family}_src", tensors=lora_tensors(layer_map, "kohya"), metadata={})

    report = networks.load_networks([f"{family}_src"], [1.0], [1.0], [None], sd_model=ldm)
    net = report.networks[0]
    assert not net.apply_errors and not report.fatal and report.layers_written == len(net.modules)
    fused = sum(isinstance(layer_map.layers[n], lora_layers.FusedSlice) for n in net.modules)
    # every layer with a parameter of its own is restored from the file: no memory held for it
    assert patcher.stats["source"] == len(net.modules) - fused
    assert patcher.held_bytes({n: layer_map.layers[n] for n in net.modules
                               if not isinstance(layer_map.layers[n], lora_layers.FusedSlice)}) == 0

    networks.load_networks([f"{family}_src"], [0.5], [0.25], [None], sd_model=ldm)  # re-read, then re-merged
    assert patcher.stats["source_reads"] >= len(net.modules) - fused
    source, calls = ldm.original_weights, []
    read_into = source.read_into
    source.read_into = lambda *a: calls.append(a[:2]) or read_into(*a)
    networks.load_networks([], sd_model=ldm)
    assert calls == []  # removal reads every layer in one batch (read_many_into), not one read_into per layer
    assert_bitwise(ldm, original)
    assert patcher.stats["inexact"] == 0 and patcher.stats["restore_fallbacks"] == 0


def test_source_casts_each_parameter_as_a1111_did(tiny_ldm_pair, tmp_path):
    ldm = load_from_checkpoint(tiny_ldm_pair("sd1")[0], str(tmp_path / "m.safetensors"), torch.float32,
                               torch.float16)
    layer_map = lora_layers.assign_network_names_to_compvis_modules(ldm)
    source = ldm.original_weights
    name = "unet.down_blocks.0.attentions.0.proj_in"
    component, path = layer_map.module_paths[name]
    weight = layer_map.layers[name].weight
    got = source.read(component, f"{path}.weight")
    assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), weight.view(torch.int16))
    step = 7
    assert torch.equal(source.sample(component, f"{path}.weight", step).view(torch.int16),
                       weight.reshape(-1)[::step].view(torch.int16))
    out = torch.empty_like(weight)
    assert source.read_into(component, f"{path}.weight", out) and torch.equal(out, weight)
    assert source.read(component, "no.such.weight") is None
    assert source.read_into(component, f"{path}.weight", torch.empty(3)) is False  # wrong shape: nothing written


def test_fp8_storage_goes_through_fp16_and_a_fp32_file_under_no_half_is_not_offered():
    fp8 = torch.float8_e4m3fn
    assert lcs._chain(torch.float32, fp8, no_half=False) == (torch.float16, fp8)
    assert lcs._chain(torch.float16, fp8, no_half=True) == (fp8,)
    assert lcs._chain(torch.float32, fp8, no_half=True) is None  # fresh load and reload cast differently
    # the two routes really differ for some fp32 values: 1 + 2^-4 + 2^-12 rounds up to fp8 directly, but
    # through fp16 it first becomes 1 + 2^-4 (a tie in e4m3) and then rounds to even, down to 1
    x = torch.tensor([1 + 2 ** -4 + 2 ** -12], dtype=torch.float32)
    assert x.to(fp8).float().item() == 1.125 and x.to(torch.float16).to(fp8).float().item() == 1.0


def test_a_file_changed_since_the_load_or_never_read_is_not_trusted(tiny_ldm_pair, tmp_path):
    path = str(tmp_path / "m.safetensors")
    ldm = load_from_checkpoint(tiny_ldm_pair("sd1")[0], path, torch.float16, torch.float32, note=False)
    lora_layers.assign_network_names_to_compvis_modules(ldm)
    assert ldm.original_weights is None  # written after this process started and not read through A1111

    stamp = lcs.file_stamp(path)
    lcs.note_read(path, stamp, stamp)
    lora_layers.assign_network_names_to_compvis_modules(ldm)
    source = ldm.original_weights
    assert isinstance(source, lcs.CheckpointSource) and source.valid()

    with open(path, "r+b") as f:  # same size, new bytes: a new identity
        f.seek(-2, os.SEEK_END)
        f.write(b"\x01\x02")
    assert not source.valid() and lcs.trusted_stamp(path) is None
    component, p = next(iter(source.dtypes))
    assert source.read(component, p) is None and source.sample(component, p, 5) is None
    lora_layers.assign_network_names_to_compvis_modules(ldm)
    assert ldm.original_weights is None


def test_read_hook_notes_every_read_and_a_file_that_changed_between_reads_is_not_trusted(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"a": torch.zeros(4)}, path)
    calls = []
    fake = types.SimpleNamespace(read_state_dict=lambda filename, *a, **k: calls.append(filename) or {})
    assert lcs.install_read_hook(fake) and not lcs.install_read_hook(fake)  # idempotent
    fake.read_state_dict(path)
    assert calls == [path] and lcs.trusted_stamp(path) == lcs.file_stamp(path)
    save_file({"a": torch.ones(4)}, path)  # rewritten, then read again (a cached state dict may be the old one)
    fake.read_state_dict(path)
    assert lcs.trusted_stamp(path) is None


def test_a1111_key_fixups_are_inverted():
    """A1111 renames old SD1 text-encoder keys on load (get_state_dict_from_checkpoint); the source finds the
    file's key for the model's name through that same function."""
    replacements = {"cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder."}

    def get_state_dict_from_checkpoint(pl_sd):  # A1111 v1.10.1's logic for SD1 files
        pl_sd = pl_sd.pop("state_dict", pl_sd)
        sd = {}
        for k, v in pl_sd.items():
            for text, replacement in replacements.items():
                if k.startswith(text):
                    k = replacement + k[len(text):]
            sd[k] = v
        pl_sd.clear()
        pl_sd.update(sd)
        return pl_sd

    index = {"cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight": (torch.float16, (4, 2), 0, 16),
             "model.diffusion_model.out.2.weight": (torch.float16, (2, 2), 16, 8)}
    fake = types.SimpleNamespace(get_state_dict_from_checkpoint=get_state_dict_from_checkpoint)
    assert lcs.a1111_key_map(index, fake) == {
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
            "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
        "model.diffusion_model.out.2.weight": "model.diffusion_model.out.2.weight"}


def test_host_source_is_left_alone(tiny_ldm_pair):
    ldm = tiny_ldm_pair("sd1")[0]

    class HostSource:
        def read(self, component, name):
            return None

        def valid(self):
            return True

    ldm.original_weights = host = HostSource()
    lora_layers.assign_network_names_to_compvis_modules(ldm)
    assert ldm.original_weights is host


def test_a_layer_is_sampled_once_and_again_after_a_foreign_write(tiny_ldm_pair, write_lora, patcher, tmp_path,
                                                                monkeypatch):
    ldm = load_from_checkpoint(tiny_ldm_pair("sd1")[0], str(tmp_path / "m.safetensors"), torch.float16,
                               torch.float32)
    layer_map = lora_layers.assign_network_names_to_compvis_modules(ldm)
    write_lora("once", tensors=lora_tensors(layer_map, "kohya"), metadata={})
    sampled = []
    real_sample = ldm.original_weights.sample
    monkeypatch.setattr(ldm.original_weights, "sample", lambda *a: sampled.append(a[:2]) or real_sample(*a))
    layers = len(networks.load_networks(["once"], sd_model=ldm).networks[0].modules)
    assert len(sampled) == layers
    for _ in range(2):  # restored from the file, applied again (also at another strength): no new sampling
        networks.load_networks([], sd_model=ldm)
        networks.load_networks(["once"], [0.5], sd_model=ldm)
    assert len(sampled) == layers

    networks.load_networks([], sd_model=ldm)
    name = "unet.down_blocks.0.attentions.0.proj_in"
    with torch.no_grad():  # someone else changes a layer that holds its original: it is the original now
        layer_map.layers[name].weight.add_(1.0)
    changed = snapshot(ldm)
    networks.load_networks(["once"], sd_model=ldm)
    assert len(sampled) == layers + 1 and patcher.stats["residual"] == 1  # sampled again, the file no longer holds it
    networks.load_networks([], sd_model=ldm)
    assert_bitwise(ldm, changed)


@pytest.mark.parametrize("file_dtype,live_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float8_e4m3fn)])
def test_a_large_parameter_is_read_in_parts_by_several_threads(tmp_path, monkeypatch, file_dtype, live_dtype):
    """A parameter of PARALLEL_BYTES or more is split over the torch threads (each its own pread and cast into its
    part of the weight): the result is the file's tensor cast as A1111 casts it, bit for bit; a file truncated
    meanwhile makes the read fail instead of raising. (The pread path: where no read lease can be had.)"""
    monkeypatch.setattr(lcs.lora_leased_map, "available", lambda: False)
    path = str(tmp_path / "big.safetensors")
    big = torch.randn(700, 1500).to(file_dtype)  # 2.1 MB in 16 bits
    save_file({"w": big, "small": torch.randn(4, 4).to(file_dtype)}, path)
    with open(path, "rb") as f:
        index = lcs.lora_files.read_safetensors_index(f, path)
    source = lcs.CheckpointSource(path, lcs.file_stamp(path), index, {k: k for k in index}, {"m": ""},
                                  {("m", "w"): live_dtype}, no_half=False)
    import threading

    import lora_parallel_reads
    threads = set()
    real_pread = lora_parallel_reads.pread
    monkeypatch.setattr(lora_parallel_reads, "pread", lambda *a: threads.add(threading.get_ident()) or real_pread(*a))
    monkeypatch.setattr(lcs, "BLOCK_BYTES", 1 << 16)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = torch.full(big.shape, 7.0).to(live_dtype)
        assert source.read_into("m", "w", out)
        expected = big.to(torch.float16).to(live_dtype) if live_dtype == torch.float8_e4m3fn else big.to(live_dtype)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
        assert len(threads) >= 2  # this thread read a part, a pool thread (or two) the others
        os.truncate(path, os.path.getsize(path) // 2)
        source.stamp = lcs.file_stamp(path)  # as if the shorter file were trusted: the short read must not raise
        assert source.read_into("m", "w", out) is False
    finally:
        torch.set_num_threads(previous)


def test_reads_go_through_a_leased_map_that_makes_a_truncation_wait(tmp_path):
    """Where a read lease can be had (Linux, our file, nobody writing it), the source reads through a map of the
    checkpoint: the same bits as the file's tensor cast once; while a read holds the lease, another process's
    truncate waits until it ends (a truncated map would raise SIGBUS); a file someone has open for writing is read
    with pread instead; after the file changed, nothing is read from the map."""
    import subprocess
    import sys
    import time

    import lora_leased_map
    assert lora_leased_map.available()  # Linux: the CI machine has leases
    path = str(tmp_path / "m.safetensors")
    big = torch.randn(300, 500).half()
    save_file({"w": big}, path)
    with open(path, "rb") as f:
        index = lcs.lora_files.read_safetensors_index(f, path)
    source = lcs.CheckpointSource(path, lcs.file_stamp(path), index, {k: k for k in index}, {"m": ""},
                                  {("m", "w"): torch.float32}, no_half=True)
    out = torch.zeros(big.shape)
    assert source.read_into("m", "w", out) and torch.equal(out, big.float())
    assert source._map is not None
    leased = source._map
    with leased.reading(lambda st: lcs._stamp(st) == source.stamp) as data:
        assert data is not None and data.numel() == os.path.getsize(path)
        child = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({path!r}, 8)"])
        time.sleep(0.5)
        assert child.poll() is None  # waits for the lease
        assert torch.equal(data[-4:], torch.frombuffer(bytearray(open(path, "rb").read()[-4:]), dtype=torch.uint8))
    assert child.wait(timeout=60) == 0 and os.path.getsize(path) == 8
    with leased.reading(lambda st: True) as data:
        assert data is None  # the size changed: no read from the map
    assert source.read_into("m", "w", torch.zeros(big.shape)) is False

    save_file({"w": big}, path)
    source = lcs.CheckpointSource(path, lcs.file_stamp(path), index, {k: k for k in index}, {"m": ""},
                                  {("m", "w"): torch.float32}, no_half=True)
    with open(path, "r+b"):  # a writer: no lease is granted, the read goes through pread
        out = torch.zeros(big.shape)
        assert source.read_into("m", "w", out) and torch.equal(out, big.float())
        with source._map.reading(lambda st: True) as data:
            assert data is None
