"""Issue 13 item 9: a residual restore that does not reproduce its fingerprint never leaves approximate weights.

On a device where residual restores are not proven, the patcher keeps a copy of each layer taken before the write
and restores from it (or from the host's source) when Σ ΔW does not reproduce, and the job is told. The mismatch is
forced on the CPU at the edge: the CPU is treated as unproven (lora_restore_guard.PROVEN_DEVICE_TYPES) and each
residual record's fingerprint is corrupted, as a GPU kernel that picked another algorithm would."""
import lora_patcher
import lora_restore_guard
import networks
import pytest
import torch
from extra_networks_lora import ExtraNetworkLora

from modules import extra_networks, processing


def _state(model) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.components().items() if m is not None
            for k, v in m.state_dict().items()}


def _assert_bitwise(model, original: dict) -> None:
    for k, v in _state(model).items():
        assert torch.equal(v.view(torch.int32), original[k].view(torch.int32)), k


@pytest.fixture
def patcher(monkeypatch):
    p = lora_patcher.Patcher(prefer=(lora_patcher.RESIDUAL,))  # no host source: the A1111 case
    monkeypatch.setattr(networks, "patcher", p)
    monkeypatch.setattr(lora_restore_guard, "PROVEN_DEVICE_TYPES", {"cpu"})
    return p


def _records(model) -> list:
    recs = []
    for comp in model.components().values():
        for m in comp.modules() if comp is not None else ():
            rec = lora_patcher.Patcher.record(m)
            if rec is not None and rec.how == lora_patcher.RESIDUAL:
                recs.append(rec)
    return recs


def test_unproven_device_restores_from_the_copy_and_reports_it(tiny_sd1, write_lora, patcher, monkeypatch):
    monkeypatch.setattr(lora_restore_guard, "PROVEN_DEVICE_TYPES", set())  # the CPU as a GPU is treated
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, seed=2, locon=True)
    original = _state(tiny_sd1)

    first = networks.load_networks(["a"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    recs = _records(tiny_sd1)
    assert recs and all(r.safety_copy is not None for r in recs)
    for rec in recs:
        rec.residual.delta_fingerprint += 1  # Σ ΔW "did not reproduce"
    assert first.held_bytes >= sum(r.safety_copy.numel() * 4 for r in recs)

    switched = networks.load_networks(["b"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    assert patcher.stats["inexact"] == 0 and patcher.stats["restore_fallbacks"] >= len(recs)
    assert any("copy taken before the write" in n for n in switched.notes), switched.notes
    networks.load_networks([], sd_model=tiny_sd1)
    _assert_bitwise(tiny_sd1, original)


def test_unproven_device_with_a_source_keeps_no_copy_and_restores_from_the_source(tiny_sd1, write_lora, patcher,
                                                                                  monkeypatch, tmp_path):
    from test_lora_patcher import FileSource
    monkeypatch.setattr(lora_restore_guard, "PROVEN_DEVICE_TYPES", set())
    tiny_sd1.original_weights = FileSource(tiny_sd1, tmp_path)
    write_lora("a", tiny_sd1, seed=1)
    original = _state(tiny_sd1)
    networks.load_networks(["a"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    recs = _records(tiny_sd1)
    assert recs and all(r.safety_copy is None for r in recs)  # the checkpoint file is the copy
    for rec in recs:
        rec.residual.delta_fingerprint += 1
    report = networks.load_networks([], sd_model=tiny_sd1)
    assert patcher.stats["inexact"] == 0 and any("checkpoint file" in n for n in report.notes), report.notes
    _assert_bitwise(tiny_sd1, original)


def test_the_job_is_told_about_the_fallback(tiny_sd1, write_lora, patcher, monkeypatch):
    monkeypatch.setattr(lora_restore_guard, "PROVEN_DEVICE_TYPES", set())
    write_lora("a", tiny_sd1, seed=1)
    original = _state(tiny_sd1)
    handler = ExtraNetworkLora()

    def job(prompt: str):
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=tiny_sd1, prompt=prompt, negative_prompt="",
                                                        steps=1, width=32, height=32, seed=1)
        _, data = extra_networks.parse_prompt(prompt)
        handler.activate(p, data.get("lora", []))
        return p

    job("x <lora:a:1>")
    for rec in _records(tiny_sd1):
        rec.residual.delta_fingerprint ^= 1
    p = job("x")
    assert any("did not reproduce its delta" in c and "copy taken before the write" in c for c in p.comments), \
        p.comments
    _assert_bitwise(tiny_sd1, original)


def test_proven_device_keeps_no_copy_and_a_mismatch_there_stops_trusting_it(tiny_sd1, write_lora, patcher):
    write_lora("a", tiny_sd1, seed=1)
    networks.load_networks(["a"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    recs = _records(tiny_sd1)
    assert recs and all(r.safety_copy is None for r in recs)  # CPU: residual restores are proven
    recs[0].residual.delta_fingerprint += 1
    report = networks.load_networks([], sd_model=tiny_sd1)
    assert patcher.stats["inexact"] == 1 and any("bit-exactly" in n for n in report.notes)
    assert not lora_restore_guard.residual_proven(torch.device("cpu"))  # from now on writes keep a copy
    networks.load_networks(["a"], [1.0], [1.0], [None], sd_model=tiny_sd1)
    assert all(r.safety_copy is not None for r in _records(tiny_sd1))
