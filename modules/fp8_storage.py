"""fp8 checkpoints (`float8_e4m3fn` / `float8_e5m2` weights) kept at their size and computed in a wider dtype.

The Linear layers inside the repeated blocks (transformer blocks, T5/CLIP encoder layers: nearly all the weights)
keep their fp8 weight; each forward casts it to the input's dtype for that one matmul, so only one layer's weight
exists in the compute dtype at a time. Everything else (embedders, norms, biases, the final layers; a few MB) is
cast to the compute dtype at load, which also makes the modules' `.dtype` (read from their first parameter by
diffusers and transformers) the compute dtype. The weight tensor itself is never replaced: the Lora patcher and
the exact-restore source see one fp8 parameter.
"""
from __future__ import annotations

import re

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK_LINEAR = re.compile(r"(^|\.)(transformer_blocks|single_transformer_blocks|block|layers)\.\d+\.")


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored in fp8 and cast to the input's dtype in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, weight, bias)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def keeps_fp8(module: torch.nn.Module, key: str) -> bool:
    """Whether parameter `key` of `module` (a skeleton is enough) stays fp8 when its file stores it so: the weight of
    a Linear layer inside a repeated block."""
    path, _, param = key.rpartition(".")
    if param != "weight" or not _BLOCK_LINEAR.search(path + ".") or path.endswith(".wo"):
        return False  # T5's `wo` casts its input to the weight's dtype (transformers keeps it in fp32)
    try:
        layer = module.get_submodule(path)
    except AttributeError:
        return False
    return type(layer) in (torch.nn.Linear, Fp8Linear)


def fp8_keys(module: torch.nn.Module, file_dtypes: dict[str, torch.dtype]) -> set[str]:
    """The parameters of `module` to keep in fp8, given {parameter name: dtype in the file}."""
    return {key for key, dtype in file_dtypes.items() if is_fp8(dtype) and keeps_fp8(module, key)}


def enable(module: torch.nn.Module) -> int:
    """Turns every Linear holding an fp8 weight into an Fp8Linear; returns how many."""
    count = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Linear and is_fp8(layer.weight.dtype):
            layer.__class__ = Fp8Linear
            count += 1
    return count


def parameter_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
