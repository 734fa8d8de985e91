"""The loaded model's exact original weights, re-read from its checkpoint files (`sd_model.original_weights`).

The Lora patcher restores a layer from here instead of keeping a copy of it. Bytes are only trusted while the file
is the one the model was loaded from: each read checks the file's identity and change times (device, inode,
size, mtime, ctime; ctime cannot be set back by tools that preserve mtime, such as `rsync --inplace -t`) before
and after reading, and returns None otherwise, so the patcher uses its residual or clone path instead. Reads are
through a read-only map of each file kept for the source's life, each read under a read lease that makes any
truncate or write of the file wait until the read ends (modules/leased_map: a truncated map would raise SIGBUS);
where no lease can be had (another OS, a file open for writing, not ours), plain pread()s, where a truncated file
gives a short read. Large preads are split over the torch threads (one kernel copy per thread: a single pread()
reaches ~80 % of a threaded memcpy).
`open_rows` hands out row blocks of one parameter, so the patcher can rebuild a merge from the original in one pass.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from modules import leased_map, mapped_memory, safetensors_mmap, sd_models_ldm

FileStamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> FileStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_stamp(filename: str) -> FileStamp:
    """What identifies a file's current contents (raises OSError when it is gone)."""
    return _stamp(os.stat(filename))


def changed_files(stamps: dict[str, FileStamp]) -> list[str]:
    """The files whose stamp differs now (or that are gone)."""
    res = []
    for filename, stamp in stamps.items():
        try:
            if file_stamp(filename) != stamp:
                res.append(filename)
        except OSError:
            res.append(filename)
    return res


