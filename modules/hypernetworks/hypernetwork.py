"""Hypernetworks (A1111 names and file format): a residual MLP pair (K, V) per attention context width.

An attention layer whose K/V input has width `dim` computes `to_k(mlp_k(context))` and `to_v(mlp_v(context))`
instead of `to_k(context)` / `to_v(context)`, where `mlp(x) = x + MLP(x) * multiplier`. On this host that is
done by forward-pre-hooks on `to_k`/`to_v` (see hooks.py); apply_hypernetworks() is the same math for code
that has the context in hand.
"""
from __future__ import annotations

import glob
import inspect
import os
from typing import Iterable, Sequence

import torch
from torch.nn.init import kaiming_normal_, kaiming_uniform_, normal_, xavier_normal_, xavier_uniform_, zeros_

from modules import devices, errors, hashes, shared
from modules.hypernetworks import storage
from modules.hypernetworks.hooks import (  # noqa: F401  (re-exported)
    attention_context_widths,
    install_hypernetwork_hooks,
    remove_hypernetwork_hooks,
)

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
METADATA_KEYS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                 "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                 "last_layer_dropout", "optional_info")


def _activation_classes() -> dict[str, type]:
    res = {
        "linear": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leakyrelu": torch.nn.LeakyReLU,
        "elu": torch.nn.ELU,
        "swish": torch.nn.Hardswish,  # A1111's "swish" is Hardswish; files depend on it
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
    }
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation" and cls is not torch.nn.MultiheadAttention:
            res.setdefault(cls_name.lower(), cls)
    return res


