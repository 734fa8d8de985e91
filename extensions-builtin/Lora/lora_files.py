"""Reading Lora files: safetensors headers (metadata, key names, shapes), tensors, embedded hashes.

Nothing here unpickles arbitrary objects: `.pt`/`.ckpt` go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys

import lora_safetensors
import safetensors.torch
import torch

SAFETENSORS_MAX_HEADER = lora_safetensors.MAX_HEADER
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
network_extensions = (".pt", ".ckpt", ".safetensors")


class LoraFileError(ValueError):
    """A file that is not a readable Lora file; the message names the file."""


def _header(filename: str, f=None) -> lora_safetensors.Header:
    """The file's validated safetensors header (lora_safetensors), problems as LoraFileError."""
    try:
        return lora_safetensors.read_header(f, filename) if f is not None else \
            lora_safetensors.read_header_file(filename)
    except lora_safetensors.HeaderError as e:
        raise LoraFileError(str(e)) from None


def read_safetensors_header(filename: str) -> tuple[dict, dict]:
    """Returns (raw `__metadata__` strings, {tensor key: {"dtype", "shape"}}) without reading tensor data."""
    header = _header(filename)
    tensors = {k: {"dtype": e.dtype, "shape": list(e.shape)} for k, e in header.tensors.items()}
    return header.metadata, tensors


SAFETENSORS_DTYPES = lora_safetensors.TORCH_DTYPES


def read_safetensors_index(f, filename: str) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    """{key: (dtype, shape, file offset, byte count)} of the tensors of an open safetensors file (tensors of dtypes
    this torch lacks are left out)."""
    return {key: (e.torch_dtype, e.shape, e.offset, e.nbytes) for key, e in _header(filename, f).tensors.items()
            if e.torch_dtype is not None}


def decode_metadata(raw: dict) -> dict:
    """A1111 rule: string values that start with `{` are JSON-decoded when possible."""
    res = {}
    for k, v in raw.items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        res[str(k)] = v
    return res


def read_metadata(filename: str) -> dict:
    """Decoded safetensors metadata, through the host's reader when it has one (A1111 API)."""
    # The host has loaded its sd_models by the time a Lora is read; looked up, never imported here (lora_files is
    # also used by command-line tools that load no host).
    reader = getattr(sys.modules.get("modules.sd_models"), "read_metadata_from_safetensors", None)
    if reader is not None:
        try:
            return dict(reader(filename) or {})
        except Exception:  # the host's reader may be stricter; ours names the problem below
            pass
    raw, _ = read_safetensors_header(filename)
    return decode_metadata(raw)


# Input-side factor spellings: their dim 1 is the layer's input width.
_INPUT_PARTS = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight",
                "_lora.down.weight", "hada_w1_b", "hada_w2_b", "diff")
_LORA_DOWN_PARTS = ("lora_down.weight", "lora_A.weight", "lora.down.weight")
_re_input_part = re.compile(r"\.lora_A\.[^.]+\.weight$")
_re_depth = re.compile(r"transformer_blocks[._]([1-9]\d*)[._]")
_re_te_q = re.compile(r"^(lora_te[12]?_|text_encoder(?:_2)?\.|lycoris_te_)(?:text_model[._])?encoder[._]layers[._]\d+"
                      r"[._]self_attn[._](?:q_proj|to_q_lora)")
_FIRST_LEVEL_ATTENTION = ("down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1_",
                          "input_blocks.1.1.", "input_blocks_2_1_", "input_blocks.2.1.")
# Names only other architectures have; the first of these that any key shows wins.
_OTHER_ARCHS = (
    ("Chroma", ("distilled_guidance_layer",)),  # Flux blocks with an approximator instead of modulation Linears
    ("Flux", ("double_blocks", "single_blocks", "single_transformer_blocks", "guidance_embedder", "guidance_in")),
    ("SD3", ("joint_blocks",)),
    ("Cascade", ("lora_prior_unet_", "lora_prior_te_")),
    # diffusers-named transformer layers that do not say which DiT, and T5 text-encoder layers (Flux, SD3, ...)
    ("DiT", ("lora_transformer_", "transformer.transformer_blocks", "lycoris_transformer_blocks",
             "base_model.model.transformer_blocks", "SelfAttention", "DenseReluDense")),
)
_FAMILIES = frozenset({"SD1", "SD2", "SDXL"})
# CLIP width of the first text encoder → families, by key prefix: kohya writes `lora_te_` only for one-encoder
# models; the other spellings are also used for SDXL's CLIP-L (768 wide).
_TE_WIDTH = {
    "lora_te_": {768: {"SD1"}, 1024: {"SD2"}},
    "lora_te1_": {768: {"SD1", "SDXL"}, 1024: {"SD2"}},
    "text_encoder.": {768: {"SD1", "SDXL"}, 1024: {"SD2"}},
    "lycoris_te_": {768: {"SD1"}, 1024: {"SD2"}},
    "lora_te2_": {1280: {"SDXL"}},
    "text_encoder_2.": {1280: {"SDXL"}},
}


