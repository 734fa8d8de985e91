"""Transformer-era checkpoints in this host: FLUX.1 (dev, schnell), Chroma and Stable Diffusion 3 / 3.5, offline.

Three ways in:
- a diffusers folder (`FluxPipeline` / `ChromaPipeline` / `StableDiffusion3Pipeline` in model_index.json):
  `from_pretrained(local_files_only)`;
- a BFL/ComfyUI single-file transformer (`flux1-dev.safetensors`, keys with or without `model.diffusion_model.`)
  plus text encoders and VAE picked separately (modules/sd_modules.py: files like `clip_l.safetensors`,
  `t5xxl_fp16.safetensors`, `ae.safetensors`), as Forge's "VAE / Text Encoder" selector does;
- an all-in-one file that bundles them (`text_encoders.clip_l.*`, `text_encoders.clip_g.*` (SD3),
  `text_encoders.t5xxl.*`, `vae.*` or `first_stage_model.*`); picked files replace the bundled ones. SD3 single files
  (`joint_blocks.*`, modules/sd3_layout.py) work the same way, T5 optional as in its "no T5" variants.

Configs come from the tensor shapes (modules/flux_layout.py, modules/component_files.py); dev, schnell and Chroma are
told apart by their tensors. Each component is built on meta and filled from the files as the SD loader does
(weights copied out of the file maps, `original_weights` for the Lora patcher's exact restore, checked before
the loaded model is given up). fp8 weights stay fp8 (modules/fp8_storage.py).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from modules import (
    component_files,
    flux_layout,
    fp8_storage,
    mapped_memory,
    original_weights,
    sd3_layout,
    t5_tokenizer,
)
from modules.sd_models_ldm import CheckpointFormatError

FAMILIES = ("flux", "chroma", "sd3")
PIPELINES = {"FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "ChromaPipeline": "chroma",
             "ChromaImg2ImgPipeline": "chroma", "StableDiffusion3Pipeline": "sd3",
             "StableDiffusion3Img2ImgPipeline": "sd3"}
NEEDS = {"flux": ("transformer", "clip_l", "t5", "vae"), "chroma": ("transformer", "t5", "vae"),
         "sd3": ("transformer", "clip_l", "clip_g", "vae")}
COMPONENT_OF = {"flux": {"transformer": "transformer", "clip_l": "text_encoder", "t5": "text_encoder_2",
                         "vae": "vae"},
                "chroma": {"transformer": "transformer", "t5": "text_encoder", "vae": "vae"},
                "sd3": {"transformer": "transformer", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                        "t5": "text_encoder_3", "vae": "vae"}}
T5_TOKENIZER = {"flux": "tokenizer_2", "chroma": "tokenizer", "sd3": "tokenizer_3"}
# T5 tokens, as the models were trained (diffusers' defaults)
MAX_SEQUENCE = {"dev": 512, "schnell": 256, "chroma": 512, "sd3": 256, "sd3.5": 256}


def pipeline_class(family: str, img2img: bool = False):
    import diffusers

    name = {"flux": "Flux", "chroma": "Chroma", "sd3": "StableDiffusion3"}[family]
    return getattr(diffusers, name + ("Img2ImgPipeline" if img2img else "Pipeline"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 overflows in Flux's T5 and transformer activations: bf16 instead, as diffusers recommends."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def assemble_pipeline(family: str, variant: str, components: dict[str, Any], tokenizers: dict | None = None):
    """A Flux/Chroma pipeline from ready components; tokenizers and scheduler are made here when not given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from modules import clip_tokenizer, default_models_dit

    parts = dict(components)
    parts.update(tokenizers or {})
    t5_name = T5_TOKENIZER[family]
    if family in ("flux", "sd3"):
        parts.setdefault("tokenizer", clip_tokenizer.load_tokenizer("clip"))
    if family == "sd3":
        parts.setdefault("tokenizer_2", clip_tokenizer.load_tokenizer("openclip"))
        parts.setdefault("text_encoder_3", None)  # no T5: the pipeline puts zeros in its place
    if t5_name not in parts:
        parts[t5_name] = t5_tokenizer.load(t5_tokenizer.tiny_tokenizer_dir()) if parts.get(
            COMPONENT_OF[family]["t5"]) is not None else None
    parts.setdefault("scheduler", FlowMatchEulerDiscreteScheduler(**default_models_dit.SCHEDULERS[variant]))
    pipe = pipeline_class(family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def index_family(index: dict) -> str | None:
    return PIPELINES.get(index.get("_class_name", ""))


def _variant(family: str, transformer) -> str:
    if family == "sd3":
        return "sd3.5" if transformer.config.qk_norm else "sd3"
    if family == "chroma":
        return "chroma"
    return "dev" if transformer.config.guidance_embeds else "schnell"


def _make_model(pipe, family: str, variant: str, checkpoint_info, source, stamps):
    from modules.sd_models_diffusers import DiffusersSdModel

    model = DiffusersSdModel(pipe, family, checkpoint_info, source, variant=variant)
    model.file_stamps = stamps
    model.memory_report = describe_memory(model)
    return model


# --- diffusers folders --------------------------------------------------------------------------------------------
def load_folder(folder: str, family: str, device, dtype, checkpoint_info=None):
    from modules import sd_models_diffusers as sdd

    names = [n for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
             if os.path.isdir(os.path.join(folder, n))]
    stamps = {path: original_weights.file_stamp(path)
              for n in names for path in set(sdd.component_weight_files(os.path.join(folder, n)).values())}
    pipe = pipeline_class(family).from_pretrained(folder, torch_dtype=compute_dtype(dtype), local_files_only=True,
                                                  use_safetensors=True)
    components = {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}
    pipe.to(device)
    mapped_memory.copy_out_of_files(components)  # from_pretrained assigns the file maps' tensors when dtypes match
    pipe.set_progress_bar_config(disable=True)
    sdd.refuse_changed(stamps, folder)
    refs, dtypes = sdd.folder_refs(folder, components)
    source = original_weights.OriginalWeights(refs, dtypes, stamps) if refs else None
    return _make_model(pipe, family, _variant(family, pipe.transformer), checkpoint_info, source, stamps)


# --- single files -------------------------------------------------------------------------------------------------
def holds_transformer_era_parts(keys) -> bool:
    """Whether a file holds a Flux/Chroma transformer or only a text encoder/VAE of one (never an SD checkpoint)."""
    keys = list(keys)
    if any(k.startswith(("cond_stage_model.", "conditioner.embedders.")) for k in keys):
        return False
    return bool(component_files.find_parts(keys))


class _Source:
    """One component's tensors: the file, its tensor views and where the component sits in it."""

    def __init__(self, filename: str, tensors: dict, part: component_files.Part):
        self.filename, self.tensors, self.part = filename, tensors, part
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}


