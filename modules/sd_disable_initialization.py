"""Building models without waste (A1111 module name and classes).

- DisableInitialization: layers are built without random initialisation (the weights come from a file anyway)
  and transformers' from_pretrained paths neither download nor load weights.
- InitializeOnMeta: the skeleton's parameters live on the meta device and cost no memory.
- LoadStateDictOnMeta: fills such a skeleton from one state dict that drains as the model fills, converting
  dtypes per key, so peak memory stays near one copy of the model. Tensors from a memory-mapped file are read
  out of the file (modules/mapped_memory.py): no parameter shares memory with the file.
- load_state_dict_lean(): the three together, for the checkpoint loader.

Every patch is undone on exit, also after an exception, and only acts in the thread that entered it
(another thread building or loading something meanwhile sees the original functions).
"""
from __future__ import annotations

import importlib
import inspect
import sys
import threading
from typing import Any, Callable, MutableMapping

import torch

from modules import mapped_memory, safetensors_mmap


def _ram_optimization_disabled() -> bool:
    shared = sys.modules.get("modules.shared")  # never import it from here: that would parse flags and options
    opts = getattr(shared, "cmd_opts", None)
    return bool(getattr(opts, "disable_model_loading_ram_optimization", False))


class ReplaceHelper:
    """Replaces attributes and puts them back. A missing attribute is skipped silently."""

    def __init__(self) -> None:
        # (object, field, the raw attribute as it was or None when inherited, whether it was the object's own)
        self.replaced: list[tuple[Any, str, Any, bool]] = []
        self._thread: int | None = None

    def replace(self, obj: Any, field: str, func: Any) -> Any:
        original = getattr(obj, field, None)
        if original is None:
            return None
        own_dict = getattr(obj, "__dict__", {})
        own = field in own_dict
        # the raw entry keeps classmethod/staticmethod wrappers intact for restore
        self.replaced.append((obj, field, own_dict[field] if own else None, own))
        setattr(obj, field, func)
        return original

    def restore(self) -> None:
        for obj, field, raw, own in reversed(self.replaced):
            if own:
                setattr(obj, field, raw)
            else:
                # it was inherited: remove ours rather than pinning the base's current value on this class
                delattr(obj, field)
        self.replaced.clear()

    def _in_owner_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.restore()


