"""Extra-network tags in prompts: parsing and dispatch to handlers (A1111 names and semantics, minus its defects)."""
from __future__ import annotations

import os
import re
from collections import defaultdict

from modules import errors, json_finite

extra_network_registry: dict = {}
extra_network_aliases: dict = {}

re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items: list | None = None):
        self.items = items or []
        self.positional: list[str] = []
        self.named: dict[str, str] = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return isinstance(other, ExtraNetworkParams) and self.items == other.items

    def __hash__(self):
        return hash(tuple(self.items))

    def __repr__(self):
        return f"ExtraNetworkParams({self.items!r})"


class ExtraNetwork:
    def __init__(self, name: str):
        self.name = name

    def activate(self, p, params_list: list[ExtraNetworkParams]) -> None:
        raise NotImplementedError

    def deactivate(self, p) -> None:
        raise NotImplementedError


def initialize() -> None:
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network: ExtraNetwork) -> None:
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network: ExtraNetwork, alias: str) -> None:
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks() -> None:
    try:
        from modules.extra_networks_hypernet import ExtraNetworkHypernet
        register_extra_network(ExtraNetworkHypernet())
    except ImportError:
        pass


def lookup_extra_networks(extra_network_data: dict) -> dict:
    """Maps {type name: [params]} to {handler: [params]}, merging aliases such as lyco→lora."""
    res: dict = {}
    for extra_network_name, extra_network_args in list(extra_network_data.items()):
        extra_network = extra_network_registry.get(extra_network_name, None)
        alias = extra_network_aliases.get(extra_network_name, None)
        if alias is not None and extra_network is None:
            extra_network = alias
        if extra_network is None:
            print(f"Skipping unknown extra network: {extra_network_name}")
            continue
        res.setdefault(extra_network, []).extend(extra_network_args)
    return res


def activate(p, extra_network_data: dict) -> None:
    """Calls each handler with its tags; a handler that raises is called again with no tags."""
    activated = []
    for extra_network, extra_network_args in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, extra_network_args)
            activated.append(extra_network)
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network.name} with arguments {extra_network_args}")
            if hasattr(p, "comment"):
                p.comment(f"Extra network {extra_network.name} failed: {type(e).__name__}: {e}")

    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network_name}")


def deactivate(p, extra_network_data: dict) -> None:
    for extra_network in extra_network_registry.values():
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {extra_network.name}")


def parse_prompt(prompt: str) -> tuple[str, dict]:
    """Removes every <type:args> tag from prompt; returns the stripped prompt and {type: [params]}."""
    res: dict = defaultdict(list)

    def found(m):
        name = m.group(1)
        args = m.group(2)
        res[name].append(ExtraNetworkParams(items=args.split(":")))
        return ""

    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


def parse_prompts(prompts: list[str]) -> tuple[list[str], dict]:
    """Strips tags from every prompt; the tags of the first prompt are the batch's (A1111 batch rule)."""
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data if extra_data is not None else defaultdict(list)


def get_user_metadata(filename: str | None, lister=None) -> dict:
    """Reads the sidecar <stem>.json next to a network file; {} when absent or unreadable."""
    if filename is None:
        return {}
    basename, _ = os.path.splitext(filename)
    metadata_filename = basename + ".json"
    metadata = {}
    try:
        exists = lister.exists(metadata_filename) if lister else os.path.exists(metadata_filename)
        if exists:
            with open(metadata_filename, "r", encoding="utf8") as file:
                loaded = json_finite.loads_lenient(file.read())  # a NaN from an older save stays as text
            if isinstance(loaded, dict):
                metadata = loaded
    except Exception as e:
        errors.display(e, f"reading extra network user metadata from {metadata_filename}")
    return metadata
