"""Upscalers for the hires fix and img2img resizing (A1111 names: `UpscalerData`, `shared.sd_upscalers`,
`shared.latent_upscale_modes`).

Only the cheap ones: the latent modes (the first pass's latents interpolated by torch) and plain image resizes
(None, Lanczos, Nearest). Network upscalers (ESRGAN, SwinIR, ...) are not part of this host.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

# A1111's table (modules/shared_items.py): name → torch.nn.functional.interpolate arguments
latent_upscale_modes: dict[str, dict] = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
latent_upscale_default_mode = "Latent"


@dataclass
class UpscalerData:
    """One image upscaler as A1111 lists it (`GET /sdapi/v1/upscalers`)."""

    name: str
    resample: int | None  # PIL resampling filter; None: the image is returned as it is
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float = 4

    def upscale(self, img: Image.Image, scale: float) -> Image.Image:
        """The image `scale` times larger (A1111's Upscaler.upscale for the plain PIL upscalers)."""
        if self.resample is None:
            return img
        return img.resize((int(img.width * scale), int(img.height * scale)), resample=self.resample)


def builtin_upscalers() -> list[UpscalerData]:
    return [UpscalerData("None", None), UpscalerData("Lanczos", Image.LANCZOS),
            UpscalerData("Nearest", Image.NEAREST)]


def find(name: str | None, upscalers: list[UpscalerData]) -> UpscalerData | None:
    return next((u for u in upscalers if u.name == name), None)


def hires_upscaler_names(upscalers: list[UpscalerData]) -> list[str]:
    """What the Hires. fix dropdown offers, in A1111's order: the latent modes, then the image upscalers."""
    return list(latent_upscale_modes) + [u.name for u in upscalers]


def check_hires_upscaler(name: str | None, upscalers: list[UpscalerData]) -> None:
    """Raises ValueError naming the upscaler when it is neither a latent mode nor a listed image upscaler."""
    if name is None or name in latent_upscale_modes or find(name, upscalers) is not None:
        return
    raise ValueError(f"could not find upscaler named {name!r}; available: "
                     + ", ".join(hires_upscaler_names(upscalers)))
