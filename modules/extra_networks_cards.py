"""Card data for the browser: a page's items → compact JSON cards (with a per-item cache) and the payload head.

Also the text helpers pages use for what a click inserts: quote_js (A1111's JS string literal) and
prompt_parts_from_js, which parses A1111's `"<lora:x:" + opts.a + ">"` expressions into parts the browser joins
(the page never evals them).
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, Iterable

from modules import errors, shared

if TYPE_CHECKING:  # the page class imports this module
    from modules.ui_extra_networks import ExtraNetworksPage


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
    for attr, family in (("is_chroma", "Chroma"), ("is_flux", "Flux"), ("is_sd3", "SD3"), ("is_sdxl", "SDXL"),
                         ("is_sd2", "SD2"), ("is_sd1", "SD1")):
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
        "sd_also": [str(f) for f in item.get("sd_also") or []],
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
