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


def select_paths(paths: list[str]) -> None:
    """Selects these files again (after a failed switch loaded the previous model back with them)."""
    from modules import shared

    names = {path: name for name, path in list_modules().items()}
    shared.opts.data[OPTION] = [names.get(p, p) for p in paths]


def takes_modules(sd_model) -> bool:
    """Whether `sd_model` was built from picked files: a Flux/Chroma/SD3 single file (folders bundle their own)."""
    from modules import sd_models_dit

    return getattr(sd_model, "family", None) in sd_models_dit.FAMILIES and \
        not os.path.isdir(getattr(sd_model, "sd_model_checkpoint", "") or "")


def changed_for(sd_model) -> bool:
    """Whether `sd_model` took picked files and the pick changed since (then it is loaded again)."""
    return takes_modules(sd_model) and tuple(selected_paths()) != tuple(getattr(sd_model, "additional_modules", ()))
