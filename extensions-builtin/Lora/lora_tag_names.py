"""The name a card puts into `<lora:NAME:w>`: one that the prompt parser can carry and that resolves to the file.

A1111's tag syntax splits a tag's text at `:`, ends it at the first `>`, and reads `key=value` as a named
argument, so a name or alias holding one of those characters makes a tag that cannot resolve. The card then
inserts the first safe form that finds this very file (the alias, the unique name, the path-qualified name), and
says on the card when there is none (the file has to be renamed).
"""
from __future__ import annotations

import lora_discovery

UNSAFE_CHARACTERS = (":", ">", "=")


def unsafe_characters(name: str) -> list[str]:
    return [c for c in UNSAFE_CHARACTERS if c in name]


def is_safe(name: str) -> bool:
    return bool(name.strip()) and not unsafe_characters(name)


def tag_name(entry, preferred: str) -> str | None:
    """`preferred` when it is safe, else the first safe name that resolves to entry; None when there is none."""
    for candidate in (preferred, entry.name, lora_discovery.path_name(entry)):
        if candidate and is_safe(candidate) and (candidate == preferred or
                                                 lora_discovery.find_network(candidate) is entry):
            return candidate
    return None


def no_tag_message(entry, preferred: str) -> str:
    chars = " ".join(f"'{c}'" for c in unsafe_characters(preferred) or unsafe_characters(entry.name))
    return (f"This Lora cannot be put into a prompt: its name {preferred!r} contains {chars}, which a "
            f"<lora:...> tag cannot hold; rename the file without {chars} to use it")
