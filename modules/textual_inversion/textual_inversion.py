"""Textual-inversion embeddings (A1111 names): `Embedding`, `EmbeddingDatabase`, `create_embedding_from_data`.

Files come from `--embeddings-dir` (`.pt`/`.bin` through `torch.load(weights_only=True)`, `.safetensors`); Lora files
can bundle more (`bundle_emb.*`, registered by the Lora extension while that Lora is active). How the words reach
the text encoders is `modules/sd_hijack.py`'s job.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from modules import errors, hashes

EXTENSIONS = (".pt", ".bin", ".safetensors")


class Embedding:
    """One embedding: `vec` is a (vectors, width) tensor, or {"clip_l": ..., "clip_g": ...} for SDXL."""

    def __init__(self, vec: torch.Tensor | dict[str, torch.Tensor], name: str, step: int | None = None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape: int | None = None
        self.vectors = 0
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename: str | None = None
        self.hash: str | None = None
        self.shorthash: Any = None  # a str, or an object whose str() is the text for `TI hashes` (bundled ones)
        self.loaded = True
        first = next(iter(vec.values())) if isinstance(vec, dict) else vec
        if isinstance(first, torch.Tensor):
            self.shape = int(first.shape[-1])
            self.vectors = int(first.shape[0]) if first.dim() > 1 else 1

    def vectors_for(self, width: int, slot: str | None) -> torch.Tensor | None:
        """The (vectors, width) tensor for a text encoder of that width ("clip_l"/"clip_g" slot for SDXL)."""
        vec = self.vec
        if isinstance(vec, dict):
            vec = vec.get(slot) if slot else None
        if not isinstance(vec, torch.Tensor):
            return None
        vec = vec.reshape(-1, vec.shape[-1]) if vec.dim() != 2 else vec
        return vec if vec.shape[-1] == width else None

    def set_hash(self, v: str | None) -> None:
        self.hash = v
        self.shorthash = v[0:12] if v else None

    def __repr__(self) -> str:
        return f"Embedding({self.name!r}, {self.vectors} vectors)"


def create_embedding_from_data(data: dict, name: str, filename: str = "unknown embedding file",
                               filepath: str | None = None) -> Embedding:
    """A1111 API: an Embedding from a loaded file's dict (A1111 `string_to_param`, SDXL `clip_l`/`clip_g`,
    diffusers `{token: tensor}` or `emb_params`)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{filename}: `string_to_param` must hold exactly one tensor")
        vec = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        vec = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "emb_params" in data:
        vec = data["emb_params"]
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vec = next(iter(data.values()))
    else:
        raise ValueError(f"{filename}: not a textual-inversion embedding (keys: {', '.join(list(data)[:5])})")
    tensors = vec.values() if isinstance(vec, dict) else [vec]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        raise ValueError(f"{filename}: the embedding is not a floating-point tensor")
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"{filename}: the embedding holds NaN or Inf")
    vec = {k: v.detach().float().cpu() for k, v in vec.items()} if isinstance(vec, dict) else vec.detach().float().cpu()
    embedding = Embedding(vec, name, step=data.get("step") if isinstance(data.get("step"), int) else None)
    embedding.filename = filepath
    return embedding


def read_embedding_file(path: str) -> dict:
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {type(e).__name__}: {e}"
                         ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a dict")
    return data


class EmbeddingDatabase:
    """Embeddings by name (A1111 API: word_embeddings, skipped_embeddings, register_embedding,
    register_embedding_by_name, load_textual_inversion_embeddings)."""

    def __init__(self):
        self.word_embeddings: dict[str, Embedding] = {}
        self.skipped_embeddings: dict[str, Embedding] = {}
        self.embedding_dirs: dict[str, Any] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        self.errors: dict[str, str] = {}

    def add_embedding_dir(self, path: str) -> None:
        self.embedding_dirs[os.path.abspath(path)] = True

    def clear_embedding_dirs(self) -> None:
        self.embedding_dirs.clear()

    def register_embedding(self, embedding: Embedding, model=None) -> Embedding:
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding: Embedding | None, model, name: str) -> Embedding | None:
        """Registers (or, with embedding=None, unregisters) a word."""
        if embedding is None:
            return self.word_embeddings.pop(name, None)
        self.word_embeddings[name] = embedding
        self.skipped_embeddings.pop(name, None)
        return embedding

    def load_from_file(self, path: str, filename: str) -> Embedding | None:
        name = os.path.splitext(filename)[0]
        try:
            embedding = create_embedding_from_data(read_embedding_file(path), name, filename, path)
        except Exception as e:
            self.errors[path] = str(e)
            errors.display(e, f"loading embedding {path}")
            return None
        self.errors.pop(path, None)
        embedding.set_hash(hashes.sha256(path, f"textual_inversion/{name}"))
        return embedding

    def load_textual_inversion_embeddings(self, force_reload: bool = False, widths: set[int] | None = None) -> None:
        """Rescans the embedding folders; unchanged files (size, mtime) are not re-read. `widths`: the loaded
        model's text-encoder widths; an embedding of another width is kept in skipped_embeddings."""
        seen = set()
        for root in list(self.embedding_dirs):
            if not os.path.isdir(root):
                continue
            for dirpath, _, filenames in os.walk(root, followlinks=True):
                for filename in sorted(filenames):
                    if not filename.lower().endswith(EXTENSIONS):
                        continue
                    path = os.path.join(dirpath, filename)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    seen.add(path)
                    stamp = (st.st_size, st.st_mtime_ns)
                    if not force_reload and self._stamps.get(path) == stamp:
                        continue
                    self._stamps[path] = stamp
                    embedding = self.load_from_file(path, filename)
                    if embedding is not None:
                        self.word_embeddings[embedding.name] = embedding
        for path in [p for p in self._stamps if p not in seen]:
            del self._stamps[path]
            for name in [n for n, e in self.word_embeddings.items() if e.filename == path]:
                del self.word_embeddings[name]
        if widths:
            for name, embedding in list(self.word_embeddings.items()):
                if embedding.filename and not _fits(embedding, widths):
                    self.skipped_embeddings[name] = self.word_embeddings.pop(name)
            for name, embedding in list(self.skipped_embeddings.items()):
                if embedding.filename and _fits(embedding, widths) and os.path.exists(embedding.filename):
                    self.word_embeddings[name] = self.skipped_embeddings.pop(name)


def _fits(embedding: Embedding, widths: set[int]) -> bool:
    if isinstance(embedding.vec, dict):
        return all(int(v.shape[-1]) in widths for v in embedding.vec.values())
    return embedding.shape in widths
