"""The Hypernetworks card page (A1111 name and item fields): one card per `.pt` under --hypernetwork-dir.

A card inserts `<hypernet:NAME:` + the default multiplier + `>`; its preview is `<stem>.preview.<fmt>` (or
`<stem>.<fmt>`); it is found by its path and, once hashed, its sha256. Files are listed, not loaded, so a broken
file still gets a card (and is reported when a prompt uses it).
"""
from __future__ import annotations

import os

from modules import errors, hashes, shared, ui_extra_networks
from modules.hypernetworks import hypernetwork
from modules.ui_extra_networks import quote_js


class ExtraNetworksPageHypernetworks(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Hypernetworks")
        self._listed = False

    def refresh(self) -> None:
        hypernetwork.refresh_hypernetworks()
        self._listed = True

    def _ensure_listed(self) -> None:
        if not self._listed:  # the first look at the page lists the folder; later ones wait for Refresh
            self.refresh()

    def items_version(self):
        return len(shared.hypernetworks), hash(tuple(shared.hypernetworks.items()))

    def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict | None:
        self._ensure_listed()
        full_path = shared.hypernetworks.get(name)
        if full_path is None:
            return None
        path, _ext = os.path.splitext(full_path)
        sha256 = hashes.sha256_from_cache(full_path, f"hypernet/{name}")
        search_terms = [self.search_terms_from_path(full_path)]
        if sha256:
            search_terms.append(sha256)
        item = {
            "name": name,
            "filename": full_path,
            "shorthash": sha256[0:10] if sha256 else "",
            "preview": self.find_preview(path),
            "description": self.find_description(path),
            "search_terms": search_terms,
            "prompt": quote_js(f"<hypernet:{name}:") + " + opts.extra_networks_default_multiplier + " + quote_js(">"),
            "local_preview": f"{path}.preview.{shared.opts.samples_format}",
            "sort_keys": {"default": index, **self.get_sort_keys(full_path)},
        }
        self.read_user_metadata(item)
        return item

    def list_items(self):
        self._ensure_listed()
        names = list(shared.hypernetworks)  # a copy: a rescan from another thread may change the dict
        for index, name in enumerate(names):
            try:
                item = self.create_item(name, index)
            except Exception as e:  # one unreadable file must not hide the others
                errors.display(e, f"creating the Hypernetworks card for {name}")
                item = {"name": name, "filename": shared.hypernetworks.get(name, ""), "prompt": None,
                        "search_terms": [name], "sort_keys": {"default": index, "name": name.lower()},
                        "error": f"{type(e).__name__}: {e}"}
            if item is not None:
                yield item

    def allowed_directories_for_previews(self) -> list[str]:
        return [shared.cmd_opts.hypernetwork_dir]
