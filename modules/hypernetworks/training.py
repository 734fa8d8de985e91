"""Training a hypernetwork on the loaded diffusers pipeline (the core of A1111's Train tab, no UI).

Each step: a batch of image latents gets noise at random timesteps (a DDPM scheduler built from the model's
scheduler config), the UNet predicts with the hypernetwork hooked into every attention layer, and the MSE
against the noise (or v, or the sample, per the model's prediction type) trains only the hypernetwork.
Progress is published through shared.state; shared.state.interrupted stops after the current step.
"""
from __future__ import annotations

import csv
import datetime
import io
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules import atomic, shared
from modules.hypernetworks import hypernetwork as hn
from modules.hypernetworks.dataset import HypernetworkDataset, make_prompt
from modules.hypernetworks.learn_schedule import LearnRateScheduler

OPTIMIZERS = {name: cls for name, cls in vars(torch.optim).items()
              if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}


@dataclass
class _Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    pipe: object
    is_sdxl: bool


def _pipeline(sd_model) -> _Pipeline:
    pipe = getattr(sd_model, "pipe", None) or sd_model
    for part in ("unet", "vae", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise ValueError(f"the model has no {part}: hypernetwork training needs a diffusers pipeline")
    return _Pipeline(pipe.unet, pipe.vae, pipe, getattr(pipe, "text_encoder_2", None) is not None)


def _encode_prompts(p: _Pipeline, prompts: list[str], width: int, height: int, device) -> tuple[torch.Tensor, dict]:
    """Text conditioning for the UNet (and SDXL's pooled embeddings and size ids)."""
    with torch.no_grad():
        if not p.is_sdxl:
            embeds, _ = p.pipe.encode_prompt(prompts, device, 1, False)
            return embeds, {}
        embeds, _, pooled, _ = p.pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=embeds.dtype)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction type {kind!r}")


def _save_preview(p: _Pipeline, path: str, prompt: str, negative_prompt: str, steps: int, cfg_scale: float,
                  seed: int, width: int, height: int) -> str:
    generator = torch.Generator(device="cpu").manual_seed(seed if seed >= 0 else random.randrange(2**32))
    with torch.inference_mode():
        image = p.pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=cfg_scale, width=width, height=height, generator=generator).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic.write_bytes_atomic(path, buf.getvalue())
    return path


def _write_loss(log_directory: str, step: int, loss: float, learn_rate: float) -> None:
    path = os.path.join(log_directory, "hypernetwork_loss.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf8") as f:  # an append-only log, not state: no atomic write
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss", "learn_rate"])
        writer.writerow([step, f"{loss:.7f}", learn_rate])


def _stamp_checkpoint(hypernetwork: hn.Hypernetwork, sd_model) -> None:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    hypernetwork.sd_checkpoint = getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None)
    hypernetwork.sd_checkpoint_name = getattr(info, "model_name", None) or getattr(info, "name", None)


