"""A1111 parity: A1111 replaces forward/_load_from_state_dict of torch.nn.Linear, Conv2d, GroupNorm, LayerNorm
and MultiheadAttention for the whole process so each layer merges its Loras lazily on first use.

This extension merges eagerly in networks.load_networks and notices foreign weight writes through tensor
version counters (lora_patcher), so it patches nothing. `networks.originals` is still a `LoraPatches()`: other
extensions call the torch functions it holds (Regional Prompter calls `networks.originals.Linear_forward(self, x)`
from its own Linear.forward), which here are simply torch's own, taken when the extension loads.
"""
import torch

_PATCHED_CLASSES = {"Linear": torch.nn.Linear, "Conv2d": torch.nn.Conv2d, "GroupNorm": torch.nn.GroupNorm,
                    "LayerNorm": torch.nn.LayerNorm, "MultiheadAttention": torch.nn.MultiheadAttention}


class LoraPatches:
    """A1111's attribute names (`Linear_forward`, `Conv2d_load_state_dict`, ...) for the unpatched functions."""

    def __init__(self):
        self.patched = False
        for name, cls in _PATCHED_CLASSES.items():
            setattr(self, f"{name}_forward", cls.forward)
            setattr(self, f"{name}_load_state_dict", cls._load_from_state_dict)

    def undo(self) -> None:
        self.patched = False