class DisableInitialization(ReplaceHelper):
    """No random init while building; with disable_clip, transformers' CLIP from_pretrained loads no weights."""

    _skipped_inits = ("kaiming_uniform_", "kaiming_normal_", "_no_grad_normal_", "_no_grad_uniform_",
                      "_no_grad_trunc_normal_")

    def __init__(self, disable_clip: bool = True) -> None:
        super().__init__()
        self.disable_clip = disable_clip

    def __enter__(self) -> DisableInitialization:
        self._thread = threading.get_ident()
        try:
            for name in self._skipped_inits:
                original = getattr(torch.nn.init, name, None)
                if original is not None:
                    self.replace(torch.nn.init, name, self._skip_init(original))
            if self.disable_clip:
                self._patch_transformers()
                self._patch_open_clip()
        except BaseException:
            self.restore()
            raise
        return self

    def _skip_init(self, original: Callable) -> Callable:
        def skip(*args, **kwargs):
            if not self._in_owner_thread():
                return original(*args, **kwargs)
            return args[0] if args else kwargs.get("tensor")

        return skip

    def _patch_transformers(self) -> None:
        if "transformers" not in sys.modules:
            return  # nothing can call it before it is imported
        transformers = _import("transformers")
        for class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            cls = getattr(transformers, class_name, None)
            if cls is not None:
                self._patch_from_pretrained(cls)

        modeling_utils = _import("transformers.modeling_utils")
        pretrained = getattr(modeling_utils, "PreTrainedModel", None)
        load_pretrained = getattr(pretrained, "_load_pretrained_model", None)
        # Older transformers take the weights file as `resolved_archive_file`; A1111 passes "/" so nothing is read.
        # transformers >= 5 has no such argument and builds on meta itself, so it is left alone there.
        if load_pretrained is not None and "resolved_archive_file" in _parameter_names(load_pretrained):
            self._patch_load_pretrained(pretrained, load_pretrained)

        hub_functions = (("transformers.utils.hub", "cached_file"), ("transformers.utils.hub", "get_from_cache"),
                         ("transformers.tokenization_utils_base", "cached_file"),
                         ("transformers.configuration_utils", "cached_file"))
        for module_name, field in hub_functions:
            module = _import(module_name)
            original = getattr(module, field, None)
            if original is not None:
                self.replace(module, field, self._local_first(original))

    def _patch_from_pretrained(self, cls: type) -> None:
        original = getattr(cls.from_pretrained, "__func__", None)
        if original is None:
            return
        helper = self

        def from_pretrained(klass, pretrained_model_name_or_path, *model_args, **kwargs):
            if not helper._in_owner_thread():
                return original(klass, pretrained_model_name_or_path, *model_args, **kwargs)
            # the checkpoint carries the weights: build from the config alone
            config = kwargs.pop("config", None) or pretrained_model_name_or_path
            if not hasattr(config, "to_dict"):
                config = klass.config_class.from_pretrained(config)
            res = klass(config)
            res.name_or_path = pretrained_model_name_or_path
            return res

        self.replace(cls, "from_pretrained", classmethod(from_pretrained))

    def _patch_load_pretrained(self, pretrained: type, original: Callable) -> None:
        helper = self

        def load_pretrained_model(*args, **kwargs):
            if helper._in_owner_thread():
                if len(args) > 3:
                    args = args[0:3] + ("/",) + args[4:]
                elif "resolved_archive_file" in kwargs:
                    kwargs["resolved_archive_file"] = "/"
            return original(*args, **kwargs)

        self.replace(pretrained, "_load_pretrained_model", staticmethod(load_pretrained_model))

    def _local_first(self, original: Callable) -> Callable:
        def cached(path_or_repo_id, *args, local_files_only: bool = False, **kwargs):
            if not self._in_owner_thread() or local_files_only:
                return original(path_or_repo_id, *args, local_files_only=local_files_only, **kwargs)
            filename = args[0] if args else kwargs.get("filename")
            if str(path_or_repo_id).endswith("openai/clip-vit-large-patch14") and filename == "added_tokens.json":
                return None  # always 404 on the hub; A1111 skips the request
            try:
                res = original(path_or_repo_id, *args, local_files_only=True, **kwargs)
                if res is not None:
                    return res
            except Exception:
                pass
            return original(path_or_repo_id, *args, local_files_only=False, **kwargs)

        return cached

    def _patch_open_clip(self) -> None:
        open_clip = sys.modules.get("open_clip")
        original = getattr(open_clip, "create_model_and_transforms", None)
        if original is None:
            return

        def create_model_and_transforms(*args, pretrained=None, **kwargs):
            return original(*args, pretrained=None if self._in_owner_thread() else pretrained, **kwargs)

        self.replace(open_clip, "create_model_and_transforms", create_model_and_transforms)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _parameter_names(func: Callable) -> list[str]:
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []


class InitializeOnMeta(ReplaceHelper):
    """Layers built inside get their parameters on the meta device; Module.to does nothing meanwhile.

    A1111 does this for Linear, Conv2d and MultiheadAttention; Embedding, LayerNorm and GroupNorm are added
    because their parameters also always come from the checkpoint (CLIP's token embedding alone is 38M).
    """

    meta_classes = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention, torch.nn.Embedding,
                    torch.nn.LayerNorm, torch.nn.GroupNorm)

    def __enter__(self) -> InitializeOnMeta:
        if _ram_optimization_disabled():
            return self
        self._thread = threading.get_ident()
        try:
            for cls in self.meta_classes:
                self._force_meta(cls)
            original_to = torch.nn.Module.to
            self.replace(torch.nn.Module, "to",
                         lambda module, *a, **k: module if self._in_owner_thread() else original_to(module, *a, **k))
        except BaseException:
            self.restore()
            raise
        return self

    def _force_meta(self, cls: type) -> None:
        original = cls.__init__
        signature = inspect.signature(original)

        def init(module, *args, **kwargs):
            if self._in_owner_thread():
                bound = signature.bind(module, *args, **kwargs)
                bound.arguments["device"] = "meta"
                return original(*bound.args, **bound.kwargs)
            return original(module, *args, **kwargs)

        self.replace(cls, "__init__", init)


