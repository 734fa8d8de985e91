"""Layer map: the loaded model's patchable modules under canonical names, and the key map built from them.

Two module layouts give the same canonical names (lora_keys):
- the diffusers host: `sd_model.components()` → unet or transformer, text_encoder, text_encoder_2 (CLIP, either
  transformers naming; T5 on Flux/Chroma), text_encoder_3 (SD3's T5);
- A1111's compvis layout: `sd_model.model.diffusion_model` (ldm/sgm UNetModel), the text towers under
  `sd_model.cond_stage_model[.wrapped]` (SD1/SD2) or `sd_model.conditioner.embedders[i][.wrapped]` (SDXL): a
  Hugging Face CLIP under `.transformer`, or OpenCLIP under `.model` whose attention is a
  `torch.nn.MultiheadAttention` with one fused `in_proj_weight`. Its q/k/v rows are exposed as three layers
  (`FusedSlice`) whose `weight` shares the fused tensor's memory, so the patcher writes them like any Linear.

Built once per model (on_model_loaded, or lazily on first use); rebuilt when the model's components change.
"""
from __future__ import annotations

import hashlib
import re

import lora_checkpoint_source
import lora_flux
import lora_keys
import lora_sd3
import torch

LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
COMPONENT_NAMES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # SD3: T5 third
FAMILIES = (("is_sdxl", "SDXL"), ("is_sd3", "SD3"), ("is_sd2", "SD2"), ("is_sd1", "SD1"))

