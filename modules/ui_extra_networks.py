"""Extra-network card pages (A1111 names): the page base class, the page registry and the routes the card pane uses.

Unlike A1111, the server never builds card HTML. `GET /sd_extra_networks/cards` returns card *data* as JSON and
`javascript/extraNetworks.js` renders only the cards in view, so ten thousand LoRAs cost one JSON download, not
ten thousand DOM nodes. Every string reaches the page through textContent or attribute setters, never as markup
(the one exception is a description when the user turned on `extra_networks_card_description_is_html`).
"""
from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import html
import inspect
import json
import os
import re
import threading
import urllib.parse
from typing import Any, Iterable

from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from modules import atomic, errors, extra_networks, json_finite, served_files, shared

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


def quote_js(s: Any) -> str:
    """A JS string literal for `s` (JSON rules, so newlines and quotes are safe; A1111 dev behaviour)."""
    return json.dumps(str(s), ensure_ascii=False)


# --- prompt expressions -------------------------------------------------------------------------------------------
# A1111 pages describe what a card click inserts as a JS expression such as `"<lora:x:" + opts.a + ">"`. The page
# never evals it: it is parsed here into parts ({"text"} or {"opt"}) that the browser joins at click time.
_expr_token = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
                         r'|(?P<opt>opts\.[A-Za-z_]\w*)|(?P<plus>\+))\s*')


def prompt_parts_from_js(expression: str | None) -> list[dict] | None:
    """Parses `"a" + opts.b + 0.5` into [{"text": "a"}, {"opt": "b"}, {"text": "0.5"}]; None if it is anything else."""
    if expression is None:
        return []
    parts: list[dict] = []
    pos, expect_operand = 0, True
    text = expression.strip()
    if not text:
        return []
    while pos < len(text):
        m = _expr_token.match(text, pos)
        if m is None or m.end() == pos:
            return None
        pos = m.end()
        if m.group("plus"):
            if expect_operand:
                return None
            expect_operand = True
            continue
        if not expect_operand:
            return None
        expect_operand = False
        if m.group("str") is not None:
            try:
                parts.append({"text": json.loads(m.group("str"))})
            except ValueError:
                return None
        elif m.group("num") is not None:
            parts.append({"text": m.group("num")})
        else:
            parts.append({"opt": m.group("opt")[len("opts."):]})
    return None if expect_operand else parts


# --- directory listings -------------------------------------------------------------------------------------------
class DirectoryLister:
    """One os.scandir per folder per refresh: preview, description and sidecar look-ups become set look-ups."""

    def __init__(self):
        self._dirs: dict[str, dict[str, tuple[float, float]]] = {}
        self._stale: set[str] = set()  # folders written to since the listings in prime() were made
        self._real_dirs: dict[str, str] = {}  # folder → its realpath, for reading thousands of neighbours
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._dirs = {}
            self._stale = set()
            self._real_dirs = {}

    def real_dir(self, dirname: str) -> str:
        real = self._real_dirs.get(dirname)
        if real is None:
            real = self._real_dirs[dirname] = os.path.realpath(dirname)
        return real

    @staticmethod
    def _without_stale_temps(dirname: str, listing: dict) -> dict:
        """A scan is where a save killed mid-write gets cleaned up: its old `.tmp-*` file is removed."""
        temps = [name for name in listing if atomic.is_temp_name(name)]
        removed = set(atomic.remove_stale_temp_files(dirname, temps)) if temps else ()
        if not removed:
            return listing
        return {k: v for k, v in listing.items() if os.path.join(dirname, k) not in removed}

    def prime(self, listings: dict[str, dict[str, tuple[float, float]]], replace: bool = True) -> None:
        """Takes folder listings someone else already made (the Lora discovery walk stats every file once).
        replace=True: they are fresh (a rescan just made them); False: they only fill folders not seen yet."""
        with self._lock:
            if replace:
                self._stale = set()
            taken = [(d, listing) for d, listing in listings.items()
                     if replace or (d not in self._dirs and d not in self._stale)]
        for dirname, listing in taken:
            listing = self._without_stale_temps(dirname, listing)
            with self._lock:
                if replace or (dirname not in self._dirs and dirname not in self._stale):
                    self._dirs[dirname] = listing

    def invalidate(self, dirname: str) -> None:
        """Forgets one folder (a file was written there); the next look-up lists it again."""
        dirname = os.path.abspath(dirname)
        with self._lock:
            self._dirs.pop(dirname, None)
            self._real_dirs.pop(dirname, None)
            self._stale.add(dirname)

    def _listing(self, dirname: str) -> dict[str, tuple[float, float]]:
        listing = self._dirs.get(dirname)
        if listing is not None:
            return listing
        listing = {}
        try:
            with os.scandir(dirname) as it:
                for entry in it:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    created = getattr(st, "st_birthtime", None) or min(st.st_ctime, st.st_mtime)
                    listing[entry.name] = (st.st_mtime, created)
        except OSError:
            pass
        listing = self._without_stale_temps(dirname, listing)
        with self._lock:
            self._dirs[dirname] = listing
        return listing

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        if not os.path.isabs(path):
            path = os.path.abspath(path)
        return os.path.split(path)

    def exists(self, path: str) -> bool:
        dirname, name = self._split(path)
        return name in self._listing(dirname)

    def names_in(self, dirname: str) -> dict[str, tuple[float, float]]:
        """{file name: (mtime, creation time)} of one folder."""
        return self._listing(dirname)

    def mctime(self, path: str) -> tuple[float, float]:
        """(mtime, creation time) of a file, (0, 0) when it is missing."""
        dirname, name = self._split(path)
        return self._listing(dirname).get(name, (0.0, 0.0))


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
        from modules.ui_extra_networks_user_metadata import UserMetadataEditor
        return UserMetadataEditor(ui, tabname, self)

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


