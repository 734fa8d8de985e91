"""The host's original weights (`sd_model.original_weights`) as the patcher reads them: the seam's protocol, where a
layer's parameter is in it, a sampled bitwise check that it holds a layer's values, and reads (whole, in place, or
row blocks).

A source is optional (A1111 has none) and may go stale (the checkpoint file changed on disk): every read is
checked (dtype, shape) and a failed read is None, never an exception.
"""
from __future__ import annotations

import logging
from typing import Protocol

import lora_layer_state
import torch

logger = logging.getLogger("lora")

SAMPLES = 64  # elements compared before a source is trusted for a layer
DONE, NOT_READ, PART_WRITTEN = "done", "not read", "part-written"


class OriginalWeights(Protocol):
    """The host's seam (`sd_model.original_weights`): parameters exactly as loaded, or None when unknown."""

    def read(self, component: str, param_name: str) -> torch.Tensor | None: ...

    def valid(self) -> bool: ...


def source_param(name: str, module: torch.nn.Module, module_paths: dict | None) -> tuple[str, str] | None:
    """(component, the component's own state-dict key of the layer's weight) for the host's source, or None when
    the layer has no parameter of its own (a row block of a fused q/k/v weight).

    Canonical names are not always module paths (text encoders drop `text_model.`, compvis UNets are renamed):
    the layer map's `module_paths` (or `module.network_module_path`) says where the module really is."""
    if module_paths is not None:
        path = module_paths.get(name)
    elif hasattr(module, "network_module_path"):
        path = module.network_module_path
    else:
        component, _, rest = name.partition(".")
        path = (component, rest)
    if path is None:
        return None
    return path[0], f"{path[1]}.{lora_layer_state.weight_attr(module)}"


class Sources:
    """The job's source with its validity asked once per job."""

    def __init__(self, source: OriginalWeights | None, module_paths: dict | None = None):
        self.source = source if source is not None and callable(getattr(source, "read", None)) else None
        self.module_paths = module_paths
        self._valid: dict[int, bool] = {}

    def is_valid(self, source) -> bool:
        if source is None:
            return False
        key = id(source)
        if key not in self._valid:
            try:
                self._valid[key] = bool(source.valid())
            except Exception as e:
                logger.warning("Lora: original weights source failed: %s", e)
                self._valid[key] = False
        return self._valid[key]


def read(source, param: tuple[str, str], like: torch.Tensor) -> torch.Tensor | None:
    """The source's tensor for `param` when it has `like`'s shape and dtype, else None."""
    try:
        t = source.read(*param)
    except Exception as e:
        logger.debug("Lora: cannot read %s/%s from the original weights: %s", *param, e)
        return None
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
        return None
    return t


def release(source, t: torch.Tensor) -> None:
    """Gives a tensor read from the source back (a source may pool its buffers)."""
    release_fn = getattr(source, "release", None)
    if callable(release_fn):
        try:
            release_fn(t)
        except Exception:
            pass


def bits_equal(sa: torch.Tensor, sb: torch.Tensor) -> bool:
    if sa.shape != sb.shape or sa.dtype != sb.dtype:
        return False
    if sa.dtype.is_floating_point and sa.element_size() in (1, 2, 4, 8):
        iv = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[sa.element_size()]
        return torch.equal(sa.contiguous().view(iv), sb.contiguous().view(iv))
    return torch.equal(sa, sb)


def sample_matches(a: torch.Tensor, b: torch.Tensor, samples: int = SAMPLES) -> bool:
    """Cheap check that a source tensor holds the layer's values: ~64 elements compared bitwise (few pages read)."""
    step = max(1, a.numel() // samples)
    return bits_equal(a.reshape(-1)[::step], b.reshape(-1)[::step].to(a.device))


def source_matches(source, param: tuple[str, str], original: torch.Tensor) -> bool:
    """Whether the source's copy of `param` holds `original`'s values at ~64 sampled elements. A source with
    `sample(component, name, step)` reads only those elements; others are read whole."""
    sample = getattr(source, "sample", None)
    if callable(sample):
        step = max(1, original.numel() // SAMPLES)
        try:
            got = sample(*param, step)
        except Exception as e:
            logger.debug("Lora: cannot sample %s/%s from the original weights: %s", *param, e)
            return False
        return isinstance(got, torch.Tensor) and bits_equal(got, original.reshape(-1)[::step].to(got.device))
    t = read(source, param, original)
    if t is None:
        return False
    try:
        return sample_matches(t, original)
    finally:
        release(source, t)


def read_into(source, param: tuple[str, str], weight: torch.Tensor) -> str | None:
    """Writes the source's original into `weight` in place when the source can (`read_into`, which returns False
    when it wrote nothing and raises when it stopped part-way): DONE, NOT_READ or PART_WRITTEN; None when the
    source has no such door."""
    read_into_fn = getattr(source, "read_into", None)
    if not callable(read_into_fn):
        return None
    try:
        with lora_layer_state.no_grad_for(weight):
            return DONE if read_into_fn(*param, weight.detach()) else NOT_READ
    except Exception as e:
        logger.warning("Lora: reading %s/%s from the original weights failed part-way: %s", *param, e)
        return PART_WRITTEN


def read_many_into(source, reads: list[tuple[tuple[str, str], torch.Tensor]]) -> list[str] | None:
    """read_into for many layers at once where the source can (`read_many_into([(component, name, out)])`: each
    file's reads under one lease and one change check): DONE, NOT_READ or PART_WRITTEN for each; None when the
    source has no such door or failed (then read each on its own: that rewrites every weight the batch touched)."""
    read_many = getattr(source, "read_many_into", None)
    if not callable(read_many) or not reads:
        return None
    outs = [w.detach() for _, w in reads]
    mode = torch.inference_mode() if any(w.is_inference() for w in outs) else torch.no_grad()
    try:
        with mode:
            done = read_many([(*param, out) for (param, _), out in zip(reads, outs, strict=True)])
    except Exception as e:
        logger.warning("Lora: reading original weights in one batch failed; reading them one by one: %s", e)
        return None
    if len(done) != len(reads):
        return None
    return [DONE if d is True else NOT_READ if d is False else PART_WRITTEN for d in done]


def open_rows(source, param: tuple[str, str], weight: torch.Tensor):
    """The source's row-block reader for `param` (`open_rows(component, name, like)`: `.read(r0, r1, out)` and
    `.close()` -> whether the file stayed unchanged), or None when the source has none or cannot read this one."""
    open_fn = getattr(source, "open_rows", None)
    if not callable(open_fn) or not weight.is_contiguous():
        return None
    try:
        return open_fn(*param, weight.detach())
    except Exception as e:
        logger.debug("Lora: cannot read rows of %s/%s from the original weights: %s", *param, e)
        return None