# OpenCLIP text tower module paths → CLIP (diffusers) ones; the attention itself becomes three FusedSlices.
_OPENCLIP_LAYER_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                         "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_re_resblock = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor on `view`'s memory with a version counter of its own: writing q's rows must not look like a
    write to k's (views share their base's counter, and the patcher reads it to notice foreign writes)."""
    with torch.no_grad():
        res = torch.empty(0, dtype=view.dtype, device=view.device)
        return res.set_(view.untyped_storage(), view.storage_offset(), view.size(), view.stride())


class FusedSlice(torch.nn.Module):
    """A layer that is a row block of a parameter of another module (contiguous, like any Linear weight).

    `weight`/`bias` are read through to the owner on every access: a moved or cast owner (`.to()`, `.half()`) is
    followed without changing the tensor object the patcher knows; a write made by anyone else to the owner's
    tensor (new weights loaded in place, a replaced parameter) gives a new tensor object, which the patcher takes
    as a foreign change (it keeps the new values as the original)."""

    def __init__(self, owner: torch.nn.Module, weight_name: str, bias_name: str | None, rows: tuple[int, int] | None):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner stays where it is in the model
        self._weight_name = weight_name
        self._bias_name = bias_name
        self._rows = rows
        self._cache: dict[str, tuple] = {}

    def _view(self, base: torch.Tensor) -> torch.Tensor:
        view = base.detach()
        return view if self._rows is None else view[self._rows[0]:self._rows[1]]

    def _read(self, name: str | None) -> torch.Tensor | None:
        base = getattr(self._owner, name) if name else None
        if base is None:
            return None
        layout = (base.data_ptr(), base.dtype, base.device, tuple(base.shape))
        cached = self._cache.get(name)
        if cached is None or cached[0] is not base or cached[1] != _version(base):
            alias = _alias(self._view(base))
        else:
            alias = cached[3]
            if cached[2] != layout:  # the owner was moved or cast: same tensor object, new memory
                alias.data = _alias(self._view(base))
        self._cache[name] = (base, _version(base), layout, alias)
        return alias

    @property
    def weight(self) -> torch.Tensor:
        return self._read(self._weight_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._read(self._bias_name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias"):
            raise ValueError(f"{getattr(self, 'network_layer_name', 'a fused layer')}: its {name} is part of a fused "
                             f"tensor of {type(self._owner).__name__} and cannot be replaced")
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"{self._weight_name}[{self._rows}]"


def mha_slices(mha: torch.nn.MultiheadAttention) -> tuple[FusedSlice, FusedSlice, FusedSlice]:
    """The q, k and v layers of a MultiheadAttention, kept on the module so they (and the patcher's bookkeeping
    on them) live as long as the model does, across layer-map rebuilds."""
    slices = getattr(mha, "_lora_fused_slices", None)
    if slices is None:
        d = mha.embed_dim
        slices = tuple(FusedSlice(mha, "in_proj_weight", "in_proj_bias", (i * d, (i + 1) * d)) for i in range(3))
        object.__setattr__(mha, "_lora_fused_slices", slices)
    return slices


# --- where the parts of a model are ------------------------------------------------------------------------------
def is_compvis_layout(sd_model) -> bool:
    return hasattr(getattr(sd_model, "model", None), "diffusion_model")


def _text_tower(embedder) -> tuple[str, torch.nn.Module] | None:
    """("clip", Hugging Face CLIP model) or ("openclip", OpenCLIP model) of an A1111 text embedder."""
    inner = getattr(embedder, "wrapped", embedder)
    transformer = getattr(inner, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and (hasattr(transformer, "text_model") or
                                                     hasattr(transformer, "encoder")):
        return "clip", transformer
    model = getattr(inner, "model", None)
    if isinstance(model, torch.nn.Module) and hasattr(getattr(model, "transformer", None), "resblocks"):
        return "openclip", model
    return None


def _compvis_text_towers(sd_model) -> list[tuple[str, str, torch.nn.Module]]:
    """[(A1111's layer-name prefix, kind, module)] of a compvis model's text towers, in order (at most two).
    A1111 names a text layer by its module path under the embedder's `wrapped`, after the embedder's index on
    SDXL: `transformer_text_model_...` (SD1), `model_transformer_resblocks_...` (SD2), `0_transformer_...`."""
    conditioner = getattr(sd_model, "conditioner", None)
    embedders = list(getattr(conditioner, "embedders", None) or []) if conditioner is not None else []
    indexed = [(f"{i}_", e) for i, e in enumerate(embedders)]
    if not embedders and isinstance(getattr(sd_model, "cond_stage_model", None), torch.nn.Module):
        indexed = [("", sd_model.cond_stage_model)]
    towers = [(prefix + ("transformer_" if t[0] == "clip" else "model_"), *t)
              for prefix, e in indexed if (t := _text_tower(e)) is not None]
    return towers[:2]


def model_sources(sd_model) -> list[tuple[str, str, torch.nn.Module]]:
    """[(component name, kind, module)], kind "unet", "ldm_unet", "clip" or "openclip"; never the VAE."""
    if is_compvis_layout(sd_model):
        res = [("unet", "ldm_unet", sd_model.model.diffusion_model)]
        names = ("text_encoder", "text_encoder_2")
        res += [(names[i], kind, module) for i, (_, kind, module) in enumerate(_compvis_text_towers(sd_model))]
        return res
    components = sd_model.components() if callable(getattr(sd_model, "components", None)) else \
        {name: getattr(sd_model, name, None) for name in COMPONENT_NAMES}
    kinds = {"unet": "unet", "transformer": "transformer"}
    return [(k, kinds.get(k, "clip"), v) for k, v in components.items()
            if k in COMPONENT_NAMES and isinstance(v, torch.nn.Module)]


def model_components(sd_model) -> dict[str, torch.nn.Module]:
    """{component name: module} for the parts Loras patch (never the VAE)."""
    return {name: module for name, _, module in model_sources(sd_model)}


def model_family(sd_model, te_count: int) -> str | None:
    """"SD1", "SD2", "SDXL" (or "SD3") from the model's A1111 flags; SDXL when it has two text encoders. A Flux-type
    transformer (the host's `is_flux`, or the transformer's own class) is "Flux" or "Chroma"."""
    transformer = _transformer(sd_model)
    if getattr(sd_model, "is_flux", False) is True or (transformer is not None and
                                                        lora_flux.is_flux_transformer(transformer)):
        return lora_flux.family_of(transformer) if transformer is not None else "Flux"
    for attr, family in FAMILIES:
        if getattr(sd_model, attr, False) is True:
            return family
    if transformer is not None and lora_sd3.is_sd3_transformer(transformer):
        return "SD3"
    return "SDXL" if te_count == 2 else None


def _transformer(sd_model) -> torch.nn.Module | None:
    components = sd_model.components() if callable(getattr(sd_model, "components", None)) else {}
    transformer = components.get("transformer", getattr(sd_model, "transformer", None))
    return transformer if isinstance(transformer, torch.nn.Module) else None


def _is_layer(module: torch.nn.Module) -> bool:
    """A patchable layer: the torch types, and RMSNorm-like modules with a weight of their own (diffusers' and
    transformers' RMSNorm / T5LayerNorm: the q/k norms of DiT attention, whose scale full-weight files change)."""
    if isinstance(module, LAYER_TYPES):
        return True
    return type(module).__name__ in _NORM_CLASSES and isinstance(getattr(module, "weight", None), torch.nn.Parameter)


_NORM_CLASSES = ("RMSNorm", "T5LayerNorm")


def _unet_layers(kind: str, unet: torch.nn.Module, layers: dict[str, torch.nn.Module],
                 paths: dict[str, tuple[str, str]]) -> lora_keys.UnetStructure:
    structure = lora_keys.UnetStructure.from_unet(unet)
    table = structure.block_table() if kind == "ldm_unet" and structure is not None else None
    for path, module in unet.named_modules():
        if not path or not isinstance(module, LAYER_TYPES):
            continue
        canonical = path if table is None else lora_keys.compvis_to_diffusers(path, table)
        if canonical is not None:
            layers[f"unet.{canonical}"] = module
            paths[f"unet.{canonical}"] = ("unet", path)
    return structure


def _openclip_layers(component: str, model: torch.nn.Module, layers: dict[str, torch.nn.Module],
                     paths: dict[str, tuple[str, str]]) -> None:
    """OpenCLIP's layers under CLIP names. Its `text_projection` is a bare parameter (diffusers' is a Linear of its
    transpose): a transposed, non-contiguous weight the patcher cannot write in place, so it is not a layer here."""
    for path, module in model.named_modules():
        if path == "ln_final":
            layers[f"{component}.final_layer_norm"] = module
            paths[f"{component}.final_layer_norm"] = (component, path)
            continue
        m = _re_resblock.match(path)
        if m is None:
            continue
        n, rest = m.groups()
        if rest == "attn" and isinstance(module, torch.nn.MultiheadAttention) and module.in_proj_weight is not None:
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), mha_slices(module), strict=True):
                layers[f"{component}.encoder.layers.{n}.self_attn.{name}"] = piece
        elif rest in _OPENCLIP_LAYER_PARTS and isinstance(module, LAYER_TYPES):
            layers[f"{component}.encoder.layers.{n}.{_OPENCLIP_LAYER_PARTS[rest]}"] = module
            paths[f"{component}.encoder.layers.{n}.{_OPENCLIP_LAYER_PARTS[rest]}"] = (component, path)


class LayerMap:
    """{canonical name: module} of one model plus its KeyMap; `token` identifies the naming for caches.

    `layout` is "diffusers" or "compvis"; `family` the model family the key map refuses other files for;
    `module_paths` {canonical: (component, the module's own path in it)}, where the module really is (canonical
    text encoder names drop `text_model.`; fused q/k/v rows have no path of their own and are left out).
    `a1111_names` {canonical: A1111's network_layer_name} on the compvis layout (`diffusion_model_input_blocks_1_1_
    proj_in`, `transformer_text_model_encoder_layers_0_self_attn_q_proj`): what other extensions match layers by."""

    def __init__(self, sd_model):
        sources = model_sources(sd_model)
        self.components = {name: module for name, _, module in sources}
        self.component_ids = {k: id(v) for k, v in self.components.items()}
        self.layout = "compvis" if is_compvis_layout(sd_model) else "diffusers"
        self.layers: dict[str, torch.nn.Module] = {}
        self.module_paths: dict[str, tuple[str, str]] = {}
        self.structure: lora_keys.UnetStructure | None = None
        for name, kind, module in sources:
            if kind in ("unet", "ldm_unet"):
                self.structure = _unet_layers(kind, module, self.layers, self.module_paths)
            elif kind == "openclip":
                _openclip_layers(name, module, self.layers, self.module_paths)
            else:
                for path, layer in module.named_modules():
                    if path and _is_layer(layer):
                        canonical = f"{name}.{lora_keys.canonical_text_path(path)}"
                        self.layers[canonical] = layer
                        self.module_paths[canonical] = (name, path)
        self.a1111_names: dict[str, str] = {}
        if self.layout == "compvis":
            prefixes = {"unet": "diffusion_model_", **{name: prefix for name, (prefix, _, _) in zip(
                ("text_encoder", "text_encoder_2"), _compvis_text_towers(sd_model), strict=False)}}
            self.a1111_names = {canonical: prefixes[component] + path.replace(".", "_")
                                for canonical, (component, path) in self.module_paths.items() if component in prefixes}
        te_count = sum(1 for k in ("text_encoder", "text_encoder_2") if k in self.components)
        self.family = model_family(sd_model, te_count)
        self.key_map = lora_keys.build_key_map(self.layers, self.structure, te_count, family=self.family)
        if self.family in lora_flux.FAMILIES:
            lora_flux.extend_key_map(self.key_map, self.layers)
        elif self.family in lora_sd3.FAMILIES:
            lora_sd3.extend_key_map(self.key_map, self.layers)
        digest = hashlib.sha256("\n".join(self.layers).encode()).hexdigest()[:16]
        self.token = f"{len(self.layers)}:{self.family}:{digest}"

    def is_current_for(self, sd_model) -> bool:
        return {k: id(v) for k, v in model_components(sd_model).items()} == self.component_ids


def assign_network_names_to_compvis_modules(sd_model) -> LayerMap | None:
    """Names every patchable module and stores the map on the model (`sd_model.network_layer_map`).

    `module.lora_layer_key` is the canonical name this extension works with. `module.network_layer_name` and
    `sd_model.network_layer_mapping` ({name: module}) are A1111's: on the compvis layout its own names, which other
    extensions compare against (Regional Prompter watches `diffusion_model_time_embed_0`); the canonical name where
    A1111 has none (our diffusers host, OpenCLIP's fused q/k/v rows)."""
    if sd_model is None:
        return None
    layer_map = LayerMap(sd_model)
    mapping = {}
    for name, module in layer_map.layers.items():
        module.lora_layer_key = name
        module.network_layer_name = layer_map.a1111_names.get(name, name)
        module.network_module_path = layer_map.module_paths.get(name)
        mapping[module.network_layer_name] = module
    sd_model.network_layer_mapping = mapping
    sd_model.network_layer_map = layer_map
    lora_checkpoint_source.attach(sd_model, layer_map)  # A1111: originals re-read from its checkpoint file
    return layer_map


def get_layer_map(sd_model) -> LayerMap:
    layer_map = getattr(sd_model, "network_layer_map", None)
    if layer_map is None or not layer_map.is_current_for(sd_model):
        layer_map = assign_network_names_to_compvis_modules(sd_model)
    return layer_map
