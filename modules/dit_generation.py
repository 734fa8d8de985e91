"""What a denoising pass needs that differs for the transformer families (FLUX.1 dev/schnell, Chroma, SD3/3.5).

- Prompts: CLIP-L's pooled output and T5's sequence (Chroma: T5 only; SD3: CLIP-L, CLIP-G and T5), encoded by the
  pipeline's own `encode_prompt` at the model's T5 length (dev and Chroma 512 tokens, schnell and SD3 256; never more
  than the tokenizer allows). A1111's emphasis `(word:1.2)` has no meaning for T5: the words are kept, the weights
  dropped (and the job says so); BREAK is dropped.
- Guidance: FLUX.1-dev is guidance-distilled, so there is no negative prompt and no CFG (the CFG scale is not used);
  its guidance embedding gets `distilled_cfg_scale` (Forge's API field and UI slider, default 3.5, recorded as
  `Distilled CFG Scale`). schnell has no guidance. Chroma and SD3 are not distilled: real CFG with the negative
  prompt, `cfg_scale` as usual.
- img2img / the hires pass: each family's img2img pipeline built from the loaded components; latents are the
  unpacked (B, 16, H/8, W/8) ones, shifted and scaled by the VAE's factors.
"""
from __future__ import annotations

import torch

from modules import prompt_parser

DEFAULT_DISTILLED_CFG = 3.5
_IMG2IMG_ATTR = "_dit_img2img_pipeline"


def plain_prompt(text: str) -> tuple[str, bool]:
    """(the prompt's words without A1111's attention syntax, whether some emphasis was dropped)."""
    parts, dropped = [], False
    for fragment, weight in prompt_parser.parse_prompt_attention(text or ""):
        if fragment == "BREAK" and weight == -1:
            continue
        dropped = dropped or weight != 1.0
        parts.append(fragment)
    return "".join(parts), dropped


def handles(sd_model) -> bool:
    """Whether `sd_model` is one of the transformer families this module runs."""
    from modules.sd_models_dit import FAMILIES

    return getattr(sd_model, "family", None) in FAMILIES


def check_size(sd_model, width: int, height: int, what: str = "width/height") -> None:
    """Flux's and SD3's latents are cut into 2x2 patches of the VAE's 8x8 cells: sizes are multiples of 16."""
    from modules.errors import JobInputError

    step = 2 * int(getattr(sd_model.pipe, "vae_scale_factor", 8))
    if width % step or height % step:
        raise JobInputError(f"{what}: {width}x{height} is not a multiple of {step} in both directions, which "
                            f"{_name(sd_model)} needs (e.g. {width // step * step}x{height // step * step})")


def max_sequence_length(sd_model) -> int:
    from modules.sd_models_dit import MAX_SEQUENCE, T5_TOKENIZER

    tokenizer = getattr(sd_model.pipe, T5_TOKENIZER[sd_model.family], None)
    return min(MAX_SEQUENCE.get(sd_model.variant, 512), int(getattr(tokenizer, "model_max_length", 512)))


def uses_cfg(sd_model, cfg_scale: float) -> bool:
    """Chroma and SD3 run classifier-free guidance (with the negative prompt); FLUX.1 is guidance-distilled."""
    return sd_model.family in ("chroma", "sd3") and cfg_scale > 1.0


def encode(sd_model, prompts: list[str], negative_prompts: list[str], cfg_scale: float, p=None) -> dict:
    """The pipeline's prompt_embeds (and pooled or negative/mask ones) for a batch."""
    texts = [plain_prompt(t) for t in prompts]
    negatives = [plain_prompt(t) for t in negative_prompts]
    cfg = uses_cfg(sd_model, cfg_scale)
    if p is not None:
        if any(dropped for _, dropped in texts + (negatives if cfg else [])):
            p.comment(f"{_name(sd_model)} reads prompts with T5: emphasis weights like (word:1.2) were ignored")
        if not cfg and any(t.strip() for t, _ in negatives):
            why = "has no negative prompt (guidance-distilled)" if sd_model.family == "flux" else \
                "uses the negative prompt only with a CFG scale above 1"
            p.comment(f"{_name(sd_model)} {why}; it was ignored")
    pipe, length = sd_model.pipe, max_sequence_length(sd_model)
    device = sd_model.device
    with torch.inference_mode():
        if sd_model.family == "chroma":
            embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
                prompt=[t for t, _ in texts], negative_prompt=[t for t, _ in negatives] if cfg else None,
                device=device, do_classifier_free_guidance=cfg, max_sequence_length=length)
            res = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
            if cfg:
                res.update(negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
            return res
        if sd_model.family == "sd3":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=[t for t, _ in texts], prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=cfg, negative_prompt=[t for t, _ in negatives] if cfg else None,
                max_sequence_length=length)
            res = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            if cfg:
                res.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
            return res
        embeds, pooled, _ = pipe.encode_prompt(prompt=[t for t, _ in texts], prompt_2=None, device=device,
                                               max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _name(sd_model) -> str:
    if sd_model.family == "sd3":
        return sd_model.variant.upper()
    return "Chroma" if sd_model.family == "chroma" else f"FLUX.1-{sd_model.variant}"


def guidance_kwargs(p, sd_model) -> dict:
    """The pipeline's guidance arguments, and the infotext field Forge writes for distilled guidance."""
    kwargs = {"max_sequence_length": max_sequence_length(sd_model)}
    if sd_model.family in ("chroma", "sd3"):
        kwargs["guidance_scale"] = float(p.cfg_scale)
        return kwargs
    distilled = getattr(p, "distilled_cfg_scale", None)
    distilled = float(DEFAULT_DISTILLED_CFG if distilled is None else distilled)
    kwargs["guidance_scale"] = distilled
    if sd_model.variant == "dev":
        p.extra_generation_params["Distilled CFG Scale"] = distilled
    return kwargs


def img2img_pipeline(sd_model):
    """Flux's / Chroma's img2img pipeline over the loaded pipeline's components (built once per model)."""
    from modules import sd_models_dit

    pipe = sd_model.pipe
    components = {k: v for k, v in pipe.components.items() if v is not None}
    cached = sd_model.__dict__.get(_IMG2IMG_ATTR)
    if cached is not None and all(getattr(cached, k, None) is v for k, v in components.items() if k != "scheduler"):
        return cached
    img2img = sd_models_dit.pipeline_class(sd_model.family, img2img=True)(**components)
    img2img.set_progress_bar_config(disable=True)
    sd_model.__dict__[_IMG2IMG_ATTR] = img2img
    return img2img


def unpack_latents(sd_model, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Flux's and Chroma's packed (B, tokens, 64) latents → (B, 16, H/8, W/8); SD3's are not packed."""
    if sd_model.family == "sd3":
        return latents
    pipe = sd_model.pipe
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