def cover_images_from_metadata(metadata: dict | None) -> list[str]:
    """The non-empty base64 images in `ssmd_cover_images` (a JSON list, possibly still a string)."""
    value = (metadata or {}).get("ssmd_cover_images")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    return [x for x in value if isinstance(x, str) and x]


def loaded_model_family() -> str:
    """The loaded model's family, without waiting for a model that is still loading."""
    try:
        from modules import sd_models
        model = getattr(sd_models.model_data, "sd_model", None)
    except Exception:
        model = None
    if model is None:
        return ""
    for attr, family in (("is_sdxl", "SDXL"), ("is_sd2", "SD2"), ("is_sd1", "SD1")):
        if getattr(model, attr, False):
            return family
    return "Unknown"


_card_option_keys = (
    "extra_networks_card_width", "extra_networks_card_height", "extra_networks_card_text_scale",
    "extra_networks_card_show_desc", "extra_networks_card_description_is_html", "extra_networks_card_order_field",
    "extra_networks_card_order", "extra_networks_tree_view_style", "extra_networks_tree_view_default_enabled",
    "extra_networks_tree_view_default_width", "extra_networks_show_hidden_directories",
    "extra_networks_hidden_models", "extra_networks_dir_button_function", "extra_networks_default_multiplier",
    "extra_networks_add_text_separator", "samples_format", "lora_show_all", "lora_hide_unknown_for_versions",
    "lora_preferred_name", "keyedit_precision_extra",
)


def card_options() -> dict:
    """The options the card pane needs in the browser (click weight, separator, card size, initial sort, ...)."""
    result = {}
    for key in _card_option_keys:
        try:
            result[key] = getattr(shared.opts, key)
        except AttributeError:
            continue
    return result


def card_options_key() -> str:
    return json.dumps(card_options(), sort_keys=True, default=str)


def _local_path(page: ExtraNetworksPage, filename: str) -> str:
    local_path = ""
    for reldir in page.allowed_directories_for_previews():
        absdir = os.path.abspath(reldir)
        if filename.startswith(absdir):
            local_path = filename[len(absdir):]
    return local_path


def card_from_item(page: ExtraNetworksPage, item: dict, index: int) -> dict | None:
    """Card data for the browser; None when the item must not be shown at all (hidden models: Never).

    Empty fields are left out: with ten thousand cards every byte counts ten thousand times.
    """
    filename = item.get("filename") or ""
    hidden_mode = shared.opts.extra_networks_hidden_models
    local_path = _local_path(page, filename)
    search_only = hidden_mode != "Always" and ("/." in local_path or "\\." in local_path)
    if search_only and hidden_mode == "Never":
        return None

    error = item.get("error")
    prompt_parts = item.get("prompt_parts")
    if prompt_parts is None:
        prompt_parts = prompt_parts_from_js(item.get("prompt"))
        if prompt_parts is None:
            prompt_parts, error = [], error or "this card's prompt expression could not be read"
    negative_parts = item.get("negative_prompt_parts")
    if negative_parts is None:
        negative_parts = prompt_parts_from_js(item.get("negative_prompt")) or []
    negative_parts = [p for p in negative_parts if p != {"text": ""}]

    name = str(item.get("name", ""))
    # "default" (Path) order is the listing order, i.e. the card's position in the list: not sent.
    sort_keys = {k: v for k, v in (item.get("sort_keys") or {}).items()
                 if k not in ("path", "default") and isinstance(v, (int, float, str))}
    user_metadata = item.get("user_metadata") or {}
    card = {
        "name": name,
        "filename": filename,
        "terms": [str(x).replace("\\", "/") for x in item.get("search_terms") or [] if x],
        "sort": sort_keys,
        "prompt": _compact_parts(prompt_parts),
    }
    optional = {
        "title": str(item.get("title") or ""),
        "alias": str(item.get("alias") or ""),
        "preview": item.get("preview") or "",
        "description": str(item.get("description") or ""),
        "activation": str(user_metadata.get("activation text") or ""),
        "negative": _compact_parts(negative_parts),
        "sd": str(item.get("sd_version") or ""),
        "error": str(error) if error else "",
    }
    card.update({k: v for k, v in optional.items() if v and v != name})
    if search_only:
        card["search_only"] = 1
    if item.get("metadata"):
        card["meta"] = 1
    return card


