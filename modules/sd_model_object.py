"""The loaded model object (`shared.sd_model` on this host): a diffusers pipeline behind the attributes A1111 code
and extensions read (`is_sdxl`, `model_type`, `sd_checkpoint_info`, ...), plus `components()`, the modules Loras
patch, and `original_weights`, where each parameter came from."""
from __future__ import annotations

import enum

import torch

from modules.original_weights import OriginalWeights


class ModelType(enum.Enum):  # A1111's sd_models.ModelType, and the transformer families after it
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5
    FLUX = 6
    CHROMA = 7


MODEL_TYPES = {"sd1": ModelType.SD1, "sd2": ModelType.SD2, "sdxl": ModelType.SDXL, "sd3": ModelType.SD3,
               "flux": ModelType.FLUX, "chroma": ModelType.CHROMA}
COMPONENTS = {"sd": ("unet", "text_encoder", "text_encoder_2", "vae"),
              "flux": ("transformer", "text_encoder", "text_encoder_2", "vae"),
              "chroma": ("transformer", "text_encoder", "vae"),  # Chroma's only text encoder is T5
              "sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}


class DiffusersSdModel:
    """What `shared.sd_model` is on this host: the pipeline plus A1111's model attributes.

    family: "sd1", "sd2", "sdxl", "flux", "chroma" or "sd3"; `variant` ("dev", "schnell", "chroma", "sd3",
    "sd3.5") for the transformer families. The denoiser is `unet` (SD1/2/XL) or `transformer` (`unet` is None)."""

    def __init__(self, pipe, family: str, checkpoint_info=None, original_weights: OriginalWeights | None = None,
                 variant: str | None = None):
        self.pipe = pipe
        self.family = family
        self.variant = variant
        self.unet = getattr(pipe, "unet", None)
        self.transformer = getattr(pipe, "transformer", None)
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.text_encoder_3 = getattr(pipe, "text_encoder_3", None)  # SD3's T5 (None: run without it)
        self.tokenizer_3 = getattr(pipe, "tokenizer_3", None)
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"
        self.is_ssd = False
        self.is_sd3 = family == "sd3"
        self.is_flux = family in ("flux", "chroma")  # Chroma is a Flux.1-schnell derivative (same blocks)
        self.is_chroma = family == "chroma"
        self.model_type = MODEL_TYPES[family]
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = getattr(checkpoint_info, "filename", None)
        self.sd_model_hash = getattr(checkpoint_info, "shorthash", None)
        self.original_weights = original_weights
        self.file_stamps: dict[str, tuple] = {}  # the files it was read from, as they were
        self.additional_modules: tuple[str, ...] = ()  # the VAE / text encoder files picked for it
        self.memory_report = ""  # what its weights take (the transformer families: fp8 or not), for the load line
        self.base_scheduler_config = dict(pipe.scheduler.config)
        denoiser = self.unet if self.unet is not None else self.transformer
        self.device = denoiser.device
        self.dtype = denoiser.dtype  # the compute dtype (fp8 weights report their layers' compute dtype)

    def components(self) -> dict[str, torch.nn.Module | None]:
        names = COMPONENTS.get(self.family, COMPONENTS["sd"])
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        return f"DiffusersSdModel({self.family}, {self.sd_model_checkpoint!r})"
