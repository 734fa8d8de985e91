"""The Lora card page (A1111 name and methods): turns `networks.available_networks` into card items."""
from __future__ import annotations

import os

import networks

from modules import errors, shared, ui_extra_networks
from modules.ui_extra_networks import quote_js

_versions = ("Unknown", "SD1", "SD2", "SDXL")


def _version_name(value) -> str:
    """`SdVersion.SDXL`, "SDXL" or None → "SDXL" / "Unknown"."""
    name = getattr(value, "name", value)
    return name if name in _versions else "Unknown"


def _format_weight(value) -> str | None:
    """A preferred weight as prompt text; None when it is unset or 0 (then the default multiplier applies)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return None
    if weight == 0:
        return None
    return str(int(weight)) if weight.is_integer() else repr(weight)


def _load_error(lora_on_disk) -> str | None:
    for attr in ("error", "load_error", "read_error"):
        value = getattr(lora_on_disk, attr, None)
        if value:
            return str(value)
    return None


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")
        self.allow_negative_prompt = False

    def refresh(self) -> None:
        networks.list_available_networks()

    def items_version(self):
        return len(networks.available_networks), hash(tuple(networks.available_networks))

    def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict | None:
        lora_on_disk = networks.available_networks.get(name)
        if lora_on_disk is None:
            return None

        path, _ext = os.path.splitext(lora_on_disk.filename)
        alias = lora_on_disk.get_alias()
        search_terms = [self.search_terms_from_path(lora_on_disk.filename)]
        file_alias = getattr(lora_on_disk, "alias", None)
        if file_alias and file_alias != name:
            search_terms.append(file_alias)
        if getattr(lora_on_disk, "hash", None):
            search_terms.append(lora_on_disk.hash)
        metadata = getattr(lora_on_disk, "metadata", None) or {}
        item = {
            "name": name,
            "alias": alias,
            "filename": lora_on_disk.filename,
            "shorthash": getattr(lora_on_disk, "shorthash", None) or "",
            "preview": self.find_preview(path) or self.find_embedded_preview(path, name, metadata),
            "description": self.find_description(path),
            "search_terms": search_terms,
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": metadata,
            "sort_keys": {"default": index, **self.get_sort_keys(lora_on_disk.filename)},
            "sd_version": _version_name(getattr(lora_on_disk, "sd_version", None)),
            "error": _load_error(lora_on_disk),
        }
        self.read_user_metadata(item)
        user_metadata = item["user_metadata"]

        activation_text = user_metadata.get("activation text")
        weight = _format_weight(user_metadata.get("preferred weight", 0.0))
        item["prompt"] = quote_js(f"<lora:{alias}:") + " + " + (
            quote_js(weight) if weight else "opts.extra_networks_default_multiplier") + " + " + quote_js(">")
        if activation_text:
            item["prompt"] += " + " + quote_js(" " + str(activation_text))

        negative_prompt = user_metadata.get("negative text")
        item["negative_prompt"] = quote_js(f"({negative_prompt}:1)") if negative_prompt else quote_js("")

        sd_version = user_metadata.get("sd version")
        if sd_version in _versions:
            item["sd_version"] = sd_version
        if enable_filter and self._filtered_out(item["sd_version"]):
            return None
        return item

    def _filtered_out(self, sd_version: str) -> bool:
        """A1111's rule: hide LoRAs made for another model family unless `lora_show_all`."""
        if getattr(shared.opts, "lora_show_all", False):
            return False
        family = ui_extra_networks.loaded_model_family()
        if family in ("", "Unknown"):
            return False
        if sd_version == "Unknown":
            return family in (getattr(shared.opts, "lora_hide_unknown_for_versions", None) or [])
        return sd_version != family

    def version_filter(self) -> dict:
        # The same rule as _filtered_out, applied in the browser: a checkpoint switch re-filters at once (13A-11).
        return {"show_all": bool(getattr(shared.opts, "lora_show_all", False)),
                "hide_unknown_for": list(getattr(shared.opts, "lora_hide_unknown_for_versions", None) or [])}

    def list_items(self):
        # Copy first: a rescan from another thread may replace entries while we iterate.
        names = list(networks.available_networks)
        for index, name in enumerate(names):
            try:
                item = self.create_item(name, index, enable_filter=False)
            except Exception as e:  # one unreadable file must not hide the others
                errors.display(e, f"creating the Lora card for {name}")
                lora_on_disk = networks.available_networks.get(name)
                item = {"name": name, "filename": getattr(lora_on_disk, "filename", ""), "prompt": None,
                        "search_terms": [name], "sort_keys": {"default": index, "name": name.lower()},
                        "error": f"{type(e).__name__}: {e}"}
            if item is not None:
                yield item

    def allowed_directories_for_previews(self) -> list[str]:
        dirs = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
        return [d for d in dirs if d]

    def create_user_metadata_editor(self, ui, tabname: str):
        from ui_edit_user_metadata import LoraUserMetadataEditor
        return LoraUserMetadataEditor(ui, tabname, self)
