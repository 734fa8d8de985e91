"""Reading parts of a file into tensors with `pread`, split over threads.

One thread's kernel copy (and cast) does not fill the memory bandwidth: a read of PARALLEL_BYTES or more is split
into one contiguous part per torch thread, each with its own cache-sized buffer. Used where no leased map can be
had (lora_checkpoint_source)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

PARALLEL_BYTES = 2 << 20  # a read this large is split over the torch threads, a part each

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def scratch(nbytes: int) -> torch.Tensor:
    """This thread's read buffer (one per thread: parts of a read run side by side)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.scratch = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def in_parts(total: int, work, nbytes: int | None = None) -> None:
    """work(lo, hi) over [0, total) split into one contiguous part per torch thread when the read is at least
    PARALLEL_BYTES (`nbytes`, default `total`); every part has finished when this returns or raises."""
    global _pool
    parts = min(torch.get_num_threads(), 8) if (total if nbytes is None else nbytes) >= PARALLEL_BYTES else 1
    if parts < 2:
        work(0, total)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(7, thread_name_prefix="lora-checkpoint-read")
    step = -(-total // parts)
    futures = [_pool.submit(work, lo, min(total, lo + step)) for lo in range(step, total, step)]
    try:
        work(0, min(step, total))
    finally:
        errors = [f.exception() for f in futures]  # waits for each: none still writes into the caller's tensor
    for e in errors:
        if e is not None:
            raise e


def pread(fd: int, buffer: torch.Tensor, offset: int, path: str) -> None:
    """Fills `buffer` (uint8, CPU) from the file at `offset`; OSError naming `path` when the file ends first."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: ended at byte {offset + done} (truncated?)")
        done += n
