"""Data types of the Lora extension (A1111 names): a file on disk, a loaded network, and the per-layer module base.

`NetworkModule` and its subclasses are pure tensor code: given the original weight of their layer they return
(ΔW, Δbias) in fp32 (`compute`), or a bypass branch that gives the layer's output change without forming ΔW
(`bypass`, functional mode). They never write weights (only lora_patcher does) and never look at host state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import lora_bypass
import lora_metadata
import lyco_helpers
import torch
from lora_bypass import ComputedBypass
from lora_metadata import SdVersion, detect_version  # noqa: F401  (A1111 names: network.SdVersion, ...)

from modules import extra_networks, shared

metadata_tags_order = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10,
                       "ss_tag_frequency": 20}


@dataclass
class FileFacts:
    """What discovery read of a Lora file for its record (lora_discovery.read_facts); this module reads nothing."""

    size: int
    mtime: float
    mtime_ns: int
    metadata: dict = field(default_factory=dict)
    version_hint: str | None = None
    also_fits: tuple[str, ...] = ()  # other families the file applies to in full (SDXL text encoders on SD3)
    read_error: str | None = None
    hash: str | None = None  # known without reading tensors (cached, or a plausible embedded one)


class _DiscoveryHooks:
    """What records need from discovery, which imports this module and so hands these over at import
    (lora_discovery: set_name_resolver, set_file_io) instead of this module importing it back."""

    find_network: Callable[[str], NetworkOnDisk | None] | None = None
    read_facts: Callable[[str, os.stat_result | None], FileFacts] | None = None
    compute_hash: Callable[[NetworkOnDisk], str | None] | None = None
    hash_known: Callable[[NetworkOnDisk], None] | None = None


_hooks = _DiscoveryHooks()


def set_name_resolver(find_network: Callable[[str], NetworkOnDisk | None]) -> None:
    _hooks.find_network = find_network


def set_file_io(read_facts: Callable[[str, os.stat_result | None], FileFacts],
                compute_hash: Callable[[NetworkOnDisk], str | None],
                hash_known: Callable[[NetworkOnDisk], None]) -> None:
    """Discovery's file reader and hasher (records built A1111-style, `NetworkOnDisk(name, filename)`, use them),
    and its hash lookup's update."""
    _hooks.read_facts, _hooks.compute_hash, _hooks.hash_known = read_facts, compute_hash, hash_known


def _find_network(name: str) -> NetworkOnDisk | None:
    return _hooks.find_network(name) if _hooks.find_network is not None else None


class NetworkOnDisk:
    """One Lora file found on disk: what discovery read of its header (FileFacts); never tensors. Built without
    `facts` (A1111 style), it asks discovery's reader.

    Fields for the card page: name (unique key in `available_networks`: the stem, or the path-qualified name
    for a later file with the same stem), stem, qualified_name (`sub/stem` relative to its Lora folder),
    filename (absolute), alias, metadata, sd_version, hash / shorthash, size, mtime, is_safetensors,
    read_error / load_error, and get_alias(), get_user_metadata().
    """

    def __init__(self, name: str, filename: str, *, qualified_name: str | None = None, root: str | None = None,
                 stat: os.stat_result | None = None, facts: FileFacts | None = None):
        self.name = name
        self.filename = os.path.abspath(filename)
        self.stem = os.path.splitext(os.path.basename(filename))[0]
        self.qualified_name = qualified_name or self.stem
        self.root = root
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if facts is None:
            if _hooks.read_facts is None:
                raise RuntimeError("NetworkOnDisk: lora_discovery is not loaded (it reads the files)")
            facts = _hooks.read_facts(self.filename, stat)
        self.size, self.mtime, self.mtime_ns = facts.size, facts.mtime, facts.mtime_ns
        self.read_error: str | None = facts.read_error
        self.load_error: str | None = None
        metadata = facts.metadata or {}
        self.metadata = dict(sorted(metadata.items(), key=lambda x: metadata_tags_order.get(x[0], 999)))
        self.version_hint = facts.version_hint
        self.also_fits = facts.also_fits
        alias = self.metadata.get("ss_output_name")
        self.alias = alias if isinstance(alias, str) and alias.strip() else self.stem

        self.hash: str | None = None
        self.shorthash: str | None = None
        self.set_hash(facts.hash)
        self.sd_version = detect_version(self.metadata, self.version_hint)

    @property
    def identity(self) -> tuple:
        """What a loaded copy of this file is valid for: path, size and modification time."""
        return self.filename, self.size, self.mtime_ns

    def detect_version(self) -> SdVersion:
        return detect_version(self.metadata, self.version_hint)

    def set_hash(self, v: str | None) -> None:
        self.hash = v or None
        self.shorthash = self.hash[0:12] if self.hash else None
        if self.shorthash and _hooks.hash_known is not None:
            _hooks.hash_known(self)

    def read_hash(self) -> None:
        """Computes the hash on first use (tensor-data "addnet" hash for safetensors, else file sha256)."""
        if not self.hash and _hooks.compute_hash is not None:
            self.set_hash(_hooks.compute_hash(self))

    def get_alias(self) -> str:
        """The name a card inserts: the alias when it resolves back to this file, else the unique name."""
        if getattr(shared.opts, "lora_preferred_name", "Alias from file") == "Filename":
            return self.name
        if self.alias != self.name and _find_network(self.alias) is self:
            return self.alias
        return self.name

    def get_user_metadata(self) -> dict:
        """The sidecar `<stem>.json` (description, activation text, preferred weight, ...)."""
        return extra_networks.get_user_metadata(self.filename)

    def __repr__(self) -> str:
        return f"NetworkOnDisk({self.name!r}, {self.filename!r})"


