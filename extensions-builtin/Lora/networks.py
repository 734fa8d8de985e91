"""A1111's public Lora API, as a thin facade over discovery, loader, plan and patcher.

Other extensions use these names: load_networks, available_networks, available_network_aliases,
forbidden_network_aliases, available_network_hash_lookup, loaded_networks, networks_in_memory,
list_available_networks, network_apply_weights, network_restore_weights_from_backup,
network_reset_cached_weight, assign_network_names_to_compvis_modules, Network, NetworkOnDisk, NetworkModule.

Unlike A1111, weights are merged eagerly inside load_networks (not lazily in each layer's forward), only the
layers that change are touched, and no full backup is kept (lora_patcher). With `lora_functional` the Loras are
added by forward hooks instead (lora_functional) and no weight is written (MultiheadAttention excepted).
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import lora_block_weights
import lora_discovery
import lora_fp8
import lora_functional
import lora_layers
import lora_loader
import lora_patcher
import lora_plan
import network
import torch
from lora_discovery import (  # noqa: F401  (A1111 names)
    available_network_aliases,
    available_network_hash_lookup,
    available_network_paths,
    available_networks,
    find_network,
    forbidden_network_aliases,
    list_available_networks,
)
from lora_loader import module_types, networks_in_memory  # noqa: F401
from network import Network, NetworkModule, NetworkOnDisk, SdVersion  # noqa: F401

from modules import errors, shared

logger = logging.getLogger("lora")

loaded_networks: list[Network] = []
patcher = lora_patcher.Patcher()
functional = lora_functional.FunctionalHooks()
extra_network_lora = None  # set by scripts/lora_script.py (A1111 attribute)
# Held while the active set changes (load_networks, restore_all) and while the in-memory cache is purged: a
# `lora_in_memory_limit` change from a settings request must not clear the modules of a network that a job has
# just loaded but not yet made active (it would silently apply nothing while the infotext records its hash).
state_lock = threading.RLock()


@dataclass
class LoadReport:
    """What load_networks did, for the caller to show: names not found, files that failed, fatal errors."""

    networks: list[Network] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)  # mentioned name → message
    duplicates: list[str] = field(default_factory=list)  # names mentioned more than once (last one used)
    fatal: str | None = None  # the patcher failed; the model holds its original weights
    notes: list[str] = field(default_factory=list)  # restores that needed a fallback, inexact restores
    layers_written: int = 0  # layers whose weights were written (merge) or whose hooks changed (functional)
    held_bytes: int = 0  # memory kept for exact restore (merge) or by the hooks (functional)
    seconds: float = 0.0  # time spent applying


last_report: LoadReport | None = None


def assign_network_names_to_compvis_modules(sd_model) -> None:
    """on_model_loaded callback (A1111 name): names the model's layers and builds its key map."""
    layer_map = lora_layers.assign_network_names_to_compvis_modules(sd_model)
    if layer_map is not None:
        for name, component in layer_map.components.items():
            if name == "unet" or name.startswith("text_encoder"):
                _watch(component, _before_unet if name == "unet" else _before_text_encoder)


def load_network(name: str, network_on_disk: NetworkOnDisk, sd_model=None) -> Network:
    """A1111 API: reads one file for the current model (no multipliers set, nothing applied)."""
    layer_map = lora_layers.get_layer_map(sd_model if sd_model is not None else shared.sd_model)
    return lora_loader.load_network(name, network_on_disk, layer_map)


def _as_list(values, count: int, default):
    values = list(values) if values is not None else []
    return (values + [default] * count)[:count]


def load_networks(names: list[str], te_multipliers: list[float] | None = None,
                  unet_multipliers: list[float] | None = None, dyn_dims: list[int | None] | None = None,
                  sd_model=None, block_weights: list[dict[str, float] | None] | None = None) -> LoadReport:
    """Makes `names` (with their multipliers) the active set and merges it into the model's weights now.

    The same file named twice (stem and alias, or two tags) is applied once, with the last weights.
    `block_weights`: per name, {LBW block id: weight} (lora_block_weights.BlockWeights.for_family) or None."""
    with state_lock:
        _adopt_replaced_cache()
        report = _load_networks(names, te_multipliers, unet_multipliers, dyn_dims, sd_model, block_weights)
        _remember_applied(sd_model if sd_model is not None else shared.sd_model)
        return report


