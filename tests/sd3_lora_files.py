"""Shared pieces of the SD3 Lora tests: the host's tiny-sd3 (SD3.5 architecture: CLIP-L, CLIP-G, T5, q/k RMS norms, an
MMDiT-X block, a last block that only shifts and scales the text; 64 wide), its transformer in SAI's single-file layout
and back through diffusers' own converter, the references and the Lora file makers.

The SAI copy comes from the host's single-file writer (modules/sd3_layout); every test first checks that diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` turns it back into the loaded weights bitwise, so which SAI row is
which diffusers parameter is diffusers' answer."""
import copy
import functools
import os

import pytest
import torch
from flux_lora_files import M, lora_delta, model_state

from modules import sd3_layout

CPU = torch.device("cpu")


class TinySD3Model:
    """Stands in for the host's SD3 model in Lora tests: `is_sd3`, components() with the transformer, CLIP-L, CLIP-G
    and T5 (text_encoder_3)."""

    def __init__(self, components: dict):
        self.transformer = components["transformer"]
        self.text_encoder, self.text_encoder_2 = components["text_encoder"], components["text_encoder_2"]
        self.text_encoder_3 = components["text_encoder_3"]
        self.is_sd3 = True
        self.is_flux = self.is_sd1 = self.is_sd2 = self.is_sdxl = False

    def components(self) -> dict:
        names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self, name) for name in names}


@functools.cache
def _tiny_sd3(folder: str) -> TinySD3Model:
    from modules import sd_models_diffusers
    return TinySD3Model(sd_models_diffusers.load(folder, CPU, torch.float32).components())


@pytest.fixture
def sd3(sd3_files) -> TinySD3Model:
    """A fresh copy of the host's tiny-sd3 components (loaded once per session)."""
    return copy.deepcopy(_tiny_sd3(sd3_files["folder"]))


def sai_state(transformer) -> dict[str, torch.Tensor]:
    """The transformer in SAI's layout, checked to come back bitwise through diffusers' converter."""
    sai = sd3_layout.to_single_file_state_dict(transformer)
    back = convert_sai(sai)
    state = transformer.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in back.items())
    return sai


def convert_sai(sai: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    return convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))


def sai_layers(sai: dict) -> dict[str, tuple]:
    """{SAI layer: weight shape} of every Linear and Conv (the layers kohya's sd-scripts trains)."""
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in sai.items() if k.endswith(".weight") and v.dim() in (2, 4)}


def factors(shapes: dict[str, tuple], rank: int = 2, seed: int = 0) -> dict:
    """{layer: (down, up, alpha)}; a conv layer gets kohya's conv LoRA (kernel on down, 1×1 up)."""
    g = torch.Generator().manual_seed(seed)
    res = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        out, inp = shape[0], shape[1]
        kernel = tuple(shape[2:])
        res[name] = (torch.randn(rank, inp, *kernel, generator=g) * 0.5,
                     torch.randn(out, rank, *((1, 1) if kernel else ()), generator=g) * 0.5, float(1 + i % 3))
    return res


def delta(d: torch.Tensor, u: torch.Tensor, a: float, shape: tuple, m: float = M, alpha: bool = True) -> torch.Tensor:
    return lora_delta(d.flatten(1), u.flatten(1), a, m, alpha).reshape(shape)


def merged_sai(sai: dict, deltas: dict[str, torch.Tensor], bias_deltas: dict | None = None) -> dict:
    res = dict(sai)
    for name, dw in deltas.items():
        res[f"{name}.weight"] = sai[f"{name}.weight"] + dw
    for name, db in (bias_deltas or {}).items():
        res[f"{name}.bias"] = sai[f"{name}.bias"] + db
    return res


def text_linears(model) -> dict[str, tuple[int, int]]:
    """{component.module path: shape} of the text encoders' Linears, paths as the modules have them."""
    return {f"{c}.{path}": tuple(m.weight.shape) for c in ("text_encoder", "text_encoder_2", "text_encoder_3")
            for path, m in getattr(model, c).named_modules()
            if isinstance(m, torch.nn.Linear) and path != "text_projection"}  # sd-scripts trains attention and MLPs


def kohya_text_base(name: str) -> str:
    """sd-scripts' SD3 names: CLIP-L `lora_te1_text_model_…`, CLIP-G `lora_te2_text_model_…`, T5 `lora_te3_…`."""
    component, _, path = name.partition(".")
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}[component]
    if component != "text_encoder_3":
        path = "text_model." + path.removeprefix("text_model.")
    return prefix + path.replace(".", "_")


def comfy_text_base(name: str) -> str:
    """ComfyUI's: `text_encoders.clip_l/clip_g/t5xxl.transformer.<module path>`."""
    component, _, path = name.partition(".")
    encoder = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}[component]
    if component != "text_encoder_3":
        path = "text_model." + path.removeprefix("text_model.")
    return f"text_encoders.{encoder}.transformer.{path}"


def expected_text(model, text_factors: dict, m: float = M, alpha: bool = True) -> dict:
    """W + m·alpha/r·up@down on the text encoders' own Linears."""
    res = {}
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        state = {k: v.detach().clone() for k, v in getattr(model, component).state_dict().items()}
        for name, (d, u, a) in text_factors.items():
            c, _, path = name.partition(".")
            if c == component:
                state[f"{path}.weight"] = state[f"{path}.weight"] + lora_delta(d, u, a, m, alpha)
        res[component] = state
    return res


def diffusers_fused(model, path: str, scale: float = M) -> dict:
    """StableDiffusion3Pipeline.load_lora_weights + fuse_lora on a copy (it reads transformer, CLIP-L and CLIP-G)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    ref = copy.deepcopy(model)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=ref.text_encoder, tokenizer=None, text_encoder_2=ref.text_encoder_2,
                                    tokenizer_2=None, text_encoder_3=ref.text_encoder_3, tokenizer_3=None,
                                    transformer=ref.transformer)
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="x",
                           low_cpu_mem_usage=False)
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"], lora_scale=scale)
    pipe.unload_lora_weights()
    return model_state(ref)