def _compact_parts(parts: list[dict]) -> list:
    """[{"text": "a"}, {"opt": "b"}] → ["a", {"opt": "b"}]."""
    return [p["text"] if "text" in p else {"opt": p["opt"]} for p in parts]


def _error_card(page: ExtraNetworksPage, name: str, index: int, error: Exception) -> dict:
    return {"name": name, "filename": "", "terms": [name], "sort": {"default": index, "name": name.lower()},
            "prompt": [], "error": f"{type(error).__name__}: {error}"}


def _iterate_items(page: ExtraNetworksPage) -> Iterable[tuple[int, dict]]:
    """list_items(), except that one broken item becomes an error card instead of breaking the page."""
    iterator = iter(page.list_items())
    index = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            errors.display(e, f"listing {page.title} cards")
            yield index, {"__error__": e, "name": f"(item {index})"}
            return
        yield index, item
        index += 1


def build_cards_payload(page: ExtraNetworksPage, tabname: str) -> tuple[bytes, list[bytes]]:
    """(the payload's JSON object without "items", [each card as JSON]) in listing order. A card whose item
    is the same object as last time (pages reuse unchanged items) keeps its JSON: at ten thousand cards, a
    rebuild after a rescan costs a dict look-up per card."""
    fragments: list[bytes] = []
    page.items = {}
    page.metadata = {}
    options_key = card_options_key()
    old_cache, new_cache = page._card_cache, {}
    for index, item in _iterate_items(page):
        if "__error__" in item:
            fragments.append(_card_bytes(_error_card(page, item["name"], index, item["__error__"])))
            continue
        name = str(item.get("name", ""))
        page.items[name] = item
        if item.get("metadata"):
            page.metadata[name] = item["metadata"]
        cached = old_cache.get(name)
        if cached is not None and cached[0] is item and cached[1] == options_key:
            fragment = cached[2]
        else:
            try:
                card = card_from_item(page, item, index)
            except Exception as e:
                errors.display(e, f"building the {page.title} card for {name}")
                card = _error_card(page, name, index, e)
            fragment = _card_bytes(card) if card is not None else None
        new_cache[name] = (item, options_key, fragment)
        if fragment is not None:
            fragments.append(fragment)
    page._card_cache = new_cache
    roots = []
    for d in page.allowed_directories_for_previews():
        if d and os.path.isdir(d):
            roots.append({"name": os.path.basename(os.path.abspath(d)), "path": os.path.abspath(d)})
    head = {
        "page": page.extra_networks_tabname,
        "title": page.title,
        "tabname": tabname,
        "id": f"{tabname}_{page.extra_networks_tabname}",
        "roots": roots,
        "opts": card_options(),
        "version_filter": page.version_filter(),
    }
    return _card_bytes(head), fragments


def _card_bytes(data: dict) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf8")


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