def _load_networks(names, te_multipliers, unet_multipliers, dyn_dims, sd_model, block_weights=None) -> LoadReport:
    global last_report
    report = LoadReport()
    sd_model = sd_model if sd_model is not None else shared.sd_model
    layer_map = lora_layers.get_layer_map(sd_model)
    names = list(names)
    te_multipliers = _as_list(te_multipliers, len(names), 1.0)
    unet_multipliers = [te if u is None else u
                        for u, te in zip(_as_list(unet_multipliers, len(names), None), te_multipliers, strict=True)]
    dyn_dims = _as_list(dyn_dims, len(names), None)
    block_weights = _as_list(block_weights, len(names), None)

    found, report.missing = lora_discovery.find_networks(list(dict.fromkeys(names)))
    for name in report.missing:
        logger.info("Couldn't find network with name %s", name)

    wanted: dict[str, tuple] = {}
    for name, te, unet, dyn, blocks in zip(names, te_multipliers, unet_multipliers, dyn_dims, block_weights,
                                           strict=True):
        entry = found.get(name)
        if entry is None:
            continue
        entry = lora_discovery.refresh_record(entry)
        if entry.filename in wanted:
            report.duplicates.append(name)
        wanted[entry.filename] = (name, entry, te, unet, dyn, blocks)

    new_loaded: list[Network] = []
    for name, entry, te, unet, dyn, blocks in wanted.values():
        try:
            net = lora_loader.get_network(name, entry, layer_map)
        except Exception as e:
            entry.load_error = str(e)
            report.load_errors[name] = str(e)
            errors.display(e, f"loading network {entry.filename}")
            continue
        net.mentioned_name = name
        net.te_multiplier = float(te)
        net.unet_multiplier = float(unet)
        net.dyn_dim = dyn
        net.block_weights = blocks
        net.layer_factors = lora_block_weights.layer_factors(blocks, net.modules, layer_map.structure) \
            if blocks else {}
        try:
            entry.read_hash()
        except Exception as e:
            errors.display(e, f"hashing {entry.filename}")
        new_loaded.append(net)

    loaded_networks[:] = new_loaded
    plan = lora_plan.build_plan(layer_map.layers, loaded_networks)
    started = time.perf_counter()
    try:
        report.layers_written = apply_plan(layer_map, plan, sd_model)
    except lora_patcher.PatchError as e:
        errors.display(e, "applying Loras")
        report.fatal = str(e)
        loaded_networks.clear()
        functional.clear(layer_map.layers)
    report.seconds = time.perf_counter() - started
    report.notes = patcher.take_notes()
    report.held_bytes = patcher.held_bytes(layer_map.layers) + functional.held_bytes(layer_map.layers)
    fp8_line = lora_fp8.summary(lora_fp8.setting(), *fp8_last, layer_map.layers,
                                functional.held_bytes(layer_map.layers))
    if fp8_line and not report.fatal:
        logger.info(fp8_line)
        report.notes.append(fp8_line)
    report.networks = list(loaded_networks)

    if lora_loader.purge_networks_from_memory(getattr(shared.opts, "lora_in_memory_limit", 0), loaded_networks):
        _release_device_cache()
    last_report = report
    return report


def functional_mode() -> bool:
    return bool(getattr(shared.opts, "lora_functional", False))


def original_weights(sd_model):
    """The host's exact originals (`sd_model.original_weights`: read(component, param) / valid()), if offered."""
    source = getattr(sd_model, "original_weights", None)
    return source if callable(getattr(source, "read", None)) and callable(getattr(source, "valid", None)) else None


def apply_plan(layer_map, plan: dict, sd_model, layers: dict | None = None) -> int:
    """Merges the plan (or, in functional mode, hooks it; MultiheadAttention is merged either way) into `layers`
    (default: every layer of the map; the others are left as they are)."""
    layers, source = layer_map.layers if layers is None else layers, original_weights(sd_model)
    paths = getattr(layer_map, "module_paths", None)
    bypass = _fp8_strategy(layer_map, plan, layers) == lora_fp8.BYPASS
    if not functional_mode() and not bypass:
        changed = functional.clear(layers)
        return changed + patcher.sync(layers, plan, source, paths)
    hooked = {k for k, m in layers.items() if functional.hookable(m) and
              (not bypass or functional_mode() or lora_fp8.fp8_weight(m) is not None)}
    if not functional_mode():  # merge mode, fp8 layers bypassed: hooks elsewhere go
        functional.clear({k: m for k, m in layers.items() if k not in hooked})
    merged = {k: v for k, v in plan.items() if k not in hooked}
    changed = patcher.sync(layers, merged, source, paths)  # also un-merges what merge mode wrote
    return changed + functional.sync({k: layers[k] for k in hooked}, {k: v for k, v in plan.items() if k in hooked})