def _family(tensors: dict, part: component_files.Part) -> tuple[str, str]:
    """(family, variant) of a file's transformer, from its tensors."""
    if part.layout == "sd3":
        return "sd3", "sd3.5" if any(k.endswith(".attn.ln_q.weight") for k in tensors) else "sd3"
    variant = flux_layout.detect_variant(tensors, part.prefix)
    return ("chroma" if variant == "chroma" else "flux"), variant


def _clip_width(source: _Source) -> int:
    return source.shapes[source.part.prefix + component_files.CLIP_PROBE][1]


def _place_clips(family: str, clips: list[_Source], sources: dict[str, _Source], what: str) -> None:
    """Picked CLIP files have no name for which CLIP they are: Flux takes one (CLIP-L); SD3 takes L and G, the wider
    one (or a single one 1280 wide) being G."""
    if not clips:
        return
    if family != "sd3":
        if len(clips) > 1:
            raise CheckpointFormatError(f"{what}: {len(clips)} CLIP text encoder files are picked "
                                        f"({', '.join(c.filename for c in clips)}); Flux uses one (CLIP-L)")
        sources["clip_l"] = clips[0]
        return
    if len(clips) > 2:
        raise CheckpointFormatError(f"{what}: {len(clips)} CLIP files are picked; SD3 uses two (CLIP-L, CLIP-G)")
    clips = sorted(clips, key=_clip_width)
    if len(clips) == 2:
        kinds = ("clip_l", "clip_g")
    else:
        kinds = ("clip_g",) if _clip_width(clips[0]) >= 1280 or "clip_l" in sources else ("clip_l",)
    for clip, kind in zip(clips, kinds, strict=True):
        sources[kind] = _Source(clip.filename, clip.tensors, component_files.Part(kind, clip.part.prefix))


