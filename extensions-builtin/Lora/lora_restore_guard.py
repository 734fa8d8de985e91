"""Where a residual restore can be trusted, and the copy that stands in for it where it cannot.

A residual restore (lora_residual) recomputes Σ ΔW and needs it bit for bit. On the CPU that is proven (same
kernels, same blocks: the test suite checks it); on an accelerator a kernel choice can differ between the write
and the restore, and then the guess would stay approximate and become the next job's original. So on a device
type not listed here, the patcher keeps a CPU copy of the layer taken before the write, and restores from it
(or from the host's source) when the delta's fingerprint does not reproduce. A device type whose residual ever
failed is no longer trusted for the rest of the process.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("lora")

PROVEN_DEVICE_TYPES: set[str] = {"cpu"}


def residual_proven(device: torch.device) -> bool:
    """Whether a residual restore on this device reproduces its delta bit for bit (no copy needed)."""
    return torch.device(device).type in PROVEN_DEVICE_TYPES


def mark_unproven(device: torch.device) -> None:
    """A residual restore on this device did not reproduce: later writes there keep a copy."""
    kind = torch.device(device).type
    if kind in PROVEN_DEVICE_TYPES:
        PROVEN_DEVICE_TYPES.discard(kind)
        logger.warning("Lora: residual restores on %s did not reproduce; layers are copied before writes from now on",
                       kind)


def take_copy(original: torch.Tensor) -> torch.Tensor:
    """The layer's original weight, copied to the CPU before the merge overwrites it."""
    return original.detach().to("cpu", copy=True)


def reusable(copy: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """A previous record's copy still holds this layer's original (same dtype and shape)."""
    return copy is not None and copy.dtype == weight.dtype and copy.shape == weight.shape