def _shape_of(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, dict):
        return list(value.get("shape") or [])
    return []


def version_hint_from_keys(tensors: dict) -> str | None:
    """The model family a Lora was made for, from its key names and shapes only ({key: tensor} or a header's
    {key: {"shape": ...}}): "SD1", "SD2", "SDXL", another architecture ("Flux", "SD3", "Cascade", "DiT"), or
    None when the evidence is missing or contradicts itself.

    Each clue narrows the SD families: the cross-attention input width (768 SD1, 1024 SD2, 2048 SDXL), the
    text encoder widths (table _TE_WIDTH), a second text encoder, transformer depth above 1 and
    `label_emb`/`add_embedding` (SDXL), attention in the first UNet level (SD1/SD2), a 1x1-conv `proj_in` (SD1)
    or a linear one (SD2/SDXL)."""
    candidates = set(_FAMILIES)
    clues = 0
    other_archs: set[str] = set()

    def narrow(families) -> None:
        nonlocal candidates, clues
        candidates &= set(families)
        clues += 1

    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            continue
        for arch, names in _OTHER_ARCHS:
            if any(n in key for n in names):
                other_archs.add(arch)
        shape = _shape_of(value)
        is_input = len(shape) >= 2 and (key.endswith(_INPUT_PARTS) or bool(_re_input_part.search(key)))
        if is_input and ("attn2_to_k" in key or "attn2.to_k" in key or "attn2.processor.to_k_lora" in key):
            family = {768: "SD1", 1024: "SD2", 2048: "SDXL"}.get(int(shape[1]))
            if family:
                narrow({family})
        if key.startswith(("lora_te2_", "text_encoder_2.")) or "label_emb" in key or "add_embedding" in key \
                or _re_depth.search(key):
            narrow({"SDXL"})
        if any(n in key for n in _FIRST_LEVEL_ATTENTION):
            narrow({"SD1", "SD2"})
        if "proj_in" in key and len(shape) >= 2 and (key.endswith(_LORA_DOWN_PARTS) or _re_input_part.search(key)):
            narrow({"SD1"} if len(shape) == 4 else {"SD2", "SDXL"})
        m = _re_te_q.match(key) if is_input else None
        if m:
            families = _TE_WIDTH.get(m.group(1), {}).get(int(shape[1]))
            if families:
                narrow(families)
    if other_archs == {"DiT"} and _sd3_diffusers_keys(tensors):
        return "SD3"
    for arch, _ in _OTHER_ARCHS:
        if arch in other_archs:
            return arch
    if clues and len(candidates) == 1:
        return next(iter(candidates))
    return None


# diffusers-named joint attention (text and image streams: SD3, Flux, other MMDiTs), its input width, and SD3.5
# Medium's second image attention
_re_joint_attention = re.compile(r"transformer_blocks[._]\d+[._]attn[._](?:add_[qkv]_proj|to_add_out)[._]")
_re_dual_attention = re.compile(r"transformer_blocks[._]\d+[._]attn2[._]")
_SD3_WIDTHS = (1536, 2432)  # SD3 Medium / SD3.5 Medium, SD3.5 Large (Flux.1 is 3072)


def _sd3_diffusers_keys(tensors: dict) -> bool:
    """Diffusers-named transformer keys that only SD3 has: joint attention 1536 or 2432 wide, or joint attention
    together with an `attn2` in the same blocks (MMDiT-X)."""
    joint = dual = False
    for key, value in tensors.items():
        if _re_joint_attention.search(key):
            joint = True
            shape = _shape_of(value)
            if len(shape) == 2 and "add_" in key and (key.endswith(_INPUT_PARTS) or _re_input_part.search(key)) \
                    and shape[1] in _SD3_WIDTHS:
                return True
        elif _re_dual_attention.search(key):
            dual = True
    return joint and dual


# ss_base_model_version / modelspec.architecture prefixes of the transformer families (kohya/sd-scripts and the
# modelspec standard: `flux1`, `flux-1-dev/lora`, `flux-1-schnell/lora`, `chroma`, `sd3...`, `stable-diffusion-3...`)
_METADATA_FAMILIES = (("chroma", "Chroma"), ("flux1", "Flux"), ("flux-1", "Flux"), ("sd3", "SD3"),
                      ("stable-diffusion-3", "SD3"), ("stable-diffusion-v3", "SD3"))


def transformer_family_from_metadata(metadata: dict) -> str | None:
    """"Flux", "Chroma" or "SD3" when a file's metadata names one of them, else None."""
    if str(metadata.get("ss_model_type", "") or "").lower() == "chroma":  # sd-scripts' --model_type chroma
        return "Chroma"
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(key, "") or "").lower()
        for prefix, family in _METADATA_FAMILIES:
            if value.startswith(prefix):
                return family
    return None


