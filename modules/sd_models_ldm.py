"""Original single-file ("ldm") checkpoint layout ↔ diffusers component parameters, and component configs read off
a checkpoint's tensor shapes.

One mapping, used both ways: `ldm_ref(component, diffusers_key)` names the checkpoint tensor (and the reshaping)
a diffusers parameter comes from. Loading reads through it, `to_ldm_state_dict` writes through it, and the Lora
patcher re-reads original weights through it.

Configs are inferred from shapes, so any SD1/SD2/SDXL-architecture file loads offline, the tiny test models
included. What shapes cannot tell follows the families' fixed rules: SD1 uses 8 attention heads everywhere, SD2
and SDXL 64 channels per head; group norms have 32 groups; text encoders use 64 channels per head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "flux": 0.3611, "chroma": 0.3611, "sd3": 1.5305}
VAE_SHIFT = {"flux": 0.1159, "chroma": 0.1159, "sd3": 0.0609}


class CheckpointFormatError(ValueError):
    """The file is not an SD1/SD2/SDXL checkpoint this host can read; the message says why."""


@dataclass(frozen=True)
class LdmRef:
    key: str  # the checkpoint's key
    # "" | "conv1x1" (ldm 1x1 conv ↔ diffusers linear) | "transpose" | "rows" | "swap_halves" (BFL's shift, scale ↔
    # diffusers' scale, shift)
    transform: str = ""
    index: int = 0  # for "rows": the first of `parts` equal row blocks (OpenCLIP's fused q/k/v, BFL's qkv/linear1)
    parts: int = 1
    span: int = 1  # for "rows": how many of those blocks


def detect_family(keys) -> str:
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointFormatError("an SDXL refiner checkpoint (OpenCLIP only); refiners are not supported")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("model.diffusion_model.x_embedder") for k in keys) or any(
            k.startswith(("double_blocks.", "joint_blocks.")) for k in keys):
        raise CheckpointFormatError("an SD3/Flux-family checkpoint; only SD1, SD2 and SDXL are supported")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointFormatError("no `model.diffusion_model.*` tensors: not a Stable Diffusion checkpoint")
    raise CheckpointFormatError("no text encoder tensors (`cond_stage_model.*` or `conditioner.embedders.*`)")


# --- UNet ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnetLevels:
    """Per down level: (resnets, has attention, has downsampler); up levels mirror them with one resnet more."""

    levels: tuple[tuple[int, bool, bool], ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UnetLevels:
        types = config["down_block_types"]
        lpb = config.get("layers_per_block", 2)
        lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(types)
        return cls(tuple((lpb[i], "CrossAttn" in t, i < len(types) - 1) for i, t in enumerate(types)))

    def input_base(self, i: int) -> int:
        return 1 + sum(n + int(down) for n, _, down in self.levels[:i])

    def up(self, i: int) -> tuple[int, bool]:
        n, attn, _ = self.levels[len(self.levels) - 1 - i]
        return n + 1, attn

    def output_base(self, i: int) -> int:
        return sum(self.up(k)[0] for k in range(i))


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_SIMPLE = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_re_block = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_re_sampler = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")
_re_mid = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _res_part(rest: str) -> str:
    return _RESNET.get(rest, rest)


def unet_module_path(path: str, levels: UnetLevels) -> str | None:
    """A diffusers UNet module path → the ldm UNetModel one."""
    if path in _UNET_SIMPLE:
        return _UNET_SIMPLE[path]
    if m := _re_block.match(path):
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = (levels.input_base(i) if side == "down_blocks" else levels.output_base(i)) + j
        block = "input_blocks" if side == "down_blocks" else "output_blocks"
        return f"{block}.{index}.1.{rest}" if kind == "attentions" else f"{block}.{index}.0.{_res_part(rest)}"
    if m := _re_sampler.match(path):
        i = int(m.group(2))
        if m.group(1) == "down_blocks":
            return f"input_blocks.{levels.input_base(i) + levels.levels[i][0]}.0.op"
        n, attn = levels.up(i)
        return f"output_blocks.{levels.output_base(i) + n - 1}.{2 if attn else 1}.conv"
    if m := _re_mid.match(path):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_res_part(rest)}"
    return None


# --- VAE ----------------------------------------------------------------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_re_vae_block = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)"
                           r"\.(\d+)\.(.+)$")
_re_vae_mid = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def vae_ref(key: str, vae_levels: int, prefix: str = VAE_PREFIX) -> LdmRef | None:
    """The ldm-layout tensor of a diffusers VAE parameter (BFL's `ae.safetensors` is this layout without a prefix)."""
    path, _, param = key.rpartition(".")
    if m := _re_vae_block.match(path):
        side, _, i, kind, j, rest = m.groups()
        i = int(i) if side == "encoder" else vae_levels - 1 - int(i)
        level = "down" if side == "encoder" else "up"
        if kind == "resnets":
            rest = "nin_shortcut" if rest == "conv_shortcut" else rest
            return LdmRef(f"{prefix}{side}.{level}.{i}.block.{j}.{rest}.{param}")
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return LdmRef(f"{prefix}{side}.{level}.{i}.{sampler}.{rest}.{param}")
    if m := _re_vae_mid.match(path):
        side, kind, j, rest = m.groups()
        if kind == "resnets":
            return LdmRef(f"{prefix}{side}.mid.block_{int(j) + 1}.{rest}.{param}")
        name = _VAE_ATTN.get(rest)
        if name is None:
            return None
        transform = "conv1x1" if param == "weight" and name != "norm" else ""
        return LdmRef(f"{prefix}{side}.mid.attn_1.{name}.{param}", transform)
    path = re.sub(r"^(encoder|decoder)\.conv_norm_out$", r"\1.norm_out", path)
    return LdmRef(f"{prefix}{path}.{param}")


# --- text encoders ------------------------------------------------------------------------------------------------
def strip_text_model(key: str) -> str:
    """transformers 5's CLIPTextModel has no `text_model.` level; CLIPTextModelWithProjection has."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


_OPENCLIP_SIMPLE = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_re_te_layer = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_ref(key: str, prefix: str) -> LdmRef | None:
    if key == "text_projection.weight":
        return LdmRef(prefix + "text_projection", "transpose")
    key = strip_text_model(key)
    if key in _OPENCLIP_SIMPLE:
        return LdmRef(prefix + _OPENCLIP_SIMPLE[key])
    m = _re_te_layer.match(key)
    if m is None:
        return None
    n, module, param = m.groups()
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        index = "qkv".index(module[len("self_attn.")])
        return LdmRef(f"{prefix}transformer.resblocks.{n}.attn.in_proj_{param}", "rows", index, 3)
    if module in _OPENCLIP_LAYER:
        return LdmRef(f"{prefix}transformer.resblocks.{n}.{_OPENCLIP_LAYER[module]}.{param}")
    return None


def clip_ref(key: str, prefix: str) -> LdmRef:
    return LdmRef(prefix + "text_model." + strip_text_model(key))


# --- one entry point ----------------------------------------------------------------------------------------------
def ldm_ref(family: str, component: str, key: str, unet_levels: UnetLevels | None = None,
            vae_levels: int = 4) -> LdmRef | None:
    """Where diffusers parameter `key` of `component` lives in an ldm checkpoint of `family`."""
    if component == "unet":
        path, _, param = key.rpartition(".")
        mapped = unet_module_path(path, unet_levels)
        return None if mapped is None else LdmRef(f"{UNET_PREFIX}{mapped}.{param}")
    if component == "vae":
        return vae_ref(key, vae_levels)
    prefix, kind = TEXT_PREFIXES[family][component]
    return openclip_ref(key, prefix) if kind == "openclip" else clip_ref(key, prefix)


def read_ref(ref: LdmRef, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The diffusers-shaped view of a checkpoint tensor (no copy, except for swap_halves)."""
    t = tensors[ref.key]
    if ref.transform == "conv1x1":
        return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t
    if ref.transform == "transpose":
        return t.t()
    if ref.transform == "rows":
        n = t.shape[0] // ref.parts
        return t[ref.index * n:(ref.index + ref.span) * n]
    if ref.transform == "swap_halves":
        half = t.shape[0] // 2
        return torch.cat([t[half:], t[:half]])
    return t


def to_ldm_state_dict(family: str, components: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The original single-file layout of in-memory diffusers components (inverse of the loader; for tests,
    benchmarks and export)."""
    unet_levels = UnetLevels.from_config(components["unet"].config)
    vae_levels = len(components["vae"].config.block_out_channels)
    res: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for component, module in components.items():
        for key, tensor in module.state_dict().items():
            ref = ldm_ref(family, component, key, unet_levels, vae_levels)
            if ref is None:
                raise CheckpointFormatError(f"{component}.{key} has no place in the {family} ldm layout")
            t = tensor.detach().cpu()
            if ref.transform == "rows":
                fused.setdefault(ref.key, [None] * ref.parts)[ref.index] = t
                continue
            if ref.transform == "conv1x1":
                t = t.reshape(*t.shape, 1, 1)
            elif ref.transform == "transpose":
                t = t.t()
            res[ref.key] = t.contiguous()
    for key, parts in fused.items():
        res[key] = torch.cat(parts, dim=0).contiguous()
    if family == "sd2":
        _pad_sd2_last_layer(res)
    return res


def _pad_sd2_last_layer(res: dict[str, torch.Tensor]) -> None:
    """SD2 files hold one more OpenCLIP block than diffusers uses (it reads the penultimate layer): write a copy of
    the last one so the file has the original block count."""
    prefix = TEXT_PREFIXES["sd2"]["text_encoder"][0] + "transformer.resblocks."
    last = max(int(k[len(prefix):].split(".")[0]) for k in res if k.startswith(prefix))
    for key in [k for k in res if k.startswith(f"{prefix}{last}.")]:
        res[key.replace(f"{prefix}{last}.", f"{prefix}{last + 1}.", 1)] = res[key].clone()


# --- configs from shapes ------------------------------------------------------------------------------------------
def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise CheckpointFormatError(f"missing tensor {key}") from None


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def infer_unet_config(shapes: Mapping[str, tuple], family: str, te2_projection_dim: int | None = None) -> dict:
    p = UNET_PREFIX
    conv_in = _shape(shapes, p + "input_blocks.0.0.weight")
    levels: list[dict] = []
    current = {"res": 0, "attn": False, "depth": 1, "channels": None}
    i = 1
    while any(k.startswith(f"{p}input_blocks.{i}.") for k in shapes):
        if f"{p}input_blocks.{i}.0.op.weight" in shapes:
            levels.append(dict(current, down=True))
            current = {"res": 0, "attn": False, "depth": 1, "channels": None}
        else:
            current["res"] += 1
            current["channels"] = _shape(shapes, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0]
            if f"{p}input_blocks.{i}.1.proj_in.weight" in shapes:
                current["attn"] = True
                current["depth"] = _count(shapes, rf"^{re.escape(p)}input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
        i += 1
    levels.append(dict(current, down=False))
    if any(level["channels"] is None for level in levels):
        raise CheckpointFormatError("unexpected UNet layout (a level without resnets)")

    attn_key = next((k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise CheckpointFormatError("the UNet has no cross-attention layers")
    proj_in = next(k for k in shapes if k.startswith(p) and k.endswith("proj_in.weight"))
    channels = [level["channels"] for level in levels]
    config = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, p + "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": levels[0]["res"] if len({lv["res"] for lv in levels}) == 1 else [lv["res"] for lv in
                                                                                           levels],
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["attn"] else "UpBlock2D" for lv in reversed(levels)],
        "cross_attention_dim": _shape(shapes, attn_key)[1],
        "use_linear_projection": len(_shape(shapes, proj_in)) == 2,
        "transformer_layers_per_block": [lv["depth"] for lv in levels],
        "attention_head_dim": 8 if family == "sd1" else [max(1, c // 64) for c in channels],
        "norm_num_groups": 32,
        "upcast_attention": family == "sd2",
    }
    time_dim = _shape(shapes, p + "time_embed.0.weight")[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    if f"{p}label_emb.0.0.weight" in shapes:
        projection_in = _shape(shapes, p + "label_emb.0.0.weight")[1]
        if te2_projection_dim is None or (projection_in - te2_projection_dim) % 6:
            raise CheckpointFormatError("cannot work out SDXL's time embedding size from the checkpoint")
        config.update({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": projection_in,
                       "addition_time_embed_dim": (projection_in - te2_projection_dim) // 6})
    return config


def infer_vae_config(shapes: Mapping[str, tuple], family: str, prefix: str = VAE_PREFIX) -> dict:
    """The AutoencoderKL config of an ldm-layout VAE under `prefix`. Flux's and SD3's 16-channel VAEs have no
    quant convs and shift their latents (fixed per family: their files carry no such number)."""
    p = prefix
    count = _count(shapes, rf"^{re.escape(p)}encoder\.down\.(\d+)\.")
    if count == 0:
        raise CheckpointFormatError(f"no VAE (`{p}encoder.down.*`) tensors")
    channels = [_shape(shapes, f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(count)]
    config = {
        "in_channels": _shape(shapes, p + "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, p + "decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * count,
        "up_block_types": ["UpDecoderBlock2D"] * count,
        "block_out_channels": channels,
        "layers_per_block": _count(shapes, rf"^{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": _shape(shapes, p + "encoder.conv_out.weight")[0] // 2,
        "norm_num_groups": 32,
        "sample_size": 1024 if family in ("sdxl", "flux", "chroma", "sd3") else 512,
        "scaling_factor": VAE_SCALING[family],
        "force_upcast": family != "sd1" and family != "sd2",
    }
    if family in VAE_SHIFT:
        config["shift_factor"] = VAE_SHIFT[family]
    if p + "quant_conv.weight" not in shapes:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    return config


def clip_text_config(shapes: Mapping[str, tuple], text_prefix: str, hidden_act: str = "quick_gelu") -> dict:
    """A Hugging Face-layout CLIP text model's config (`text_prefix` ends in `text_model.`); heads are 64 wide."""
    t = text_prefix
    vocab, hidden = _shape(shapes, t + "embeddings.token_embedding.weight")
    return {
        "max_position_embeddings": _shape(shapes, t + "embeddings.position_embedding.weight")[0],
        "num_hidden_layers": _count(shapes, rf"^{re.escape(t)}encoder\.layers\.(\d+)\."),
        "intermediate_size": _shape(shapes, t + "encoder.layers.0.mlp.fc1.weight")[0],
        "hidden_act": hidden_act, "vocab_size": vocab, "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // 64),
        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }


def infer_text_config(shapes: Mapping[str, tuple], family: str, component: str) -> dict:
    prefix, kind = TEXT_PREFIXES[family][component]
    if kind == "clip":
        return clip_text_config(shapes, prefix + "text_model.")
    vocab, hidden = _shape(shapes, prefix + "token_embedding.weight")
    layers = _count(shapes, rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    config = {
        "max_position_embeddings": _shape(shapes, prefix + "positional_embedding")[0],
        # SD2 reads OpenCLIP's penultimate block (diffusers' config simply has one layer fewer)
        "num_hidden_layers": layers - 1 if family == "sd2" else layers,
        "intermediate_size": _shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        "hidden_act": "gelu",
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
        "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
    }
    if component == "text_encoder_2":
        config["projection_dim"] = _shape(shapes, prefix + "text_projection")[1]
    return config
