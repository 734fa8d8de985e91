"""Embedding words in prompts (A1111 name: `sd_hijack.model_hijack.embedding_db`).

A1111 swaps the token embeddings inside its own prompt encoder. Here each text encoder's token-embedding layer gets a
forward hook instead: for the job, every embedding word in a prompt is rewritten to placeholder tokens (one per
vector) that the tokenizer knows, and the hook puts the embedding's vectors where those tokens are. No weight is
written or resized, and nothing happens when no embedding is used.
"""
from __future__ import annotations

import re

import torch

from modules import shared
from modules.textual_inversion.textual_inversion import Embedding, EmbeddingDatabase

_HOOKED = "_embedding_hooks"


def _encoders(sd_model) -> list[tuple[object, torch.nn.Module, str | None]]:
    """(tokenizer, text encoder, SDXL slot) for each text encoder of the model."""
    pairs = [(getattr(sd_model, "tokenizer", None), getattr(sd_model, "text_encoder", None)),
             (getattr(sd_model, "tokenizer_2", None), getattr(sd_model, "text_encoder_2", None))]
    pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
    slots = ["clip_l", "clip_g"] if len(pairs) == 2 else [None]
    return [(t, e, s) for (t, e), s in zip(pairs, slots, strict=False)]


class _EmbeddingHook:
    """Pre-hook: out-of-vocabulary placeholder ids → 0 (so the lookup works); hook: their rows → the vectors."""

    def __init__(self):
        self.table: dict[int, torch.Tensor] = {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def pre(self, module: torch.nn.Embedding, args):
        ids = args[0]
        mask = ids >= module.num_embeddings
        if not bool(mask.any()):
            self.pending = None
            return None
        self.pending = (ids, mask)
        return (ids.masked_fill(mask, 0), *args[1:])

    def post(self, module: torch.nn.Embedding, args, output: torch.Tensor):
        if self.pending is None:
            return None
        ids, mask = self.pending
        self.pending = None
        output = output.clone()
        for token_id in ids[mask].unique().tolist():
            vector = self.table.get(int(token_id))
            if vector is not None:
                output[ids == token_id] = vector.to(output.device, output.dtype)
        return output


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()
        self.comments: list[str] = []
        self.extra_generation_params: dict = {}
        self._dirs_added = False

    # --- per model ---------------------------------------------------------------------------------------------
    def _hook(self, encoder: torch.nn.Module) -> _EmbeddingHook:
        embedding = encoder.get_input_embeddings()
        hook = getattr(embedding, _HOOKED, None)
        if hook is None:
            hook = _EmbeddingHook()
            embedding.register_forward_pre_hook(hook.pre)
            embedding.register_forward_hook(hook.post)
            setattr(embedding, _HOOKED, hook)
        return hook

    def refresh_embeddings(self, sd_model=None) -> None:
        if not self._dirs_added:
            directory = getattr(shared.cmd_opts, "embeddings_dir", None)
            if directory:
                self.embedding_db.add_embedding_dir(directory)
            self._dirs_added = True
        widths = {int(e.get_input_embeddings().embedding_dim) for _, e, _ in _encoders(sd_model)} if sd_model else None
        self.embedding_db.load_textual_inversion_embeddings(widths=widths)

    # --- per job -----------------------------------------------------------------------------------------------
    def apply_embeddings(self, sd_model, prompts: list[str], negative_prompts: list[str], p=None
                         ) -> tuple[list[str], list[str]]:
        """Rewrites embedding words to placeholder tokens and arms the hooks; records `TI hashes`.
        The job calls refresh_embeddings() first."""
        words = self.embedding_db.word_embeddings
        if not words:
            return prompts, negative_prompts
        texts = list(prompts) + list(negative_prompts)
        used = {name: e for name, e in words.items() if any(_word_pattern(name).search(t or "") for t in texts)}
        if not used:
            return prompts, negative_prompts

        encoders = _encoders(sd_model)
        replacements: dict[str, str] = {}
        for index, (name, embedding) in enumerate(sorted(used.items())):
            per_encoder = [(t, e, embedding.vectors_for(e.get_input_embeddings().embedding_dim, slot))
                           for t, e, slot in encoders]
            if any(vectors is None for _, _, vectors in per_encoder):
                if p is not None:
                    p.comment(f"Embedding {name} does not fit this model's text encoders; it was not used")
                continue
            count = per_encoder[0][2].shape[0]
            tokens = [f"<emb{index}.{i}>" for i in range(count)]
            for tokenizer, encoder, vectors in per_encoder:
                from transformers import AddedToken
                tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
                hook = self._hook(encoder)
                for token, vector in zip(tokens, vectors, strict=True):
                    hook.table[tokenizer.convert_tokens_to_ids(token)] = vector
            replacements[name] = " ".join(tokens)
        if p is not None:
            self._record_hashes(p, {n: used[n] for n in replacements})

        def rewrite(text: str) -> str:
            for name, tokens in replacements.items():
                text = _word_pattern(name).sub(tokens, text)
            return text

        return [rewrite(t) for t in prompts], [rewrite(t) for t in negative_prompts]

    def clear_embeddings(self, sd_model) -> None:
        for _, encoder, _ in _encoders(sd_model):
            hook = getattr(encoder.get_input_embeddings(), _HOOKED, None)
            if hook is not None:
                hook.table.clear()

    @staticmethod
    def _record_hashes(p, used: dict[str, Embedding]) -> None:
        if not shared.opts.data.get("textual_inversion_add_hashes_to_infotext", True):
            return
        entries = [f"{name.replace(':', '').replace(',', '')}: {e.shorthash}" for name, e in used.items()
                   if e.shorthash is not None and str(e.shorthash)]
        if entries:
            p.extra_generation_params["TI hashes"] = ", ".join(entries)


def _word_pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<![\w])" + re.escape(name) + r"(?![\w])", re.IGNORECASE)


model_hijack = StableDiffusionModelHijack()
