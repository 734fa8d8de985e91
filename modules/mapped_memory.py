"""Which tensors live in a memory map of a file, and copying them out without touching the map.

A tensor that is a view of a file mapping (safetensors_mmap, torch.load(mmap=True), safetensors' own loader) is
not the model's memory: rewriting the file in place changes it, truncating the file makes the next access raise
SIGBUS. The loaders copy every such tensor into process memory. The copy reads the file with pread() through a
descriptor checked to be the mapped inode, so a file truncated meanwhile gives a short read (an error), never a
SIGBUS, and the map's pages are never faulted in (peak memory stays at the copy).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Iterable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    offset: int  # file offset of `start`
    dev: tuple[int, int]  # (major, minor)
    inode: int
    path: str
    private: bool


def file_mappings() -> list[FileMapping]:
    """This process's mappings of regular files, from /proc/self/maps (empty where that does not exist)."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        found.append(FileMapping(start, end, int(parts[2], 16), (major, minor), int(parts[4]), parts[5],
                                 parts[1][3:4] == "p"))
    return found


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """(first byte address, length) of the memory a CPU tensor's elements occupy (non-negative strides)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), (last + 1) * tensor.element_size()


class MappedFiles:
    """A snapshot of the file mappings, to look tensors up in and copy them out of (a context manager: it keeps
    one descriptor per mapped file open until exit)."""

    def __init__(self, mappings: list[FileMapping] | None = None):
        self.mappings = sorted(file_mappings() if mappings is None else mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]
        self._fds: dict[tuple, int] = {}

    def __enter__(self) -> MappedFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def find(self, tensor: torch.Tensor) -> FileMapping | None:
        """The mapping holding any byte of `tensor`'s storage (a CPU tensor), else None."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or not self.mappings:
            return None
        storage = tensor.untyped_storage()
        start, n = storage.data_ptr(), storage.nbytes()
        if n == 0:
            return None
        i = bisect.bisect_right(self._starts, start + n - 1) - 1
        if i >= 0 and self.mappings[i].end > start:
            return self.mappings[i]
        return None

    def _fd(self, mapping: FileMapping) -> int | None:
        key = (mapping.dev, mapping.inode)
        if key not in self._fds:
            if mapping.path.endswith(" (deleted)"):
                return None
            try:
                fd = os.open(mapping.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
            st = os.fstat(fd)
            if st.st_ino != mapping.inode or (os.major(st.st_dev), os.minor(st.st_dev)) != mapping.dev:
                os.close(fd)  # the path now names another file: its bytes are not the map's
                return None
            self._fds[key] = fd
        return self._fds[key]

    def copy_out(self, tensor: torch.Tensor, mapping: FileMapping | None = None) -> torch.Tensor:
        """A contiguous copy of `tensor` in process memory, read from the mapped file (see the module docstring).

        Only for views nobody wrote to (a private map's written pages are not in the file): the loaders call it on
        freshly mapped checkpoints. Falls back to copying from the map when the file cannot be opened by its
        path any more (deleted or replaced). Raises OSError when the file is shorter than the map says."""
        mapping = mapping or self.find(tensor)
        if mapping is None:
            return tensor.clone(memory_format=torch.contiguous_format)
        first, length = _byte_span(tensor)
        fd = self._fd(mapping)
        if fd is None or not (mapping.start <= first and first + length <= mapping.end):
            return tensor.clone(memory_format=torch.contiguous_format)
        buffer = new_tensor(length, torch.uint8)
        pread_into(fd, buffer, mapping.offset + first - mapping.start, mapping.path)
        values = buffer.view(tensor.dtype)
        if tensor.is_contiguous():
            return values.view(tensor.shape)
        return values.as_strided(tensor.shape, tensor.stride()).contiguous()

    def shared(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str]]:
        """[(name, file)] of the tensors whose storage lies in a file mapping."""
        res = []
        for name, t in named:
            mapping = self.find(t)
            if mapping is not None:
                res.append((name, mapping.path))
        return res


_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14  # Linux
_libc = None


def new_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on the CPU, with transparent huge pages asked for when it is large: the first
    writes into fresh memory (page faults and zeroing) cost more than reading the file from the page cache, and
    huge pages halve that (THP is commonly in `madvise` mode, so it must be asked for)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= 2 * _HUGE:
        _advise_huge(t.data_ptr(), nbytes)
    return t


def _advise_huge(ptr: int, nbytes: int) -> None:
    global _libc
    try:
        import ctypes

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        start = -(-ptr // _HUGE) * _HUGE  # the whole 2 MiB blocks inside the allocation
        end = (ptr + nbytes) // _HUGE * _HUGE
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # only speed


def pread_into(fd: int, buffer: torch.Tensor, offset: int, path: str) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: ended at byte {offset + done} while reading it (truncated while loading?)")
        done += n


def module_tensors(modules: dict[str, torch.nn.Module | None]) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of the components as ("component.name", tensor)."""
    res = []
    for component, module in modules.items():
        if module is None:
            continue
        for name, t in list(module.named_parameters(remove_duplicate=False)) + \
                list(module.named_buffers(remove_duplicate=False)):
            res.append((f"{component}.{name}", t))
    return res


def file_backed_tensors(modules: dict[str, torch.nn.Module | None]) -> list[tuple[str, str]]:
    """[(component.name, file)] of the parameters and buffers that share memory with a file mapping."""
    return MappedFiles().shared(module_tensors(modules))


def copy_out_of_files(modules: dict[str, torch.nn.Module | None]) -> int:
    """Moves every parameter and buffer that lives in a file mapping into process memory (tensors that share a
    storage keep sharing the copy); returns how many storages were copied. Copies what the tensors hold now
    (from the map, not the file: a private map may have been written to), one storage at a time."""
    maps = MappedFiles()
    if not maps.mappings:
        return 0
    copies: dict[int, torch.UntypedStorage] = {}
    for module in (m for m in modules.values() if m is not None):
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for t in table.values():
                    if t is None or maps.find(t) is None:
                        continue
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key not in copies:
                        copies[key] = storage.clone()
                    moved = torch.empty(0, dtype=t.dtype).set_(copies[key], t.storage_offset(), t.shape, t.stride())
                    with torch.no_grad():
                        t.data = moved
    return len(copies)