def train_hypernetwork(hypernetwork_name: str, *, data_root: str, steps: int, learn_rate: float | str = 0.00001,
                       batch_size: int = 1, gradient_step: int = 1, log_directory: str | None = None,
                       training_width: int = 512, training_height: int = 512, clip_grad_mode: str | None = None,
                       clip_grad_value: float | str = 0.1, shuffle_tags: bool = False, tag_drop_out: float = 0.0,
                       latent_sampling_method: str = "once", template: str = "[filewords]",
                       save_hypernetwork_every: int = 0, create_image_every: int = 0,
                       preview_prompt: str | None = None, preview_negative_prompt: str = "", preview_steps: int = 20,
                       preview_cfg_scale: float = 7.0, preview_seed: int = -1, preview_width: int | None = None,
                       preview_height: int | None = None, save_optimizer_state: bool = True, seed: int | None = None,
                       sd_model=None) -> tuple[hn.Hypernetwork, str]:
    """Trains <hypernetwork-dir>/<name>.pt up to `steps` total steps (resuming from its saved step and, when the
    `.optim` sidecar matches the file, its optimizer state). Returns (hypernetwork, saved filename).

    `template` holds prompt lines, one picked at random per image (A1111's template file content).
    Intermediate files go to <log_directory>/<name>-<step>.pt under hypernetworks/, previews under images/
    (at the training size unless preview_width/preview_height say otherwise).
    """
    if batch_size < 1 or gradient_step < 1 or steps < 1:
        raise ValueError("batch_size, gradient_step and steps must be positive")
    path = shared.hypernetworks.get(hypernetwork_name) or hn.refresh_hypernetworks().get(hypernetwork_name)
    if path is None:
        raise FileNotFoundError(f"Hypernetwork not found: {hypernetwork_name}")
    sd_model = sd_model if sd_model is not None else shared.sd_model
    if sd_model is None:
        raise ValueError("no Stable Diffusion model is loaded: hypernetwork training needs one")
    p = _pipeline(sd_model)
    preview_width = preview_width or training_width
    preview_height = preview_height or training_height
    filename = os.path.join(shared.cmd_opts.hypernetwork_dir, f"{hypernetwork_name}.pt")
    if log_directory is None:
        log_directory = os.path.join(shared.data_path, "textual_inversion")
    log_directory = os.path.join(log_directory, datetime.datetime.now().strftime("%Y-%m-%d"), hypernetwork_name)

    hypernetwork = hn.Hypernetwork()
    hypernetwork.load(path)
    hypernetwork.lookup_name = hypernetwork_name
    initial_step = hypernetwork.step or 0
    if initial_step >= steps:
        shared.state.textinfo = "Model has already been trained beyond specified max steps"
        return hypernetwork, filename

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**32))
    lr_scheduler = LearnRateScheduler(learn_rate, steps, initial_step)
    clip_grad = {"value": torch.nn.utils.clip_grad_value_, "norm": torch.nn.utils.clip_grad_norm_}.get(clip_grad_mode)
    clip_scheduler = LearnRateScheduler(clip_grad_value, steps, initial_step) if clip_grad else None
    device = next(p.unet.parameters()).device
    dtype = next(p.unet.parameters()).dtype
    templates = [line.strip() for line in template.splitlines() if line.strip()] or ["[filewords]"]

    shared.state.begin(job="train-hypernetwork")
    shared.state.textinfo = f"Preparing dataset from {data_root}..."
    shared.state.job_count = steps - initial_step
    shared.state.sampling_steps = gradient_step
    previous_loaded = list(shared.loaded_hypernetworks)
    unet_requires_grad = [(param, param.requires_grad) for param in p.unet.parameters()]
    completed = False
    try:
        dataset = HypernetworkDataset(data_root, p.vae, training_width, training_height, latent_sampling_method,
                                      generator)
        noise_scheduler = _noise_scheduler(p.pipe)
        hn.install_hypernetwork_hooks(sd_model)
        shared.loaded_hypernetworks[:] = [hypernetwork.set_multiplier(1.0)]
        hypernetwork.to(device).train()
        for param, _ in unet_requires_grad:
            param.requires_grad_(False)

        weights = hypernetwork.weights()
        optimizer_name = hypernetwork.optimizer_name if hypernetwork.optimizer_name in OPTIMIZERS else "AdamW"
        optimizer = OPTIMIZERS[optimizer_name](params=weights, lr=lr_scheduler.learn_rate)
        if hypernetwork.optimizer_state_dict:
            try:
                optimizer.load_state_dict(hypernetwork.optimizer_state_dict)
            except (ValueError, RuntimeError, KeyError) as e:
                print(f"Cannot resume from the saved optimizer state: {e}")
        hypernetwork.optimizer_state_dict = None  # only the live optimizer's state is saved from now on

        order: list[int] = []
        cond_cache: dict[str, tuple[torch.Tensor, dict]] = {}
        fixed_prompts = not shuffle_tags and not tag_drop_out and len(templates) == 1

        def next_batch() -> tuple[torch.Tensor, torch.Tensor, dict]:
            while len(order) < batch_size:
                epoch = list(range(len(dataset)))
                rng.shuffle(epoch)
                order.extend(epoch)
            entries = [dataset.entries[order.pop(0)] for _ in range(batch_size)]
            prompts = [make_prompt(rng.choice(templates), e.caption, hypernetwork_name, rng, shuffle_tags,
                                   tag_drop_out) for e in entries]
            conds = []
            for prompt in prompts:
                cond = cond_cache.get(prompt)
                if cond is None:
                    cond = _encode_prompts(p, [prompt], training_width, training_height, device)
                    if fixed_prompts:  # the same few prompts every epoch: encode each once
                        cond_cache[prompt] = cond
                conds.append(cond)
            embeds = torch.cat([c[0] for c in conds])
            added = {k: torch.cat([c[1][k] for c in conds]) for k in conds[0][1]}
            latents = torch.stack([dataset.latents(e) for e in entries])
            return latents, embeds, added

        with torch.inference_mode(False), torch.enable_grad():
            while hypernetwork.step < steps and not shared.state.interrupted:
                lr_scheduler.apply(optimizer, hypernetwork.step)
                if lr_scheduler.finished:
                    break
                step_loss = 0.0
                for micro in range(gradient_step):
                    shared.state.sampling_step = micro
                    latents, embeds, added = next_batch()
                    latents = latents.to(device)
                    noise = torch.randn(latents.shape, generator=generator).to(device)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                              generator=generator).to(device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    target = _target(noise_scheduler, latents, noise, timesteps)
                    pred = p.unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype),
                                  added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} or None).sample
                    loss = F.mse_loss(pred.float(), target.float()) / gradient_step
                    loss.backward()
                    step_loss += loss.item()
                if clip_grad:
                    clip_scheduler.step(hypernetwork.step)
                    clip_grad(weights, clip_scheduler.learn_rate)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                hypernetwork.step += 1

                shared.state.job_no = hypernetwork.step - initial_step
                shared.state.sampling_step = 0  # job_no counts the finished steps
                shared.state.textinfo = (f"Training hypernetwork {hypernetwork_name}: step {hypernetwork.step}/"
                                         f"{steps}, loss {step_loss:.7f}")
                os.makedirs(log_directory, exist_ok=True)
                _write_loss(log_directory, hypernetwork.step, step_loss, lr_scheduler.learn_rate)

                if save_hypernetwork_every and hypernetwork.step % save_hypernetwork_every == 0:
                    _save(hypernetwork, optimizer, optimizer_name, save_optimizer_state, sd_model,
                          os.path.join(log_directory, "hypernetworks", f"{hypernetwork_name}-{hypernetwork.step}.pt"))
                if create_image_every and hypernetwork.step % create_image_every == 0:
                    hypernetwork.eval()
                    try:
                        _save_preview(p, os.path.join(log_directory, "images",
                                                      f"{hypernetwork_name}-{hypernetwork.step}.png"),
                                      preview_prompt or make_prompt(templates[0], dataset.entries[0].caption,
                                                                    hypernetwork_name, rng),
                                      preview_negative_prompt, preview_steps, preview_cfg_scale, preview_seed,
                                      preview_width, preview_height)
                    finally:
                        hypernetwork.train()
        completed = True
    finally:
        hypernetwork.eval()
        for param, requires_grad in unet_requires_grad:
            param.requires_grad_(requires_grad)
        shared.loaded_hypernetworks[:] = previous_loaded
        if completed:  # also after an interrupt: the steps done are kept
            _save(hypernetwork, optimizer, optimizer_name, save_optimizer_state, sd_model, filename)
            shared.state.textinfo = f"Training {'interrupted' if shared.state.interrupted else 'finished'} at step " \
                                    f"{hypernetwork.step}; saved {filename}"
        shared.state.end()
    return hypernetwork, filename


def _save(hypernetwork: hn.Hypernetwork, optimizer, optimizer_name: str, save_optimizer_state: bool, sd_model,
          filename: str) -> None:
    _stamp_checkpoint(hypernetwork, sd_model)
    hypernetwork.optimizer_name = optimizer_name
    hypernetwork.optimizer_state_dict = optimizer.state_dict() if save_optimizer_state else None
    try:
        hypernetwork.save(filename)
    finally:
        hypernetwork.optimizer_state_dict = None  # do not keep a second reference to the optimizer state
