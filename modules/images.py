"""Image helpers under A1111's names: resize_image (img2img resize modes, hires image upscaling), flatten, reading
images sent to the API, and saving a job's images."""
from __future__ import annotations

import base64
import binascii
import io
import os
import time

from PIL import Image, ImageOps, PngImagePlugin

from modules import shared, upscaler
from modules.atomic import write_bytes_atomic

LANCZOS = Image.LANCZOS
NEAREST = Image.NEAREST

# A1111's resize modes, by index (the API's `resize_mode`) and by the label the img2img tab shows
RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]


def _resize(im: Image.Image, width: int, height: int, upscaler_name: str | None) -> Image.Image:
    """To exactly width x height: the named upscaler first when enlarging, then Lanczos to the exact size."""
    scaler = upscaler.find(upscaler_name, shared.sd_upscalers) if upscaler_name not in (None, "None") else None
    if scaler is None or im.mode == "L":
        return im.resize((width, height), resample=LANCZOS)
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        im = scaler.upscale(im, scale)
    if im.width != width or im.height != height:
        im = im.resize((width, height), resample=LANCZOS)
    return im


def resize_image(resize_mode: int, im: Image.Image, width: int, height: int,
                 upscaler_name: str | None = None) -> Image.Image:
    """A1111's resize modes: 0 stretch to the size; 1 keep the aspect ratio, fill the size and crop the excess;
    2 keep the aspect ratio, fit inside and fill the empty bands by stretching the image's edges.
    (Mode 3, the latent upscale, resizes latents instead; for an image it is mode 0.)"""
    if resize_mode in (0, 3):
        return _resize(im, width, height, upscaler_name)
    ratio = width / height
    src_ratio = im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = _resize(im, src_w, src_h, upscaler_name)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    if resize_mode != 2:
        raise ValueError(f"resize_mode {resize_mode} is not one of 0-3 ({', '.join(RESIZE_MODES)})")
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _resize(im, src_w, src_h, upscaler_name)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def flatten(img: Image.Image, bgcolor: str = "#ffffff") -> Image.Image:
    """RGB; transparent pixels become bgcolor (A1111's images.flatten)."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, bgcolor)
        background.alpha_composite(img.convert("RGBA"))
        img = background
    return img.convert("RGB")


class ImageDecodeError(ValueError):
    pass


def decode_base64_to_image(encoding: str, what: str = "image") -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) → a loaded PIL image. URLs to fetch are refused
    (A1111 fetches them only when `api_enable_requests` is on); a bad value raises ImageDecodeError naming `what`."""
    if not isinstance(encoding, str) or not encoding:
        raise ImageDecodeError(f"{what}: expected a base64-encoded image")
    if encoding.startswith(("http://", "https://")):
        raise ImageDecodeError(f"{what}: image URLs are not fetched; send the image as base64")
    if encoding.startswith("data:image/"):
        encoding = encoding.split(",", 1)[1] if "," in encoding else ""
    try:
        data = base64.b64decode(encoding, validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{what}: not a readable base64 image ({type(e).__name__}: {e})") from None
    return image


def save_sample(image, p, seed: int, infotext: str) -> str:
    """Saves into outputs/<txt2img|img2img>-images/<date>/NNNNN-<seed>.<format> with the infotext embedded."""
    configured = shared.opts.data.get(f"outdir_{p.job_name}_samples")
    base = p.outpath_samples or configured or os.path.join(shared.data_path, "outputs", f"{p.job_name}-images")
    folder = os.path.join(base, time.strftime("%Y-%m-%d"))
    os.makedirs(folder, exist_ok=True)
    existing = [f for f in os.listdir(folder) if f[:5].isdigit()]
    number = max([int(f[:5]) for f in existing], default=-1) + 1
    ext = shared.opts.samples_format or "png"
    path = os.path.join(folder, f"{number:05}-{seed}.{ext}")
    buf = io.BytesIO()
    if ext == "png":
        pnginfo = PngImagePlugin.PngInfo()
        if shared.opts.enable_pnginfo:
            pnginfo.add_text("parameters", infotext)
        image.save(buf, format="PNG", pnginfo=pnginfo)
    else:
        image.convert("RGB").save(buf, format=ext.upper().replace("JPG", "JPEG"))
    write_bytes_atomic(path, buf.getvalue())
    return path