def _pick(filename: str, tensors: dict, module_files: list[str]
          ) -> tuple[dict[str, _Source], dict[str, tuple], str, str]:
    """({kind: source} from the checkpoint and the picked module files (these win), every file's stamp, family,
    variant)."""
    from modules.sd_models_diffusers import read_checkpoint_tensors

    stamps = {}
    if reason := component_files.unsupported_reason(tensors):
        raise CheckpointFormatError(f"{filename}: {reason}")
    sources: dict[str, _Source] = {p.kind: _Source(filename, tensors, p) for p in component_files.find_parts(tensors)}
    if "transformer" not in sources:
        held = ", ".join(component_files.KIND_LABELS[k] for k in sources)
        raise CheckpointFormatError(f"{filename} holds only a {held}, no Flux/Chroma/SD3 transformer: put it in "
                                    f"models/text_encoder or models/VAE and pick it under VAE / Text Encoder")
    family, variant = _family(tensors, sources["transformer"].part)
    picked: dict[str, str] = {}
    clips: list[_Source] = []
    for path in module_files:
        stamps[path] = original_weights.file_stamp(path)
        module_tensors = read_checkpoint_tensors(path)
        if reason := component_files.unsupported_reason(module_tensors):
            raise CheckpointFormatError(f"{path}: {reason}")
        parts = component_files.find_parts(module_tensors)
        if not parts:
            raise CheckpointFormatError(f"{path}: not a text encoder (CLIP, T5) or VAE file this host can read")
        for part in parts:
            if part.kind == "transformer":
                raise CheckpointFormatError(f"{path} holds a diffusion transformer: pick it as the checkpoint, not "
                                            f"under VAE / Text Encoder")
            source = _Source(path, module_tensors, part)
            if part.kind in ("clip_l", "clip_g") and not part.prefix:  # a plain CLIP file: which one is decided below
                clips.append(source)
                continue
            if part.kind in picked:
                raise CheckpointFormatError(f"{path}: two {component_files.KIND_LABELS[part.kind]} files are picked "
                                            f"({picked[part.kind]}); pick one")
            picked[part.kind] = path
            sources[part.kind] = source
    _place_clips(family, clips, sources, filename)
    return sources, stamps, family, variant