# Layers Flux.1 has and Chroma lacks (Chroma's distilled guidance layer replaces modulation and the vector embedders)
_FLUX_ONLY = ("_mod_lin", "_mod.lin", "modulation_lin", "modulation.lin", "time_in", "vector_in", "guidance_in",
              "time_text_embed", "norm1.linear", "norm1_linear", "norm1_context", "norm.linear", "norm_linear")


def file_family(tensors: dict, metadata: dict) -> str | None:
    """The family of a file for its card: the keys' (version_hint_from_keys), except that Flux-block keys without a
    Flux-only layer are Chroma's when the metadata says Chroma (a Chroma LoRA trains Flux's block layers)."""
    hint = version_hint_from_keys(tensors)
    if hint == "Flux" and transformer_family_from_metadata(metadata) == "Chroma" and \
            not any(n in key for key in tensors for n in _FLUX_ONLY):
        return "Chroma"
    return hint


# Text-encoder layers two families share: a file that names only these fits both (SDXL's CLIP-L and CLIP-G are
# SD3's first two text encoders, same widths, same layer names).
SHARED_TEXT_ENCODERS = {("SDXL", "SD3"): ("lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")}


def shares_text_encoders(keys, hint: str | None, family: str | None) -> bool:
    """Whether a `hint` file names only text-encoder layers that a model of `family` has as well."""
    prefixes = SHARED_TEXT_ENCODERS.get((hint, family))
    names = [k for k in keys if not k.startswith("bundle_emb.")]
    return prefixes is not None and bool(names) and all(k.startswith(prefixes) for k in names)


def also_fits(keys, hint: str | None) -> list[str]:
    """The other families a `hint` file applies to in full (its card is shown for them too)."""
    keys = list(keys)
    return [family for (made_for, family) in SHARED_TEXT_ENCODERS
            if made_for == hint and shares_text_encoders(keys, hint, family)]


def header_info(filename: str) -> dict:
    """{"metadata": decoded metadata, "version_hint": family or None, "also_fits": [other families]} of a
    safetensors file."""
    raw, tensors = read_safetensors_header(filename)
    metadata = read_metadata(filename) if raw else {}
    hint = file_family(tensors, metadata)
    return {"metadata": metadata, "version_hint": hint, "also_fits": also_fits(tensors, hint)}


def embedded_hash(metadata: dict) -> str | None:
    """kohya's embedded `sshs_model_hash`, trusted only when it is 64 hex chars and not the hash of nothing."""
    value = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    if not _HEX64.match(value) or value == EMPTY_SHA256:
        return None
    return value


_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\.\s+(?:Please|Check|To )|$)", re.S)


def unpickling_message(filename: str, error: BaseException) -> str:
    """What to tell the user about a .pt/.ckpt that only loads by unpickling code: what it needs and what to do.
    torch's own text advises turning the safety check off; we never repeat that."""
    m = _UNPICKLER_DETAIL.search(str(error))
    detail = " ".join(m.group(1).split()) if m else type(error).__name__
    return (f"{filename}: this file needs Python objects unpickled to load ({detail}); that can run code, so it is "
            f"not done. Convert it to .safetensors with a tool you trust to use it")


def _is_unpickling_error(error: BaseException) -> bool:
    return isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error)


def _load_pickle(filename: str, mmap: bool):
    return torch.load(filename, map_location="cpu", weights_only=True, mmap=mmap)


def pickle_problem(filename: str) -> str:
    """"" when a .pt/.ckpt loads with `torch.load(weights_only=True)`, else the message for the card. Cheap for
    zip-format files: with mmap only the pickle is parsed, no tensor data is read (legacy files are read whole)."""
    try:
        try:
            _load_pickle(filename, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            _load_pickle(filename, mmap=False)  # legacy (non-zip) serialization cannot be memory-mapped
    except Exception as e:
        if _is_unpickling_error(e):
            return unpickling_message(filename, e)
        return f"{filename}: cannot load tensors: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def load_state_dict(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of a Lora file on the CPU; non-tensor entries of `.pt` files are left out."""
    ext = os.path.splitext(filename)[1].lower()
    try:
        if ext == ".safetensors":
            # copies: load_file's tensors are views of a shared map of the file, so a file rewritten in place
            # would change (or, when shorter, crash) a network that is loaded and merged
            return {k: v.clone() for k, v in safetensors.torch.load_file(filename, device="cpu").items()}
        if ext in (".pt", ".ckpt"):
            data = torch.load(filename, map_location="cpu", weights_only=True)
        else:
            raise LoraFileError(f"{filename}: unsupported file type {ext!r}")
    except LoraFileError:
        raise
    except Exception as e:
        if _is_unpickling_error(e):
            raise LoraFileError(unpickling_message(filename, e)) from None
        raise LoraFileError(f"{filename}: cannot load tensors: {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFileError(f"{filename}: expected a dict of tensors, found {type(data).__name__}")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
