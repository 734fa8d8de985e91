"""The card editor (A1111 name: UserMetadataEditor): reads and writes a card's sidecar `<stem>.json`.

The dialog itself is drawn by javascript/extraNetworksEditor.js from `editor_data()`; this class decides which
fields exist and validates what comes back. Every file write goes through `_write_next_to_item`, which only
writes next to the card's own file, inside the page's folders, atomically.
"""
from __future__ import annotations

import datetime
import io
import math
import os

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from modules import extra_networks, json_finite, served_files, shared
from modules.atomic import write_bytes_atomic, write_text_atomic

MAX_PREVIEW_BYTES = 32 * 1024 * 1024
PREVIEW_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF",
                   "avif": "AVIF"}  # extension → PIL


class EditorError(ValueError):
    """A request the editor refuses (unknown card, file outside the page's folders, bad image)."""


def sizeof_fmt(num: float, suffix: str = "B") -> str:
    """1024-based, no decimals: `144MB` (A1111 format)."""
    for unit in ("", "K", "M", "G", "T", "P", "E", "Z"):
        if abs(num) < 1024:
            return f"{num:3.0f}{unit}{suffix}".strip()
        num /= 1024
    return f"{num:.0f}Y{suffix}"


class UserMetadataEditor:
    def __init__(self, ui, tabname: str, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
        self.id_part = f"{self.tabname}_{self.page.extra_networks_tabname}_edit_user_metadata"

    # --- reading ---------------------------------------------------------------------------------------------------
    def get_item(self, name: str) -> dict:
        item = self.page.items.get(name)
        if item is None:
            item = self.page.create_item(name, enable_filter=False)
        if not item or not item.get("filename"):
            raise EditorError(f"no card named {name!r}")
        return item

    def get_user_metadata(self, name: str) -> dict:
        """The sidecar JSON as it is on disk now (never a cached copy: we are about to overwrite it)."""
        item = self.get_item(name)
        sidecar = os.path.splitext(item["filename"])[0] + ".json"
        readable = served_files.readable_in_page(self.page, sidecar)  # a link out is replaced on save, never read
        user_metadata = extra_networks.get_user_metadata(item["filename"]) if readable else {}
        item["user_metadata"] = user_metadata
        return user_metadata

    def relative_path(self, path: str) -> str:
        for parent_path in self.page.allowed_directories_for_previews():
            parent = os.path.abspath(parent_path)
            if os.path.abspath(path).startswith(parent + os.sep):
                return os.path.relpath(path, parent)
        return os.path.basename(path)

    def get_metadata_table(self, name: str) -> list[tuple[str, str]]:
        item = self.get_item(name)
        filename = item["filename"]
        try:
            stats = os.stat(filename)
        except OSError:
            return [("Filename:", self.relative_path(filename)), ("File:", "missing")]
        return [
            ("Filename:", self.relative_path(filename)),
            ("File size:", sizeof_fmt(stats.st_size)),
            ("Hash:", item.get("shorthash") or None),
            ("Modified:", datetime.datetime.fromtimestamp(stats.st_mtime).strftime("%Y-%m-%d %H:%M")),
        ]

    def editor_fields(self, name: str, user_metadata: dict) -> list[dict]:
        """The form, top to bottom: {key, label, type (textarea|text|select|slider), value, ...}."""
        item = self.get_item(name)
        return [
            {"key": "description", "label": "Description", "type": "textarea", "lines": 4,
             "value": str(user_metadata.get("description", item.get("description") or ""))},
            {"key": "notes", "label": "Notes", "type": "textarea", "lines": 4,
             "value": str(user_metadata.get("notes", ""))},
        ]

    def editor_extras(self, name: str, user_metadata: dict) -> dict:
        """Extra parts of the dialog pages may add (the Lora editor adds training tags)."""
        return {}

    def editor_data(self, name: str) -> dict:
        item = self.get_item(name)
        user_metadata = self.get_user_metadata(name)
        return {
            "name": name,
            "title": str(item.get("title") or name),
            "preview": item.get("preview"),
            "table": [[row[0], str(row[1]), *row[2:]] for row in self.get_metadata_table(name)
                      if row[1] is not None and str(row[1]) not in ("", "None")],
            "fields": self.editor_fields(name, user_metadata),
            "can_replace_preview": True,
            "preview_format": shared.opts.samples_format,
            **self.editor_extras(name, user_metadata),
        }

    # --- writing ---------------------------------------------------------------------------------------------------
    def clean_values(self, name: str, values: dict) -> dict:
        """The submitted fields this editor owns, converted to their stored types; others are ignored."""
        cleaned = {}
        for field in self.editor_fields(name, {}):
            key = field["key"]
            if key not in values:
                continue
            value = values[key]
            if field["type"] == "slider":
                value = self.clean_number(field, value)
            elif field["type"] == "select":
                if value not in field.get("choices", []):
                    raise EditorError(f"{field['label']}: {value!r} is not one of {field.get('choices')}")
            else:
                value = "" if value is None else str(value)
            cleaned[key] = value
        return cleaned

    @staticmethod
    def clean_number(field: dict, value) -> float:
        """A slider's value: a finite number inside the field's range, else EditorError saying why."""
        label = field["label"]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise EditorError(f"{label}: {value!r} is not a number")
        try:
            number = float(value)
        except (ValueError, OverflowError) as e:
            raise EditorError(f"{label}: {value!r} is not a number") from e
        if not math.isfinite(number):
            raise EditorError(f"{label}: {value!r} is not a finite number")
        low, high = field.get("min", -math.inf), field.get("max", math.inf)
        if not low <= number <= high:
            raise EditorError(f"{label}: {value!r} is out of range ({low:g} to {high:g})")
        return number

    def save_user_metadata(self, name: str, values: dict) -> dict:
        """Merges the submitted fields into the sidecar JSON (other keys are kept) and writes it."""
        user_metadata = self.get_user_metadata(name)
        user_metadata.update(self.clean_values(name, values))
        self.write_user_metadata(name, user_metadata)
        return user_metadata

    def write_user_metadata(self, name: str, metadata: dict) -> None:
        try:  # strict JSON: a NaN in the file would make it unreadable for every other JSON reader
            text = json_finite.dumps_strict(metadata, indent=4, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise EditorError(f"the metadata of {name} cannot be written as JSON: {e}") from e
        path = self._write_next_to_item(name, ".json", lambda path: write_text_atomic(path, text))
        self._written(name, path)

    def _written(self, name: str, path: str) -> None:
        """After a write next to the item: that folder is listed again and the item rebuilt, nothing else."""
        self.page.lister.invalidate(os.path.dirname(path))
        self.page.forget_item(name)

    def preview_target(self, name: str) -> str:
        """Where Replace preview writes: over the local preview the card shows now, so the new picture is the
        one shown whatever the look-up order; else `<stem>.<samples_format>`, the file A1111 writes."""
        item = self.get_item(name)
        stem = os.path.splitext(os.path.abspath(item["filename"]))[0]
        find = getattr(self.page, "find_preview_path", None)
        shown = find(stem) if find else None
        if shown and os.path.splitext(shown)[1].lower().lstrip(".") in PREVIEW_FORMATS:
            return shown
        fmt = (shared.opts.samples_format or "png").lower()
        return f"{stem}.{fmt if fmt in PREVIEW_FORMATS else 'png'}"

    def save_preview(self, name: str, data: bytes) -> str:
        """Writes an uploaded image as the card's preview (see preview_target), keeping its infotext in PNGs;
        returns the path."""
        from PIL import Image, PngImagePlugin

        if len(data) > MAX_PREVIEW_BYTES:
            raise EditorError("the image is too large")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as e:
            raise EditorError(f"not an image: {e}") from e
        target = self.preview_target(name)
        stem = os.path.splitext(os.path.abspath(self.get_item(name)["filename"]))[0]
        suffix = target[len(stem):]
        fmt = PREVIEW_FORMATS[os.path.splitext(target)[1].lower().lstrip(".")]
        parameters = image.info.get("parameters")
        buf = io.BytesIO()
        if fmt == "PNG":
            pnginfo = PngImagePlugin.PngInfo()
            if parameters:
                pnginfo.add_text("parameters", parameters)
            image.save(buf, format="PNG", pnginfo=pnginfo)
        elif fmt == "GIF":
            image.save(buf, format="GIF")
        else:
            image.convert("RGB").save(buf, format=fmt)
        path = self._write_next_to_item(name, suffix, lambda target: write_bytes_atomic(target, buf.getvalue()))
        self._written(name, path)
        return path

    def _write_next_to_item(self, name: str, suffix: str, write) -> str:
        """The only way this editor writes: `<card file stem><suffix>`, inside one of the page's folders."""
        filename = os.path.abspath(self.get_item(name)["filename"])
        target = os.path.splitext(filename)[0] + suffix
        folders = [os.path.abspath(d) for d in self.page.allowed_directories_for_previews() if d]
        if (not any(os.path.commonpath([folder, target]) == folder for folder in folders)
                or not served_files.writable_in_page(self.page, target)):
            raise EditorError(f"{target} is outside the {self.page.title} folders")
        write(target)
        return target


def add_editor_routes(app, get_page) -> None:
    """GET/POST /sd_extra_networks/user-metadata and POST /sd_extra_networks/replace-preview."""
    def editor_for(page_name: str, tabname: str) -> UserMetadataEditor:
        page = get_page(page_name)
        if page is None:
            raise HTTPException(status_code=404, detail="page not found")
        editors = page.__dict__.setdefault("_user_metadata_editors", {})
        if tabname not in editors:
            editors[tabname] = page.create_user_metadata_editor(None, tabname)
        return editors[tabname]

    def fail(e: EditorError):
        return JSONResponse(status_code=400, content={"error": str(e)})

    def check_page_request(request: Request) -> None:
        """Writes need a header that only the page's own scripts send: another site's form or fetch cannot
        add it without a CORS preflight, which this server never allows (cross-site request forgery)."""
        if request.headers.get("x-webui-request") != "1":
            raise HTTPException(status_code=403, detail="missing X-Webui-Request header")

    def get_user_metadata(page: str = "", tabname: str = "txt2img", name: str = ""):
        try:  # finite(): one NaN anywhere in a card's data must not make the editor unopenable
            return JSONResponse(json_finite.finite(editor_for(page, tabname).editor_data(name)))
        except EditorError as e:
            return fail(e)

    async def post_user_metadata(request: Request, page: str = "", tabname: str = "txt2img", name: str = ""):
        check_page_request(request)
        try:
            values = await request.json()
        except ValueError:
            return fail(EditorError("the body is not JSON"))
        if not isinstance(values, dict):
            return fail(EditorError("the body must be a JSON object"))
        try:
            saved = editor_for(page, tabname).save_user_metadata(name, values)
        except EditorError as e:
            return fail(e)
        return JSONResponse({"user_metadata": saved})

    async def replace_preview(request: Request, page: str = "", tabname: str = "txt2img", name: str = ""):
        check_page_request(request)
        data = await request.body()
        try:
            path = editor_for(page, tabname).save_preview(name, data)
        except EditorError as e:
            return fail(e)
        return JSONResponse({"path": path})

    app.add_api_route("/sd_extra_networks/user-metadata", get_user_metadata, methods=["GET"])
    app.add_api_route("/sd_extra_networks/user-metadata", post_user_metadata, methods=["POST"])
    app.add_api_route("/sd_extra_networks/replace-preview", replace_preview, methods=["POST"])
