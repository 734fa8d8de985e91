"""A .safetensors file as a dict of tensors that are views of one private memory map of the file.

Why not `safetensors.torch.load_file`: it maps the file too, but gives no way to hand pages back once a
tensor has been copied elsewhere, so a converting load keeps the whole file resident next to the model.
Here `release_pages(tensor)` drops the resident pages of a consumed tensor (they are re-read from the file
if anyone touches them again), which keeps peak memory near one copy of the model.
"""
from __future__ import annotations

import mmap
import threading
import weakref

import torch

from modules import safetensors_header

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python names it only from 3.13

# base address -> (weakref to the mmap, length): lets release_pages() find the map a tensor lives in
_maps: dict[int, tuple[weakref.ref, int]] = {}
_maps_lock = threading.RLock()  # re-entrant: a map's finalizer (_forget_map) may run from GC while it is held
_prefetchers: dict[int, "_Prefetcher"] = {}  # base address -> the thread reading that file ahead


class MmapStateDict(dict):
    """{key: tensor} for one file; `metadata` holds the header's `__metadata__` strings."""

    metadata: dict[str, str]
    filename: str


def _torch_entry(key: str, entry: safetensors_header.Entry, filename: str) -> tuple[torch.dtype, list[int], int, int]:
    if entry.torch_dtype is None:
        raise safetensors_header.HeaderError(f"{filename}: tensor {key!r} has a dtype this torch lacks: {entry.dtype}")
    return entry.torch_dtype, list(entry.shape), entry.offset, entry.nbytes


def read_index(f, filename: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """{key: (dtype, shape, file offset, byte count)} from the validated header (safetensors_header) of an open
    safetensors file."""
    header = safetensors_header.read_header(f, filename)
    return {key: _torch_entry(key, entry, filename) for key, entry in header.tensors.items()}


def open_safetensors_mmap(filename: str, populate: bool = False, prefetch: bool = True) -> MmapStateDict:
    """Maps the file copy-on-write and returns its tensors as views (nothing is read until touched).

    prefetch=True (the default) reads the file into the page cache from a background thread, in file order,
    while the caller builds its model, so the later page faults find the pages there instead of
    reading them 4 KiB at a time in whatever order the model touches them. It is skipped when the file is larger
    than half the memory available. populate=True maps every page in before returning (read faults only: pages
    stay shared with the page cache). Writing to a tensor changes only this process's copy, never the file.
    """
    with open(filename, "rb") as f:
        header = safetensors_header.read_header(f, filename)
        size, data_start = header.size, header.data_start
        # not MAP_POPULATE: on a writable private map it write-faults, copying every page out of the page cache
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else None
    if mm is not None and populate:
        _populate_read(mm, size)

    res = MmapStateDict()
    res.metadata = {str(k): str(v) for k, v in header.metadata.items()}
    res.filename = filename
    if mm is None:
        return res
    base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    with _maps_lock:
        _maps[base] = (weakref.ref(mm), size)
        if not populate and prefetch and size <= _available_memory() // 2:
            _prefetchers[base] = _Prefetcher(filename, data_start, size)
    weakref.finalize(mm, _forget_map, base)

    for key, entry in header.tensors.items():
        dtype, shape, offset, nbytes = _torch_entry(key, entry, filename)
        if nbytes == 0:
            res[key] = torch.empty(shape, dtype=dtype)
            continue
        res[key] = torch.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)
    return res


def _populate_read(mm: mmap.mmap, size: int) -> None:
    try:
        mm.madvise(_MADV_POPULATE_READ, 0, size)
    except (OSError, ValueError):
        # kernels before 5.14: one read per page does the same, from C
        torch.frombuffer(mm, dtype=torch.uint8)[::_PAGE].sum()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: do not prefetch