def parse_layer_structure(layer_structure: Sequence[float] | str | None) -> list[float]:
    """`[1, 2, 1]` or "1, 2, 1": layer widths as multiples of dim; must start and end with 1."""
    if layer_structure is None:
        raise ValueError("layer_structure must not be None")
    if isinstance(layer_structure, str):
        try:
            layer_structure = [float(x.strip()) for x in layer_structure.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layer_structure {layer_structure!r} is not a comma-separated list of numbers") from None
    res = [float(x) for x in layer_structure]
    if len(res) < 2:
        raise ValueError(f"layer_structure needs at least two entries, got {res}")
    if res[0] != 1:
        raise ValueError(f"layer_structure should start with 1, got {res}")
    if res[-1] != 1:
        raise ValueError(f"layer_structure should end with 1, got {res}")
    if any(x <= 0 for x in res):
        raise ValueError(f"layer_structure entries must be positive, got {res}")
    return [int(x) if x == int(x) else x for x in res]


def parse_dropout_structure(layer_structure: Sequence[float] | None, use_dropout: bool,
                            last_layer_dropout: bool) -> list[float]:
    """A1111's default dropout: 0.3 after every hidden layer, the last hidden one only with last_layer_dropout."""
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    if not use_dropout:
        return [0] * len(layer_structure)
    dropout_values = [0]
    dropout_values.extend([0.3] * (len(layer_structure) - 3))
    dropout_values.append(0.3 if last_layer_dropout else 0)
    dropout_values.append(0)
    return dropout_values


def _check_dropout_structure(dropout_structure: Sequence[float], layer_structure: Sequence[float]) -> list[float]:
    res = [float(x) for x in dropout_structure]
    if len(res) != len(layer_structure):
        raise ValueError(f"dropout_structure {res} needs one entry per layer_structure entry {list(layer_structure)}")
    if any(not 0 <= x < 1 for x in res):
        raise ValueError(f"dropout probabilities must be 0 or between 0 and 1, got {res}")
    return res


class HypernetworkModule(torch.nn.Module):
    """x + MLP(x) * multiplier, with MLP = [Linear, activation?, LayerNorm?, Dropout?] per layer_structure step."""

    activation_dict = _activation_classes()

    def __init__(self, dim: int, state_dict: dict | None = None, layer_structure: Sequence[float] | None = None,
                 activation_func: str | None = None, weight_init: str = "Normal", add_layer_norm: bool = False,
                 activate_output: bool = False, dropout_structure: Sequence[float] | None = None):
        super().__init__()
        self.multiplier = 1.0
        layer_structure = parse_layer_structure(layer_structure)
        if dropout_structure is not None:
            dropout_structure = _check_dropout_structure(dropout_structure, layer_structure)
        if activation_func not in (None, "linear") and activation_func not in self.activation_dict:
            raise ValueError(f"hypernetwork uses an unsupported activation function: {activation_func}")

        linears: list[torch.nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width = int(dim * layer_structure[i + 1])
            linears.append(torch.nn.Linear(int(dim * layer_structure[i]), width))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                linears.append(self.activation_dict[activation_func]())
            if add_layer_norm:
                linears.append(torch.nn.LayerNorm(width))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                linears.append(torch.nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = torch.nn.Sequential(*linears)

        if state_dict is not None:
            self.fix_old_state_dict(state_dict)
            self.load_state_dict(state_dict)
        else:
            self._initialize(weight_init or "Normal", activation_func)
        self.to(devices.device)

    def _initialize(self, weight_init: str, activation_func: str | None) -> None:
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight initialization {weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (torch.nn.Linear, torch.nn.LayerNorm):
                continue
            w, b = layer.weight.data, layer.bias.data
            # LayerNorm gets Normal(0, 0.01) too, as in A1111: the new network starts near the identity
            if weight_init == "Normal" or type(layer) is torch.nn.LayerNorm:
                normal_(w, mean=0.0, std=0.01)
            elif weight_init == "XavierUniform":
                xavier_uniform_(w)
            elif weight_init == "XavierNormal":
                xavier_normal_(w)
            elif weight_init == "KaimingUniform":
                kaiming_uniform_(w, nonlinearity=nonlinearity)
            else:
                kaiming_normal_(w, nonlinearity=nonlinearity)
            zeros_(b)

    @staticmethod
    def fix_old_state_dict(state_dict: dict) -> None:
        """The first hypernetworks named their two layers linear1/linear2."""
        changes = {
            "linear1.bias": "linear.0.bias",
            "linear1.weight": "linear.0.weight",
            "linear2.bias": "linear.1.bias",
            "linear2.weight": "linear.1.weight",
        }
        for old, new in changes.items():
            x = state_dict.pop(old, None)
            if x is not None:
                state_dict[new] = x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (self.multiplier if not self.training else 1)

    def trainables(self) -> list[torch.nn.Parameter]:
        res: list[torch.nn.Parameter] = []
        for layer in self.linear:
            if type(layer) in (torch.nn.Linear, torch.nn.LayerNorm):
                res += [layer.weight, layer.bias]
        return res


class Hypernetwork:
    """`layers = {dim: (k_module, v_module)}` plus the metadata A1111 stores next to them."""

    def __init__(self, name: str | None = None, enable_sizes: Iterable[int] | None = None,
                 layer_structure: Sequence[float] | str | None = None, activation_func: str | None = None,
                 weight_init: str | None = None, add_layer_norm: bool = False, use_dropout: bool = False,
                 activate_output: bool = False, **kwargs):
        self.filename: str | None = None
        self.name = name
        self.layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.layer_structure = parse_layer_structure(layer_structure if layer_structure is not None else [1, 2, 1])
        self.activation_func = activation_func
        self.weight_init = weight_init or "Normal"
        self.add_layer_norm = add_layer_norm
        self.use_dropout = use_dropout
        self.activate_output = activate_output
        self.last_layer_dropout = kwargs.get("last_layer_dropout", True)
        self.dropout_structure = kwargs.get("dropout_structure", None)
        if self.dropout_structure is None:
            self.dropout_structure = parse_dropout_structure(self.layer_structure, self.use_dropout,
                                                             self.last_layer_dropout)
        self.optimizer_name: str | None = None
        self.optimizer_state_dict: dict | None = None
        self.optional_info: str | None = None
        self.multiplier = 1.0

        for size in enable_sizes or []:
            self.layers[int(size)] = (self._module(int(size)), self._module(int(size)))
        self.eval()

    def _module(self, size: int, state_dict: dict | None = None) -> HypernetworkModule:
        return HypernetworkModule(size, state_dict, self.layer_structure, self.activation_func, self.weight_init,
                                  self.add_layer_norm, self.activate_output, dropout_structure=self.dropout_structure)

    def modules(self) -> list[HypernetworkModule]:
        return [module for pair in self.layers.values() for module in pair]

    def weights(self) -> list[torch.nn.Parameter]:
        return [p for module in self.modules() for p in module.parameters()]

    def train(self, mode: bool = True) -> Hypernetwork:
        for module in self.modules():
            module.train(mode=mode)
            for param in module.parameters():
                param.requires_grad = mode
        return self

    def eval(self) -> Hypernetwork:
        return self.train(False)

    def to(self, device) -> Hypernetwork:
        for module in self.modules():
            module.to(device)
        return self

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        self.multiplier = multiplier
        for module in self.modules():
            module.multiplier = multiplier
        return self

    def save(self, filename: str) -> None:
        """Writes the A1111 layout atomically, and the `.optim` sidecar when an optimizer state is set."""
        state_dict: dict = {}
        for size, (module_k, module_v) in self.layers.items():
            state_dict[size] = (_cpu_state_dict(module_k), _cpu_state_dict(module_v))
        state_dict["step"] = self.step
        state_dict["name"] = self.name
        state_dict["layer_structure"] = self.layer_structure
        state_dict["activation_func"] = self.activation_func
        state_dict["is_layer_norm"] = self.add_layer_norm
        state_dict["weight_initialization"] = self.weight_init
        state_dict["sd_checkpoint"] = self.sd_checkpoint
        state_dict["sd_checkpoint_name"] = self.sd_checkpoint_name
        state_dict["activate_output"] = self.activate_output
        state_dict["use_dropout"] = self.use_dropout
        state_dict["dropout_structure"] = self.dropout_structure
        state_dict["last_layer_dropout"] = (self.dropout_structure[-2] != 0) if self.dropout_structure is not None \
            else self.last_layer_dropout
        state_dict["optional_info"] = self.optional_info or None
        storage.save_atomic(state_dict, filename)

        if self.optimizer_state_dict:
            storage.save_atomic({
                "optimizer_name": self.optimizer_name or "AdamW",
                "hash": file_shorthash(filename),  # ties the optimizer state to this exact file
                "optimizer_state_dict": self.optimizer_state_dict,
            }, filename + ".optim")

    def load(self, filename: str) -> None:
        """Reads an A1111 .pt (weights-only); refuses files that would need real unpickling."""
        self.filename = filename
        if self.name is None:
            self.name = os.path.splitext(os.path.basename(filename))[0]
        state_dict = storage.read_weights_only(filename)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{filename} is not a hypernetwork: expected a dict, found {type(state_dict).__name__}")
        sizes = {k: v for k, v in state_dict.items() if type(k) is int}
        if not sizes:
            raise ValueError(f"{filename} is not a hypernetwork: it has no layers (integer width keys)")

        self.layer_structure = parse_layer_structure(state_dict.get("layer_structure", None) or [1, 2, 1])
        self.optional_info = state_dict.get("optional_info", None)
        self.activation_func = state_dict.get("activation_func", None)
        self.weight_init = state_dict.get("weight_initialization", "Normal")
        self.add_layer_norm = state_dict.get("is_layer_norm", False)
        self.dropout_structure = state_dict.get("dropout_structure", None)
        self.use_dropout = True if self.dropout_structure is not None and any(self.dropout_structure) \
            else state_dict.get("use_dropout", False)
        # files from before the option existed activated the output layer too
        self.activate_output = state_dict.get("activate_output", True)
        self.last_layer_dropout = state_dict.get("last_layer_dropout", False)
        if self.dropout_structure is None:
            self.dropout_structure = parse_dropout_structure(self.layer_structure, self.use_dropout,
                                                             self.last_layer_dropout)
        self._load_optimizer_sidecar(filename)

        self.layers = {}
        for size, pair in sizes.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(x, dict) for x in pair):
                raise ValueError(f"{filename}: layer {size} should be a pair of state dicts (K, V)")
            try:
                self.layers[size] = (self._module(size, dict(pair[0])), self._module(size, dict(pair[1])))
            except RuntimeError as e:
                raise ValueError(f"{filename}: layer {size} does not match its metadata: {e}") from None

        self.name = state_dict.get("name", None) or self.name
        self.step = state_dict.get("step", 0) or 0
        self.sd_checkpoint = state_dict.get("sd_checkpoint", None)
        self.sd_checkpoint_name = state_dict.get("sd_checkpoint_name", None)
        self.eval()

    def _load_optimizer_sidecar(self, filename: str) -> None:
        self.optimizer_state_dict = None
        self.optimizer_name = "AdamW"
        optim_file = filename + ".optim"
        if not os.path.exists(optim_file):
            return
        try:
            saved = storage.read_weights_only(optim_file)
        except storage.UnsafeFileError as e:
            errors.report(str(e))
            return
        if isinstance(saved, dict) and saved.get("hash") == file_shorthash(filename):
            self.optimizer_state_dict = saved.get("optimizer_state_dict", None)
            if self.optimizer_state_dict:
                self.optimizer_name = saved.get("optimizer_name", "AdamW")

    def shorthash(self) -> str | None:
        if not self.filename:
            return None
        sha256 = hashes.sha256(self.filename, f"hypernet/{self.name}")
        return sha256[0:10] if sha256 else None


def _cpu_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def file_shorthash(filename: str) -> str:
    """First 10 hex chars of the file's sha256 (cached like A1111, computed even with --no-hashing)."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    sha256 = hashes.sha256(filename, f"hypernet/{stem}") or hashes.calculate_sha256(filename)
    return sha256[0:10]


def list_hypernetworks(path: str) -> dict[str, str]:
    """{name: filename} for every `**/*.pt` under path, sorted case-insensitively; name = file stem."""
    res = {}
    for filename in sorted(glob.iglob(os.path.join(path, "**/*.pt"), recursive=True), key=str.lower):
        name = os.path.splitext(os.path.basename(filename))[0]
        if name != "None":  # "None" means "no hypernetwork" in the options
            res[name] = filename
    return res


def refresh_hypernetworks() -> dict[str, str]:
    """Rescans --hypernetwork-dir into shared.hypernetworks (in place, so references to it stay valid)."""
    found = list_hypernetworks(shared.cmd_opts.hypernetwork_dir)
    shared.hypernetworks.clear()
    shared.hypernetworks.update(found)
    return shared.hypernetworks


# filename -> ((mtime_ns, size), Hypernetwork): kept for the networks of the last job, reloaded when the file changes
_cache: dict[str, tuple[tuple[int, int], Hypernetwork]] = {}


def _stamp(filename: str) -> tuple[int, int]:
    st = os.stat(filename)
    return st.st_mtime_ns, st.st_size


def _load_by_name(name: str) -> Hypernetwork:
    path = shared.hypernetworks.get(name, None)
    if path is None or not os.path.exists(path):
        path = refresh_hypernetworks().get(name, None)
    if path is None:
        raise FileNotFoundError(f"Hypernetwork not found: {name}")
    stamp = _stamp(path)
    cached = _cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    hypernetwork = Hypernetwork()
    hypernetwork.load(path)
    hypernetwork.lookup_name = name  # the name used in prompts (the stem), which may differ from its `name` field
    _cache[path] = (stamp, hypernetwork)
    return hypernetwork


def load_hypernetwork(name: str) -> Hypernetwork | None:
    """The hypernetwork named `name` (file stem), or None when it is unknown or fails to load (reported)."""
    try:
        return _load_by_name(name)
    except FileNotFoundError:
        return None
    except Exception as e:
        _report_load_error(name, e)
        return None


def _report_load_error(name: str, e: Exception) -> None:
    expected = isinstance(e, (ValueError, storage.UnsafeFileError))  # a bad file, not a bug: no traceback
    errors.report(f"Error loading hypernetwork {name}: {e}", exc_info=not expected)


def load_hypernetworks(names: Sequence[str], multipliers: Sequence[float] | None = None) -> list[tuple[str, str]]:
    """Makes shared.loaded_hypernetworks the given networks, in order, each with its multiplier.

    A name given twice is applied once, with its last multiplier. Returns (name, message) for each name that
    was skipped (unknown or unloadable), for the caller to show.
    """
    chosen: dict[str, float] = {}
    for i, name in enumerate(names):
        chosen[name] = float(multipliers[i]) if multipliers else 1.0

    failures: list[tuple[str, str]] = []
    loaded: list[Hypernetwork] = []
    for name, multiplier in chosen.items():
        try:
            hypernetwork = _load_by_name(name)
        except FileNotFoundError:
            failures.append((name, f"Hypernetwork not found: {name}"))
            continue
        except Exception as e:
            _report_load_error(name, e)
            failures.append((name, f"Hypernetwork {name} failed to load: {e}"))
            continue
        loaded.append(hypernetwork.set_multiplier(multiplier))

    in_use = {h.filename for h in loaded}
    for path in [p for p in _cache if p not in in_use]:
        del _cache[path]
    shared.loaded_hypernetworks.clear()
    shared.loaded_hypernetworks.extend(loaded)
    return failures


def _run(module: HypernetworkModule, x: torch.Tensor) -> torch.Tensor:
    """The module on x in the module's own dtype (fp32), the result back in x's dtype."""
    weight = module.linear[0].weight
    if weight.device != x.device:
        module.to(x.device)
    return module(x.to(weight.dtype)).to(x.dtype)


def apply_single_hypernetwork(hypernetwork: Hypernetwork | None, context_k: torch.Tensor, context_v: torch.Tensor,
                              layer: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    hypernetwork_layers = (hypernetwork.layers if hypernetwork is not None else {}).get(context_k.shape[-1], None)
    if hypernetwork_layers is None:
        return context_k, context_v
    if layer is not None:
        layer.hyper_k = hypernetwork_layers[0]
        layer.hyper_v = hypernetwork_layers[1]
    return _run(hypernetwork_layers[0], context_k), _run(hypernetwork_layers[1], context_v)


def apply_hypernetworks(hypernetworks: Sequence[Hypernetwork], context: torch.Tensor,
                        layer: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_k, context_v) after every hypernetwork in order; each one picks its pair by context width."""
    context_k = context
    context_v = context
    for hypernetwork in hypernetworks:
        context_k, context_v = apply_single_hypernetwork(hypernetwork, context_k, context_v, layer)
    return context_k, context_v


def apply_to_context(hypernetworks: Sequence[Hypernetwork], context: torch.Tensor, index: int) -> torch.Tensor:
    """One side of apply_hypernetworks (index 0: K, 1: V), for the to_k/to_v hooks."""
    for hypernetwork in hypernetworks:
        pair = hypernetwork.layers.get(context.shape[-1], None)
        if pair is not None:
            context = _run(pair[index], context)
    return context


def find_closest_hypernetwork_name(search: str) -> str | None:
    """The shortest known name containing `search` (case-insensitive), as A1111's infotext paste uses."""
    if not search:
        return None
    search = search.lower()
    applicable = sorted((name for name in shared.hypernetworks if search in name.lower()), key=len)
    return applicable[0] if applicable else None


def create_hypernetwork(name: str, enable_sizes: Iterable[int | str], overwrite_old: bool = False,
                        layer_structure: Sequence[float] | str | None = None, activation_func: str | None = None,
                        weight_init: str | None = None, add_layer_norm: bool = False, use_dropout: bool = False,
                        dropout_structure: Sequence[float] | str | None = None) -> str:
    """Writes a new, untrained hypernetwork to <hypernetwork-dir>/<name>.pt and returns that path."""
    name = "".join(x for x in name if (x.isalnum() or x in "._- ")).strip()
    if not name or name == "None":
        raise ValueError("Name cannot be empty")
    filename = os.path.join(shared.cmd_opts.hypernetwork_dir, f"{name}.pt")
    if not overwrite_old and os.path.exists(filename):
        raise FileExistsError(f"file {filename} already exists")

    layer_structure = parse_layer_structure(layer_structure if layer_structure is not None else [1, 2, 1])
    if isinstance(dropout_structure, str):
        dropout_structure = [float(x.strip()) for x in dropout_structure.split(",") if x.strip()]
    if not use_dropout:
        dropout_structure = [0] * len(layer_structure)
    elif not dropout_structure:
        dropout_structure = parse_dropout_structure(layer_structure, True, True)
    dropout_structure = _check_dropout_structure(dropout_structure, layer_structure)

    hypernetwork = Hypernetwork(name=name, enable_sizes=[int(x) for x in enable_sizes],
                                layer_structure=layer_structure, activation_func=activation_func,
                                weight_init=weight_init, add_layer_norm=add_layer_norm, use_dropout=use_dropout,
                                dropout_structure=dropout_structure)
    hypernetwork.save(filename)
    refresh_hypernetworks()
    return filename
