"""Plan: for the wanted networks, what each layer should hold.

A layer's wanted state is the ordered list of (network file identity, module factors version, multiplier, dyn) of
the networks that target it with a non-zero multiplier. The patcher compares it with the state the layer holds and
touches only layers where the two differ; a changed file (new size or mtime) is a new identity, and tensors another
extension assigned to a module a new factors version, so either re-applies.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import network


@dataclass(frozen=True)
class Contribution:
    network: network.Network
    module: network.NetworkModule
    multiplier: float
    dyn_dim: int | None

    @property
    def key(self) -> tuple:
        return self.network.identity, getattr(self.module, "factors_version", 0), self.multiplier, self.dyn_dim

    def held(self) -> Contribution:
        """This contribution with a shallow copy of its module, for a restore record: the tensors the merge used
        stay with it when another extension assigns new ones to the module (NetworkModule.__setattr__)."""
        return Contribution(self.network, copy.copy(self.module), self.multiplier, self.dyn_dim)


def multiplier_for(net: network.Network, layer_name: str) -> float:
    """te multiplier for text encoder layers, unet multiplier for the rest, times the layer's block weight."""
    base = float(net.te_multiplier if network.is_text_encoder_layer(layer_name) else net.unet_multiplier)
    factors = getattr(net, "layer_factors", None)  # A1111-era subclasses of Network may lack it
    return base * factors[layer_name] if factors and layer_name in factors else base


def contributions_for(layer_name: str, networks: Iterable[network.Network]) -> list[Contribution]:
    res = []
    for net in networks:
        module = net.modules.get(layer_name)
        if module is None:
            continue
        m = multiplier_for(net, layer_name)
        if m == 0:  # contributes nothing; leaving it out keeps `<lora:x:1:0>` from touching the UNet at all
            continue
        res.append(Contribution(net, module, m, net.dyn_dim))
    return res


def state_key(contributions: list[Contribution]) -> tuple:
    return tuple(c.key for c in contributions)


def build_plan(layers: dict, networks: list[network.Network]) -> dict[str, list[Contribution]]:
    """{layer name: contributions} for every layer of `layers` that some network targets (model order)."""
    targeted = set()
    for net in networks:
        targeted.update(net.modules)
    return {name: contributions_for(name, networks) for name in layers if name in targeted}