class _Prefetcher:
    """Reads a file through the page cache from daemon threads, with plain read()s into scratch buffers (a read
    releases the GIL), and publishes how far the file is read without a gap. Blocks are handed out in file order
    to `threads` readers: two requests in flight read a cold file about twice as fast on the disks seen here as one
    does. Not posix_fadvise(WILLNEED): the kernel caps it at one readahead window per call. Not sendfile() to
    /dev/null: that leaves pages whose first access is slow later. A failure only costs speed."""

    def __init__(self, filename: str, start: int, end: int, block: int = 16 * 1024 * 1024, threads: int = 2):
        self.filename, self.end, self.block = filename, end, block
        self.start = start - start % _PAGE
        self.blocks = max(1, -(-(end - self.start) // block))
        self.next_block = 0
        self.completed: set[int] = set()
        self.done = self.start  # everything before this offset has been read
        self.running = threads
        self.finished = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._run, name="safetensors-prefetch", daemon=True)
                        for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _take(self) -> int | None:
        with self.cond:
            if self.next_block >= self.blocks:
                return None
            self.next_block += 1
            return self.next_block - 1

    def _completed(self, index: int) -> None:
        with self.cond:
            self.completed.add(index)
            first_missing = (self.done - self.start) // self.block
            while first_missing in self.completed:
                self.completed.discard(first_missing)
                first_missing += 1
            self.done = min(self.end, self.start + first_missing * self.block)
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            with open(self.filename, "rb", buffering=0) as f:
                buf = bytearray(min(self.block, 4 * 1024 * 1024))
                while (index := self._take()) is not None:
                    pos = self.start + index * self.block
                    stop = min(self.end, pos + self.block)
                    f.seek(pos)
                    while pos < stop:
                        n = f.readinto(memoryview(buf)[:min(len(buf), stop - pos)])
                        if not n:
                            break
                        pos += n
                    self._completed(index)
        except OSError:
            pass
        finally:
            with self.cond:
                self.running -= 1
                if self.running == 0:
                    self.finished = True
                self.cond.notify_all()

    def wait_until(self, offset: int, timeout: float | None = None) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.finished or self.done >= offset, timeout)


def _forget_map(base: int) -> None:
    with _maps_lock:
        _maps.pop(base, None)
        _prefetchers.pop(base, None)


def wait_for_prefetch(tensors, timeout: float | None = None) -> int:
    """Waits until the prefetch has read the bytes of these tensors (not the whole file: a component whose
    tensors come first in the file can load while the rest is still being read); returns how many files it
    waited on. A loader calls it before reading the tensors in its own order: a page fault on a page not yet
    read reads a few KiB at a time, which on a cold cache is many times slower than the file read in order."""
    with _maps_lock:
        pending = {b: (p, _maps[b][1]) for b, p in list(_prefetchers.items()) if not p.finished and b in _maps}
    if not pending:
        return 0
    needed: dict[int, int] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        for base, (_, size) in pending.items():
            if base <= ptr < base + size:
                needed[base] = max(needed.get(base, 0), ptr - base + storage.nbytes())
                break
    for base, offset in needed.items():
        pending[base][0].wait_until(offset, timeout)
    return len(needed)


def release_pages(tensor: torch.Tensor) -> bool:
    """Drops the resident pages that lie wholly inside `tensor`'s bytes, if it is a view of a map made here.

    Only for tensors nobody wrote to: a page dropped here reads back as the file's bytes. Pages shared
    with a neighbouring tensor are kept. Returns True when something was released.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    start = tensor.untyped_storage().data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    with _maps_lock:
        found = [(b, ref, n) for b, (ref, n) in list(_maps.items()) if b <= start and end <= b + n]
    if not found:
        return False
    base, ref, _ = found[0]
    mm = ref()
    if mm is None:
        return False
    first = -(-(start - base) // _PAGE) * _PAGE  # round the offset up to a page boundary
    last = ((end - base) // _PAGE) * _PAGE  # and the end down
    if last <= first:
        return False
    mm.madvise(mmap.MADV_DONTNEED, first, last - first)
    return True
