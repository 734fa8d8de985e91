"""Training data for hypernetworks: a folder of images with optional `<stem>.txt` captions, as latents.

Captions follow A1111: the `.txt` next to the image, else the file stem without leading numbers. A template
line (default "[filewords]") turns a caption into the training prompt; `[name]` is the network's name.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_numbers_at_start = re.compile(r"^[-\d]+\s*")


@dataclass
class DatasetEntry:
    filename: str
    caption: str
    latent_mean: torch.Tensor | None = None
    latent_std: torch.Tensor | None = None
    latent_sample: torch.Tensor | None = None


def list_images_with_captions(data_root: str) -> list[tuple[str, str]]:
    """(image path, caption) for every image directly in data_root, sorted by name."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"dataset folder {data_root} does not exist")
    res = []
    for name in sorted(os.listdir(data_root), key=str.lower):
        path = os.path.join(data_root, name)
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(path):
            continue
        caption_file = os.path.join(data_root, stem + ".txt")
        if os.path.exists(caption_file):
            with open(caption_file, "r", encoding="utf8") as f:
                caption = f.read().strip()
        else:
            caption = _numbers_at_start.sub("", stem)
        res.append((path, caption))
    if not res:
        raise ValueError(f"dataset folder {data_root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return res


def load_image(filename: str, width: int, height: int) -> torch.Tensor:
    """RGB, scaled to cover width×height, centre-cropped; a (3, H, W) tensor in [-1, 1]."""
    with Image.open(filename) as img:
        img = img.convert("RGB")
        scale = max(width / img.width, height / img.height)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def make_prompt(template: str, caption: str, name: str, rng: random.Random, shuffle_tags: bool = False,
                tag_drop_out: float = 0.0) -> str:
    tags = [t.strip() for t in caption.split(",")]
    if tag_drop_out:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return template.replace("[filewords]", ", ".join(tags)).replace("[name]", name)


class HypernetworkDataset:
    """Images encoded once by the VAE; `latents(entry)` gives the latent for one step per the sampling method."""

    methods = ("once", "deterministic", "random")

    def __init__(self, data_root: str, vae, width: int, height: int, latent_sampling_method: str = "once",
                 generator: torch.Generator | None = None, encode_batch_size: int = 4):
        if latent_sampling_method not in self.methods:
            raise ValueError(f"latent_sampling_method must be one of {self.methods}, got {latent_sampling_method!r}")
        self.method = latent_sampling_method
        self.generator = generator
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.entries = [DatasetEntry(path, caption) for path, caption in list_images_with_captions(data_root)]
        device = next(vae.parameters()).device
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            for start in range(0, len(self.entries), encode_batch_size):
                chunk = self.entries[start:start + encode_batch_size]
                pixels = torch.stack([load_image(e.filename, width, height) for e in chunk]).to(device, dtype)
                dist = vae.encode(pixels).latent_dist
                for i, entry in enumerate(chunk):
                    entry.latent_mean = dist.mean[i].float().cpu()
                    entry.latent_std = dist.std[i].float().cpu()
                    if self.method == "once":
                        entry.latent_sample = self._sample(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def _sample(self, entry: DatasetEntry) -> torch.Tensor:
        noise = torch.randn(entry.latent_mean.shape, generator=self.generator)
        return entry.latent_mean + entry.latent_std * noise

    def latents(self, entry: DatasetEntry) -> torch.Tensor:
        if self.method == "once":
            latent = entry.latent_sample
        elif self.method == "deterministic":
            latent = entry.latent_mean
        else:
            latent = self._sample(entry)
        return (latent - self.shift_factor) * self.scaling_factor
