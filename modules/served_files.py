"""Which files the extra-network pages may serve, read and write: only files inside a page's own folders after
symlinks are resolved, and, for the image routes, only images of a fixed set of types whatever the settings say.

A name inside a Lora folder proves nothing: `x.png` may be a link to `/etc/passwd`, `x.txt` a link to a key file.
So every check resolves the path (realpath) and compares it with the resolved folders. A folder symlinked into a
Lora folder (the Lora scan follows those, as A1111 does) counts as the page's when a listed item lives there, so
linked sub-folders keep their previews while a link to any other folder is refused.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Iterable

IMAGE_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
                     "gif": "image/gif", "avif": "image/avif"}
IMAGE_EXTENSIONS = tuple(IMAGE_MEDIA_TYPES)

_item_folders_cache: dict[int, tuple[tuple[int, int], frozenset[str]]] = {}  # id(page) → (items key, folders)


def image_extension(path: str) -> str | None:
    """`png`, `jpg`, ... for an image file name, None for anything else."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext in IMAGE_MEDIA_TYPES else None


def check_image_format(value: Any) -> str:
    """The `samples_format` option's check: an image type from IMAGE_EXTENSIONS, normalised (`.PNG` → `png`)."""
    fmt = str(value if value is not None else "").strip().lower().lstrip(".")
    if fmt not in IMAGE_MEDIA_TYPES:
        raise ValueError(f"{value!r} is not an image format; use one of {', '.join(IMAGE_EXTENSIONS)}")
    return fmt


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _real_dir(page, folder: str, cached: bool) -> str:
    lister = getattr(page, "lister", None)
    if cached and lister is not None and hasattr(lister, "real_dir"):
        return lister.real_dir(folder)
    return os.path.realpath(folder)


def page_folders(page, cached: bool = True) -> list[str]:
    """The page's folders, symlinks resolved."""
    return [_real_dir(page, os.path.abspath(d), cached) for d in page.allowed_directories_for_previews() if d]


def _item_folders(page) -> frozenset[str]:
    """The resolved folders holding the page's listed items; rebuilt only when the item list changes."""
    items = getattr(page, "items", None) or {}
    key = (id(items), len(items))
    cached = _item_folders_cache.get(id(page))
    if cached is not None and cached[0] == key:
        return cached[1]
    folders = {os.path.dirname(os.path.abspath(item["filename"])) for item in list(items.values())
               if isinstance(item, dict) and item.get("filename")}
    result = frozenset(os.path.realpath(f) for f in folders)
    _item_folders_cache[id(page)] = (key, result)
    return result


def real_path_in_page(page, path: str) -> str | None:
    """The resolved path of `path` (which need not exist) when it lies inside one of the page's folders, or
    directly in a folder holding one of its listed items (a linked sub-folder); else None."""
    real = os.path.realpath(os.path.abspath(path))
    if any(_inside(real, root) for root in page_folders(page, cached=False)):
        return real
    if os.path.dirname(real) in _item_folders(page):
        return real
    return None


def readable_in_page(page, path: str) -> bool:
    """For a card's own neighbours (descriptions, the sidecar): True unless `path` is a link that leads out of
    both its own folder and the page's folders (then a message says so). Card building reads thousands of these
    from folders it has just listed, so folders are resolved once per scan (the page lister's cache)."""
    path = os.path.abspath(path)
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return True  # a plain file in the card's own folder, wherever that folder really is
    except OSError:
        return False
    real = os.path.realpath(path)
    if os.path.dirname(real) == _real_dir(page, os.path.dirname(path), True):
        return True
    if any(_inside(real, root) for root in page_folders(page, cached=True)):
        return True
    print(f"Not reading {path}: it is a link out of the {page.title} folders (to {real})")
    return False


def writable_in_page(page, target: str) -> bool:
    """Where the editor may write `target`: its folder, resolved, is one of the page's (a link at `target`
    itself is replaced by the write, never followed)."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(target)))
    roots = page_folders(page, cached=False)
    return any(folder == root or _inside(folder, root) for root in roots) or folder in _item_folders(page)


def servable_image(pages: Iterable, filename: str) -> str | None:
    """The resolved path to serve for a preview request: the name and the file it resolves to are both images
    of an allowed type and lie inside a page's folders; None when it must not be served."""
    if not filename or "\0" in filename or image_extension(filename) is None:
        return None
    for page in pages:
        real = real_path_in_page(page, filename)
        if real is not None and image_extension(real) is not None:
            return real
    return None


def sniff_image_media_type(data: bytes) -> str | None:
    """The media type of image bytes of an allowed type (embedded cover images), None for anything else."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:3] == b"GIF":
        return "image/gif"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return None
