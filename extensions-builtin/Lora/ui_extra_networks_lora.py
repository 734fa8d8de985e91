"""The Lora card page (A1111 name and methods): turns `networks.available_networks` into card items.

Items are cached per file and rebuilt only when the file's record, its neighbours (preview, sidecar JSON,
description), its hash or the name maps change, so rescanning ten thousand LoRAs rebuilds only what changed.

Two hosts: ours sends card data as JSON (`cards_json`) and its lister takes the discovery walk's listings (`prime`,
`names_in`); A1111 v1.10.1 renders each item into HTML itself (`create_html` → `create_item_html`) with a
`MassFileLister` it resets on every render. Those extras are detected, never assumed.
"""
from __future__ import annotations

import html
import json
import math
import os

import lora_discovery
import lora_hashing
import lora_layers
import lora_tag_names
import networks
import ui_edit_user_metadata
import ui_edit_user_metadata_a1111

from modules import errors, shared, ui_extra_networks, ui_extra_networks_user_metadata

# Our host builds the card pane from JSON; A1111 from the HTML its page class renders (create_item_html).
HOST_CARDS_JSON = hasattr(ui_extra_networks.ExtraNetworksPage, "cards_json")
# Our host's editor dialog is built in the browser from editor_fields; A1111's from gradio components.
HOST_EDITOR_FIELDS = hasattr(ui_extra_networks_user_metadata.UserMetadataEditor, "editor_fields")

_versions = ("Unknown", "SD1", "SD2", "SDXL", "SD3", "Flux", "Chroma")
SEARCH_TAGS = 24  # training tags a card can be found by (the editor's tag cloud shows as many)


def quote_js(s) -> str:
    """A JS string literal (JSON rules: quotes, backslashes and newlines are safe; A1111's own quote_js leaves
    newlines raw, which breaks a card whose activation text has several lines)."""
    return json.dumps(str(s), ensure_ascii=False)


def _model_family() -> str:
    """The loaded model's family ("SD1", "SD2", "SDXL", ...), "" without a model: the host's own answer when it
    has one (ours does not wait for a model that is still loading), else A1111's `is_sdxl`/`is_sd2`/`is_sd1`."""
    if hasattr(ui_extra_networks, "loaded_model_family"):
        return ui_extra_networks.loaded_model_family()
    model = getattr(shared, "sd_model", None)
    if model is None:
        return ""
    return lora_layers.model_family(model, 0) or "Unknown"


def _version_name(value) -> str:
    """`SdVersion.SDXL`, "SDXL" or None → "SDXL" / "Unknown"."""
    name = getattr(value, "name", value)
    return name if name in _versions else "Unknown"


def _user_version(item: dict, user_metadata: dict) -> None:
    """The version the user set in the editor wins over the file's (and then no other family is claimed)."""
    sd_version = user_metadata.get("sd version")
    if sd_version in _versions and sd_version != item.get("sd_version"):
        item["sd_version"], item["sd_also"] = sd_version, []


