"""Request and response shapes of the HTTP API (A1111 field names and defaults)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerationRequest(BaseModel):
    """The fields txt2img and img2img share. Unknown fields are accepted and ignored, as A1111 clients send many."""
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
    distilled_cfg_scale: float | None = None  # Forge's: FLUX.1-dev's guidance embedding (None: 3.5)
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
    send_images: bool = True
    save_images: bool = False


class StableDiffusionTxt2ImgProcessingAPI(GenerationRequest):
    """POST /sdapi/v1/txt2img, with A1111's hires-fix fields."""

    enable_hr: bool = False
    firstphase_width: int = Field(default=0, ge=0)
    firstphase_height: int = Field(default=0, ge=0)
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(default=0, ge=0)
    hr_resize_x: int = Field(default=0, ge=0)
    hr_resize_y: int = Field(default=0, ge=0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class StableDiffusionImg2ImgProcessingAPI(GenerationRequest):
    """POST /sdapi/v1/img2img: `init_images` are base64 images (a `data:image/...;base64,` prefix is accepted).
    Masks (inpainting) are refused with a message."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    include_init_images: bool = False


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64.")
    parameters: dict
    info: str


class ImageToImageResponse(BaseModel):
    images: list[str] | None = Field(default=None, title="Image", description="The generated images in base64.")
    parameters: dict
    info: str


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDModuleItem(BaseModel):
    model_name: str
    filename: str


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


class HypernetworkItem(BaseModel):
    name: str
    path: str | None = None


class CreateResponse(BaseModel):
    info: str = Field(title="Create info", description="Response string from create embedding or hypernetwork task.")


class TrainResponse(BaseModel):
    info: str = Field(title="Train info", description="Response string from train embedding or hypernetwork task.")
    filename: str | None = None
    step: int | None = None


class CreateHypernetworkRequest(BaseModel):
    """POST /sdapi/v1/create/hypernetwork (the arguments of A1111's create_hypernetwork)."""
    model_config = ConfigDict(extra="ignore")

    name: str
    enable_sizes: list[int] = Field(default_factory=lambda: [768, 320, 640, 1280])
    overwrite_old: bool = False
    layer_structure: list[float] | str | None = None
    activation_func: str | None = None
    weight_init: str | None = None
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | str | None = None


class TrainHypernetworkRequest(BaseModel):
    """POST /sdapi/v1/train/hypernetwork (A1111's train_hypernetwork arguments; unknown ones such as id_task,
    varsize or use_weight are accepted and ignored). `template` is the prompt template's text (one line picked
    per image; `[filewords]` is the caption, `[name]` the network's name)."""
    model_config = ConfigDict(extra="ignore")

    hypernetwork_name: str
    data_root: str
    steps: int = Field(default=100, ge=1)
    learn_rate: float | str = "0.00001"
    batch_size: int = Field(default=1, ge=1)
    gradient_step: int = Field(default=1, ge=1)
    log_directory: str | None = None
    training_width: int = Field(default=512, ge=8)
    training_height: int = Field(default=512, ge=8)
    clip_grad_mode: str | None = None
    clip_grad_value: float | str = 0.1
    shuffle_tags: bool = False
    tag_drop_out: float = Field(default=0.0, ge=0.0, lt=1.0)
    latent_sampling_method: str = "once"
    template: str = "[filewords]"
    save_hypernetwork_every: int = Field(default=0, ge=0)
    create_image_every: int = Field(default=0, ge=0)
    preview_prompt: str | None = None
    preview_negative_prompt: str = ""
    preview_steps: int = Field(default=20, ge=1)
    preview_cfg_scale: float = 7.0
    preview_seed: int = -1
    preview_width: int | None = Field(default=None, ge=8)
    preview_height: int | None = Field(default=None, ge=8)
    save_optimizer_state: bool = True
    seed: int | None = None

    def training_kwargs(self) -> dict[str, Any]:
        args = self.model_dump()
        if args["clip_grad_mode"] in ("", "disabled"):
            args["clip_grad_mode"] = None
        return args