class ModuleDict(dict):
    """`Network.modules`: {canonical layer name: NetworkModule}. `keys()` lists A1111's layer names where the model
    has them (`diffusion_model_input_blocks_1_1_proj_in`, as A1111's own dict is keyed: LoRA Block Weight picks a
    module's block weight by that name) and indexing takes either name; iteration, items() and get() are canonical."""

    a1111_names: dict[str, str] = {}  # {canonical: A1111 name} (lora_layers.LayerMap.a1111_names)

    def keys(self) -> list[str]:
        return [self.a1111_names.get(k, k) for k in dict.keys(self)]

    def __getitem__(self, key: str) -> NetworkModule:
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            names = self.a1111_names
            if getattr(self, "_by_a1111", (None,))[0] is not names:  # built once per name table
                self._by_a1111 = (names, {a: c for c, a in names.items()})
            canonical = self._by_a1111[1].get(key)
            if canonical is None or not dict.__contains__(self, canonical):
                raise
            return dict.__getitem__(self, canonical)


class Network:  # LoraModule
    """A Lora file parsed for one model: {canonical layer name: NetworkModule} plus what did not match."""

    factors_version = 0  # tensor replacements in its modules (NetworkModule.__setattr__); networks' wanted state

    def __init__(self, name: str, network_on_disk: NetworkOnDisk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim: int | None = None
        self.block_weights: dict[str, float] | None = None  # {LBW block id: weight} from the tag, this job
        self.layer_factors: dict[str, float] = {}  # {layer: block weight} where it is not 1 (lora_plan reads it)
        self.modules: ModuleDict = ModuleDict()
        self.bundle_embeddings: dict = {}
        self.mtime: float | None = network_on_disk.mtime if network_on_disk else None
        self.mentioned_name: str | None = None
        self.identity: tuple = network_on_disk.identity if network_on_disk else (name,)
        self.layer_map_token: str | None = None
        self.unmatched_keys: list[str] = []  # file keys that name no layer of this model
        self.unsupported_keys: list[str] = []  # keys of layers whose parts no network type understands
        self.unused_keys: list[str] = []  # parts a network type left over
        self.load_errors: dict[str, str] = {}  # layer → why its module could not be built
        self.apply_errors: dict[str, str] = {}  # layer → why its delta could not be computed

    @property
    def unmatched_count(self) -> int:
        return len(self.unmatched_keys) + len(self.unsupported_keys) + len(self.unused_keys)

    def error_count(self) -> int:
        return len(self.load_errors) + len(self.apply_errors)

    def __repr__(self) -> str:
        return f"Network({self.name!r}, {len(self.modules)} layers)"


@dataclass
class NetworkWeights:
    network_key: str  # the file-side base name, e.g. lora_unet_down_blocks_0_..._to_q
    sd_key: str  # the canonical layer name, e.g. unet.down_blocks.0.attentions.0....to_q
    w: dict[str, torch.Tensor] = field(default_factory=dict)
    sd_module: torch.nn.Module | None = None


def is_text_encoder_layer(sd_key: str) -> bool:
    return sd_key.startswith("text_encoder")


def _scalar(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"expected a single number, found a tensor of shape {tuple(t.shape)}")
        return float(t.item())
    return float(t)


def dora_square_default(net: Network | None) -> str:
    """The DoRA axis for a 1-D magnitude on a square layer, from the network's file metadata (lora_metadata)."""
    return lora_metadata.dora_axis_from_metadata(getattr(getattr(net, "network_on_disk", None), "metadata", None))


def _same_tensor(old, new: torch.Tensor) -> bool:
    return isinstance(old, torch.Tensor) and old.data_ptr() == new.data_ptr() and old.dtype == new.dtype and \
        old.shape == new.shape and old.stride() == new.stride() and old.device == new.device


class ModuleType:
    """Claims the parts of one layer group it understands by returning a NetworkModule, else None."""

    def create_module(self, net: Network, weights: NetworkWeights) -> NetworkModule | None:
        return None


class NetworkModule:
    """Base of every network type: scale, multiplier, reshape to the target, DoRA, extra bias.

    Subclasses implement `calc_delta(orig_weight, dyn_dim, multiplier, orig_bias) -> (U, output_shape, ex_bias)`:
    the delta before scale and multiplier, fp32, on orig_weight's device. A type whose strength is not a plain
    factor (OFT, BOFT) sets `applies_multiplier` and returns its delta at strength `multiplier` already.
    `validate(weight_shape)` raises ValueError with a clear message when the parts cannot fit the target.
    `bypass_weight(op, factor, dyn_dim)` is the type's own forward of factor·U (functional mode); `bypass()` puts
    DoRA, A1111's weight-shaped `bias` part and Δbias around it.
    `delta_reads_weight`: whether the type's ΔW reads the weight's values (DoRA aside); see delta_depends_on_weight.
    """

    common_parts = ("alpha", "scale", "dora_scale", "bias")
    supports_dora = True
    applies_multiplier = False
    delta_reads_weight = True
    factors_version = 0  # tensors assigned to the module so far: part of the layer's plan key (lora_plan)

    def __setattr__(self, name: str, value) -> None:
        # Other extensions scale a loaded network by assigning new tensors to its modules (LoRA Block Weight:
        # `module.w1a = Parameter(module.w1a * ratio)`, `module.up_model.weight = ...`): each replacement is
        # counted, so the plan sees the layer change and merges it again. Reassigning the same storage
        # (Regional Prompter moves factors to the device they are on) is no change. Kept as plain tensors.
        if isinstance(value, torch.Tensor):
            value = value.detach() if value.requires_grad else value
            if not _same_tensor(self.__dict__.get(name), value):
                object.__setattr__(self, "factors_version", self.factors_version + 1)
                net = self.__dict__.get("network")
                if net is not None:
                    net.factors_version = getattr(net, "factors_version", 0) + 1
        object.__setattr__(self, name, value)

    def __copy__(self) -> NetworkModule:
        """A shallow copy (each restore record holds one): the same attributes, without copy's generic protocol,
        which costs more than the rest of a small layer's record."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __init__(self, net: Network, weights: NetworkWeights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        w = weights.w
        self.dim: int | None = None
        self.bias = w.get("bias")
        self.alpha = _scalar(w.get("alpha"))
        self.scale = _scalar(w.get("scale"))
        self.dora_scale = w.get("dora_scale") if self.supports_dora else None
        self.dora_square_default = dora_square_default(net)
        self.parts_used: set[str] = {k for k in self.common_parts if k in w}
        if not self.supports_dora:
            self.parts_used.discard("dora_scale")

    @property
    def delta_depends_on_weight(self) -> bool:
        """Whether ΔW reads the original weight's values (then a residual restore cannot recompute it from the
        patched weight): the type's declared `delta_reads_weight`, always with DoRA, and always for a subclass
        that changes the math of the class that declared it."""
        if self.dora_scale is not None:
            return True
        declared = next((c for c in type(self).__mro__ if "delta_reads_weight" in c.__dict__), NetworkModule)
        return bool(declared.delta_reads_weight) or not lyco_helpers.own_math(self, declared, "calc_delta",
                                                                              "delta_shape")

    def multiplier(self) -> float:
        return self.network.te_multiplier if is_text_encoder_layer(self.sd_key) else self.network.unet_multiplier

    def calc_scale(self, dyn_dim: int | None = None) -> float:
        """`scale` when the file has one, else alpha/dim (dim: the type's rank), else 1. alpha 0 means no alpha,
        as kohya's and LyCORIS's modules read it (A1111 would make the whole delta 0)."""
        if self.scale is not None:
            return self.scale
        if self.dim and self.alpha:
            return self.alpha / self.dim
        return 1.0

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        raise NotImplementedError

    def delta_shape(self) -> tuple | None:
        """The shape calc_delta returns without reading the weight, for validation; None when it depends on W."""
        return None

    def extra_bias(self) -> torch.Tensor | None:
        """The type's own Δbias part at strength 1 (full's diff_b, norm's b_norm), for the bypass forward."""
        return None

    def validate(self, weight_shape: tuple) -> None:
        weight_shape = tuple(weight_shape)
        shape = self.delta_shape()
        if shape is not None and not lyco_helpers.fits_weight(shape, weight_shape):
            raise ValueError(f"its parts make a delta of shape {tuple(shape)}, the layer's weight has shape "
                             f"{weight_shape}")
        if self.bias is not None and shape is not None and self.bias.numel() != torch.Size(shape).numel():
            raise ValueError(f"bias of shape {tuple(self.bias.shape)} does not match the delta's shape {tuple(shape)}")
        if self.dora_scale is not None:
            lyco_helpers.dora_axis(self.dora_scale.shape, weight_shape, self.dora_square_default)

    def compute(self, orig_weight: torch.Tensor, multiplier: float, dyn_dim: int | None = None,
                orig_bias: torch.Tensor | None = None):
        """(ΔW, Δbias) in fp32 for strength `multiplier`, ΔW shaped like orig_weight: m · finalize(s · U).

        orig_weight (and orig_bias) are the layer's original parameters, in any dtype; nothing is written."""
        updown, output_shape, ex_bias = self.calc_delta(orig_weight, dyn_dim, multiplier, orig_bias)
        return self.finalize_updown(updown, orig_weight, output_shape, ex_bias, multiplier, dyn_dim)

    def shaped_delta(self, updown: torch.Tensor, orig_weight: torch.Tensor, output_shape) -> torch.Tensor:
        """U (+ A1111's weight-shaped `bias` part, which is added before the scale) as fp32 shaped like the weight."""
        updown = updown.float()
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape) + self.bias.to(updown.device, torch.float32)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        return lyco_helpers.reshape_to_weight(updown, orig_weight.shape)

    def finalize_updown(self, updown: torch.Tensor, orig_weight: torch.Tensor, output_shape, ex_bias=None,
                        multiplier: float | None = None, dyn_dim: int | None = None):
        m = self.multiplier() if multiplier is None else multiplier
        updown = self.shaped_delta(updown, orig_weight, output_shape)
        if ex_bias is not None:
            ex_bias = ex_bias.to(updown.device, torch.float32)
        if self.applies_multiplier:
            return updown, ex_bias
        if ex_bias is not None:
            ex_bias = ex_bias * m
        updown = updown * self.calc_scale(dyn_dim)
        if self.dora_scale is not None:
            axis = lyco_helpers.dora_axis(self.dora_scale.shape, orig_weight.shape, self.dora_square_default)
            updown = lyco_helpers.weight_decompose(updown, orig_weight.to(updown.device, torch.float32),
                                                   self.dora_scale.to(updown.device, torch.float32), axis)
        return updown * m, ex_bias

    # --- bypass forward (functional mode) ------------------------------------------------------------------------
    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None
                      ) -> lora_bypass.Bypass | None:
        """The type's own forward of factor·U (for an `applies_multiplier` type: its whole output change at
        strength `factor`), or None where it has none for this layer (then ΔW is computed in each call)."""
        return None

    def bypass(self, layer: torch.nn.Module, multiplier: float, dyn_dim: int | None = None) -> lora_bypass.Bypass:
        """This network's output change on `layer` at strength `multiplier`: Δy(x, y0) with y0 the layer's own
        output. Equal to running the layer with its merged weights; nothing weight-sized is kept."""
        return self.bypass_on(lora_bypass.LayerOp(layer), multiplier, dyn_dim)

    def bypass_on(self, op: lora_bypass.LayerOp, multiplier: float, dyn_dim: int | None = None
                  ) -> lora_bypass.Bypass:
        self.validate(op.weight_shape)
        declared = next(c for c in type(self).__mro__ if "bypass_weight" in c.__dict__)
        if declared is NetworkModule or not lyco_helpers.own_math(self, declared, "calc_delta", "delta_shape"):
            return ComputedBypass(self, op, multiplier, dyn_dim)  # a subclass with its own math keeps it
        return lora_bypass.assemble(self, op, multiplier, dyn_dim)

    def calc_updown(self, orig_weight: torch.Tensor):
        """A1111 API: the delta for this network's current multiplier and dyn."""
        return self.compute(orig_weight, self.multiplier(), self.network.dyn_dim)

    def forward(self, x, y):
        """A1111 API (its functional path): `y` plus the layer's own op applied to `x` with (ΔW, Δbias), which is
        the same as running the layer with W + ΔW because every supported op is linear in its weight and bias.
        The extension's own functional mode (lora_functional) uses cheaper low-rank branches where it can."""
        layer = self.sd_module
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise TypeError(f"{self.sd_key}: the layer has no weight")
        try:
            op = lora_bypass.LayerOp(layer)
        except TypeError as e:
            raise TypeError(f"{self.sd_key}: no functional path ({e})") from None
        dw, db = self.calc_updown(weight.detach())
        return y + op(x, dw.to(x.device, x.dtype), None if db is None else db.to(x.device, x.dtype))
