"""Tiny single-file SD1 checkpoints for the checkpoint tests (the tiny default model in the original layout): good
ones in both formats, one bad one of each kind a switch must survive, and ways to damage a file in place."""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
from safetensors.torch import save_file

# a UNet tensor that no config inference reads: its shape or absence only shows when the weights are matched
VICTIM_KEY = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_k.weight"

# file name -> what the error must say about it
BAD_FILES = {
    "bad-pickle.ckpt": "weights_only",
    "bad-corrupt.safetensors": "the tensors end at byte",  # truncated: the header reader compares spans with the size
    "bad-shapes.safetensors": "wrong shape",
    "bad-missing.safetensors": "tensors missing",
}


def tiny_sd1_ldm(default_models_dir: str) -> dict[str, torch.Tensor]:
    from modules import sd_models_diffusers, sd_models_ldm

    model = sd_models_diffusers.load(os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1"),
                                     torch.device("cpu"), torch.float32)
    return sd_models_ldm.to_ldm_state_dict("sd1", {k: v for k, v in model.components().items() if v is not None})


def write_good(ldm: dict, folder: str, stem: str = "good") -> dict[str, str]:
    """{"safetensors": path, "ckpt": path} of the same weights in both formats."""
    os.makedirs(folder, exist_ok=True)
    paths = {"safetensors": os.path.join(folder, f"{stem}.safetensors"), "ckpt": os.path.join(folder, f"{stem}.ckpt")}
    save_file(ldm, paths["safetensors"])
    torch.save({"state_dict": ldm, "global_step": 1}, paths["ckpt"])
    return paths


def write_bad(ldm: dict, folder: str) -> dict[str, str]:
    """{file name: path} for BAD_FILES."""
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, name) for name in BAD_FILES}
    # a .ckpt whose pickle holds something besides tensors and plain containers: it needs a full unpickle
    torch.save({"state_dict": ldm, "created": datetime.date(2024, 1, 1)}, paths["bad-pickle.ckpt"])
    # an interrupted download: the header promises more bytes than the file has
    good = os.path.join(folder, "_whole.safetensors")
    save_file(ldm, good)
    with open(good, "rb") as f:
        data = f.read()
    with open(paths["bad-corrupt.safetensors"], "wb") as f:
        f.write(data[:len(data) * 3 // 5])
    os.remove(good)
    shape = ldm[VICTIM_KEY].shape
    save_file(dict(ldm, **{VICTIM_KEY: torch.zeros(shape[0], shape[1] + 8)}), paths["bad-shapes.safetensors"])
    save_file({k: v for k, v in ldm.items() if k != VICTIM_KEY}, paths["bad-missing.safetensors"])
    return paths


def overwrite_in_place(path: str, keep_times: bool = True) -> None:
    """What `cp other FILE` / `rsync --inplace -t` do: same file (inode), same size, other bytes; with keep_times
    the mtime is set back, so only the inode's change time tells."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        head = min(size, 4096)
        if path.endswith(".safetensors"):  # keep the header readable, scramble every byte of tensor data
            f.seek(0)
            head = 8 + int.from_bytes(f.read(8), "little")
        f.seek(head)
        rng = np.random.default_rng(0)
        left = size - head
        while left > 0:
            n = min(left, 1 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(1024)


def render(sd_model, seed: int = 3) -> np.ndarray:
    generator = [torch.Generator().manual_seed(seed)]
    image = sd_model.pipe(prompt=["a red house"], negative_prompt=[""], num_inference_steps=3, guidance_scale=7.0,
                          width=64, height=64, generator=generator).images[0]
    return np.array(image)
