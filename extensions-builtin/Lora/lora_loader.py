"""Parsing: a Lora file → Network {canonical layer: NetworkModule} for one model, with every key accounted for.

Keys that name no layer, layers whose parts no network type understands, and parts a type leaves over are
collected on the Network (`unmatched_keys`, `unsupported_keys`, `unused_keys`), never silently dropped. A layer
whose module cannot be built is recorded in `load_errors`; the rest of the file still loads.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import lora_files
import network
import network_lora

logger = logging.getLogger("lora")

module_types: list[network.ModuleType] = [network_lora.ModuleTypeLora()]

# Loaded networks by absolute path (A1111 keeps this dict too; it is purged to lora_in_memory_limit).
networks_in_memory: OrderedDict[str, network.Network] = OrderedDict()


def parse_state_dict(net: network.Network, state_dict: dict, layer_map) -> network.Network:
    groups, bases, net.unmatched_keys = layer_map.key_map.group(state_dict.keys())
    for canonical, parts in groups.items():
        weights = network.NetworkWeights(network_key=bases[canonical], sd_key=canonical,
                                         w={part: state_dict[key] for part, key in parts.items()},
                                         sd_module=layer_map.layers.get(canonical))
        try:
            module = None
            for module_type in module_types:
                module = module_type.create_module(net, weights)
                if module is not None:
                    break
        except Exception as e:
            net.load_errors[canonical] = f"{type(e).__name__}: {e}"
            continue
        if module is None:
            net.unsupported_keys.extend(parts.values())
            continue
        net.unused_keys.extend(key for part, key in parts.items()
                               if part not in module.parts_used and network_lora.PART_ALIASES.get(part)
                               not in module.parts_used)
        net.modules[canonical] = module
    return net


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


def purge_networks_from_memory(limit: int, keep: list[network.Network]) -> None:
    """Keeps at most `limit` networks besides those in `keep` (the current job's), dropping the oldest first."""
    keep_ids = {id(n) for n in keep}
    extra = [k for k, n in networks_in_memory.items() if id(n) not in keep_ids]
    for filename in extra[:max(0, len(extra) - max(0, int(limit)))]:
        networks_in_memory.pop(filename, None)
