"""Generation jobs (A1111 names): StableDiffusionProcessingTxt2Img (with the hires fix),
StableDiffusionProcessingImg2Img, process_images, Processed, create_infotext.

process_images runs the A1111 order per batch: parse the prompts' extra-network tags, activate them, apply
embeddings, sample. The hires fix's second pass (processing_hires) activates the Hires prompt's own tags before it
samples, with `p.is_hr_pass` set, as A1111 does; img2img's init images are prepared by processing_img2img.
"""
from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Any

from modules import (
    devices,
    diffusion_passes,
    dit_generation,
    extra_networks,
    images,
    infotext_utils,
    processing_hires,
    processing_img2img,
    samplers,
    sd_hijack,
    shared,
)
from modules.errors import JobInputError
from modules.extra_networks import re_extra_net

opt_C = 4
opt_f = 8
VERSION = "lora-webui 0.1"


class StableDiffusionProcessing:
    def __init__(self, sd_model=None, outpath_samples: str | None = None, outpath_grids: str | None = None,
                 prompt: str | list = "", styles: list | None = None, seed: int = -1, subseed: int = -1,
                 subseed_strength: float = 0, seed_resize_from_h: int = -1, seed_resize_from_w: int = -1,
                 seed_enable_extras: bool = True, sampler_name: str | None = None, scheduler: str | None = None,
                 batch_size: int = 1, n_iter: int = 1, steps: int = 20, cfg_scale: float = 7.0, width: int = 512,
                 height: int = 512, restore_faces: bool | None = None, tiling: bool | None = None,
                 do_not_save_samples: bool = False, do_not_save_grid: bool = False,
                 extra_generation_params: dict | None = None, overlay_images: Any = None,
                 negative_prompt: str | list = "", eta: float | None = None, do_not_reload_embeddings: bool = False,
                 denoising_strength: float | None = None, ddim_discretize: str | None = None,
                 s_min_uncond: float | None = None, s_churn: float | None = None, s_tmax: float | None = None,
                 s_tmin: float | None = None, s_noise: float | None = None, override_settings: dict | None = None,
                 override_settings_restore_afterwards: bool = True, sampler_index: int | None = None,
                 refiner_checkpoint: str | None = None, refiner_switch_at: float | None = None,
                 disable_extra_networks: bool = False, comments: dict | None = None,
                 distilled_cfg_scale: float | None = None, **kwargs):
        self.sd_model = sd_model
        self.outpath_samples = outpath_samples
        self.outpath_grids = outpath_grids
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.styles = styles or []
        self.seed = seed
        self.subseed = subseed
        self.sampler_name = sampler_name or samplers.default_sampler_name
        self.sampler_given = bool(sampler_name)  # else the loaded model's default is used (Flux: Euler)
        self.scheduler = scheduler
        self.batch_size = int(batch_size)
        self.n_iter = int(n_iter)
        self.steps = int(steps)
        self.cfg_scale = float(cfg_scale)
        # FLUX.1-dev's guidance embedding (Forge's field); None: 3.5 (modules/dit_generation.py)
        self.distilled_cfg_scale = None if distilled_cfg_scale is None else float(distilled_cfg_scale)
        self.width = int(width)
        self.height = int(height)
        self.do_not_save_samples = do_not_save_samples
        self.do_not_save_grid = do_not_save_grid
        self.extra_generation_params = dict(extra_generation_params or {})
        self.override_settings = {k: v for k, v in (override_settings or {}).items()}
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.disable_extra_networks = disable_extra_networks
        self.denoising_strength = denoising_strength
        self.comments: dict[str, int] = dict(comments or {})
        self.is_hr_pass = False
        self.enable_hr = False
        self.iteration = 0
        self.all_prompts: list[str] = []
        self.all_negative_prompts: list[str] = []
        self.all_seeds: list[int] = []
        self.all_subseeds: list[int] = []
        self.prompts: list[str] = []
        self.negative_prompts: list[str] = []
        self.seeds: list[int] = []
        self.subseeds: list[int] = []
        self.extra_network_data: dict = {}
        self.scripts = None
        self.script_args: list = []
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.cached_c = [None, None]
        self.cached_uc = [None, None]

    job_name = "txt2img"

    def comment(self, text: str) -> None:
        """Adds a line to the job's comments (shown under the image and as a UI warning); repeats are kept once."""
        self.comments[text] = 1

    # --- the steps process_images calls, in order (A1111 names) -------------------------------------------------
    def setup_prompts(self) -> None:
        """After all_prompts/all_negative_prompts are set: per-mode prompt lists (the Hires prompts)."""

    def init(self, all_prompts: list, all_seeds: list, all_subseeds: list) -> None:
        """Once per job, before the first batch: checks and per-mode preparation (init images, hires sizes)."""

    def parse_extra_network_prompts(self) -> None:
        """Strips the tags from this batch's prompts; the first prompt's tags are the batch's (A1111 rule)."""
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        self.negative_prompts, _ = extra_networks.parse_prompts(self.negative_prompts)

    def sample(self, sd_model) -> list:
        """This batch's images (PIL), with p.prompts / p.negative_prompts / p.seeds set and the networks active."""
        raise NotImplementedError

    @property
    def passes(self) -> int:
        """Sampling passes per batch (2 with the hires fix), for the progress bar."""
        return 1

    def negative_prompts_for_tags(self) -> list[str]:
        """Every negative prompt the job encodes (tags there are ignored and reported)."""
        return list(self.all_negative_prompts)

    @property
    def sd_model_name(self) -> str | None:
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        return getattr(info, "name_for_extra", None) or getattr(info, "model_name", None)

    @property
    def sd_model_hash(self) -> str | None:
        return getattr(self.sd_model, "sd_model_hash", None)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img with A1111's hires fix: `enable_hr` upscales the first pass (its latents with a "Latent" mode,
    else its decoded images with an image upscaler) to `hr_scale` times the size or to `hr_resize_x` x
    `hr_resize_y`, then denoises it again for `hr_second_pass_steps` steps from `denoising_strength`, with the
    Hires prompt's own Lora set active."""

    def __init__(self, enable_hr: bool = False, denoising_strength: float | None = 0.75, firstphase_width: int = 0,
                 firstphase_height: int = 0, hr_scale: float = 2.0, hr_upscaler: str | None = None,
                 hr_second_pass_steps: int = 0, hr_resize_x: int = 0, hr_resize_y: int = 0,
                 hr_checkpoint_name: str | None = None, hr_sampler_name: str | None = None,
                 hr_scheduler: str | None = None, hr_prompt: str | list = "", hr_negative_prompt: str | list = "",
                 force_task_id: str | None = None, **kwargs):
        super().__init__(denoising_strength=0.75 if denoising_strength is None else denoising_strength, **kwargs)
        self.enable_hr = bool(enable_hr)
        self.hr_scale = float(hr_scale if hr_scale is not None else 2.0)
        self.hr_upscaler = hr_upscaler
        self.hr_second_pass_steps = int(hr_second_pass_steps or 0)
        self.hr_resize_x = int(hr_resize_x or 0)
        self.hr_resize_y = int(hr_resize_y or 0)
        self.hr_checkpoint_name = hr_checkpoint_name
        self.hr_sampler_name = None if hr_sampler_name in ("", "Use same sampler") else hr_sampler_name
        self.hr_scheduler = hr_scheduler
        self.hr_prompt = hr_prompt if hr_prompt is not None else ""
        self.hr_negative_prompt = hr_negative_prompt if hr_negative_prompt is not None else ""
        self.hr_upscale_to_x = 0
        self.hr_upscale_to_y = 0
        self.truncate_x = 0
        self.truncate_y = 0
        self.latent_scale_mode: dict | None = None
        self.all_hr_prompts: list[str] = []
        self.all_hr_negative_prompts: list[str] = []
        self.hr_prompts: list[str] = []
        self.hr_negative_prompts: list[str] = []
        self.hr_extra_network_data: dict = {}
        if firstphase_width or firstphase_height:  # A1111's old API: width/height are the final size
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.width, self.height
            self.width, self.height = int(firstphase_width or self.width), int(firstphase_height or self.height)

    @property
    def passes(self) -> int:
        return 2 if self.enable_hr else 1

    def setup_prompts(self) -> None:
        if self.enable_hr:
            processing_hires.setup_prompts(self)

    def init(self, all_prompts: list, all_seeds: list, all_subseeds: list) -> None:
        if self.enable_hr:
            processing_hires.init(self)

    def parse_extra_network_prompts(self) -> None:
        super().parse_extra_network_prompts()
        if self.enable_hr:
            processing_hires.parse_extra_network_prompts(self)

    def negative_prompts_for_tags(self) -> list[str]:
        return list(self.all_negative_prompts) + (list(self.all_hr_negative_prompts) if self.enable_hr else [])

    def sample(self, sd_model) -> list:
        if not self.enable_hr:
            return diffusion_passes.txt2img(self, sd_model, self.seeds)
        return processing_hires.sample(self, sd_model)


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img: the init images, resized to width x height by `resize_mode` (A1111's 0-3), are encoded and
    denoised from `denoising_strength`. One init image serves the whole batch; several set the batch size."""

    job_name = "img2img"

    def __init__(self, init_images: list | None = None, resize_mode: int = 0, denoising_strength: float | None = 0.75,
                 image_cfg_scale: float | None = None, mask: Any = None, mask_blur_x: int = 4, mask_blur_y: int = 4,
                 mask_blur: int | None = None, mask_round: bool = True, inpainting_fill: int = 0,
                 inpaint_full_res: bool = True, inpaint_full_res_padding: int = 0, inpainting_mask_invert: int = 0,
                 initial_noise_multiplier: float | None = None, latent_mask: Any = None,
                 force_task_id: str | None = None, **kwargs):
        super().__init__(denoising_strength=0.75 if denoising_strength is None else denoising_strength, **kwargs)
        self.init_images = list(init_images or [])
        self.resize_mode = int(resize_mode or 0)
        self.image_cfg_scale = image_cfg_scale
        self.image_mask = mask
        self.init_latent = None  # the batch's init latents when resize_mode is 3 (latent upscale)
        self.batch_init_images: list = []  # the resized init images, one per image of a batch

    def init(self, all_prompts: list, all_seeds: list, all_subseeds: list) -> None:
        processing_img2img.init(self)

    def sample(self, sd_model) -> list:
        return processing_img2img.sample(self, sd_model)


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list: list, seed: int = -1, info: str = "",
                 subseed: int | None = None, all_prompts: list | None = None, all_negative_prompts: list | None = None,
                 all_seeds: list | None = None, all_subseeds: list | None = None, index_of_first_image: int = 0,
                 infotexts: list | None = None, comments: str = ""):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.info = info
        self.comments = comments
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.styles = p.styles
        self.job_timestamp = p.job_timestamp
        self.all_prompts = all_prompts or p.all_prompts
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts
        self.all_seeds = all_seeds or p.all_seeds
        self.all_subseeds = all_subseeds or p.all_subseeds
        self.infotexts = infotexts or [info]
        self.version = VERSION

    def js(self) -> str:
        obj = {
            "prompt": self.all_prompts[0] if self.all_prompts else self.prompt,
            "all_prompts": self.all_prompts,
            "negative_prompt": self.all_negative_prompts[0] if self.all_negative_prompts else self.negative_prompt,
            "all_negative_prompts": self.all_negative_prompts,
            "seed": self.seed,
            "all_seeds": self.all_seeds,
            "subseed": self.subseed,
            "all_subseeds": self.all_subseeds,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.sampler_name,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "sd_model_name": self.sd_model_name,
            "sd_model_hash": self.sd_model_hash,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.index_of_first_image,
            "infotexts": self.infotexts,
            "styles": self.styles,
            "job_timestamp": self.job_timestamp,
            "comments": self.comments,
            "version": self.version,
        }
        return json.dumps(obj, default=str)


def create_infotext(p: StableDiffusionProcessing, all_prompts: list, all_seeds: list, all_subseeds: list,
                    comments: Any = None, iteration: int = 0, position_in_batch: int = 0,
                    use_main_prompt: bool = False, index: int | None = None,
                    all_negative_prompts: list | None = None) -> str:
    """The infotext of one image, keys in A1111's order. A value in p.extra_generation_params may be a list (one
    entry per image of the job) or a callable called with keyword arguments (p, index, prompt_text,
    negative_prompt, ...) that returns the text or None, as A1111 allows ("Hires prompt" is one)."""
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    prompt_text = p.prompt if use_main_prompt else all_prompts[index]
    negative_prompt = all_negative_prompts[index] if all_negative_prompts else ""
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if shared.opts.add_model_hash_to_info else None,
        "Model": p.sd_model_name if shared.opts.add_model_name_to_info else None,
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": clip_skip if (clip_skip := shared.opts.data.get("CLIP_stop_at_last_layers", 1)) > 1 else None,
        "Batch size": p.batch_size if p.batch_size > 1 else None,
        "Batch pos": position_in_batch if p.batch_size > 1 else None,
    }
    generation_params.update(p.extra_generation_params)
    generation_params["Version"] = VERSION if shared.opts.add_version_to_infotext else None
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index] if index < len(value) else None
        elif callable(value):
            generation_params[key] = value(p=p, index=index, prompt_text=prompt_text,
                                           negative_prompt=negative_prompt, iteration=iteration,
                                           position_in_batch=position_in_batch, all_prompts=all_prompts,
                                           all_seeds=all_seeds, all_subseeds=all_subseeds)
    return infotext_utils.build_infotext(prompt_text, negative_prompt, generation_params)


def _as_list(value, count: int) -> list:
    return list(value) if isinstance(value, list) else [value] * count


def _setup_prompts_and_seeds(p: StableDiffusionProcessing) -> None:
    count = p.batch_size * p.n_iter
    p.all_prompts = _as_list(p.prompt, count)
    p.all_negative_prompts = _as_list(p.negative_prompt, count)
    seed = int(p.seed) if p.seed is not None else -1
    if seed == -1:
        seed = int(random.randrange(4294967294))
    p.seed = seed
    p.all_seeds = [seed + i for i in range(count)]
    p.all_subseeds = [int(p.subseed) if p.subseed not in (None, -1) else 0] * count


def _negative_prompt_tags(negative_prompts: list[str]) -> list[str]:
    found = []
    for text in negative_prompts:
        for m in re_extra_net.finditer(text or ""):
            if m.group(0) not in found:
                found.append(m.group(0))
    return found


def process_images(p: StableDiffusionProcessing) -> Processed:
    """Runs a job with override_settings applied for its duration."""
    stored_opts = {k: shared.opts.data.get(k) for k in p.override_settings}
    try:
        for k, v in p.override_settings.items():
            shared.opts.set(k, v)
            if k == "sd_model_checkpoint":
                from modules import sd_models
                sd_models.reload_model_weights()
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                if k != "sd_model_checkpoint":
                    shared.opts.set(k, v)


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    if p.sd_model is None:
        p.sd_model = shared.sd_model
    sd_model = p.sd_model
    try:
        p.sampler_name = samplers.check(p.sampler_name if getattr(p, "sampler_given", True) else None, sd_model)
    except ValueError as e:
        raise JobInputError(f"sampler_name: {e}") from None
    if dit_generation.handles(sd_model):
        dit_generation.check_size(sd_model, p.width, p.height)
    _setup_prompts_and_seeds(p)
    p.setup_prompts()

    ignored_tags = _negative_prompt_tags(p.negative_prompts_for_tags())
    if ignored_tags:
        p.comment("Extra networks in the negative prompt are ignored: " + ", ".join(ignored_tags))

    sd_hijack.model_hijack.refresh_embeddings(sd_model)  # before activation: bundled embeddings check against it
    shared.state.begin(job=p.job_name)
    output_images: list = []
    infotexts: list[str] = []
    try:
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        shared.state.job_count = p.n_iter * p.passes
        for n in range(p.n_iter):
            if shared.state.interrupted:
                break
            p.iteration = n
            shared.state.job_no = n * p.passes
            sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts = p.all_prompts[sl]
            p.negative_prompts = p.all_negative_prompts[sl]
            p.seeds = p.all_seeds[sl]
            p.subseeds = p.all_subseeds[sl]
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            p.prompts, p.negative_prompts = sd_hijack.model_hijack.apply_embeddings(
                sd_model, p.prompts, p.negative_prompts, p)

            samples = p.sample(sd_model)
            for i, image in enumerate(samples):
                index = n * p.batch_size + i
                text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=n,
                                       position_in_batch=i)
                infotexts.append(text)
                image.info["parameters"] = text
                output_images.append(image)
                if shared.opts.samples_save and not p.do_not_save_samples:
                    images.save_sample(image, p, p.all_seeds[index], text)
        if not p.disable_extra_networks and p.extra_network_data is not None:
            extra_networks.deactivate(p, p.extra_network_data)
    finally:
        p.is_hr_pass = False
        sd_hijack.model_hijack.clear_embeddings(sd_model)
        shared.state.end()
        devices.torch_gc()

    comments = "\n".join(p.comments)
    info = infotexts[0] if infotexts else ""
    return Processed(p, output_images, seed=p.all_seeds[0], info=info, subseed=p.all_subseeds[0],
                     infotexts=infotexts, comments=comments)
