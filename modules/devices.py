"""Device and dtype policy (A1111 module name). CPU runs fp32 by default: fp16 math is very slow there."""
import contextlib

import torch

cpu = torch.device("cpu")


def _pick_device() -> torch.device:
    from modules import shared
    if shared.cmd_opts.device:
        return torch.device(shared.cmd_opts.device)
    return torch.device("cuda") if torch.cuda.is_available() else cpu


def _pick_dtype(dev: torch.device) -> torch.dtype:
    from modules import shared
    precision = "fp32" if shared.cmd_opts.no_half else shared.cmd_opts.precision
    if precision is None:
        precision = "fp16" if dev.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


device = _pick_device()
dtype = _pick_dtype(device)
dtype_unet = dtype
dtype_vae = dtype
dtype_inference = dtype
device_interrogate = device
device_gfpgan = device
device_esrgan = device
unet_needs_upcast = False


def get_optimal_device() -> torch.device:
    return device


def get_optimal_device_name() -> str:
    return str(device)


def torch_gc() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cond_cast_unet(x):
    return x.to(dtype_unet) if unet_needs_upcast else x


def cond_cast_float(x):
    return x.float() if unet_needs_upcast else x


@contextlib.contextmanager
def autocast(disable: bool = False):
    yield


@contextlib.contextmanager
def without_autocast(disable: bool = False):
    yield
