"""The loaded model on this host: a diffusers pipeline behind the attributes A1111 code reads from `shared.sd_model`.

Two ways in, both offline:
- a diffusers folder (model_index.json): `from_pretrained(local_files_only=True, use_safetensors=True)`;
- a single-file SD1/SD2/SDXL checkpoint in the original layout: configs are read off the tensor shapes
  (modules/sd_models_ldm.py), each component is built on the meta device and filled tensor by tensor from the
  file (modules/sd_disable_initialization.load_state_dict_lean), so peak memory stays near one copy of the model.

Either way every weight ends up in process memory, never in a map of the file (modules/mapped_memory.py): the model
survives its file being rewritten, truncated or deleted. `prepare()` checks a file without reading its weights,
so a model switch can refuse a bad file before it gives up the loaded model (sd_models.load_model).

Either way the model keeps `original_weights`: where each parameter came from, so the Lora patcher can re-read an
original weight from the file instead of holding a copy of it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import torch

from modules import mapped_memory, original_weights, sd_models_ldm
from modules.original_weights import OriginalWeights
from modules.sd_model_object import DiffusersSdModel, ModelType  # noqa: F401  (ModelType: re-exported)

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
}
TOKENIZER_KINDS = {"sd1": {"tokenizer": "clip"}, "sd2": {"tokenizer": "openclip"},
                   "sdxl": {"tokenizer": "clip", "tokenizer_2": "openclip"}}


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def assemble_pipeline(family: str, components: dict[str, Any], scheduler_config: dict | None = None):
    """A pipeline from ready components; tokenizers and scheduler are made here when not given."""
    from diffusers import EulerDiscreteScheduler

    from modules import clip_tokenizer

    parts = dict(components)
    for name, kind in TOKENIZER_KINDS[family].items():
        parts.setdefault(name, clip_tokenizer.load_tokenizer(kind))
    if "scheduler" not in parts:
        parts["scheduler"] = EulerDiscreteScheduler.from_config(scheduler_config or SCHEDULER_CONFIG)
    if family == "sdxl":
        return pipeline_class(family)(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return pipeline_class(family)(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --- diffusers folders --------------------------------------------------------------------------------------------
def folder_family(folder: str) -> str:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise sd_models_ldm.CheckpointFormatError(f"{folder}: cannot read model_index.json: {e}") from None
    name = index.get("_class_name", "")
    from modules import sd_models_dit
    if sd_models_dit.index_family(index):
        return sd_models_dit.index_family(index)
    if "XL" in name:
        return "sdxl"
    if name not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        raise sd_models_ldm.CheckpointFormatError(f"{folder}: {name or 'an unknown pipeline'} is not an SD1/SD2/SDXL "
                                                  f"pipeline (nor Flux or Chroma)")
    try:
        with open(os.path.join(folder, "text_encoder", "config.json"), encoding="utf8") as f:
            hidden = json.load(f).get("hidden_size")
    except (OSError, ValueError):
        hidden = None
    return "sd2" if hidden == 1024 else "sd1"


def component_weight_files(folder: str) -> dict[str, str]:
    """{tensor key: file} of one component folder, as from_pretrained picks them (non-variant safetensors)."""
    from safetensors import safe_open

    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        if name.endswith(".safetensors.index.json") and name.count(".") == 3:
            with open(os.path.join(folder, name), encoding="utf8") as f:
                weight_map = json.load(f).get("weight_map", {})
            return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as f:
                return {k: path for k in f.keys()}
    return {}


def folder_refs(folder: str, components: dict[str, torch.nn.Module]):
    refs, dtypes = {}, {}
    for component, module in components.items():
        files = component_weight_files(os.path.join(folder, component))
        for key, tensor in module.state_dict().items():
            for candidate in (key, "text_model." + key, sd_models_ldm.strip_text_model(key)):
                if candidate in files:
                    refs[(component, key)] = (files[candidate], candidate, None)
                    dtypes[(component, key)] = tensor.dtype
                    break
    return refs, dtypes


def _folder_stamps(folder: str) -> dict[str, original_weights.FileStamp]:
    """The stamps of every weight file a folder load may read (taken before it reads them)."""
    stamps = {}
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for path in set(component_weight_files(os.path.join(folder, component)).values()):
            stamps[path] = original_weights.file_stamp(path)
    return stamps


def load_diffusers_folder(folder: str, device: torch.device, dtype: torch.dtype, checkpoint_info=None
                          ) -> DiffusersSdModel:
    family = folder_family(folder)
    from modules import sd_models_dit
    if family in sd_models_dit.FAMILIES:
        return sd_models_dit.load_folder(folder, family, device, dtype, checkpoint_info)
    stamps = _folder_stamps(folder)
    kwargs = dict(torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    if family != "sdxl":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(family).from_pretrained(folder, **kwargs)
    components = {k: getattr(pipe, k) for k in ("unet", "text_encoder", "text_encoder_2", "vae")
                  if getattr(pipe, k, None) is not None}
    pipe.to(device)
    # diffusers assigns the safetensors maps' own tensors when the dtype matches: copy them into memory
    mapped_memory.copy_out_of_files(components)
    pipe.set_progress_bar_config(disable=True)
    refuse_changed(stamps, folder)
    refs, dtypes = folder_refs(folder, components)
    source = OriginalWeights(refs, dtypes, stamps) if refs else None
    model = DiffusersSdModel(pipe, family, checkpoint_info, source)
    model.file_stamps = stamps
    return model


def refuse_changed(stamps: dict, what: str) -> None:
    changed = original_weights.changed_files(stamps)
    if changed:
        raise sd_models_ldm.CheckpointFormatError(
            f"{what}: {', '.join(changed)} changed on disk while it was loading (being copied?); load it again")


# --- single files -------------------------------------------------------------------------------------------------
def read_checkpoint_tensors(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint: safetensors as views of a private memory map (nothing is read
    until used); .ckpt/.pt through torch.load(weights_only=True), never a full unpickle."""
    from modules import safetensors_mmap

    if filename.lower().endswith(".safetensors"):
        try:
            return safetensors_mmap.open_safetensors_mmap(filename)
        except ValueError as e:
            raise sd_models_ldm.CheckpointFormatError(str(e)) from None
    try:
        data = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise sd_models_ldm.CheckpointFormatError(
            f"{filename}: cannot be read with torch.load(weights_only=True) ({_torch_load_reason(e)}); it is never "
            f"unpickled in full (that could run code from the file): convert it to .safetensors") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise sd_models_ldm.CheckpointFormatError(f"{filename}: not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _torch_load_reason(e: Exception) -> str:
    """The line of torch's long weights_only message that says what the file holds (e.g. `Unsupported global:
    GLOBAL datetime.date ...`), without its advice and terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", text, re.MULTILINE)
    line = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _normalise_sd1_clip_keys(tensors: dict) -> None:
    """Old SD1 files lack the `text_model.` level under cond_stage_model.transformer (A1111 renames them too)."""
    old, new = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."
    if any(k.startswith(new) for k in tensors):
        return
    for key in [k for k in tensors if k.startswith(old)]:
        tensors[new + key[len(old):]] = tensors.pop(key)


def _sidecar_prediction_type(filename: str, family: str) -> str:
    """SD2: v-prediction unless an A1111 sidecar `<stem>.yaml` says `parameterization: eps`-style otherwise."""
    if family != "sd2":
        return "epsilon"
    yaml_path = os.path.splitext(filename)[0] + ".yaml"
    try:
        with open(yaml_path, encoding="utf8") as f:
            text = f.read()
    except OSError:
        return "v_prediction"
    m = re.search(r"parameterization:\s*['\"]?(\w+)", text)
    return "v_prediction" if m and m.group(1) == "v" else "epsilon"


def _component_dict(family: str, component: str, expected: dict[str, torch.Size], tensors: dict, levels,
                    vae_levels: int, filename: str) -> tuple[dict[str, torch.Tensor], dict[str, sd_models_ldm.LdmRef]]:
    """{model key: view of the file's tensor} for one component; every tensor present and of the model's shape."""
    source: dict[str, torch.Tensor] = {}
    refs: dict[str, sd_models_ldm.LdmRef] = {}
    missing, wrong = [], []
    for key, shape in expected.items():
        ref = sd_models_ldm.ldm_ref(family, component, key, levels, vae_levels)
        if ref is None or ref.key not in tensors:
            missing.append(ref.key if ref is not None else key)
            continue
        # left a view (not made contiguous here, which would read it through the map): the loader copies every
        # tensor out of the file contiguously (a non-contiguous parameter's matmuls would round differently)
        view = sd_models_ldm.read_ref(ref, tensors)
        if tuple(view.shape) != tuple(shape):
            wrong.append(f"{ref.key} is {list(view.shape)}, the model needs {list(shape)}")
            continue
        source[key] = view
        refs[key] = ref
    if missing:
        raise sd_models_ldm.CheckpointFormatError(
            f"{filename}: {len(missing)} {component} tensors missing, e.g. {', '.join(missing[:3])}")
    if wrong:
        raise sd_models_ldm.CheckpointFormatError(
            f"{filename}: {len(wrong)} {component} tensors have the wrong shape: {'; '.join(wrong[:3])}")
    return source, refs


def _fill(skeleton: torch.nn.Module, source: dict, device, dtype) -> torch.nn.Module:
    from modules.sd_disable_initialization import load_state_dict_lean

    module, result = load_state_dict_lean(skeleton, source, device=device, dtype=dtype, strict=False)
    if result.missing_keys:
        raise sd_models_ldm.CheckpointFormatError(f"tensors not filled: {', '.join(result.missing_keys[:5])}")
    return module.eval()


class PreparedLoad:
    """A checkpoint checked as far as it can be without reading its weights (format, family, every tensor
    present with the right shape): `fill()` then reads the weights. Lets a model switch find a bad file before it
    gives up the loaded model."""

    def __init__(self, filename: str, fill: Callable[[], DiffusersSdModel]):
        self.filename = filename
        self._fill = fill

    def fill(self) -> DiffusersSdModel:
        fill, self._fill = self._fill, None  # once: it drains the file's views
        if fill is None:
            raise RuntimeError(f"{self.filename}: already loaded")
        return fill()


def _prepare_single_file(filename: str, device: torch.device, dtype: torch.dtype, checkpoint_info=None,
                         module_files: list[str] | None = None) -> PreparedLoad:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modules.sd_disable_initialization import build_on_meta

    stamps = {filename: original_weights.file_stamp(filename)}  # before anything is read
    tensors = read_checkpoint_tensors(filename)
    from modules import sd_models_dit
    if sd_models_dit.holds_transformer_era_parts(tensors.keys()):
        return sd_models_dit.prepare_files(filename, tensors, stamps, list(module_files or []), device, dtype,
                                           checkpoint_info)
    family = sd_models_ldm.detect_family(tensors.keys())
    if family == "sd1":
        _normalise_sd1_clip_keys(tensors)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    try:
        text_configs = {c: sd_models_ldm.infer_text_config(shapes, family, c)
                        for c in sd_models_ldm.TEXT_PREFIXES[family]}
        te2_projection = text_configs.get("text_encoder_2", {}).get("projection_dim")
        unet_config = sd_models_ldm.infer_unet_config(shapes, family, te2_projection)
        vae_config = sd_models_ldm.infer_vae_config(shapes, family)
    except sd_models_ldm.CheckpointFormatError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as e:
        raise sd_models_ldm.CheckpointFormatError(
            f"{filename}: its tensor shapes do not describe an {family.upper()} model ({type(e).__name__}: {e})"
        ) from None
    levels = sd_models_ldm.UnetLevels.from_config(unet_config)
    vae_levels = len(vae_config["block_out_channels"])

    factories: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": lambda: UNet2DConditionModel(**unet_config),
        "vae": lambda: AutoencoderKL(**vae_config),
    }
    for component, config in text_configs.items():
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        factories[component] = (lambda cls=cls, config=config: cls(CLIPTextConfig(**config)))

    # Every skeleton first (cheap, and it overlaps the background read of the file), then fill them in the order
    # their tensors lie in A1111-written files: text encoders and VAE before the UNet.
    skeletons = {component: build_on_meta(factory) for component, factory in factories.items()}
    sources = {}
    for component in sorted(skeletons, key=lambda c: c == "unet"):
        expected = {k: v.shape for k, v in skeletons[component].state_dict().items()}
        sources[component] = _component_dict(family, component, expected, tensors, levels, vae_levels, filename)
    del tensors  # what is not in `sources` is not needed

    def fill() -> DiffusersSdModel:
        components: dict[str, torch.nn.Module] = {}
        refs: dict[tuple[str, str], tuple[str, str, sd_models_ldm.LdmRef | None]] = {}
        dtypes: dict[tuple[str, str], torch.dtype] = {}
        for component in list(sources):
            source, component_refs = sources.pop(component)
            module = _fill(skeletons.pop(component), source, device, dtype)
            components[component] = module
            for key, ref in component_refs.items():
                refs[(component, key)] = (filename, ref.key, ref)
            for key, tensor in module.state_dict().items():
                dtypes[(component, key)] = tensor.dtype
        refuse_changed(stamps, filename)
        scheduler_config = dict(SCHEDULER_CONFIG, prediction_type=_sidecar_prediction_type(filename, family))
        pipe = assemble_pipeline(family, components, scheduler_config)
        pipe.set_progress_bar_config(disable=True)
        is_safetensors = filename.lower().endswith(".safetensors")
        source = OriginalWeights(refs, dtypes, stamps) if is_safetensors else None
        model = DiffusersSdModel(pipe, family, checkpoint_info, source)
        model.file_stamps = stamps
        return model

    return PreparedLoad(filename, fill)


def load_single_file(filename: str, device: torch.device, dtype: torch.dtype, checkpoint_info=None,
                     module_files: list[str] | None = None) -> DiffusersSdModel:
    return _prepare_single_file(filename, device, dtype, checkpoint_info, module_files).fill()


def prepare(filename: str, device: torch.device, dtype: torch.dtype, checkpoint_info=None,
            module_files: list[str] | None = None) -> PreparedLoad:
    """Checks a checkpoint without reading its weights (raises CheckpointFormatError saying what is wrong).
    `module_files`: separately picked text encoder / VAE files (Flux single files; ignored otherwise)."""
    if os.path.isdir(filename):
        folder_family(filename)
        return PreparedLoad(filename, lambda: load_diffusers_folder(filename, device, dtype, checkpoint_info))
    if not os.path.isfile(filename):
        raise sd_models_ldm.CheckpointFormatError(f"{filename}: no such file")
    return _prepare_single_file(filename, device, dtype, checkpoint_info, module_files)


def load(filename: str, device: torch.device, dtype: torch.dtype, checkpoint_info=None,
         module_files: list[str] | None = None) -> DiffusersSdModel:
    return prepare(filename, device, dtype, checkpoint_info, module_files).fill()
