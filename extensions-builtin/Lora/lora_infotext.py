"""Pasting infotext (A1111 6.5): `Lora hashes` re-point tags to local files; kohya AddNet fields become tags."""
from __future__ import annotations

import os
import re

import lora_discovery

from modules import paths_internal

re_lora_tag = re.compile(r"<(lora|lyco):([^:>]+)")
re_addnet_module = re.compile(r"^AddNet Module (\d+)$")
re_trailing_hash = re.compile(r"\(([0-9a-fA-F]+)\)\s*$")


def parse_lora_hashes(text: str) -> dict[str, str]:
    """`"a: 0123456789ab, b: ..."` → {"a": "0123456789ab", ...} (split on `,`, then on the first `:`)."""
    res = {}
    for item in (text or "").split(","):
        name, sep, shorthash = item.partition(":")
        if sep and name.strip() and shorthash.strip():
            res[name.strip()] = shorthash.strip()
    return res


def resolve_hashes_in_prompt(prompt: str, lora_hashes: dict[str, str]) -> str:
    """Rewrites `<lora:NAME:` to the local file's name when NAME's hash is one of ours."""
    def replace(m: re.Match) -> str:
        shorthash = lora_hashes.get(m.group(2))
        entry = lora_discovery.available_network_hash_lookup.get(shorthash) if shorthash else None
        if entry is None:
            return m.group(0)
        return f"<{m.group(1)}:{entry.get_alias()}"

    return re_lora_tag.sub(replace, prompt)


def infotext_pasted(infotext: str, d: dict) -> None:
    """on_infotext_pasted callback: the Prompt and the Hires prompt are rewritten (A1111 rewrites the Prompt only,
    though its `Lora hashes` lists the Loras of both passes)."""
    hashes = parse_lora_hashes(d.get("Lora hashes") or "")
    for key in ("Prompt", "Hires prompt"):
        if hashes and isinstance(d.get(key), str):
            d[key] = resolve_hashes_in_prompt(d[key], hashes)


def _addnet_extension_installed() -> bool:
    folder = paths_internal.extensions_dir
    return os.path.isdir(folder) and any("additional-networks" in x.lower() for x in os.listdir(folder))


def addnet_infotext_pasted(infotext: str, d: dict) -> None:
    """kohya "Additional Networks" fields → `<lora:NAME:W>` tags appended to the Prompt."""
    if not isinstance(d.get("Prompt"), str) or _addnet_extension_installed():
        return
    numbers = sorted(int(m.group(1)) for k in d if (m := re_addnet_module.match(str(k))))
    added = []
    for n in numbers:
        if d.get(f"AddNet Module {n}") != "LoRA":
            continue
        model = str(d.get(f"AddNet Model {n}", "")).strip()
        model = re_trailing_hash.sub("", model).strip()
        if not model:
            continue
        weight = d.get(f"AddNet Weight A {n}", "1.0")
        added.append(f"<lora:{model}:{weight}>")
    if added:
        d["Prompt"] += "\n" + "".join(added)
