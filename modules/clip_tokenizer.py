"""CLIP tokenizer files built offline from the BPE vocabulary that ships in the `open_clip_torch` package.

The OpenAI CLIP BPE file (`bpe_simple_vocab_16e6.txt.gz`) defines the same 49408-token vocabulary and merges as
the Hugging Face `openai/clip-vit-large-patch14` tokenizer; this writes `vocab.json` and `merges.txt` from it so
`transformers.CLIPTokenizer` loads with no network. open_clip itself is never imported (it needs torchvision).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

from modules.atomic import write_text_atomic

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
MERGES_COUNT = 49152 - 256 - 2  # OpenAI's simple_tokenizer keeps this many merges
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# SD1 and SDXL's first encoder pad with <|endoftext|>; OpenCLIP (SD2, SDXL's second encoder) pads with "!".
PAD_TOKENS = {"clip": "<|endoftext|>", "openclip": "!"}


def bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, BPE_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{BPE_NAME} not found: install open_clip_torch with --no-deps (see install.py)")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def vocab_and_merges(path: str | None = None) -> tuple[dict[str, int], list[str]]:
    with gzip.open(path or bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:MERGES_COUNT + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def ensure_tokenizer_files(folder: str, kind: str = "clip", max_length: int = 77) -> str:
    """Writes a CLIPTokenizer folder (kind "clip" or "openclip") unless it is complete; returns the folder."""
    if all(os.path.isfile(os.path.join(folder, name)) for name in FILES):
        return folder
    vocab, merges = vocab_and_merges()
    pad = PAD_TOKENS[kind]
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "errors": "replace", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad, "add_prefix_space": False, "clean_up_tokenization_spaces": True,
    }
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_text_atomic(os.path.join(folder, "special_tokens_map.json"), json.dumps(special, indent=2))
    write_text_atomic(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2))
    return folder


def shared_tokenizer_dir(kind: str = "clip") -> str:
    """The repo's own tokenizer folder (configs/tokenizers/<kind>), built on first use."""
    from modules import paths_internal
    return ensure_tokenizer_files(os.path.join(paths_internal.sd_configs_path, "tokenizers", kind), kind)


def load_tokenizer(kind: str = "clip"):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(shared_tokenizer_dir(kind), local_files_only=True)
