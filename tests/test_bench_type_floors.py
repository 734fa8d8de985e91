"""scripts/bench_lora_type_floors.py's loops do the same work as the extension's types: at every block size the
calibration may pick, each floor leaves W0 + ΔW, where ΔW is the type's generic compute() (itself checked against
lycoris-lora in test_lora_lycoris_reference), rounded once for bf16; remove puts back the original bits."""
from __future__ import annotations

from types import SimpleNamespace

import lora_loader
import network
import pytest
import torch

from scripts import bench_lora_floors, bench_lora_type_floors

G = torch.Generator().manual_seed(3)


def rnd(*shape, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * scale


def _module(parts: dict, layer: torch.nn.Module, key: str = "lora_unet_x"):
    weights = network.NetworkWeights(network_key=key, sd_key="unet.x", w=parts, sd_module=layer)
    module = lora_loader.build_module(network.Network("t", None), weights)
    assert module is not None
    return module


CASES = {  # (files' parts for a 64 × 48 Linear, floor name)
    "full": lambda: {"diff": rnd(64, 48)},
    "ia3": lambda: {"weight": rnd(64)},
    "oft": lambda: {"oft_blocks": rnd(8, 8, 8), "rescale": 1 + rnd(64, 1)},
    "boft": lambda: {"oft_blocks": rnd(3, 16, 4, 4), "rescale": 1 + rnd(64, 1)},
    "glora": lambda: {"a1.weight": rnd(48, 4), "a2.weight": rnd(4, 48), "b1.weight": rnd(64, 4),
                      "b2.weight": rnd(4, 48), "alpha": torch.tensor(2.0)},
    "dora": lambda: {"lora_up.weight": rnd(64, 4), "lora_down.weight": rnd(4, 48), "alpha": torch.tensor(2.0),
                     "dora_scale": 1 + rnd(1, 48)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_type_floors_leave_w0_plus_the_types_delta_at_every_block_size(kind, dtype):
    layer = torch.nn.Linear(48, 64)
    with torch.no_grad():
        layer.weight.copy_(rnd(64, 48, scale=0.15))
    module = _module(CASES[kind](), layer)
    w0 = layer.weight.detach().to(dtype)
    expected = (w0.float() + module.compute(w0.float(), 1.0)[0]).to(dtype)
    layers = {"unet.x": SimpleNamespace(weight=w0.clone())}
    floors = bench_lora_type_floors.TypeFloors(layers, {"F": SimpleNamespace(modules={"unet.x": module})},
                                               torch.device("cpu"))
    factors = getattr(floors, f"{kind}_factors")("F")
    for chunk in bench_lora_floors.CHUNKS + (1 << 8,):
        floors.chunk = chunk
        getattr(floors, f"apply_{kind}")(factors)
        got = layers["unet.x"].weight
        tol = 2e-5 if dtype == torch.float32 else 0.02
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol, msg=f"{kind} at {chunk}")
        assert not torch.equal(got, w0)
        floors.remove()
        assert torch.equal(layers["unet.x"].weight, w0)