fp8_last: tuple = ("", lora_fp8.Costs())  # (the strategy the last job used, its fp8 costs), for its report line


def _fp8_strategy(layer_map, plan: dict, layers: dict) -> str:
    """The fp8 strategy for this plan (`lora_fp8_strategy`, auto resolved from the plan's memory costs); sets the
    patcher's."""
    global fp8_last
    strategy = lora_fp8.setting()
    cost = lora_fp8.costs(layers, plan, getattr(layer_map, "components", {}).values())
    chosen = lora_fp8.resolve(strategy, cost)
    patcher.fp8_strategy = chosen
    fp8_last = (chosen, cost)
    return chosen


def _release_device_cache() -> None:
    """What A1111's torch_gc() after a purge is for, without its gc.collect() (purged networks are freed by
    reference counting, lora_loader.purge_networks_from_memory)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def purge_networks_from_memory() -> None:
    """Trims the loaded-network cache to `lora_in_memory_limit` (its onchange handler); the active set is kept."""
    with state_lock:
        dropped = lora_loader.purge_networks_from_memory(getattr(shared.opts, "lora_in_memory_limit", 0),
                                                         loaded_networks)
    if dropped:
        _release_device_cache()


def network_apply_weights(self: torch.nn.Module) -> None:
    """Brings one layer to the state the loaded networks want (a no-op when it is there already). Other extensions
    call it from their own layer forwards, as A1111's patched forwards do."""
    name = getattr(self, "lora_layer_key", None)
    if name is None:
        return
    apply_changed_multipliers()
    sd_model = getattr(shared, "sd_model", None)
    layers, plan = {name: self}, {name: lora_plan.contributions_for(name, loaded_networks)}
    bypass = fp8_last[0] == lora_fp8.BYPASS and lora_fp8.fp8_weight(self) is not None
    if (functional_mode() or bypass) and functional.hookable(self):
        patcher.sync(layers, {}, original_weights(sd_model))
        functional.sync(layers, plan)
    else:
        functional.clear(layers)
        patcher.sync(layers, plan, original_weights(sd_model))


def network_restore_weights_from_backup(self: torch.nn.Module) -> None:
    patcher.restore(self)


def network_reset_cached_weight(self: torch.nn.Module) -> None:
    """Forgets the layer's Lora state without writing (new weights were loaded into it)."""
    patcher.forget(self)
    functional.remove(self)


def restore_all(sd_model=None) -> None:
    """Puts every layer of the model back to its original weights, removes the hooks, clears the active set."""
    sd_model = sd_model if sd_model is not None else shared.sd_model
    with state_lock:
        loaded_networks.clear()
        _remember_applied(sd_model)
        layer_map = lora_layers.get_layer_map(sd_model)
        functional.clear(layer_map.layers)
        patcher.sync(layer_map.layers, {}, original_weights(sd_model), getattr(layer_map, "module_paths", None))


# --- changes other extensions make behind load_networks' back ----------------------------------------------------
# A1111 merges lazily in each layer's forward and compares the loaded networks' (name, te, unet, dyn) there, so
# extensions change those between steps or even layers: loractl turns the multipliers into properties of the
# sampling step, LoRA Block Weight's start/stop and Regional Prompter's regions set them from their own callbacks
# and forwards, and LBW scales the loaded modules' tensors after activation. Here the merge happens in load_networks;
# these notice such changes (a module's new tensors show in its network's factors_version) before the text encoders
# and the UNet run, and apply them (the plan then rewrites only the layers that changed).
_applied_state: tuple = (False, ())  # (functional mode, each loaded network's id, name, te, unet, dyn, version)
_applied_unet_state: tuple = (False, ())  # the same, as far as the UNet's layers hold it
_applied_model = None  # weakref to the model they were applied to


