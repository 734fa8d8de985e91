"""`<hypernet:NAME>` / `<hypernet:NAME:MULT>` in prompts (A1111 name and syntax).

Differences from A1111, on purpose: an unknown name or a bad multiplier is reported with p.comment instead of
being skipped silently; the `sd_hypernetwork` option adds its tag to a prompt once, not on every batch; the
networks stop applying when the job ends; and the infotext records `Hypernet hashes` so an image says which
files made it (the tags themselves stay in the prompt, as in A1111).

The networks reach the model through forward-pre-hooks on every attention layer's to_k/to_v
(modules/hypernetworks/hooks.py), installed on the job's model the first time a tag is used.

Pasting infotext (`infotext_pasted`, an on_infotext_pasted callback registered with the handler): the old
`Hypernet: NAME` / `Hypernet strength: X` fields become `<hypernet:NAME:X>` (as A1111's parser does), and
`Hypernet hashes` re-point tags to the local file with that hash when it has another name.
"""
from __future__ import annotations

import re

from modules import extra_networks, hashes, script_callbacks, shared
from modules.hypernetworks import hypernetwork


class ExtraNetworkHypernet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("hypernet")
        script_callbacks.remove_callbacks_for_function(infotext_pasted)
        script_callbacks.on_infotext_pasted(infotext_pasted)

    def activate(self, p, params_list: list[extra_networks.ExtraNetworkParams]) -> None:
        params_list = self._with_option_network(p, list(params_list))

        names: list[str] = []
        multipliers: list[float] = []
        for params in params_list:
            if not params.items:
                continue
            items = [str(x) for x in params.items]
            try:
                multiplier = float(items[1]) if len(items) > 1 else 1.0
            except ValueError:
                p.comment(f"Hypernetwork tag <hypernet:{':'.join(items)}> skipped: "
                          f"multiplier {items[1]!r} is not a number")
                continue
            names.append(items[0])
            multipliers.append(multiplier)

        if len(set(names)) < len(names):
            p.comment("Hypernetworks named more than once are applied once, with the last multiplier: "
                      + ", ".join(sorted({n for n in names if names.count(n) > 1})))
        for _, message in hypernetwork.load_hypernetworks(names, multipliers):
            p.comment(message)
        if shared.loaded_hypernetworks:
            from modules import sd_models

            model = getattr(p, "sd_model", None) or sd_models.model_data.sd_model  # never load one from here
            if model is not None:
                hypernetwork.install_hypernetwork_hooks(model)  # once per layer; later calls find them hooked
        self._add_infotext(p)

    def deactivate(self, p) -> None:
        shared.loaded_hypernetworks.clear()

    @staticmethod
    def _with_option_network(p, params_list: list) -> list:
        """The `sd_hypernetwork` option: acts like a tag with the default multiplier when the prompt lacks one."""
        additional = shared.opts.data.get("sd_hypernetwork", "None")
        if not additional or additional == "None":
            return params_list
        if additional not in shared.hypernetworks:
            hypernetwork.refresh_hypernetworks()
        if additional not in shared.hypernetworks or any(x.items and x.items[0] == additional for x in params_list):
            return params_list
        multiplier = shared.opts.data.get("extra_networks_default_multiplier", 1.0)
        tag = f"<hypernet:{additional}:{multiplier}>"
        p.all_prompts = [x if tag in x else f"{x}{tag}" for x in p.all_prompts]
        return params_list + [extra_networks.ExtraNetworkParams(items=[additional, str(multiplier)])]

    @staticmethod
    def _add_infotext(p) -> None:
        entries = []
        for loaded in shared.loaded_hypernetworks:
            shorthash = loaded.shorthash()
            if shorthash:
                name = getattr(loaded, "lookup_name", None) or loaded.name
                entries.append(f"{name.replace(':', '').replace(',', '')}: {shorthash}")
        if entries:
            p.extra_generation_params["Hypernet hashes"] = ", ".join(entries)
        else:
            p.extra_generation_params.pop("Hypernet hashes", None)


re_hypernet_tag = re.compile(r"<hypernet:([^:>]+)")


def parse_hypernet_hashes(text: str) -> dict[str, str]:
    """`"a: 0123456789, b: ..."` → {"a": "0123456789", ...}."""
    res = {}
    for item in (text or "").split(","):
        name, sep, shorthash = item.partition(":")
        if sep and name.strip() and shorthash.strip():
            res[name.strip()] = shorthash.strip().lower()
    return res


def _local_names_by_shorthash() -> dict[str, str]:
    """{shorthash: name} of the local hypernetworks (hashes come from the cache, computed once per file)."""
    if not shared.hypernetworks:
        hypernetwork.refresh_hypernetworks()
    res = {}
    for name, filename in shared.hypernetworks.items():
        try:
            sha256 = hashes.sha256(filename, f"hypernet/{name}")
        except OSError:
            continue
        if sha256:
            res.setdefault(sha256[0:10], name)
    return res


def infotext_pasted(infotext: str, d: dict) -> None:
    """on_infotext_pasted callback: rewrites only d["Prompt"]."""
    prompt = d.get("Prompt")
    if not isinstance(prompt, str):
        return
    name = d.get("Hypernet")
    if isinstance(name, str) and name.strip() and name.strip() != "None":
        name = name.strip()
        if name not in shared.hypernetworks:
            name = hypernetwork.find_closest_hypernetwork_name(name) or name
        if f"<hypernet:{name}:" not in prompt and f"<hypernet:{name}>" not in prompt:
            prompt += f"<hypernet:{name}:{d.get('Hypernet strength', '1.0')}>"

    wanted = parse_hypernet_hashes(d.get("Hypernet hashes", ""))
    if wanted:
        local = _local_names_by_shorthash()

        def replace(m: re.Match) -> str:
            found = local.get(wanted.get(m.group(1), ""))
            return f"<hypernet:{found}" if found else m.group(0)

        prompt = re_hypernet_tag.sub(replace, prompt)
    d["Prompt"] = prompt