def _item_for(page: ExtraNetworksPage, name: str) -> dict | None:
    item = page.items.get(name)
    if item is None:
        try:
            item = page.create_item(name, enable_filter=False)
        except Exception as e:
            errors.display(e, f"reading {page.title} item {name}")
            item = None
    return item


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
    """Adds the /sd_extra_networks/* routes (no API auth, as in A1111: the page itself needs them)."""

    def page_or_404(page_name: str) -> ExtraNetworksPage:
        page = get_page(page_name)
        if page is None:
            raise HTTPException(status_code=404, detail="page not found")
        return page

    def fetch_file(filename: str = "", mtime: str = ""):
        real = served_files.servable_image(extra_pages, filename)
        if real is None:
            raise HTTPException(status_code=403, detail="not an allowed preview file")
        if not os.path.isfile(real):
            raise HTTPException(status_code=404, detail="file not found")
        return FileResponse(real, media_type=served_files.IMAGE_MEDIA_TYPES[served_files.image_extension(real)],
                            headers={"Accept-Ranges": "bytes", "Cache-Control": "max-age=604800",
                                     "X-Content-Type-Options": "nosniff"})

    def fetch_cover_images(page: str = "", item: str = "", index: int = 0):
        found = page_or_404(page)
        entry = _item_for(found, item)
        images = cover_images_from_metadata((entry or {}).get("metadata"))
        if index < 0 or index >= len(images):
            raise HTTPException(status_code=404, detail="cover image not found")
        encoded = images[index]
        if encoded.startswith("data:") and "," in encoded:
            encoded = encoded.split(",", 1)[1]
        try:
            data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(status_code=404, detail="cover image is not valid base64") from e
        media_type = served_files.sniff_image_media_type(data)
        if media_type is None:
            raise HTTPException(status_code=404, detail="cover image is not an image")
        return Response(content=data, media_type=media_type,
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    def get_metadata(page: str = "", item: str = ""):
        found = page_or_404(page)
        metadata = found.metadata.get(item)
        if metadata is None:
            metadata = (_item_for(found, item) or {}).get("metadata")
        if not metadata:
            return JSONResponse({})
        shown = json_finite.finite({k: v for k, v in metadata.items() if k != "ssmd_cover_images"})
        return JSONResponse({"metadata": json.dumps(shown, indent=4, ensure_ascii=False, default=str)})

    def get_single_card(page: str = "", tabname: str = "", name: str = ""):
        found = page_or_404(page)
        known = found.items.get(name)
        if known and known.get("filename"):
            found.lister.invalidate(os.path.dirname(os.path.abspath(known["filename"])))
        else:
            found.lister.reset()
        found.forget_item(name)
        try:
            item = found.create_item(name, enable_filter=False)
        except Exception as e:
            errors.display(e, f"building the {found.title} card for {name}")
            return JSONResponse({"item": _error_card(found, name, 0, e)})
        if item is None:
            raise HTTPException(status_code=404, detail="item not found")
        found.items[name] = item
        return JSONResponse({"item": card_from_item(found, item, 0)})

    def background_status(page: str = ""):
        found = page_or_404(page)
        try:
            status = found.background_status()
        except Exception as e:
            errors.display(e, f"reading the {found.title} background status")
            status = None
        return JSONResponse({"status": status, "model_family": loaded_model_family()},
                            headers={"Cache-Control": "no-store"})

    def cards_response(request: Request, found: ExtraNetworksPage, tabname: str) -> Response:
        body, gzipped, etag = found.cards_json(tabname)
        # A refresh that changed nothing answers 304 too (the browser sends the etag it has): no download,
        # no parsing, no re-render.
        # The loaded model family travels in a header so the cached body does not depend on it; the browser
        # revalidates with the etag, so looking again costs a 304.
        headers = {"Cache-Control": "no-cache", "ETag": etag, "X-Model-Family": loaded_model_family(),
                   "Vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            body = gzipped
        return Response(content=body, media_type="application/json", headers=headers)

    def get_cards(request: Request, page: str = "", tabname: str = "txt2img"):
        return cards_response(request, page_or_404(page), tabname)

    def refresh_cards(request: Request, page: str = "", tabname: str = "txt2img"):
        """Rescans every page (A1111's refresh does too) and returns the requested page's cards."""
        found = page_or_404(page)
        for p in extra_pages:
            try:
                p.do_refresh()
            except Exception as e:
                errors.display(e, f"refreshing {p.title}")
        return cards_response(request, found, tabname)

    app.add_api_route("/sd_extra_networks/thumb", fetch_file, methods=["GET", "HEAD"])
    app.add_api_route("/sd_extra_networks/cover-images", fetch_cover_images, methods=["GET"])
    app.add_api_route("/sd_extra_networks/metadata", get_metadata, methods=["GET"])
    app.add_api_route("/sd_extra_networks/get-single-card", get_single_card, methods=["GET"])
    app.add_api_route("/sd_extra_networks/cards", get_cards, methods=["GET"])
    app.add_api_route("/sd_extra_networks/refresh", refresh_cards, methods=["POST"])
    app.add_api_route("/sd_extra_networks/background-status", background_status, methods=["GET"])

    from modules.ui_extra_networks_user_metadata import add_editor_routes
    add_editor_routes(app, get_page)
