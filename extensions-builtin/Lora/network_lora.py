"""LoRA / LoCon / Tucker-LoCon / DyLoRA (A1111 file name): ΔW = m · s · up·down, s = alpha/rank or `scale`."""
from __future__ import annotations

import lyco_helpers
import network
import torch

# Other trainers' names for the same parts (PEFT `lora_A/lora_B`, old diffusers `lora.down/lora.up`).
PART_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        w = weights.w
        if any(k in w for k in PART_ALIASES):
            w = {PART_ALIASES.get(k, k): v for k, v in w.items()}
            weights = network.NetworkWeights(weights.network_key, weights.sd_key, w, weights.sd_module)
        if "lora_up.weight" in w and "lora_down.weight" in w:
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.up = w["lora_up.weight"]
        self.down = w["lora_down.weight"]
        self.mid = w.get("lora_mid.weight")
        self.parts_used |= {"lora_up.weight", "lora_down.weight"}
        if self.mid is not None:
            self.parts_used.add("lora_mid.weight")
        if self.up.dim() not in (2, 4) or self.down.dim() not in (2, 4):
            raise ValueError(f"lora_up {tuple(self.up.shape)} / lora_down {tuple(self.down.shape)} must be 2-D or 4-D")
        rank = self.down.shape[0]
        if self.mid is None and self.up.shape[1] != rank:
            raise ValueError(f"lora_up {tuple(self.up.shape)} and lora_down {tuple(self.down.shape)} disagree on rank")
        if self.mid is not None and (self.mid.dim() != 4 or self.mid.shape[0] != self.up.shape[1]
                                     or self.mid.shape[1] != rank):
            raise ValueError(f"lora_mid {tuple(self.mid.shape)} does not fit lora_up {tuple(self.up.shape)} "
                             f"and lora_down {tuple(self.down.shape)}")
        self.dim = rank

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None):
        device = orig_weight.device
        up = self.up.to(device, torch.float32)
        down = self.down.to(device, torch.float32)
        output_shape = [up.size(0), down.size(1)]
        if self.mid is not None:
            # Tucker LoCon: dyn does not apply to the core tensor (as in A1111)
            mid = self.mid.to(device, torch.float32)
            updown = lyco_helpers.rebuild_cp_decomposition(up, down, mid)
            output_shape += list(mid.shape[2:])
        else:
            if down.dim() == 4:
                output_shape += list(down.shape[2:])
            updown = lyco_helpers.rebuild_conventional(up, down, output_shape, dyn_dim)
        return updown, output_shape, None
