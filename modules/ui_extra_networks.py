"""Extra-network card pages (A1111 names): the page base class, the page registry and the pane's gradio frame.

Unlike A1111, the server never builds card HTML. `GET /sd_extra_networks/cards` returns card *data* as JSON and
`javascript/extraNetworks.js` renders only the cards in view, so ten thousand LoRAs cost one JSON download, not
ten thousand DOM nodes. Every string reaches the page through textContent or attribute setters, never as markup
(the one exception is a description when the user turned on `extra_networks_card_description_is_html`).

The rest lives next door: folder listings (extra_networks_listing), card data (extra_networks_cards), routes
(extra_networks_routes). Their A1111-visible names are re-exported here.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import inspect
import os
import threading
import urllib.parse
from typing import Any, Iterable

from modules import errors, extra_networks, extra_networks_routes, served_files, shared, ui_extra_networks_user_metadata
from modules.extra_networks_cards import (  # noqa: F401  (A1111 names, re-exported)
    build_cards_payload,
    card_from_item,
    card_options,
    card_options_key,
    cover_images_from_metadata,
    loaded_model_family,
    prompt_parts_from_js,
    quote_js,
)
from modules.extra_networks_listing import DirectoryLister

extra_pages: list["ExtraNetworksPage"] = []
allowed_dirs: set[str] = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]
_cards_lock = threading.Lock()


def allowed_preview_extensions_with_extra(extra_extensions: Iterable[str] = ()) -> list[str]:
    """A list, not a set, so the preview lookup order is the same on every run (fixes A1111 13B-15)."""
    result = list(default_allowed_preview_extensions)
    for ext in extra_extensions:
        ext = (ext or "").lower().lstrip(".")
        if ext and ext not in result:
            result.append(ext)
    return result


def allowed_preview_extensions() -> list[str]:
    return allowed_preview_extensions_with_extra((shared.opts.samples_format,))


# --- pages --------------------------------------------------------------------------------------------------------
class ExtraNetworksPage:
    """One tab of cards. Subclasses implement list_items(), create_item() and allowed_directories_for_previews()."""

    def __init__(self, title: str):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.id_page = self.extra_networks_tabname
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata: dict[str, Any] = {}
        self.items: dict[str, dict] = {}
        self.lister = DirectoryLister()
        self.generation = 0  # bumped by refresh; part of the cards cache key
        self._cards_cache: dict[tuple, tuple[bytes, bytes, str]] = {}
        self._card_cache: dict[str, tuple] = {}  # item name → (item, options key, card JSON bytes)
        self._last_payload: tuple[bytes, bytes, str] | None = None

    # A1111 API -----------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        pass

    def list_items(self) -> Iterable[dict]:
        raise NotImplementedError()

    def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict | None:
        raise NotImplementedError()

    def allowed_directories_for_previews(self) -> list[str]:
        return []

    def create_user_metadata_editor(self, ui, tabname: str):
        return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, self)

    def read_user_metadata(self, item: dict, use_cache: bool = True) -> None:
        filename = item.get("filename", None)
        sidecar = os.path.splitext(filename)[0] + ".json" if filename else ""
        if sidecar and (not use_cache or self.lister.exists(sidecar)) and not served_files.readable_in_page(
                self, sidecar):
            filename = None  # a sidecar that is a link out of the page's folders is not read
        metadata = extra_networks.get_user_metadata(filename, lister=self.lister if use_cache else None)
        desc = metadata.get("description", None)
        if desc is not None:
            item["description"] = desc
        item["user_metadata"] = metadata

    def link_preview(self, filename: str) -> str:
        quoted = urllib.parse.quote(filename.replace("\\", "/"))
        mtime, _ = self.lister.mctime(filename)
        return f"./sd_extra_networks/thumb?filename={quoted}&mtime={mtime}"

    def search_terms_from_path(self, filename: str, possible_directories: list[str] | None = None) -> str:
        """The path relative to the parent of its root folder, e.g. `Lora/chars/x.safetensors`."""
        abspath = filename if os.path.isabs(filename) else os.path.abspath(filename)
        for parentdir in (possible_directories if possible_directories is not None
                          else self.allowed_directories_for_previews()):
            parentdir = os.path.dirname(os.path.abspath(parentdir)).rstrip(os.sep) + os.sep
            if abspath.startswith(parentdir):
                return abspath[len(parentdir):].replace("\\", "/")
        return ""

    def get_sort_keys(self, path: str) -> dict:
        """date_created is the creation time and date_modified the mtime (A1111 swaps them: 13B-14)."""
        mtime, created = self.lister.mctime(path)
        return {
            "date_created": int(created),
            "date_modified": int(mtime),
            "name": os.path.basename(path).lower(),
            "path": path.replace("\\", "/").lower(),
        }

    def find_preview_path(self, path: str) -> str | None:
        """The preview file of `path` (the item's file without its extension): every `<stem>.preview.<ext>`
        first, then `<stem>.<ext>`, each in the fixed extension order (png, jpg, jpeg, webp, gif, then
        samples_format), so the choice is the same on every run (A1111 13B-15 picks by set order)."""
        dirname, stem = self.lister._split(path)
        names = self.lister.names_in(dirname)
        exts = allowed_preview_extensions()
        for pattern in ("{}.preview.{}", "{}.{}"):
            for ext in exts:
                candidate = pattern.format(stem, ext)
                if candidate in names and served_files.readable_in_page(self, os.path.join(dirname, candidate)):
                    return os.path.join(dirname, candidate)
        return None

    def find_preview(self, path: str) -> str | None:
        found = self.find_preview_path(path)
        return self.link_preview(found) if found else None

    def find_embedded_preview(self, path: str, name: str, metadata: dict | None) -> str | None:
        if cover_images_from_metadata(metadata):
            quoted = urllib.parse.quote(name)
            return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={quoted}&index=0"
        return None

    def find_description(self, path: str) -> str | None:
        for candidate in (f"{path}.txt", f"{path}.description.txt"):
            if not self.lister.exists(candidate) or not served_files.readable_in_page(self, candidate):
                continue
            try:
                with open(candidate, "r", encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                pass
        return None

    def items_version(self) -> Any:
        """A cheap fingerprint of the listed items; None disables the cards cache. Pages override it."""
        return None

    def version_filter(self) -> dict | None:
        """How the browser hides cards made for another model family (see javascript/extraNetworks.js):
        {"show_all": bool, "hide_unknown_for": [families]}; None shows every card. The filter runs in the
        browser so the card data does not depend on the loaded model and switching models re-filters at once."""
        return None

    # cards ---------------------------------------------------------------------------------------------------------
    def do_refresh(self) -> None:
        """Rescans (page.refresh) with a fresh directory lister. Card data is rebuilt from the new listing, but
        items and cards that did not change are reused, and an unchanged result keeps its etag."""
        self.lister.reset()
        self.refresh()
        self.generation += 1
        self._cards_cache.clear()

    def forget_item(self, name: str) -> None:
        """Drops what is cached for one item (its files were written)."""
        self._card_cache.pop(name, None)
        self._cards_cache.clear()

    def background_status(self) -> dict | None:
        """Work the page does in the background (the Lora page hashes new files): {"running", "done", "total",
        ...} for the pane's progress line, or None."""
        return None

    def cards_json(self, tabname: str) -> tuple[bytes, bytes, str]:
        """The card pane's data for one tab as (JSON, gzipped JSON, etag), cached until the listing or the
        options change."""
        version = self.items_version()
        key = (tabname, self.generation, version, card_options_key())
        if version is not None:
            cached = self._cards_cache.get(key)
            if cached is not None:
                return cached
        with _cards_lock:
            head, fragments = build_cards_payload(self, tabname)
        body = head[:-1] + b',"items":[' + b",".join(fragments) + b"]}"
        last = self._last_payload
        if last is not None and last[0] == body:
            result = last
        else:
            result = (body, gzip.compress(body, compresslevel=3), '"' + hashlib.sha1(body).hexdigest()[:20] + '"')
        self._last_payload = result
        if version is not None:
            self._cards_cache.clear()
            self._cards_cache[key] = result
        return result


# --- registry -----------------------------------------------------------------------------------------------------
def initialize() -> None:
    extra_pages.clear()
    allowed_dirs.clear()


def register_page(page: ExtraNetworksPage) -> None:
    """Registers a page; its preview folders become servable by /sd_extra_networks/thumb."""
    extra_pages.append(page)
    allowed_dirs.update(os.path.abspath(x) for x in page.allowed_directories_for_previews() if x)


def register_default_pages() -> None:
    """A1111 registers Textual Inversion, Hypernetworks and Checkpoints here; this host has Hypernetworks."""
    from modules.ui_extra_networks_hypernets import ExtraNetworksPageHypernetworks
    register_page(ExtraNetworksPageHypernetworks())


def pages_in_preferred_order(pages: list[ExtraNetworksPage]) -> list[ExtraNetworksPage]:
    tab_order = [x.lower().strip() for x in shared.opts.ui_extra_networks_tab_reorder.split(",")]

    def tab_name_score(name: str) -> int:
        name = name.lower()
        for i, possible_match in enumerate(tab_order):
            if possible_match and possible_match in name:
                return i
        return len(pages)

    tab_scores = {page.name: (tab_name_score(page.name), original_index) for original_index, page in enumerate(pages)}
    return sorted(pages, key=lambda x: tab_scores[x.name])


def get_page(page_name: str) -> ExtraNetworksPage | None:
    for page in extra_pages:
        if page.extra_networks_tabname == page_name or page.name == page_name:
            return page
    return None


def pane_html(page: ExtraNetworksPage, tabname: str) -> str:
    """The static frame of a card pane; the browser fills it from /sd_extra_networks/cards."""
    pid = html.escape(f"{tabname}_{page.extra_networks_tabname}")
    data = f'data-tabname="{html.escape(tabname)}" data-page="{html.escape(page.extra_networks_tabname)}"'
    sort_buttons = "".join(
        f'<button type="button" class="extra-network-control--sort" data-sort-key="{key}" '
        f'title="Sort by {label.lower()}">{label}</button>'
        for key, label in (("default", "Path"), ("name", "Name"), ("date_created", "Date created"),
                           ("date_modified", "Date modified")))
    return f"""
<div class="extra-network-pane" id="{pid}_pane" {data}>
  <div class="extra-network-controls">
    <input type="search" id="{pid}_extra_search" class="extra-network-search" placeholder="Search"
           autocomplete="off" spellcheck="false" aria-label="Search {html.escape(page.title)}">
    <div class="extra-network-sort-buttons" role="group" aria-label="Sort">{sort_buttons}</div>
    <button type="button" class="extra-network-control--sort-dir" data-sortdir="Ascending"
            title="Sort ascending">&#8593;</button>
    <button type="button" class="extra-network-control--tree" title="Show or hide the folders"
            aria-label="Show or hide the folders"><svg viewBox="0 0 24 24" class="control-icon" aria-hidden="true">
            <path d="M3 6h6l2 2h10v11H3z"/></svg></button>
    <button type="button" class="extra-network-control--refresh" id="{pid}_extra_refresh"
            title="Rescan the folders">&#10227; Refresh</button>
    <span class="extra-network-count" aria-live="polite"></span>
  </div>
  <div class="extra-network-body">
    <div class="extra-network-dirs" id="{pid}_dirs"></div>
    <div class="extra-network-cards-scroll" id="{pid}_cards" tabindex="-1">
      <div class="extra-network-cards-sizer"><div class="extra-network-cards-window"></div></div>
      <div class="extra-network-message">Loading...</div>
    </div>
  </div>
</div>"""


def _supported_kwargs(component, **kwargs) -> dict:
    """The keyword arguments this gradio version's component accepts (gradio 6 has options 3.41 lacks)."""
    try:
        params = inspect.signature(component.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in kwargs.items() if k in params}


def create_ui(tabname: str) -> list[tuple[ExtraNetworksPage, Any]]:
    """Adds one gr.Tab per registered page to the current Tabs; returns [(page, tab)]. Works with gradio 6 and
    with A1111's gradio 3.41: options only gradio 6 knows are passed only when the component takes them."""
    import gradio as gr

    result = []
    for page in pages_in_preferred_order(extra_pages):
        tab_id = f"{tabname}_{page.extra_networks_tabname}"
        tab_kwargs = _supported_kwargs(gr.Tab, elem_classes=["extra-page"], render_children=True)
        with gr.Tab(page.title, id=tab_id, elem_id=tab_id, **tab_kwargs) as tab:
            html_kwargs = _supported_kwargs(gr.HTML, js_on_load=None, apply_default_css=False, padding=False)
            gr.HTML(pane_html(page, tabname), elem_id=f"{tab_id}_pane_html", **html_kwargs)
        result.append((page, tab))
    return result


# --- routes -------------------------------------------------------------------------------------------------------
def is_servable_preview(filename: str) -> bool:
    """True when filename, symlinks resolved, is an image inside a page's folders (see modules/served_files.py)."""
    return served_files.servable_image(extra_pages, filename) is not None


def warm_cards_cache(tabnames: Iterable[str] = ("txt2img",)) -> threading.Thread:
    """Builds every page's card data in the background so the first look at a pane is instant."""
    def build():
        for page in list(extra_pages):
            for tabname in tabnames:
                try:
                    page.cards_json(tabname)
                except Exception as e:
                    errors.display(e, f"preparing {page.title} cards")

    thread = threading.Thread(target=build, name="cards-cache", daemon=True)
    thread.start()
    return thread


def add_pages_to_demo(app) -> None:
    """Adds the /sd_extra_networks/* routes (A1111's name; behind the UI login when one is set)."""
    extra_networks_routes.add_routes(app, extra_pages, get_page)
