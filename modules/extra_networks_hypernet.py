"""`<hypernet:NAME>` / `<hypernet:NAME:MULT>` in prompts (A1111 name and syntax).

Differences from A1111, on purpose: an unknown name or a bad multiplier is reported with p.comment instead of
being skipped silently; the `sd_hypernetwork` option adds its tag to a prompt once, not on every batch; the
networks stop applying when the job ends; and the infotext records `Hypernet hashes` so an image says which
files made it (the tags themselves stay in the prompt, as in A1111).
"""
from __future__ import annotations

from modules import extra_networks, shared
from modules.hypernetworks import hypernetwork


class ExtraNetworkHypernet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("hypernet")

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