_BLOCK_BYTES = 1 << 20
_PARALLEL_BYTES = 8 << 20  # below this one pread() is as fast as several
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _pread_parallel(fd: int, buffer: torch.Tensor, offset: int, filename: str) -> None:
    """pread_into split into one contiguous part per torch thread (a uint8 buffer)."""
    global _pool
    parts = min(torch.get_num_threads(), 8)
    if parts < 2 or buffer.numel() < _PARALLEL_BYTES:
        mapped_memory.pread_into(fd, buffer, offset, filename)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(8, thread_name_prefix="original-weights")
    step = -(-buffer.numel() // parts)
    futures = [_pool.submit(mapped_memory.pread_into, fd, buffer[i:i + step], offset + i, filename)
               for i in range(0, buffer.numel(), step)]
    for f in futures:
        f.result()


def _read_cast(fd: int, flat: torch.Tensor, dtype: torch.dtype, offset: int, nbytes: int, filename: str) -> None:
    size = dtype.itemsize
    per_block = max(1, _BLOCK_BYTES // size)
    buffer = torch.empty(per_block * size, dtype=torch.uint8)
    done, total = 0, nbytes // size
    while done < total:
        n = min(per_block, total - done)
        mapped_memory.pread_into(fd, buffer[:n * size], offset + done * size, filename)
        flat[done:done + n].copy_(buffer[:n * size].view(dtype))
        done += n


def _as_stored(ref: sd_models_ldm.LdmRef | None) -> bool:
    """Whether the parameter's bytes lie in the file as loaded (whole, or a block of rows), not reshaped."""
    return ref is None or ref.transform in ("", "rows")


class OriginalWeights:
    """Reads a parameter exactly as it was loaded, from the checkpoint file (nothing is held in memory).

    refs: {(component, parameter name): (file, key, LdmRef or None)}; dtypes: the loaded dtype of each;
    stamps: each file's file_stamp() from before the load read it (taken now when not given).
    valid() is False once any file changed on disk, and read() returns None for a changed file."""

    def __init__(self, refs: dict[tuple[str, str], tuple[str, str, sd_models_ldm.LdmRef | None]],
                 dtypes: dict[tuple[str, str], torch.dtype], stamps: dict[str, FileStamp] | None = None):
        self.refs = refs
        self.dtypes = dtypes
        self.stamps: dict[str, FileStamp] = {}
        for filename, _, _ in refs.values():
            if filename not in self.stamps:
                self.stamps[filename] = (stamps or {}).get(filename) or file_stamp(filename)
        self._index: dict[str, dict] = {}  # file -> its header index, parsed once (~6 ms for SD1.5)
        self._maps: dict[str, leased_map.LeasedMap | None] = {}  # file -> its map (None: pread only)
        self._maps_lock = threading.Lock()

    def valid(self) -> bool:
        return not changed_files(self.stamps)

    def has(self, component: str, name: str) -> bool:
        return (component, name) in self.refs

    def read(self, component: str, name: str) -> torch.Tensor | None:
        """The parameter as loaded (a new tensor in memory), or None when its file changed or cannot be read."""
        entry = self.refs.get((component, name))
        if entry is None:
            return None
        filename, key, ref = entry
        try:
            tensor = self._read_unchanged(filename, key, ref)
        except (OSError, ValueError, KeyError):
            return None
        if tensor is None:
            return None
        if ref is not None and ref.transform in ("conv1x1", "transpose", "swap_halves"):
            tensor = sd_models_ldm.read_ref(ref, {key: tensor}).contiguous()
        dtype = self.dtypes.get((component, name))
        return tensor.to(dtype) if dtype is not None else tensor

    def read_into(self, component: str, name: str, out: torch.Tensor) -> bool:
        """Writes the parameter as loaded into `out` (its shape and dtype): straight from the file into its memory
        when no cast or transform is needed. False when nothing was written (unknown, file changed); raises
        OSError when the file changed while it was read (then `out` may be part-written)."""
        entry = self.refs.get((component, name))
        if entry is None or out.dtype != self.dtypes.get((component, name), out.dtype):
            return False
        filename, key, ref = entry
        direct = _as_stored(ref) and out.device.type == "cpu" and out.is_contiguous()
        if not direct:
            t = self.read(component, name)
            if t is None or t.shape != out.shape:
                return False
            out.copy_(t)
            return True
        leased = self._leased(filename)
        if leased is not None:
            with leased.reading(lambda st: _stamp(st) == self.stamps[filename]) as data:
                if data is not None:  # nobody can write or truncate the file until this block ends
                    try:
                        dtype, shape, offset, nbytes = self._where(None, filename, key, ref)
                    except (OSError, ValueError, KeyError):
                        return False
                    if list(shape) != list(out.shape):
                        return False
                    out.view(-1).copy_(data[offset:offset + nbytes].view(dtype))
                    if _stamp(leased.fstat()) != self.stamps[filename]:
                        raise OSError(f"{filename} changed while it was read")
                    return True
        try:
            with open(filename, "rb", buffering=0) as f:
                located = self._locate(f, filename, key, ref)
                if located is None:
                    return False
                dtype, shape, offset, nbytes = located
                if list(shape) != list(out.shape):
                    return False
                if dtype == out.dtype:
                    if nbytes:
                        _pread_parallel(f.fileno(), out.view(torch.uint8).view(-1), offset, filename)
                else:  # converted on load: cast block by block through a cache-sized buffer
                    _read_cast(f.fileno(), out.view(-1), dtype, offset, nbytes, filename)
                if _stamp(os.fstat(f.fileno())) != self.stamps[filename]:
                    raise OSError(f"{filename} changed while it was read")
        except (ValueError, KeyError):
            return False
        return True

    def read_many_into(self, items: list[tuple[str, str, torch.Tensor]]) -> list[bool | None]:
        """read_into for many parameters (component, name, out), each file's under one lease and one change check
        (a job's restores: the per-read lease and file checks cost more than a small layer's copy). For each: True
        written from the unchanged file; False nothing written (read it with read_into); None written while the
        file changed (`out` may hold mixed bytes)."""
        done: list[bool | None] = [False] * len(items)
        by_file: dict[str, list[int]] = {}
        for i, (component, name, out) in enumerate(items):
            entry = self.refs.get((component, name))
            if entry is not None and out.dtype == self.dtypes.get((component, name), out.dtype) and \
                    _as_stored(entry[2]) and out.device.type == "cpu" and out.is_contiguous():
                by_file.setdefault(entry[0], []).append(i)
        for filename, indices in by_file.items():
            leased = self._leased(filename)
            if leased is None:
                continue
            stamp = self.stamps[filename]
            with leased.reading(lambda st, stamp=stamp: _stamp(st) == stamp) as data:
                if data is None:
                    continue
                written = []
                for i in indices:
                    component, name, out = items[i]
                    try:
                        dtype, shape, offset, nbytes = self._where(None, filename, *self.refs[(component, name)][1:])
                    except (OSError, ValueError, KeyError):
                        continue
                    if list(shape) == list(out.shape):
                        out.view(-1).copy_(data[offset:offset + nbytes].view(dtype))
                        written.append(i)
                unchanged = _stamp(leased.fstat()) == stamp
                for i in written:
                    done[i] = True if unchanged else None
        return done

    def open_rows(self, component: str, name: str, like: torch.Tensor) -> RowReader | None:
        """A reader of row blocks of the parameter as loaded (`like`: a CPU tensor of its shape and dtype), or
        None when it cannot give rows straight from the file (unknown, changed, reshaped on load, other device).
        Close it (or use it as a context manager) to learn whether the file stayed unchanged."""
        entry = self.refs.get((component, name))
        if entry is None or like.dtype != self.dtypes.get((component, name), like.dtype) or \
                like.device.type != "cpu" or like.dim() < 1:
            return None
        filename, key, ref = entry
        if not _as_stored(ref):
            return None
        mapped = self._mapped_rows(filename, key, ref, like)
        if mapped is not None:
            return mapped
        try:
            f = open(filename, "rb", buffering=0)
        except OSError:
            return None
        try:
            located = self._locate(f, filename, key, ref)
        except (ValueError, KeyError):
            located = None
        if located is None or list(located[1]) != list(like.shape):
            f.close()
            return None
        dtype, _, offset, nbytes = located
        return RowReader(f, filename, self.stamps[filename], dtype, offset, nbytes // max(like.shape[0], 1))

    def sample(self, component: str, name: str, step: int) -> torch.Tensor | None:
        """Elements 0, step, 2·step, ... of the flattened parameter as loaded, read one by one (a few pages)."""
        entry = self.refs.get((component, name))
        if entry is None:
            return None
        filename, key, ref = entry
        if not _as_stored(ref):  # reshaped on read: take it whole
            t = self.read(component, name)
            return None if t is None else t.reshape(-1)[::step]
        try:
            with open(filename, "rb", buffering=0) as f:
                located = self._locate(f, filename, key, ref)
                if located is None:
                    return None
                dtype, _, offset, nbytes = located
                size = dtype.itemsize
                count = (nbytes // size + step - 1) // step if nbytes else 0
                raw = torch.empty(count * size, dtype=torch.uint8)
                view = memoryview(raw.numpy())
                for i in range(count):
                    if os.preadv(f.fileno(), [view[i * size:(i + 1) * size]], offset + i * step * size) != size:
                        return None
                if _stamp(os.fstat(f.fileno())) != self.stamps[filename]:
                    return None
        except (OSError, ValueError, KeyError):
            return None
        dtype_loaded = self.dtypes.get((component, name))
        t = raw.view(dtype)
        return t.to(dtype_loaded) if dtype_loaded is not None else t

    def _leased(self, filename: str) -> leased_map.LeasedMap | None:
        """The file's map for reads under a lease (made on first use); None where none can be had."""
        with self._maps_lock:
            if filename not in self._maps:
                leased = None
                if leased_map.available():
                    try:
                        leased = leased_map.LeasedMap(filename)
                    except (OSError, ValueError):
                        leased = None
                self._maps[filename] = leased
            return self._maps[filename]

    def _mapped_rows(self, filename: str, key: str, ref, like: torch.Tensor) -> MappedRowReader | None:
        """A row reader over the file's map holding its lease until closed, or None (no map, no lease, changed)."""
        leased = self._leased(filename)
        if leased is None:
            return None
        reading = leased.reading(lambda st: _stamp(st) == self.stamps[filename])
        data = reading.__enter__()
        try:
            located = self._where(None, filename, key, ref) if data is not None else None
        except (OSError, ValueError, KeyError):
            located = None
        if located is None or list(located[1]) != list(like.shape):
            reading.__exit__(None, None, None)
            return None
        dtype, _, offset, nbytes = located
        return MappedRowReader(reading, data, leased, self.stamps[filename], dtype, offset,
                               nbytes // max(like.shape[0], 1))

    def _locate(self, f, filename: str, key: str, ref):
        """(dtype, shape, offset, byte count) of the parameter in the open file, None when the file changed."""
        if _stamp(os.fstat(f.fileno())) != self.stamps[filename]:
            return None
        return self._where(f, filename, key, ref)

    def _where(self, f, filename: str, key: str, ref):
        """(dtype, shape, offset, byte count) of the parameter (`f`: the open file, None to open it for the index)."""
        index = self._index.get(filename)
        if index is None:
            if f is None:
                with open(filename, "rb") as g:
                    index = self._index[filename] = safetensors_mmap.read_index(g, filename)
            else:
                index = self._index[filename] = safetensors_mmap.read_index(f, filename)
        dtype, shape, offset, nbytes = index[key]
        if ref is not None and ref.transform == "rows" and shape:
            # one of `parts` equal row blocks (OpenCLIP's fused q/k/v): only those rows
            rows = shape[0] // ref.parts
            row_bytes = nbytes // shape[0] if shape[0] else 0
            span = getattr(ref, "span", 1)  # BFL's linear1: the MLP part is 4 of 7 blocks
            offset, nbytes = offset + ref.index * rows * row_bytes, span * rows * row_bytes
            shape = [span * rows, *shape[1:]]
        return dtype, shape, offset, nbytes

    def _read_unchanged(self, filename: str, key: str, ref) -> torch.Tensor | None:
        with open(filename, "rb", buffering=0) as f:
            located = self._locate(f, filename, key, ref)
            if located is None:
                return None
            dtype, shape, offset, nbytes = located
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                mapped_memory.pread_into(f.fileno(), buffer, offset, filename)
            if _stamp(os.fstat(f.fileno())) != self.stamps[filename]:  # written while we read: the bytes may be mixed
                return None
        return buffer.view(dtype).view(shape)


class RowReader:
    """Row blocks of one parameter, read straight from its checkpoint file into the caller's tensor (cast when
    the model was loaded in another dtype). `close()` says whether the file was the loaded one throughout."""

    def __init__(self, f, filename: str, stamp: FileStamp, dtype: torch.dtype, offset: int, row_bytes: int):
        self._f, self.filename, self._stamp = f, filename, stamp
        self.dtype, self._offset, self._row_bytes = dtype, offset, row_bytes

    def read(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows r0:r1 into `out` (contiguous, on the CPU); raises OSError on a short read."""
        offset, nbytes = self._offset + r0 * self._row_bytes, (r1 - r0) * self._row_bytes
        if out.dtype == self.dtype:
            mapped_memory.pread_into(self._f.fileno(), out.view(torch.uint8).view(-1), offset, self.filename)
        else:
            _read_cast(self._f.fileno(), out.view(-1), self.dtype, offset, nbytes, self.filename)

    def close(self) -> bool:
        """Closes the file; True when it is still the one the model was loaded from."""
        if self._f.closed:
            return False
        try:
            return _stamp(os.fstat(self._f.fileno())) == self._stamp
        finally:
            self._f.close()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MappedRowReader:
    """RowReader over a leased map (modules/leased_map): rows are copied (and cast) from the mapped file; the lease
    is held until close(), so the file cannot change meanwhile."""

    def __init__(self, reading, data: torch.Tensor, leased, stamp: FileStamp, dtype: torch.dtype, offset: int,
                 row_bytes: int):
        self._reading, self._data, self._leased, self._stamp = reading, data, leased, stamp
        self.dtype, self._offset, self._row_bytes = dtype, offset, row_bytes

    def read(self, r0: int, r1: int, out: torch.Tensor) -> None:
        if self._data is None:
            raise OSError("row reader used after close")
        lo, hi = self._offset + r0 * self._row_bytes, self._offset + r1 * self._row_bytes
        out.view(-1).copy_(self._data[lo:hi].view(self.dtype))

    def close(self) -> bool:
        """Releases the lease; True when the file is still the one the model was loaded from (the lease kept its
        contents; its times can still be changed)."""
        if self._data is None:
            return False
        self._data = None
        try:
            return _stamp(self._leased.fstat()) == self._stamp
        except OSError:
            return False
        finally:
            self._reading.__exit__(None, None, None)

    def __enter__(self) -> MappedRowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
