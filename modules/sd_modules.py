"""Text encoder and VAE files picked for a checkpoint that does not bundle them, as Forge's "VAE / Text Encoder"
selector does (Forge's option name, so Forge API clients work): `forge_additional_modules` is a list of files from
`--vae-dir` (default models/VAE) and `--text-encoder-dir` (default models/text_encoder), e.g.
`["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]`.

Entries are stored as names relative to their folder (a full path inside one of the folders is accepted and stored
as its name); anything else is refused with a message, so the API cannot point the loader at arbitrary files.
They are used by Flux/Chroma single files (modules/sd_models_dit.py); SD checkpoints bundle their own.
"""
from __future__ import annotations

import os

OPTION = "forge_additional_modules"
LABEL = "VAE / Text Encoder"
EXTENSIONS = (".safetensors", ".sft")


def folders() -> list[str]:
    from modules import shared

    opts = shared.cmd_opts
    vae = getattr(opts, "vae_dir", None) or os.path.join(shared.models_path, "VAE")
    text_encoder = getattr(opts, "text_encoder_dir", None) or os.path.join(shared.models_path, "text_encoder")
    return [os.path.abspath(vae), os.path.abspath(text_encoder)]


def list_modules() -> dict[str, str]:
    """{name: path} of every module file, names relative to their folder (VAE folder first)."""
    found: dict[str, str] = {}
    for root in folders():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.lower().endswith(EXTENSIONS):
                    path = os.path.join(dirpath, name)
                    found.setdefault(os.path.relpath(path, root).replace(os.sep, "/"), path)
    return found


def _name_of(value: str, available: dict[str, str]) -> str:
    if value in available:
        return value
    if os.path.isabs(value):
        wanted = os.path.realpath(value)
        for name, path in available.items():
            if os.path.realpath(path) == wanted:
                return name
    matches = [name for name in available if os.path.basename(name) == value]
    if len(matches) == 1:
        return matches[0]
    where = " or ".join(folders())
    if len(matches) > 1:
        raise ValueError(f"{value!r} names several files ({', '.join(matches)}); give the path under {where}")
    raise ValueError(f"{value!r} is not a text encoder or VAE file in {where}")


def validate(value) -> list[str]:
    """The option's check: a list of module file names (ValueError naming the entry that is not one)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of file names")
    available = list_modules()
    return list(dict.fromkeys(_name_of(v, available) for v in value if v))


def selected_paths() -> list[str]:
    """The picked files' paths (entries whose file is gone are skipped with a message)."""
    from modules import shared

    available = list_modules()
    paths = []
    for name in shared.opts.data.get(OPTION) or []:
        try:
            paths.append(available[_name_of(name, available)])
        except ValueError as e:
            print(f"{LABEL}: {e}; skipped", flush=True)
    return paths
