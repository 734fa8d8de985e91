"""The patcher benchmark's floors (scripts/bench_lora_floors.py) do the same work as the patcher: at every block
size the calibration may pick, each floor leaves W0 + ΔW (written here with torch.kron and plain products), rounded
once for bf16, and its remove puts back the original bits. A floor that skipped work would look fast."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scripts import bench_lora_floors as floors_mod

SHAPES = {"linear": (64, 48), "conv": (32, 16, 3, 3)}


def _module(**parts):
    return SimpleNamespace(calc_scale=lambda: 0.5, **parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_floors_leave_w0_plus_delta_at_every_block_size(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    layers = {n: SimpleNamespace(weight=r(*s).to(dtype)) for n, s in SHAPES.items()}
    nets = {
        "A": SimpleNamespace(modules={n: _module(up=r(s[0], 4), down=r(4, *s[1:])) for n, s in SHAPES.items()}),
        "B": SimpleNamespace(modules={n: _module(up=r(s[0], 4), down=r(4, *s[1:])) for n, s in SHAPES.items()}),
        "H": SimpleNamespace(modules={n: _module(w1a=r(s[0], 3), w1b=r(3, *s[1:]), w2a=r(s[0], 3), w2b=r(3, *s[1:]))
                                      for n, s in SHAPES.items()}),
        "K": SimpleNamespace(modules={n: _module(w1=r(8, 8), w2a=r(s[0] // 8, 4),
                                                 w2b=r(4, torch.Size(s[1:]).numel() // 8)) for n, s in SHAPES.items()}),
    }
    originals = {n: layer.weight.clone() for n, layer in layers.items()}
    expected = {}
    for n, s in SHAPES.items():
        a, b, h, k = (nets[key].modules[n] for key in "ABHK")
        w0 = originals[n].float().reshape(s[0], -1)
        expected["apply", n] = w0 + 0.5 * a.up @ a.down.reshape(4, -1)
        expected["switch", n] = w0 + 0.35 * b.up @ b.down.reshape(4, -1)
        expected["apply 2", n] = expected["apply", n] + 0.5 * b.up @ b.down.reshape(4, -1)
        expected["loha", n] = w0 + 0.5 * (h.w1a @ h.w1b.reshape(3, -1)) * (h.w2a @ h.w2b.reshape(3, -1))
        expected["lokr", n] = w0 + 0.5 * torch.kron(k.w1, k.w2a @ k.w2b)

    floors = floors_mod.Floors(layers, nets, torch.device("cpu"))
    ops = {"apply": lambda: floors.apply_lora(floors.lora_factors("A")),
           "switch": lambda: floors.apply_lora(floors.lora_factors("B", 0.7), from_original=True),
           "apply 2": lambda: floors.apply_lora(floors.lora_factors("AB")),
           "apply 2 per LoRA": lambda: floors.apply_lora_parts(floors.lora_parts("AB")),
           "loha": lambda: floors.apply_loha(floors.loha_factors("H")),
           "lokr": lambda: floors.apply_lokr(floors.lokr_factors("K"))}
    for chunk in (16, 200, 1000, *floors_mod.CHUNKS):  # smaller than a row, than a LoKr run, several runs, ...
        for op, run in ops.items():
            floors.chunk = chunk
            if op == "switch":
                floors.apply_lora(floors.lora_factors("A"))  # from a patched weight: the original is read
            run()
            for n, s in SHAPES.items():
                want = expected[op.removesuffix(" per LoRA"), n].to(dtype).float()
                got = layers[n].weight.float().reshape(s[0], -1)
                # fp32: sums in another order; bf16: one rounding of the fp32 sum (a last-bit tie may differ)
                torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-4,
                                           msg=lambda m, op=op, n=n, c=chunk: f"{op} {n} block {c}: {m}")
            floors.remove()
            assert all(torch.equal(layers[n].weight, originals[n]) for n in SHAPES)
