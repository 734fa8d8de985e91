"""T5 tokenizers without a download.

- The tiny default models use a small Unigram vocabulary written here (T5's special tokens and numbering: `<pad>` 0,
  `</s>` 1, `<unk>` 2; common words, letters, digits and punctuation, each also with SentencePiece's `▁` word start),
  built with the `tokenizers` library through transformers' T5Tokenizer. Same text, same ids, on every machine.
- Real T5-XXL weights (32128 rows) need T5's own 32k vocabulary, which no installed package carries and which is
  never fetched: it is read from `models/text_encoder/t5-tokenizer/` (a `tokenizer_2` folder copied from a FLUX.1
  diffusers model: `tokenizer.json`, or `spiece.model`) or from any diffusers Flux/SD3 folder among the checkpoints.
"""
from __future__ import annotations

import json
import os
import string

from modules.sd_models_ldm import CheckpointFormatError

SPECIALS = ("<pad>", "</s>", "<unk>")
_WORDS = (
    "a an the of and or in on with at by for from to is are photo picture painting drawing portrait landscape "
    "close up view cat dog bird horse fish man woman girl boy child people face eyes hair hand house tree flower "
    "sky cloud sun moon star water sea river lake mountain forest city street road car boat sunset night day light "
    "dark shadow red orange yellow green blue purple pink brown black white gray gold silver big small tall long "
    "short old young beautiful cute happy sad style art artist detailed high quality best masterpiece render "
    "digital oil watercolor sketch anime realistic cinematic lighting background foreground soft sharp focus"
).split()
T5_VOCAB_SIZE = 32128  # rows of T5-XXL's embedding (32100 tokens, padded)
USER_FOLDER = ("text_encoder", "t5-tokenizer")


def tiny_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) of the tiny vocabulary; whole words score above their letters."""
    vocab = [(s, 0.0) for s in SPECIALS] + [("▁", -3.0)]
    vocab += [("▁" + w, -5.0 - i * 0.001) for i, w in enumerate(_WORDS)]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -10.0) for c in chars] + [("▁" + c, -10.5) for c in chars]
    seen, res = set(), []
    for piece, score in vocab:
        if piece not in seen:
            seen.add(piece)
            res.append((piece, score))
    return res


TINY_VOCAB_SIZE = len(tiny_vocab())
TINY_MAX_LENGTH = 64


def build_tiny_tokenizer():
    from transformers import T5Tokenizer

    # 64 tokens: the pipelines encode prompts to min(the model's length, this), which keeps the tiny model fast
    return T5Tokenizer(vocab=tiny_vocab(), extra_ids=0, model_max_length=TINY_MAX_LENGTH)


def tiny_tokenizer_dir() -> str:
    """The repo's tiny T5 tokenizer folder (configs/tokenizers/t5-tiny), written on first use (a temporary folder
    renamed, so it is complete or absent)."""
    import shutil
    import tempfile

    from modules import paths_internal

    folder = os.path.join(paths_internal.sd_configs_path, "tokenizers", "t5-tiny")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".t5-tiny-", dir=parent)
        try:
            build_tiny_tokenizer().save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isfile(os.path.join(folder, "tokenizer.json")):  # not another process's finished copy
                raise
    return folder


def _is_t5_folder(folder: str) -> bool:
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and \
            not os.path.isfile(os.path.join(folder, "spiece.model")):
        return False
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf8") as f:
            return "T5" in json.load(f).get("tokenizer_class", "T5")
    except (OSError, ValueError):
        return os.path.isfile(os.path.join(folder, "spiece.model"))


def candidate_folders(models_path: str, checkpoint_dir: str | None) -> list[str]:
    """Where a real T5 tokenizer may be: the user's folder, then the T5 tokenizers of diffusers Flux/SD3 folders."""
    found = [os.path.join(models_path, *USER_FOLDER)]
    if checkpoint_dir and os.path.isdir(checkpoint_dir):
        for dirpath, dirnames, _ in os.walk(checkpoint_dir):
            if os.path.isfile(os.path.join(dirpath, "model_index.json")):
                found += [os.path.join(dirpath, name) for name in ("tokenizer_2", "tokenizer_3", "tokenizer")]
                dirnames[:] = []
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return [f for f in found if _is_t5_folder(f)]


def find_tokenizer_folder(vocab_rows: int, what: str, models_path: str, checkpoint_dir: str | None) -> str:
    """The folder of the tokenizer for a T5 encoder with `vocab_rows` embedding rows; CheckpointFormatError (naming
    `what` and where to put the tokenizer) when this machine has none."""
    if vocab_rows == TINY_VOCAB_SIZE:
        return tiny_tokenizer_dir()
    for folder in candidate_folders(models_path, checkpoint_dir):
        if vocab_rows - 128 < _vocab_size(folder) <= vocab_rows:  # T5 pads its 32100 tokens to 32128 rows
            return folder
    raise CheckpointFormatError(
        f"{what}: its T5 text encoder needs T5's own tokenizer ({vocab_rows}-row vocabulary), which is not on this "
        f"machine and is never downloaded: copy the `tokenizer_2` folder of a FLUX.1 diffusers model "
        f"(tokenizer.json or spiece.model) to {os.path.join(models_path, *USER_FOLDER)}")


def _vocab_size(folder: str) -> int:
    try:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf8") as f:
            model = json.load(f).get("model", {})
        return len(model.get("vocab", []))
    except (OSError, ValueError):
        return T5_VOCAB_SIZE - 28  # spiece.model only: T5's 32100 tokens


def load(folder: str):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(folder, local_files_only=True)
