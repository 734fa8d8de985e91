"""Embeddings bundled in Lora files (`bundle_emb.*`): usable as words in the prompt while their Lora is active.

They go into the host's embedding database (A1111: `modules.sd_hijack.model_hijack.embedding_db`) when the Lora is
loaded for a job and come out when the next job no longer has it. A same-named embedding from the embeddings
folder wins, with a message (A1111 behaviour).
"""
from __future__ import annotations

import logging

from modules import shared

try:  # the embedding database and its Embedding type; a host without textual inversion has no bundled words
    from modules import sd_hijack
    from modules.textual_inversion import textual_inversion
except ImportError:
    sd_hijack = textual_inversion = None

logger = logging.getLogger("lora")

_registered: dict[str, object] = {}  # embedding name → the Embedding this module registered


class BundledHash(str):
    """What `TI hashes` records for a bundled embedding: its Lora's name (option lora_bundled_ti_to_infotext)."""


def _embedding_db():
    return getattr(getattr(sd_hijack, "model_hijack", None), "embedding_db", None)


def unregister_all() -> None:
    db = _embedding_db()
    for name, embedding in list(_registered.items()):
        if db is not None and db.word_embeddings.get(name) is embedding:
            db.register_embedding_by_name(None, None, name)
        del _registered[name]


def register(networks: list, sd_model=None) -> list[str]:
    """Registers the bundled embeddings of `networks`; returns messages for the job's comments."""
    unregister_all()
    db = _embedding_db()
    if db is None or textual_inversion is None:
        return []
    messages = []
    to_infotext = bool(getattr(shared.opts, "lora_bundled_ti_to_infotext", True))
    for net in networks:
        for name, data in (getattr(net, "bundle_embeddings", None) or {}).items():
            existing = db.word_embeddings.get(name)
            if existing is not None and getattr(existing, "filename", None):
                messages.append(f'Skip bundle embedding: "{name}" as it was already loaded from embeddings folder')
                continue
            payload = {"string_to_param": {"*": data}} if not isinstance(data, dict) else dict(data)
            try:
                embedding = textual_inversion.create_embedding_from_data(payload, name, net.name)
            except ValueError as e:
                messages.append(f"Lora {net.name}: bundled embedding {name} skipped: {e}")
                continue
            embedding.shorthash = BundledHash(net.name if to_infotext else "")
            db.register_embedding(embedding, sd_model)
            _registered[name] = embedding
    return messages
