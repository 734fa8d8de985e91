"""Checkpoints (A1111 module name and API): listing, selection, loading, hashes, safetensors metadata.

A checkpoint is a single `.safetensors`/`.ckpt` file in the original layout or a diffusers folder (one holding
`model_index.json`), under `--ckpt-dir` (default `models/Stable-diffusion`) or given with `--ckpt`. Loading builds a
`sd_models_diffusers.DiffusersSdModel`, offline, and runs the `on_model_loaded` callbacks.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time

import torch

from modules import (
    devices,
    errors,
    hashes,
    original_weights,
    safetensors_header,
    script_callbacks,
    sd_models_diffusers,
    sd_modules,
    shared,
)
from modules.sd_models_diffusers import ModelType  # noqa: F401  (A1111 name)
from modules.sd_models_ldm import CheckpointFormatError

model_dir = "Stable-diffusion"
checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_aliases: dict[str, CheckpointInfo] = {}
checkpoints_loaded: dict = {}  # A1111 keeps cached state dicts here; this host caches none
checkpoint_extensions = (".safetensors", ".ckpt")


def checkpoint_dir() -> str:
    return os.path.abspath(shared.cmd_opts.ckpt_dir or os.path.join(shared.models_path, model_dir))


def natural_sort_key(s: str, regex: re.Pattern = re.compile(r"([0-9]+)")) -> list:
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def _weights_file_for_hash(path: str) -> str:
    """The file whose sha256 identifies a checkpoint: the file itself, or a diffusers folder's UNet weights."""
    if not os.path.isdir(path):
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        candidate = os.path.join(path, "unet", name)
        if not os.path.isfile(candidate):  # Flux, Chroma
            candidate = os.path.join(path, "transformer", name)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(path, "model_index.json")


