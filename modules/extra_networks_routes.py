"""The /sd_extra_networks/* routes the card pane uses (A1111's paths): thumbnails, cover images, metadata, single
card, card data with etags, refresh, background status; the editor's routes come from
ui_extra_networks_user_metadata. Pages are found through the registry handed in (modules.ui_extra_networks)."""
from __future__ import annotations

import base64
import binascii
import json
import os
from typing import TYPE_CHECKING, Callable

from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from modules import errors, json_finite, served_files, ui_extra_networks_user_metadata
from modules.extra_networks_cards import _error_card, card_from_item, cover_images_from_metadata, loaded_model_family

if TYPE_CHECKING:  # the page class imports this module
    from modules.ui_extra_networks import ExtraNetworksPage


def _item_for(page: ExtraNetworksPage, name: str) -> dict | None:
    item = page.items.get(name)
    if item is None:
        try:
            item = page.create_item(name, enable_filter=False)
        except Exception as e:
            errors.display(e, f"reading {page.title} item {name}")
            item = None
    return item


def add_routes(app, extra_pages: list, get_page: Callable) -> None:
    """Adds the /sd_extra_networks/* routes for the pages in `extra_pages` (the registry's own list)."""

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

    ui_extra_networks_user_metadata.add_editor_routes(app, get_page)
