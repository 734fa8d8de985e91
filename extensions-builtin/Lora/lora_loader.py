"""Parsing: a Lora file → Network {canonical layer: NetworkModule} for one model, with every key accounted for.

Keys that name no layer, layers whose parts no network type understands, and parts a type leaves over are
collected on the Network (`unmatched_keys`, `unsupported_keys`, `unused_keys`), never silently dropped. A layer
whose module cannot be built is recorded in `load_errors`; the rest of the file still loads.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import lora_discovery  # noqa: F401  (registers the file reader that records built A1111-style use)
import lora_files
import lora_keys
import network
import network_full
import network_glora
import network_hada
import network_ia3
import network_lokr
import network_lora
import network_norm
import network_oft
import network_rows
import torch

logger = logging.getLogger("lora")

# A1111's order: the first type that claims a layer's parts wins.
module_types: list[network.ModuleType] = [
    network_lora.ModuleTypeLora(),
    network_hada.ModuleTypeHada(),
    network_ia3.ModuleTypeIa3(),
    network_lokr.ModuleTypeLokr(),
    network_full.ModuleTypeFull(),
    network_norm.ModuleTypeNorm(),
    network_glora.ModuleTypeGLora(),
    network_oft.ModuleTypeOFT(),
]

# Loaded networks by absolute path (A1111 keeps this dict too; it is purged to lora_in_memory_limit).
networks_in_memory: OrderedDict[str, network.Network] = OrderedDict()


def _target_weight_shape(sd_module) -> tuple | None:
    weight = getattr(sd_module, "in_proj_weight", None) if isinstance(sd_module, torch.nn.MultiheadAttention) \
        else getattr(sd_module, "weight", None)
    return None if weight is None else tuple(weight.shape)


def _non_finite_parts(parts: dict[str, str], state_dict: dict) -> list[str]:
    bad = []
    for key in parts.values():
        t = state_dict[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(key)
    return bad


def build_module(net: network.Network, weights: network.NetworkWeights) -> network.NetworkModule | None:
    """The first network type that claims the layer's parts, checked against the target layer's weight shape.
    None when no type claims them; ValueError/KeyError with a message when the parts are broken."""
    for module_type in module_types:
        module = module_type.create_module(net, weights)
        if module is not None:
            shape = _target_weight_shape(weights.sd_module)
            if shape is not None:
                module.validate(shape)
            return module
    return None


def parse_state_dict(net: network.Network, state_dict: dict, layer_map) -> network.Network:
    parsed = lora_keys.parse_state_dict(state_dict, layer_map.key_map, getattr(net.network_on_disk, "metadata", None))
    state_dict, groups, bases, net.unmatched_keys = parsed.tensors, parsed.groups, parsed.bases, parsed.unmatched
    if isinstance(net.modules, network.ModuleDict):
        net.modules.a1111_names = getattr(layer_map, "a1111_names", {})
    net.bundle_embeddings, net.version_hint, net.refused = parsed.bundle_embeddings, parsed.version_hint, parsed.refused
    for canonical, parts in groups.items():
        bad = _non_finite_parts(parts, state_dict)
        if bad:
            net.load_errors[canonical] = f"{bases[canonical]}: NaN or infinite values in {', '.join(bad)}"
            continue
        weights = network.NetworkWeights(network_key=bases[canonical], sd_key=canonical,
                                         w={part: state_dict[key] for part, key in parts.items()},
                                         sd_module=layer_map.layers.get(canonical))
        try:
            module = build_module(net, weights)
        except Exception as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            net.load_errors[canonical] = f"{bases[canonical]}: {message}"
            continue
        if module is None:
            net.unsupported_keys.extend(parts.values())
            continue
        fused = layer_map.key_map.fused.get(canonical)
        if fused is not None:
            try:
                pieces = _split_fused(module, fused, layer_map)
            except Exception as e:
                net.load_errors[canonical] = f"{bases[canonical]}: {e}"
                continue
        else:
            pieces = {canonical: module}
        twice = [target for target in pieces if target in net.modules]
        if twice:  # a fused file layer and a layer of its own for the same weight: the first one wins
            net.load_errors[canonical] = f"{bases[canonical]}: {twice[0]} is already changed by " \
                                         f"{net.modules[twice[0]].network_key} in this file; not applied twice"
            continue
        net.unused_keys.extend(key for part, key in parts.items()
                               if part not in module.parts_used and network_lora.PART_ALIASES.get(part)
                               not in module.parts_used)
        net.modules.update(pieces)
    return net


def _split_fused(module: network.NetworkModule, fused, layer_map) -> dict:
    """{real layer: module} of a file layer that is several loaded layers (Flux's fused qkv, network_rows), each
    checked against its layer."""
    pieces = network_rows.split(module, fused, layer_map.layers)
    for piece in pieces.values():
        shape = _target_weight_shape(piece.sd_module)
        if shape is not None:
            piece.validate(shape)
    return pieces


def load_network(name: str, network_on_disk: network.NetworkOnDisk, layer_map) -> network.Network:
    """Reads and parses a file for the model behind layer_map. Raises LoraFileError for unreadable files."""
    net = network.Network(name, network_on_disk)
    state_dict = lora_files.load_state_dict(network_on_disk.filename)
    parse_state_dict(net, state_dict, layer_map)
    net.layer_map_token = layer_map.token
    if net.unmatched_count:
        logger.debug("Network %s didn't match keys: %s", network_on_disk.filename,
                     net.unmatched_keys + net.unsupported_keys + net.unused_keys)
    return net


def get_network(name: str, network_on_disk: network.NetworkOnDisk, layer_map) -> network.Network:
    """The in-memory network when its file (path, size, mtime) and the model naming are unchanged, else a fresh
    read. A replaced file therefore re-applies even with the same name and weights (A1111 13B-4)."""
    net = networks_in_memory.get(network_on_disk.filename)
    if net is None or net.identity != network_on_disk.identity or net.layer_map_token != layer_map.token:
        net = load_network(name, network_on_disk, layer_map)
        network_on_disk.load_error = None
    networks_in_memory[network_on_disk.filename] = net
    networks_in_memory.move_to_end(network_on_disk.filename)
    net.name = name
    return net


def purge_networks_from_memory(limit: int, keep: list[network.Network]) -> int:
    """Keeps at most `limit` networks besides those in `keep` (the current job's), dropping the oldest first.
    Returns how many were dropped.

    A dropped network's modules point back at it; clearing them breaks that cycle, so its tensors are freed at
    once by reference counting instead of waiting for (or forcing, A1111 calls gc.collect()) a garbage collection."""
    keep_ids = {id(n) for n in keep}
    extra = [k for k, n in networks_in_memory.items() if id(n) not in keep_ids]
    dropped = 0
    for filename in extra[:max(0, len(extra) - max(0, int(limit or 0)))]:
        net = networks_in_memory.pop(filename, None)
        if net is not None:
            net.modules = {}
            dropped += 1
    return dropped