def _format_weight(value) -> str | None:
    """A preferred weight as prompt text; None when it is unset or 0 (then the default multiplier applies)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return None
    if weight == 0 or not math.isfinite(weight):  # "NaN" kept as text from an older editor save
        return None
    return str(int(weight)) if weight.is_integer() else repr(weight)


def _load_error(lora_on_disk) -> str | None:
    for attr in ("error", "load_error", "read_error"):
        value = getattr(lora_on_disk, attr, None)
        if value:
            return str(value)
    return None


def _training_tags(metadata: dict) -> str:
    """The most frequent training tags, for search."""
    try:
        return ", ".join(tag for tag, _ in ui_edit_user_metadata.build_tags(metadata)[:SEARCH_TAGS])
    except Exception:  # odd ss_tag_frequency shapes must not lose the card
        return ""


class _CachedItem:
    __slots__ = ("entry", "token", "listing", "signature", "item")

    def __init__(self, entry, token, listing, signature, item):
        self.entry, self.token, self.listing, self.signature, self.item = entry, token, listing, signature, item


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")
        self.allow_negative_prompt = False
        self._item_cache: dict[str, _CachedItem] = {}
        self._suffix_cache: tuple[tuple, tuple[str, ...]] = ((), ())
        self._tabnames: set[str] = set()
        try:
            lora_hashing.start()  # the web UI hashes new files in the background
            if HOST_CARDS_JSON:  # A1111 shows new hashes at the next render
                lora_hashing.on_finished(self._rebuild_cards)
        except Exception as e:
            errors.display(e, "starting the Lora background hashing")

    def _prime_lister(self, replace: bool) -> None:
        """The discovery walk already stat'ed every file: our host's lister takes its listings (A1111's has no
        `prime` and lists each folder once per render itself)."""
        prime = getattr(self.lister, "prime", None)
        if callable(prime):
            prime(lora_discovery.dir_listings(), replace=replace)

    def refresh(self) -> None:
        networks.list_available_networks()
        self._prime_lister(replace=True)

    def items_version(self):
        return lora_discovery.maps_generation, len(networks.available_networks), lora_hashing.status()["generation"]

    def cards_json(self, tabname: str):
        self._tabnames.add(tabname)
        return super().cards_json(tabname)

    def _rebuild_cards(self) -> None:
        """New hashes change many cards: rebuild the card data now (in the hashing thread), not on the next
        look at the pane."""
        for tabname in list(self._tabnames) or ["txt2img"]:
            try:
                self.cards_json(tabname)
            except Exception as e:
                errors.display(e, "preparing Lora cards")

    def background_status(self) -> dict | None:
        status = lora_hashing.status()
        return {"task": "hashing", "label": "Hashing", **status}

    # --- items ------------------------------------------------------------------------------------------------------
    def _suffixes(self) -> tuple[str, ...]:
        """The neighbours an item depends on: sidecar, descriptions, every possible preview."""
        exts = tuple(ui_extra_networks.allowed_preview_extensions())
        if self._suffix_cache[0] != exts:
            self._suffix_cache = (exts, (".json", ".txt", ".description.txt", *(f".preview.{e}" for e in exts),
                                         *(f".{e}" for e in exts)))
        return self._suffix_cache[1]

    def _token(self, lora_on_disk) -> tuple:
        """What an item takes from outside its own files: its names (which depend on the other files: alias
        collisions, shared stems) and hash, and two options. Cheap, so adding one file rebuilds one item."""
        shared_stem = lora_discovery.shares_stem(lora_on_disk)
        return (lora_on_disk.name, lora_on_disk.get_alias(), shared_stem,
                lora_discovery.path_name(lora_on_disk) if shared_stem else "", lora_on_disk.hash,
                shared.opts.samples_format)

    def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict | None:
        lora_on_disk = networks.available_networks.get(name)
        if lora_on_disk is None:
            return None
        item = self._cached_item(lora_on_disk)
        if enable_filter and self._filtered_out(item["sd_version"], item.get("sd_also") or ()):
            return None
        return item

    def _cached_item(self, lora_on_disk) -> dict:
        """The item for a record, reused while the record, its neighbouring files and the name maps hold."""
        dirname, base = os.path.split(lora_on_disk.filename)
        stem = os.path.splitext(base)[0]
        names_in = getattr(self.lister, "names_in", None)
        listing = names_in(dirname) if callable(names_in) else None
        token = self._token(lora_on_disk)
        cached = self._item_cache.get(lora_on_disk.filename)
        if cached is not None and cached.entry is lora_on_disk and cached.token == token \
                and listing is not None and cached.listing is listing:  # nothing in the folder changed
            return cached.item
        if listing is not None:
            signature = tuple(listing.get(stem + s) for s in self._suffixes())
        else:  # A1111's lister: one folder listing per render, then a dict look-up per neighbour
            signature = tuple(self.lister.find(os.path.join(dirname, stem + s)) for s in self._suffixes())
        if cached is not None and cached.entry is lora_on_disk and cached.token == token \
                and cached.signature == signature:  # the folder changed, but not this file's neighbours
            cached.listing = listing
            return cached.item
        item = self._build_item(lora_on_disk)
        self._item_cache[lora_on_disk.filename] = _CachedItem(lora_on_disk, token, listing, signature, item)
        return item

    def _build_item(self, lora_on_disk) -> dict:
        name = lora_on_disk.name
        path, _ext = os.path.splitext(lora_on_disk.filename)
        alias = lora_on_disk.get_alias()
        title = name
        if lora_discovery.shares_stem(lora_on_disk):
            # Same file name in several folders: show and insert the path-qualified name (A1111 13A-12).
            title = lora_discovery.path_name(lora_on_disk)
            if alias == name:
                alias = title
        search_terms = [self.search_terms_from_path(lora_on_disk.filename)]
        file_alias = getattr(lora_on_disk, "alias", None)
        if file_alias and file_alias != name:
            search_terms.append(file_alias)
        if getattr(lora_on_disk, "hash", None):
            search_terms.append(lora_on_disk.hash)
        metadata = getattr(lora_on_disk, "metadata", None) or {}
        tags = _training_tags(metadata)
        if tags:
            search_terms.append(tags)
        item = {
            "name": name,
            "title": title,
            "alias": alias,
            "filename": lora_on_disk.filename,
            "shorthash": getattr(lora_on_disk, "shorthash", None) or "",
            "preview": self.find_preview(path) or self._embedded_preview(path, name, metadata),
            "description": self.find_description(path),
            "search_terms": search_terms,
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": metadata,
            "sort_keys": self.get_sort_keys(lora_on_disk.filename),
            "sd_version": _version_name(getattr(lora_on_disk, "sd_version", None)),
            "sd_also": [f for f in getattr(lora_on_disk, "also_fits", ()) if f in _versions],
            "error": _load_error(lora_on_disk),
        }
        self.read_user_metadata(item)
        user_metadata = item["user_metadata"]

        activation_text = user_metadata.get("activation text")
        weight = _format_weight(user_metadata.get("preferred weight", 0.0))
        tag_name = lora_tag_names.tag_name(lora_on_disk, alias)
        if tag_name is None:  # no name of this file fits in a tag: the card says so and inserts nothing
            problem = lora_tag_names.no_tag_message(lora_on_disk, alias)
            item["error"] = f"{item['error']}; {problem}" if item.get("error") else problem
            item["prompt"], item["prompt_parts"] = quote_js(""), []
            item["negative_prompt"], item["negative_prompt_parts"] = quote_js(""), []
            _user_version(item, user_metadata)
            return item
        alias = tag_name
        # A1111's JS expressions (other code may read them) and the same thing as parts, which the card
        # framework uses without parsing.
        item["prompt"] = quote_js(f"<lora:{alias}:") + " + " + (
            quote_js(weight) if weight else "opts.extra_networks_default_multiplier") + " + " + quote_js(">")
        parts = [{"text": f"<lora:{alias}:"},
                 {"text": weight} if weight else {"opt": "extra_networks_default_multiplier"}, {"text": ">"}]
        if activation_text:
            item["prompt"] += " + " + quote_js(" " + str(activation_text))
            parts.append({"text": " " + str(activation_text)})
        item["prompt_parts"] = parts

        negative_prompt = user_metadata.get("negative text")
        item["negative_prompt"] = quote_js(f"({negative_prompt}:1)") if negative_prompt else quote_js("")
        item["negative_prompt_parts"] = [{"text": f"({negative_prompt}:1)"}] if negative_prompt else []

        _user_version(item, user_metadata)
        return item

    def _filtered_out(self, sd_version: str, also: tuple | list = ()) -> bool:
        """A1111's rule: hide LoRAs made for another model family unless `lora_show_all`; a file that also fits
        the loaded family in full (`also`: an SDXL text-encoder Lora on SD3) is shown."""
        if getattr(shared.opts, "lora_show_all", False):
            return False
        family = _model_family()
        if family in ("", "Unknown"):
            return False
        if sd_version == "Unknown":
            return family in (getattr(shared.opts, "lora_hide_unknown_for_versions", None) or [])
        return sd_version != family and family not in also

    def version_filter(self) -> dict:
        # The same rule as _filtered_out, applied in the browser: a checkpoint switch re-filters at once (13A-11).
        return {"show_all": bool(getattr(shared.opts, "lora_show_all", False)),
                "hide_unknown_for": list(getattr(shared.opts, "lora_hide_unknown_for_versions", None) or [])}

    def list_items(self):
        # The discovery walk's listings fill folders the lister has not seen (the first build after start).
        self._prime_lister(replace=False)
        # Copy first: a rescan from another thread may replace entries while we iterate.
        entries = list(networks.available_networks.items())
        live = set()
        for index, (name, lora_on_disk) in enumerate(entries):
            live.add(lora_on_disk.filename)
            try:
                item = self._cached_item(lora_on_disk)
            except Exception as e:  # one unreadable file must not hide the others
                errors.display(e, f"creating the Lora card for {name}")
                filename = getattr(lora_on_disk, "filename", "")
                item = {"name": name, "filename": filename, "prompt": quote_js(""), "negative_prompt": quote_js(""),
                        "prompt_parts": [], "search_terms": [name], "sort_keys": {"name": name.lower()},
                        "local_preview": f"{os.path.splitext(filename)[0]}.{shared.opts.samples_format}",
                        "error": f"{type(e).__name__}: {e}"}
            if not HOST_CARDS_JSON:  # A1111's "Sort by path" sorts by this key: the listing's natural path order
                item = {**item, "sort_keys": {"default": index, **(item.get("sort_keys") or {})}}
            yield item
        for filename in [f for f in self._item_cache if f not in live]:
            del self._item_cache[filename]

    def allowed_directories_for_previews(self) -> list[str]:
        dirs = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
        return [d for d in dirs if d]

    def _embedded_preview(self, path: str, name: str, metadata: dict) -> str | None:
        try:
            return self.find_embedded_preview(path, name, metadata)
        except (ValueError, TypeError):  # A1111's reads ssmd_cover_images as JSON text; an odd value has none
            return None

    def create_user_metadata_editor(self, ui, tabname: str):
        editor = ui_edit_user_metadata.LoraUserMetadataEditor if HOST_EDITOR_FIELDS else \
            ui_edit_user_metadata_a1111.LoraUserMetadataEditor
        return editor(ui, tabname, self)

    # --- A1111's HTML cards ---------------------------------------------------------------------------------------
    def create_item_html(self, tabname: str, item: dict, template: str | None = None):
        """A1111 renders cards from items itself: what it puts into the page unescaped (search terms: training
        tags, aliases) is escaped here, a card's problem is shown in its description, and the card gets what
        this extension's javascript/lora_cards_drag.js needs to drag it into a prompt."""
        adapted = dict(item)
        adapted["search_terms"] = [html.escape(str(t)) for t in item.get("search_terms") or []]
        error = item.get("error")
        if error:
            description = item.get("description") or ""
            if getattr(shared.opts, "extra_networks_card_description_is_html", False):
                adapted["description"] = f"⚠ {html.escape(str(error))}<br>{description}"
            else:
                adapted["description"] = f"⚠ {error}\n{description}"
        res = super().create_item_html(tabname, adapted, template)
        if isinstance(res, str) and res.startswith('<div class="card" ') and item.get("prompt_parts"):
            parts = html.escape(json.dumps(item["prompt_parts"], ensure_ascii=False))
            res = f'<div class="card" draggable="true" data-lora-prompt="{parts}" ' + res[len('<div class="card" '):]
        return res