class LoadStateDictOnMeta(ReplaceHelper):
    """Loads `state_dict` into a model built on meta, popping each entry as its layer takes it.

    weight_dtype_conversion maps the first key component to a dtype ("" is the default; A1111 passes
    {"first_stage_model": None, "alphas_cumprod": None, "": torch.float16}). Only floating-point parameters
    are converted; buffers keep their dtype. A meta parameter receives its converted tensor by assignment
    (no zero-fill and copy). A tensor that is a view of a file map (a memory-mapped checkpoint) is read out of the
    file into process memory first, also when its dtype already matches: the model never lives on the file.
    """

    def __init__(self, state_dict: MutableMapping[str, torch.Tensor], device: Any,
                 weight_dtype_conversion: dict | None = None, force: bool = False,
                 keep_file_dtype: set[str] | frozenset = frozenset()) -> None:
        super().__init__()
        self.keep_file_dtype = keep_file_dtype  # keys loaded in the file's dtype (fp8 weights kept at their size)
        self.force = force  # act even with --disable-model-loading-ram-optimization (for a skeleton on meta)
        self.state_dict = state_dict
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.weight_dtype_conversion = weight_dtype_conversion or {}
        self.default_dtype = self.weight_dtype_conversion.get("")
        self._active = False
        self._mapped: mapped_memory.MappedFiles | None = None

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        super().__exit__(exc_type, exc_val, exc_tb)
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None

    def _stage(self, source: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """`source` as the model will hold it: on the device, converted, contiguous, and in process memory.

        A view of a file map is read out of the file (mapped_memory.copy_out), never assigned: a parameter that is
        the file's page would change when the file is rewritten and raise SIGBUS when it is truncated."""
        mapping = self._mapped.find(source) if self._mapped is not None else None
        if mapping is not None:
            source = self._mapped.copy_out(source, mapping)
            if self.device.type == "cpu" and dtype is not None and dtype != source.dtype:
                converted = mapped_memory.new_tensor(source.shape, dtype)  # huge pages for the converted copy too
                converted.copy_(source)
                return converted
        staged = source.to(device=self.device, dtype=dtype)
        return staged if staged.is_contiguous() else staged.contiguous()

    def get_weight_dtype(self, key: str) -> torch.dtype | None:
        if key in self.keep_file_dtype:
            return None
        return self.weight_dtype_conversion.get(key.split(".", 1)[0], self.default_dtype)

    def __enter__(self) -> LoadStateDictOnMeta:
        if _ram_optimization_disabled() and not self.force:
            return self
        self._thread = threading.get_ident()
        # the file maps the state dict's tensors live in: their tensors are read out of the file, never assigned
        self._mapped = mapped_memory.MappedFiles()
        try:
            original_load = torch.nn.Module.load_state_dict
            self.replace(torch.nn.Module, "load_state_dict",
                         lambda module, *a, **k: self._load_state_dict(original_load, module, *a, **k))
            # Module plus every class that defines its own _load_from_state_dict (norm layers, or a class some
            # extension patched): the patched one found now is the "original" we call, so its logic still runs.
            for cls in [torch.nn.Module] + _classes_overriding("_load_from_state_dict"):
                self._wrap_load_from_state_dict(cls)
        except BaseException:
            self.restore()
            raise
        return self

    def _wrap_load_from_state_dict(self, cls: type) -> None:
        original = cls.__dict__["_load_from_state_dict"]
        if not inspect.isfunction(original):
            return
        self.replace(cls, "_load_from_state_dict",
                     lambda module, *a, **k: self._load_from_state_dict(original, module, *a, **k))

    def _load_state_dict(self, original: Callable, module: torch.nn.Module, state_dict, strict: bool = True,
                         assign: bool = False):
        if state_dict is not self.state_dict or not self._in_owner_thread() or self._active:
            return original(module, state_dict, strict=strict, assign=assign)
        # the tensors are about to be read in the model's order, not the file's: let a prefetch finish first
        safetensors_mmap.wait_for_prefetch(state_dict.values())
        # torch copies the dict it is given several times while recursing; give it meta stand-ins so the
        # copies cost nothing, and fetch the real tensors from the one source dict in _load_from_state_dict
        stand_ins = {k: v.to(device="meta") if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            stand_ins = _with_metadata(stand_ins, metadata)
        self._active = True
        try:
            return original(module, stand_ins, strict=strict, assign=assign)
        finally:
            self._active = False

    def _load_from_state_dict(self, original: Callable, module: torch.nn.Module, state_dict, prefix, local_metadata,
                              *args, **kwargs):
        if not self._active or not self._in_owner_thread():
            return original(module, state_dict, prefix, local_metadata, *args, **kwargs)

        used: list[str] = []
        consumed: list[tuple[torch.Tensor, torch.Tensor]] = []
        assign = False
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        for table, convert in ((module._parameters, True), (persistent, False)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                key = prefix + name
                source = self.state_dict.pop(key, None)
                if isinstance(source, torch.Tensor):
                    dtype = self.get_weight_dtype(key) if convert and source.is_floating_point() else None
                    staged = self._stage(source, dtype)
                    state_dict[key] = staged
                    used.append(key)
                    consumed.append((source, staged))
                staged = state_dict.get(key)
                if tensor.is_meta:
                    if isinstance(staged, torch.Tensor) and not staged.is_meta:
                        assign = True
                    else:
                        # nothing in the file for it: zeros, as A1111 does (strict loading reports it missing)
                        dtype = (self.default_dtype if convert and tensor.is_floating_point() else None) or tensor.dtype
                        zeros = torch.zeros_like(tensor, device=self.device, dtype=dtype)
                        if convert:
                            module._parameters[name] = torch.nn.Parameter(zeros, requires_grad=tensor.requires_grad)
                        else:
                            module._buffers[name] = zeros

        if assign:
            local_metadata = dict(local_metadata, assign_to_params_buffers=True)
        original(module, state_dict, prefix, local_metadata, *args, **kwargs)

        for key in used:
            state_dict.pop(key, None)
        for source, staged in consumed:
            if staged.data_ptr() != source.data_ptr():
                safetensors_mmap.release_pages(source)  # copied elsewhere: the file's pages are not needed now


def _with_metadata(d: dict, metadata) -> dict:
    from collections import OrderedDict

    res = OrderedDict(d)
    res._metadata = metadata  # type: ignore[attr-defined]
    return res


def _classes_overriding(method: str) -> list[type]:
    found, seen, todo = [], set(), list(torch.nn.Module.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if method in cls.__dict__:
            found.append(cls)
    return found


def build_on_meta(module_factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`module_factory()` without random init and with its layers on meta: a skeleton for load_state_dict_lean
    (its `state_dict()` keys and shapes are already right, so a loader can map keys without a second build)."""
    with DisableInitialization(disable_clip=True), InitializeOnMeta():
        return module_factory()


def load_state_dict_lean(module_factory: Callable[[], torch.nn.Module] | torch.nn.Module,
                         state_dict: MutableMapping[str, torch.Tensor], device: Any = "cpu",
                         dtype: torch.dtype | None = None, *, strict: bool = True,
                         weight_dtype_conversion: dict | None = None,
                         keep_file_dtype: set[str] | frozenset = frozenset()) -> tuple[torch.nn.Module, Any]:
    """Builds `module_factory()` on meta without init and loads `state_dict` into it, draining the dict.

    `module_factory` may also be a skeleton from build_on_meta(), which is then filled in place. Returns
    (module, torch's IncompatibleKeys). Floating-point parameters become `dtype` (None keeps the file's); a
    per-prefix `weight_dtype_conversion` overrides it; keys in `keep_file_dtype` keep the file's dtype. Entries
    the module took are popped from `state_dict`, so what is left afterwards is exactly what it did not use.
    Raises RuntimeError when `strict` finds missing or unexpected keys, or when any tensor would be left on meta.
    """
    conversion = dict(weight_dtype_conversion or {})
    if dtype is not None:
        conversion.setdefault("", dtype)

    given = module_factory if isinstance(module_factory, torch.nn.Module) else None
    on_meta = given is not None and any(t.is_meta for t in list(given.parameters()) + list(given.buffers()))
    if _ram_optimization_disabled() and not on_meta:  # a meta skeleton can only be filled the lean way
        if given is None:
            with DisableInitialization(disable_clip=True):
                given = module_factory()
        module = given
        result = module.load_state_dict(state_dict, strict=strict)
        for key in list(state_dict):
            if key not in result.unexpected_keys:
                del state_dict[key]
        if dtype is not None:
            module.to(device=device, dtype=dtype)
        else:
            module.to(device=device)
        return module, result

    module = given if given is not None else build_on_meta(module_factory)
    with LoadStateDictOnMeta(state_dict, device, conversion, force=on_meta, keep_file_dtype=keep_file_dtype):
        result = module.load_state_dict(state_dict, strict=strict)
    left_on_meta = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{len(left_on_meta)} tensors were not loaded (a layer skipped the loader): "
                           + ", ".join(left_on_meta[:10]))
    return module, result
