"""Bad Lora files: each problem gives its own message naming the layer or file, the job completes, and the model
keeps its weights (bit for bit) wherever the file is bad."""
import networks
import pytest
import torch

from scripts import make_demo_loras as demo


def _params(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, comp in model.components().items() if comp is not None
            for k, v in comp.state_dict().items()}


def _assert_untouched(model, before: dict) -> None:
    now = _params(model)
    assert now.keys() == before.keys()
    for key, value in now.items():
        assert torch.equal(value, before[key]), f"{key} changed"


def _kohya_tensors(model, family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    shapes = demo.layer_shapes_from_components(model.components())
    structure = networks.lora_layers.LayerMap(model).structure
    return demo.lora_tensors(demo.select_layers(shapes, False), family, structure, rank=2, alpha=1.0, seed=seed,
                             dtype=torch.float32)


def _bases(tensors: dict) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in tensors})


def _load(name: str, model):
    report = networks.load_networks([name], [1.0], [1.0], [None], sd_model=model)
    assert report.fatal is None
    return report


def test_wrong_shapes_are_reported_per_layer_and_leave_the_layer_alone(tiny_sd1, write_lora):
    tensors = _kohya_tensors(tiny_sd1)
    bad = next(b for b in _bases(tensors) if "attn2_to_k" in b)
    down = tensors[f"{bad}.lora_down.weight"]
    tensors[f"{bad}.lora_down.weight"] = torch.randn(down.shape[0], down.shape[1] + 3)
    write_lora("wrong_shape", tensors=tensors, metadata={})
    before = _params(tiny_sd1)
    net = _load("wrong_shape", tiny_sd1).networks[0]
    (layer, message), = net.load_errors.items()
    assert bad in message and "shape" in message, message
    assert layer not in net.modules
    assert len(net.modules) == len(_bases(tensors)) - 1  # the rest of the file applies
    changed = {k for k, v in _params(tiny_sd1).items() if not torch.equal(v, before[k])}
    assert f"{layer}.weight" not in changed and changed


def test_rank_mismatch_between_up_and_down(tiny_sd1, write_lora):
    tensors = _kohya_tensors(tiny_sd1)
    bad = _bases(tensors)[0]
    up = tensors[f"{bad}.lora_up.weight"]
    tensors[f"{bad}.lora_up.weight"] = torch.randn(up.shape[0], up.shape[1] + 1, *up.shape[2:])
    write_lora("rank_mismatch", tensors=tensors, metadata={})
    net = _load("rank_mismatch", tiny_sd1).networks[0]
    assert any("disagree on the rank" in m and bad in m for m in net.load_errors.values()), net.load_errors


def test_unknown_parts_are_listed_not_dropped(tiny_sd1, write_lora):
    tensors = _kohya_tensors(tiny_sd1)
    bases = _bases(tensors)
    extra = f"{bases[0]}.lora_extra.weight"
    tensors[extra] = torch.randn(3)
    alien = bases[1]
    for part in ("lora_up.weight", "lora_down.weight", "alpha"):
        del tensors[f"{alien}.{part}"]
    tensors[f"{alien}.mystery.weight"] = torch.randn(4)
    write_lora("unknown_parts", tensors=tensors, metadata={})
    net = _load("unknown_parts", tiny_sd1).networks[0]
    assert extra in net.unused_keys
    assert f"{alien}.mystery.weight" in net.unsupported_keys
    assert len(net.modules) == len(bases) - 1 and not net.load_errors


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tiny_sd1, write_lora, value):
    tensors = _kohya_tensors(tiny_sd1)
    bad = _bases(tensors)[2]
    tensors[f"{bad}.lora_up.weight"][0, 0] = value
    write_lora("non_finite", tensors=tensors, metadata={})
    before = _params(tiny_sd1)
    net = _load("non_finite", tiny_sd1).networks[0]
    (layer, message), = net.load_errors.items()
    assert "NaN or infinite" in message and f"{bad}.lora_up.weight" in message
    now = _params(tiny_sd1)
    assert torch.equal(now[f"{layer}.weight"], before[f"{layer}.weight"])
    assert all(torch.isfinite(v).all() for v in now.values() if v.is_floating_point())


def test_a_file_that_is_all_bad_leaves_the_model_untouched(tiny_sd1, write_lora):
    tensors = {k: torch.full_like(v, float("nan")) if k.endswith("lora_up.weight") else v
               for k, v in _kohya_tensors(tiny_sd1).items()}
    write_lora("all_nan", tensors=tensors, metadata={})
    before = _params(tiny_sd1)
    report = _load("all_nan", tiny_sd1)
    net = report.networks[0]
    assert len(net.load_errors) == len(_bases(tensors)) and not net.modules
    assert report.layers_written == 0
    _assert_untouched(tiny_sd1, before)


@pytest.mark.parametrize("keep", ["half", "all_but_16_bytes"])
def test_truncated_file(tiny_sd1, write_lora, keep):
    path = write_lora("truncated", tensors=_kohya_tensors(tiny_sd1), metadata={})
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if keep == "half" else data[:-16])
    networks.list_available_networks()
    before = _params(tiny_sd1)
    report = _load("truncated", tiny_sd1)
    message = report.load_errors["truncated"]
    assert not report.networks and "truncated.safetensors" in message and "cannot load" in message, message
    _assert_untouched(tiny_sd1, before)


def test_garbage_file(tiny_sd1, lora_dir):
    (lora_dir / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    networks.list_available_networks()
    before = _params(tiny_sd1)
    report = _load("garbage", tiny_sd1)
    assert not report.networks and "garbage" in report.load_errors["garbage"]
    _assert_untouched(tiny_sd1, before)


def test_sdxl_lora_on_sd1_model(tiny_sd1, tiny_sdxl, write_lora):
    write_lora("for_sdxl", tiny_sdxl, family="sdxl")
    before = _params(tiny_sd1)
    report = _load("for_sdxl", tiny_sd1)
    net = report.networks[0]
    assert not net.modules
    assert "SDXL" in (getattr(net, "refused", None) or ""), getattr(net, "refused", None)
    assert net.unmatched_keys and not net.load_errors
    _assert_untouched(tiny_sd1, before)


def test_lora_with_other_widths_on_same_layer_names(tiny_sd1, tiny_sdxl, write_lora):
    """Same key names, other shapes (a LoRA trained on a model with other widths): every layer is refused with a
    shape message and nothing is written."""
    tensors = _kohya_tensors(tiny_sd1)
    wider = {}
    for key, value in tensors.items():
        if key.endswith("lora_down.weight"):
            value = torch.randn(value.shape[0], value.shape[1] * 2, *value.shape[2:])
        wider[key] = value
    write_lora("other_widths", tensors=wider, metadata={})
    before = _params(tiny_sd1)
    report = _load("other_widths", tiny_sd1)
    net = report.networks[0]
    assert not net.modules and len(net.load_errors) == len(_bases(tensors))
    assert all("shape" in m for m in net.load_errors.values())
    assert report.layers_written == 0
    _assert_untouched(tiny_sd1, before)