def _skeletons(family: str, variant: str, sources: dict[str, _Source], what: str) -> dict[str, Callable]:
    """{component: factory} with configs read off the shapes."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    t = sources["transformer"]
    try:
        if family == "sd3":
            config = sd3_layout.transformer_config(t.shapes, t.part.prefix)
            cls = SD3Transformer2DModel
        else:
            config = flux_layout.transformer_config(t.shapes, t.part.prefix, variant)
            cls = ChromaTransformer2DModel if family == "chroma" else FluxTransformer2DModel
        factories: dict[str, Callable] = {"transformer": lambda: cls(**config)}
        clip_cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel  # SD3 reads pooled projections
        for kind in ("clip_l", "clip_g"):
            if kind in sources and kind in COMPONENT_OF[family]:
                clip = sources[kind]
                clip_config = component_files.clip_config(clip.shapes, clip.part.prefix, kind)
                factories[COMPONENT_OF[family][kind]] = (lambda c=clip_config: clip_cls(CLIPTextConfig(**c)))
        if "t5" in sources:
            t5 = sources["t5"]
            t5_config = component_files.t5_config(t5.shapes, t5.part.prefix)
            factories[COMPONENT_OF[family]["t5"]] = lambda: T5EncoderModel(T5Config(**t5_config))
        vae = sources["vae"]
        vae_config = component_files.vae_config(vae.shapes, vae.part, family)
        factories["vae"] = lambda: AutoencoderKL(**vae_config)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{what}: {e}") from None
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointFormatError(f"{what}: its tensor shapes do not describe a {family} model "
                                    f"({type(e).__name__}: {e})") from None
    return factories


def _ref(kind: str, key: str, source: _Source, module: torch.nn.Module):
    if kind == "transformer":
        layout = sd3_layout if source.part.layout == "sd3" else flux_layout
        return layout.transformer_ref(key, module.config, source.part.prefix)
    if kind in ("clip_l", "clip_g"):
        return component_files.clip_ref(key, source.part.prefix)
    if kind == "t5":
        return component_files.t5_ref(key, source.shapes, source.part.prefix)
    return component_files.vae_ref(key, source.part, len(module.config.block_out_channels))


def _component_source(kind: str, source: _Source, skeleton: torch.nn.Module) -> tuple[dict, dict, set]:
    """({parameter: view of the file's tensor}, {parameter: ref}, fp8 keys kept) for one component; every tensor
    present and of the model's shape."""
    from modules.sd_models_ldm import read_ref

    views, refs, dtypes, missing, wrong = {}, {}, {}, [], []
    for key, tensor in skeleton.state_dict().items():
        if kind == "t5" and key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight: the same module (see _fill_component)
        ref = _ref(kind, key, source, skeleton)
        if ref is None or ref.key not in source.tensors:
            missing.append(ref.key if ref is not None else key)
            continue
        view = read_ref(ref, source.tensors)
        if tuple(view.shape) != tuple(tensor.shape):
            wrong.append(f"{ref.key} is {list(view.shape)}, the model needs {list(tensor.shape)}")
            continue
        views[key], refs[key], dtypes[key] = view, ref, view.dtype
    label = component_files.KIND_LABELS[kind]
    if missing:
        raise CheckpointFormatError(f"{source.filename}: {len(missing)} {label} tensors missing, e.g. "
                                    f"{', '.join(missing[:3])}")
    if wrong:
        raise CheckpointFormatError(f"{source.filename}: {len(wrong)} {label} tensors have the wrong shape: "
                                    f"{'; '.join(wrong[:3])}")
    return views, refs, fp8_storage.fp8_keys(skeleton, dtypes)


def _fill_component(kind: str, skeleton, views: dict, keep_fp8: set, device, dtype) -> torch.nn.Module:
    from modules.sd_disable_initialization import load_state_dict_lean

    if kind == "t5":
        skeleton.encoder.embed_tokens = skeleton.shared  # one embedding, filled once
    module, result = load_state_dict_lean(skeleton, views, device=device, dtype=dtype, strict=False,
                                          keep_file_dtype=keep_fp8)
    missing = [k for k in result.missing_keys if not (kind == "t5" and k == "encoder.embed_tokens.weight")]
    if missing:
        raise CheckpointFormatError(f"tensors not filled: {', '.join(missing[:5])}")
    fp8_storage.enable(module)
    return module.eval()


def prepare_files(filename: str, tensors: dict, stamps: dict, module_files: list[str], device, dtype,
                  checkpoint_info=None):
    """Checks a Flux/Chroma file (and the picked module files) without reading weights; PreparedLoad.fill() reads
    them."""
    from modules import shared
    from modules.sd_disable_initialization import build_on_meta
    from modules.sd_models_diffusers import PreparedLoad, refuse_changed

    sources, module_stamps, family, variant = _pick(filename, tensors, module_files)
    stamps = dict(stamps, **module_stamps)
    missing = [component_files.KIND_LABELS[k] for k in NEEDS[family] if k not in sources]
    if missing:
        raise CheckpointFormatError(
            f"{filename} is a {variant} transformer without {', '.join(missing)}: pick "
            f"{'them' if len(missing) > 1 else 'it'} under VAE / Text Encoder (files like clip_l.safetensors, "
            f"t5xxl_fp16.safetensors in models/text_encoder, ae.safetensors in models/VAE; the option "
            f"`forge_additional_modules` in the API)")
    tokenizer_dir = None
    if "t5" in sources:  # SD3 runs without T5 (zeros in its place), as its "no T5" variants do
        t5 = sources["t5"]
        vocab_rows = t5.shapes[component_files.t5_embedding_key(t5.shapes, t5.part.prefix)][0]
        from modules import sd_models
        tokenizer_dir = t5_tokenizer.find_tokenizer_folder(vocab_rows, t5.filename, shared.models_path,
                                                           sd_models.checkpoint_dir())
    factories = _skeletons(family, variant, sources, filename)
    kinds = {component: kind for kind, component in COMPONENT_OF[family].items()}
    skeletons = {component: build_on_meta(factory) for component, factory in factories.items()}
    prepared = {c: _component_source(kinds[c], sources[kinds[c]], s) for c, s in skeletons.items()}
    files = {c: sources[kinds[c]].filename for c in skeletons}
    del sources, tensors
    dtype = compute_dtype(dtype)

    def fill():
        components, refs, dtypes = {}, {}, {}
        for component in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):  # small first
            if component not in prepared:
                continue
            views, component_refs, keep_fp8 = prepared.pop(component)
            module = _fill_component(kinds[component], skeletons.pop(component), views, keep_fp8, device, dtype)
            components[component] = module
            for key, ref in component_refs.items():
                refs[(component, key)] = (files[component], ref.key, ref)
            if kinds[component] == "t5":
                refs[(component, "encoder.embed_tokens.weight")] = refs[(component, "shared.weight")]
            for key, tensor in module.state_dict().items():
                dtypes[(component, key)] = tensor.dtype
        refuse_changed(stamps, filename)
        tokenizers = {T5_TOKENIZER[family]: t5_tokenizer.load(tokenizer_dir)} if tokenizer_dir else {}
        pipe = assemble_pipeline(family, variant, components, tokenizers)
        safetensors_only = all(f.lower().endswith(".safetensors") for f in stamps)
        source = original_weights.OriginalWeights(refs, dtypes, stamps) if safetensors_only else None
        return _make_model(pipe, family, variant, checkpoint_info, source, stamps)

    return PreparedLoad(filename, fill)


def describe_memory(model) -> str:
    """"transformer 23.8 MB (fp8 weights 17.0 MB), text_encoder ..." for the load message."""
    parts = []
    for name, module in model.components().items():
        if module is None:
            continue
        total = fp8_storage.parameter_bytes(module)
        fp8 = sum(p.numel() for p in module.parameters() if fp8_storage.is_fp8(p.dtype))
        parts.append(f"{name} {total / 2 ** 20:.1f} MiB" + (f" (fp8 weights {fp8 / 2 ** 20:.1f} MiB)" if fp8 else ""))
    return ", ".join(parts)


def read_index(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json"), encoding="utf8") as f:
        return json.load(f)