class CheckpointInfo:
    """One checkpoint on disk (A1111 fields: filename, name, name_for_extra, model_name, hash, sha256, shorthash,
    title, short_title, ids, metadata, is_safetensors)."""

    def __init__(self, filename: str):
        self.filename = os.path.abspath(filename)
        root = checkpoint_dir()
        if self.filename.startswith(root + os.sep):
            name = os.path.relpath(self.filename, root)
        else:
            name = os.path.basename(self.filename.rstrip(os.sep))
        self.name = name.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(self.filename.rstrip(os.sep)))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.is_diffusers = os.path.isdir(self.filename)
        self.is_safetensors = self.filename.lower().endswith(".safetensors")
        self.hash = model_hash(_weights_file_for_hash(self.filename))
        self.sha256 = hashes.sha256_from_cache(_weights_file_for_hash(self.filename), f"checkpoint/{self.name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else \
            f"{self.name_for_extra} [{self.shorthash}]"
        self.metadata: dict = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(self.filename)
            except Exception as e:
                errors.display(e, f"reading metadata of {self.filename}")
        self.ids = [self.hash, self.model_name, self.title, self.name, self.name_for_extra,
                    f"{self.name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]"]

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for i in self.ids:
            if i:
                checkpoint_aliases[i] = self

    def calculate_shorthash(self) -> str | None:
        """Computes (and caches) the sha256 on first use; the title then carries the short hash, as in A1111."""
        self.sha256 = hashes.sha256(_weights_file_for_hash(self.filename), f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return shorthash
        self.shorthash = shorthash
        if shorthash not in self.ids:
            self.ids += [shorthash, self.sha256, f"{self.name} [{shorthash}]", f"{self.name_for_extra} [{shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{shorthash}]"
        self.short_title = f"{self.name_for_extra} [{shorthash}]"
        if old_title in checkpoints_list:  # keep the listing order: rename the entry in place
            entries = [(self.title if k == old_title else k, v) for k, v in checkpoints_list.items()]
            checkpoints_list.clear()
            checkpoints_list.update(entries)
        self.register()
        return shorthash

    def __repr__(self) -> str:
        return f"CheckpointInfo({self.title!r})"


def model_hash(filename: str) -> str:
    """A1111's legacy 8-hex hash: sha256 of 64 KiB at offset 1 MiB."""
    try:
        with open(filename, "rb") as f:
            import hashlib
            m = hashlib.sha256()
            f.seek(0x100000)
            m.update(f.read(0x10000))
            return m.hexdigest()[0:8]
    except OSError:
        return "NOFILE"


def _walk_checkpoints(root: str) -> list[str]:
    found = []
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if is_diffusers_folder(dirpath):
            found.append(dirpath)
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(checkpoint_extensions):
                found.append(os.path.join(dirpath, name))
    return sorted(found, key=natural_sort_key)


def list_models() -> None:
    """Rescans the checkpoint folder (and --ckpt); keeps A1111's dicts, rebuilt in place."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    root = checkpoint_dir()
    os.makedirs(root, exist_ok=True)
    paths = []
    if shared.cmd_opts.ckpt:
        if os.path.exists(shared.cmd_opts.ckpt):
            paths.append(shared.cmd_opts.ckpt)
        else:
            print(f"Checkpoint {shared.cmd_opts.ckpt} given by --ckpt was not found")
    paths += _walk_checkpoints(root)
    for path in paths:
        try:
            info = CheckpointInfo(path)
        except Exception as e:
            errors.display(e, f"listing checkpoint {path}")
            continue
        if info.title not in checkpoints_list:
            info.register()


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string: str) -> CheckpointInfo | None:
    """A1111's (misspelt) name: exact alias, then title without the hash, then a substring of the title."""
    if not search_string:
        return None
    found = checkpoint_aliases.get(search_string)
    if found is not None:
        return found
    stripped = re.sub(r"\s*\[[0-9a-f]+\]\s*$", "", search_string)
    found = checkpoint_aliases.get(stripped)
    if found is not None:
        return found
    matches = sorted((info for info in checkpoints_list.values() if search_string in info.title),
                     key=lambda x: len(x.title))
    return matches[0] if matches else None


def _fallback() -> CheckpointInfo:
    """The first listed checkpoint; the tiny SD1 default model before the other tiny ones (tiny-flux sorts first)."""
    listed = list(checkpoints_list.values())
    return next((x for x in listed if x.name == "tiny-sd1"), listed[0])


def select_checkpoint() -> CheckpointInfo:
    """The checkpoint to load: the setting, else --ckpt, else the first one listed (tiny-sd1 when present)."""
    if not checkpoints_list:
        list_models()
    wanted = shared.opts.data.get("sd_model_checkpoint")
    info = get_closet_checkpoint_match(wanted) if wanted else None
    if info is not None:
        return info
    if shared.cmd_opts.ckpt:
        wanted_file = os.path.abspath(shared.cmd_opts.ckpt)
        info = next((x for x in checkpoints_list.values() if x.filename == wanted_file), None)
        if info is not None:
            return info
    if not checkpoints_list:
        raise FileNotFoundError(f"No checkpoints found in {checkpoint_dir()}: put a .safetensors file or a diffusers "
                                f"folder there, or pass --ckpt; `python install.py` builds the tiny default models")
    first = _fallback()
    if wanted:
        print(f"Checkpoint {wanted} not found; loading fallback {first.title}")
    return first


def read_metadata_from_safetensors(filename: str) -> dict:
    """The `__metadata__` of a safetensors file, with JSON-looking string values decoded (A1111 behaviour). The
    header is read and checked by safetensors_header: a file that is not a safetensors file raises ValueError."""
    res = {}
    for k, v in safetensors_header.read_header_file(filename).metadata.items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


def read_state_dict(checkpoint_file: str, print_global_state: bool = False, map_location: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A1111 API: every tensor of a file; `.ckpt`/`.pt` only through torch.load(weights_only=True)."""
    device = map_location or shared.weight_load_location or devices.get_optimal_device_name()
    if checkpoint_file.lower().endswith(".safetensors"):
        import safetensors.torch
        if shared.opts.data.get("disable_mmap_load_safetensors", False):
            with open(checkpoint_file, "rb") as f:
                return safetensors.torch.load(f.read())
        return safetensors.torch.load_file(checkpoint_file, device=str(device))
    data = torch.load(checkpoint_file, map_location=device, weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return data


class SdModelData:
    """Holds the loaded model; reading `sd_model` loads the selected checkpoint on first use (A1111 name)."""

    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models: list = []
        self.was_loaded_at_least_once = False
        self.lock = threading.RLock()

    def get_sd_model(self):
        if self.was_loaded_at_least_once or self.sd_model is not None:
            return self.sd_model
        with self.lock:
            if self.sd_model is not None or self.was_loaded_at_least_once:
                return self.sd_model
            try:
                load_model()
            except Exception as e:
                errors.display(e, "loading stable diffusion model")
                print("Stable diffusion model failed to load", flush=True)
                self.sd_model = None
            finally:
                self.was_loaded_at_least_once = True
        return self.sd_model

    def set_sd_model(self, v) -> None:
        self.sd_model = v
        self.loaded_sd_models = [v] if v is not None else []


model_data = SdModelData()


def unload_model_weights(sd_model=None, info=None) -> None:
    with model_data.lock:
        model_data.set_sd_model(None)
    devices.torch_gc()


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded. The message names the file and the reason, and which model stays loaded
    (`filename`, `reason`, `loaded`: the title of the model still loaded, or None)."""

    def __init__(self, filename: str, reason: str, loaded: str | None, bad_file: bool):
        self.filename, self.reason, self.loaded, self.bad_file = filename, reason, loaded, bad_file
        stays = f"; {loaded} stays loaded" if loaded else "; no model is loaded"
        super().__init__(f"Could not load checkpoint {reason}{stays}")


def _reason(filename: str, e: BaseException) -> str:
    text = str(e) if isinstance(e, CheckpointFormatError) else f"{type(e).__name__}: {e}"
    return text if filename in text else f"{filename}: {text}"


def _loaded_title() -> str | None:
    info = getattr(model_data.sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None)


def _failed(checkpoint_info: CheckpointInfo, e: BaseException) -> CheckpointLoadError:
    """The error for a failed load; the loaded model (if any) is selected again."""
    loaded = _loaded_title()
    if loaded is not None:
        shared.opts.data["sd_model_checkpoint"] = loaded
    return CheckpointLoadError(checkpoint_info.filename, _reason(checkpoint_info.filename, e), loaded,
                               isinstance(e, CheckpointFormatError))


def _can_load_again(sd_model) -> bool:
    """Whether the files `sd_model` came from are still as they were, so it could be loaded again."""
    stamps = getattr(sd_model, "file_stamps", None)
    return bool(stamps) and not original_weights.changed_files(stamps)


def _activate(checkpoint_info: CheckpointInfo, sd_model, started: float):
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    script_callbacks.model_loaded_callback(sd_model)
    memory = getattr(sd_model, "memory_report", "")  # the transformer families say what their weights take
    print(f"Model {checkpoint_info.title} loaded in {time.time() - started:.1f}s ({sd_model.family}, "
          f"{devices.device}, {sd_model.dtype}{'; ' + memory if memory else ''})", flush=True)
    return sd_model


def load_model(checkpoint_info: CheckpointInfo | None = None, already_loaded_state_dict=None):
    """Loads a checkpoint (the selected one by default), replacing the current model, all or nothing.

    The file is checked before the loaded model is touched (format, unpickling, every tensor present, shapes);
    a file that fails leaves the loaded model loaded and selected and raises CheckpointLoadError naming the file
    and why. The loaded model is then freed before the new weights are read (peak memory: one model) and loaded
    again from its file if reading the new one fails; when its file changed since, it is kept in memory until
    the new one is in instead."""
    with model_data.lock:
        checkpoint_info = checkpoint_info or select_checkpoint()
        started = time.time()
        try:
            checkpoint_info.calculate_shorthash()
        except OSError as e:
            errors.display(e, f"hashing {checkpoint_info.filename}")
        try:
            modules = sd_modules.selected_paths()
            prepared = sd_models_diffusers.prepare(checkpoint_info.filename, devices.device, devices.dtype,
                                                   checkpoint_info, modules)
        except Exception as e:
            raise _failed(checkpoint_info, e) from e

        previous = model_data.sd_model
        previous_info = getattr(previous, "sd_checkpoint_info", None)
        previous_modules = list(getattr(previous, "additional_modules", ()))
        keep = previous is not None and not (previous_info is not None and _can_load_again(previous))
        if previous is not None and not keep:
            previous = None
            unload_model_weights()
        try:
            sd_model = prepared.fill()
        except Exception as e:
            if previous is None and previous_info is not None:
                _load_back(previous_info, e, previous_modules)
            raise _failed(checkpoint_info, e) from e
        finally:
            del prepared
        if sd_modules.takes_modules(sd_model):
            sd_model.additional_modules = tuple(modules)
        del previous
        return _activate(checkpoint_info, sd_model, started)


def _load_back(previous_info: CheckpointInfo, cause: BaseException, modules: list[str]) -> None:
    """After a failed switch: loads the model that was unloaded for it again (its files are unchanged), with the
    text encoder / VAE files it had, which are selected again."""
    started = time.time()
    print(f"Loading {previous_info.title} back after: {cause}", flush=True)
    try:
        sd_model = sd_models_diffusers.load(previous_info.filename, devices.device, devices.dtype, previous_info,
                                            modules)
    except Exception as e:
        errors.display(e, f"loading {previous_info.title} back")
        return
    if modules:
        sd_model.additional_modules = tuple(modules)
        sd_modules.select_paths(modules)
    _activate(previous_info, sd_model, started)


def reload_model_weights(sd_model=None, info: CheckpointInfo | None = None, forced_reload: bool = False):
    """Loads the selected checkpoint unless it is the loaded one already (with the picked text encoder / VAE
    files, for a model that takes them)."""
    with model_data.lock:
        checkpoint_info = info or select_checkpoint()
        current = model_data.sd_model
        if (current is not None and not forced_reload
                and getattr(current.sd_checkpoint_info, "filename", None) == checkpoint_info.filename
                and not sd_modules.changed_for(current)):
            return current
        return load_model(checkpoint_info)