def _wanted_state() -> tuple:
    return functional_mode(), tuple((id(n), n.name, float(n.te_multiplier), float(n.unet_multiplier), n.dyn_dim,
                                     getattr(n, "factors_version", 0)) for n in loaded_networks)


def _remember_applied(sd_model) -> None:
    global _applied_state, _applied_unet_state, _applied_model
    _applied_state = _applied_unet_state = _wanted_state()
    _applied_model = weakref.ref(sd_model) if sd_model is not None else None


def apply_changed_multipliers(sd_model=None, unet_only: bool = False) -> int:
    """Applies the loaded networks again when a name, multiplier, dyn or lora_functional changed since the last
    apply (to the model they were applied to); returns the layers written (0, after a tuple comparison, when
    nothing changed). `unet_only`: between sampling steps the text encoders have done their work (A1111, which
    merges in each layer's forward, leaves them as they were when the prompt was encoded)."""
    global _applied_unet_state
    if not loaded_networks and not _applied_state[1] and not _applied_unet_state[1]:
        return 0
    wanted = _wanted_state()
    # the UNet may hold a newer state than the text encoders (unet_only applies between steps): a full apply is
    # needed unless both hold what is wanted (LBW's start= sets 0, then the tag's weight back: the UNet's wanted
    # state returns to the text encoders' one)
    if wanted == _applied_unet_state and (unet_only or wanted == _applied_state):
        return 0
    if sd_model is None:
        sd_model = _applied_model() if _applied_model is not None else None
    if sd_model is None:
        return 0
    with state_lock:
        layer_map = lora_layers.get_layer_map(sd_model)
        layers = layer_map.layers if not unet_only else \
            {k: m for k, m in layer_map.layers.items() if not network.is_text_encoder_layer(k)}
        try:
            written = apply_plan(layer_map, lora_plan.build_plan(layers, loaded_networks), sd_model, layers)
        except lora_patcher.PatchError as e:
            errors.display(e, "applying changed Lora multipliers")
            loaded_networks.clear()
            functional.clear(layer_map.layers)
            written = 0
        if unet_only:
            _applied_unet_state = _wanted_state()
        else:
            _remember_applied(sd_model)
    return written


def _before_unet(module, args) -> None:
    apply_changed_multipliers(unet_only=True)


def _before_text_encoder(module, args) -> None:
    apply_changed_multipliers()


def _watch(component, before) -> None:
    """Checks for changes before each call of the component (once per component): the UNet after every cfg_denoiser
    callback of the step has run, a text encoder after LoRA Block Weight scaled the loaded modules' tensors (A1111
    would see both in the layers' forwards of that same call)."""
    if isinstance(component, torch.nn.Module) and not getattr(component, "_lora_watched", False):
        component.register_forward_pre_hook(before)
        component._lora_watched = True


def network_forward(org_module: torch.nn.Module, input, original_forward):
    """A1111 API (its functional path): the layer's output with the loaded networks, given the layer's unpatched
    forward. Regional Prompter calls it from its own Linear.forward after changing the multipliers for a region:
    the change is applied first; then in functional mode this layer's hook adds the networks' output, in merge
    mode its weights hold them."""
    network_apply_weights(org_module)
    return original_forward(org_module, input)


def _adopt_replaced_cache() -> None:
    """LoRA Block Weight empties A1111's network cache by assigning a new dict to `networks.networks_in_memory`
    (it scales the loaded networks' tensors in place, so they must be read from the file again): the cache this
    extension really uses is emptied the same way."""
    global networks_in_memory
    if networks_in_memory is not lora_loader.networks_in_memory:
        lora_loader.purge_networks_from_memory(0, [])
        lora_loader.networks_in_memory.clear()
        networks_in_memory = lora_loader.networks_in_memory


__all__ = [
    "load_networks", "available_networks", "available_network_aliases", "forbidden_network_aliases",
    "available_network_hash_lookup", "loaded_networks", "networks_in_memory", "list_available_networks",
    "network_apply_weights", "network_restore_weights_from_backup", "network_reset_cached_weight", "network_forward",
    "assign_network_names_to_compvis_modules", "Network", "NetworkOnDisk", "NetworkModule", "network",
]
