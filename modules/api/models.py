"""Request and response shapes of the HTTP API (A1111 field names and defaults)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StableDiffusionTxt2ImgProcessingAPI(BaseModel):
    """POST /sdapi/v1/txt2img. Unknown fields are accepted and ignored, as A1111 clients send many."""
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1)
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    enable_hr: bool = False
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    send_images: bool = True
    save_images: bool = False


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64.")
    parameters: dict
    info: str


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None
