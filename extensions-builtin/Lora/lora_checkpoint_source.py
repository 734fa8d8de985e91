"""Exact original weights of an A1111 model, re-read from the checkpoint file it was loaded from.

Our host offers `sd_model.original_weights`; A1111 does not. There the model was loaded from
`sd_model.sd_checkpoint_info.filename` (a `.safetensors` file: its keys are the model's state-dict keys after
A1111's own key fix-ups, `sd_models.get_state_dict_from_checkpoint`), then cast. This module re-reads a parameter
from that file and casts it the way A1111 did, so the patcher can restore a layer without keeping a copy of it.

Cast, as A1111 v1.10.1 does it (`load_model`, `load_model_weights`): the file's tensor goes to the dtype the
parameter has now in one rounding (`--no-half`: fp32; else fp16, `--upcast-sampling` included; a fp32/fp64 file
under `--no-half` likewise). fp8 storage (`fp8_storage`) casts Linear/Conv2d weights to float8 after that: from
fp16 unless `--no-half`; under `--no-half` only fp16 files are taken (a fp32 file then depends on how the model
was loaded: fresh or reloaded, so those parameters are not offered). The VAE is never read (Loras do not touch
it), so a separately loaded VAE does not matter.

Trust: the bytes are used only while the file is the one A1111 read. A1111's `read_state_dict` is wrapped to note
the file's identity (device, inode, size, mtime, ctime) before and after every read; a file is trusted when every
read of it in this process saw the identity it has now, or, when A1111 never read it through that function, when
it was last changed before this process started. The `checkpoints_loaded` cache (a state dict read earlier)
and UI model merges (new files; or a loaded file overwritten, which changes its identity) are covered by that
rule. Reads go through a map of the file kept for the source's life, each under a read lease that makes any
truncate or write wait until it ends (lora_leased_map: a truncated map would raise SIGBUS), with the identity
checked once the lease is held; where no lease can be had, through pread, with the identity checked before and
after (a truncated file gives a short read). The patcher also compares sampled elements with the live layer
before trusting a parameter, and falls back to its residual or clone path when anything does not match.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import lora_files
import lora_leased_map
import lora_parallel_reads
import torch

try:  # both hosts have them; a bare process (a tool, a test without a host) may not
    from modules import sd_models, shared
except ImportError:
    sd_models = shared = None

logger = logging.getLogger("lora")

FileStamp = tuple[int, int, int, int, int]
BLOCK_BYTES = 1 << 20  # pread block for casting reads: stays in cache between the read and the cast
_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

_lock = threading.Lock()
_seen: dict[str, set[FileStamp]] = {}  # realpath → identities seen by A1111's reads in this process


def _stamp(st: os.stat_result) -> FileStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_stamp(filename: str) -> FileStamp:
    return _stamp(os.stat(filename))


def _process_start() -> float:
    """When this process started (seconds since the epoch); the import time where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0  # btime is whole seconds: one second of margin
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_START = _process_start()


def note_read(filename: str, before: FileStamp | None, after: FileStamp | None) -> None:
    """Records the identities a checkpoint had around one read of it by the host."""
    key = os.path.realpath(filename)
    with _lock:
        seen = _seen.setdefault(key, set())
        for stamp in (before, after):
            seen.add(stamp if stamp is not None else (0, 0, -1, 0, 0))  # gone: never matches a real file


def install_read_hook(sd_models) -> bool:
    """Wraps A1111's `sd_models.read_state_dict` to note the file's identity around each read (idempotent)."""
    original = getattr(sd_models, "read_state_dict", None)
    if not callable(original) or getattr(original, "_lora_noted", False):
        return False

    def read_state_dict(checkpoint_file, *args, **kwargs):
        before = _try_stamp(checkpoint_file)
        try:
            return original(checkpoint_file, *args, **kwargs)
        finally:
            note_read(checkpoint_file, before, _try_stamp(checkpoint_file))

    read_state_dict._lora_noted = True
    read_state_dict.__wrapped__ = original
    sd_models.read_state_dict = read_state_dict
    return True


def _try_stamp(filename) -> FileStamp | None:
    try:
        return file_stamp(os.fspath(filename))
    except (OSError, TypeError):
        return None


def trusted_stamp(filename: str) -> FileStamp | None:
    """The file's identity now, when its contents are what the host read (see the module docstring), else None."""
    try:
        now = file_stamp(filename)
    except OSError:
        return None
    with _lock:
        seen = set(_seen.get(os.path.realpath(filename), ()))
    if seen:
        return now if seen == {now} else None
    changed = max(now[3], now[4]) / 1e9
    return now if changed < PROCESS_START else None


def a1111_key_map(index: dict, sd_models) -> dict[str, str]:
    """{model state-dict key: file key}, applying A1111's own key fix-ups (`get_state_dict_from_checkpoint`) to the
    file's keys; identity where A1111 has no such function."""
    convert = getattr(sd_models, "get_state_dict_from_checkpoint", None) if sd_models is not None else None
    if not callable(convert):
        return {k: k for k in index}
    # A1111 pops the converted tensors by identity of their value: give each key a distinct placeholder with the
    # file's shape (its SD2-turbo test reads one shape) on the meta device, so nothing is allocated.
    placeholders = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _, _) in index.items()}
    by_id = {id(v): k for k, v in placeholders.items()}
    converted = convert(dict(placeholders))
    return {new_key: by_id[id(v)] for new_key, v in converted.items() if id(v) in by_id}


def _chain(file_dtype: torch.dtype, live: torch.dtype, no_half: bool) -> tuple[torch.dtype, ...] | None:
    """The casts A1111 made from the file's dtype to the live one, or None when that is ambiguous."""
    if live in _FLOAT8:
        if not no_half:
            return (torch.float16, live)
        return (live,) if file_dtype in (torch.float16, live) else None
    if file_dtype in _FLOAT8 and live not in _FLOAT8 and live != torch.float32:
        return None  # A1111 never stores fp8 checkpoints' weights back into 16 bits
    return (live,)


class CheckpointSource:
    """`sd_model.original_weights` for an A1111 model: read(component, param) → the parameter as loaded.

    entries: {(component, param name): (file key, live dtype)}; `prefixes`: {component: its state-dict prefix in
    the model} (what `read` prepends to a parameter name)."""

    def __init__(self, filename: str, stamp: FileStamp, index: dict, key_map: dict[str, str],
                 prefixes: dict[str, str], dtypes: dict[tuple[str, str], torch.dtype], no_half: bool):
        self.filename = filename
        self.stamp = stamp
        self._index = index
        self._key_map = key_map
        self.prefixes = prefixes
        self.dtypes = dtypes
        self.no_half = no_half
        self._map: lora_leased_map.LeasedMap | None = None
        self._map_tried = False
        self._map_lock = threading.Lock()

    # --- the seam ---------------------------------------------------------------------------------------------
    def valid(self) -> bool:
        try:
            return file_stamp(self.filename) == self.stamp
        except OSError:
            return False

    def has(self, component: str, name: str) -> bool:
        return self._entry(component, name) is not None

    def read(self, component: str, name: str) -> torch.Tensor | None:
        """The parameter as loaded, in a new tensor; None when unknown or the file changed."""
        entry = self._entry(component, name)
        if entry is None:
            return None
        out = torch.empty(entry[1], dtype=entry[4])
        return out if self._read(entry, out) else None

    def read_into(self, component: str, name: str, out: torch.Tensor) -> bool:
        """Writes the parameter as loaded into `out` (same shape and dtype, any device); False (and `out`
        possibly part-written) when unknown or the file changed."""
        entry = self._entry(component, name)
        if entry is None or tuple(out.shape) != entry[1] or out.dtype != entry[4]:
            return False
        return self._read(entry, out)

    def read_many_into(self, items: list[tuple[str, str, torch.Tensor]]) -> list[bool | None]:
        """read_into for many parameters (component, name, out) under one lease and one change check where the map
        can serve them (no cast chain, CPU, contiguous). For each: True written from the unchanged file; False
        nothing written (read it with read_into); None written while the file changed (possibly mixed bytes)."""
        done: list[bool | None] = [False] * len(items)
        leased = self._leased_map()
        if leased is None:
            return done
        with leased.reading(lambda st: _stamp(st) == self.stamp) as data:
            if data is None:
                return done
            written = []
            for i, (component, name, out) in enumerate(items):
                entry = self._entry(component, name)
                if entry is None or tuple(out.shape) != entry[1] or out.dtype != entry[4] or len(entry[5]) != 1 or \
                        out.device.type != "cpu" or not out.is_contiguous():
                    continue
                file_dtype, _, offset, nbytes = entry[:4]
                out.view(-1).copy_(data[offset:offset + nbytes].view(file_dtype))
                written.append(i)
            unchanged = _stamp(leased.fstat()) == self.stamp
            for i in written:
                done[i] = True if unchanged else None
        return done

    def sample(self, component: str, name: str, step: int) -> torch.Tensor | None:
        """Elements 0, step, 2·step, ... of the flattened parameter as loaded (a few small reads)."""
        entry = self._entry(component, name)
        if entry is None:
            return None
        file_dtype, shape, offset, nbytes, live, chain = entry
        size = file_dtype.itemsize
        count = (nbytes // size + step - 1) // step if nbytes else 0
        raw = torch.empty(count * size, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        try:
            with open(self.filename, "rb", buffering=0) as f:
                fd = f.fileno()
                if _stamp(os.fstat(fd)) != self.stamp:
                    return None
                for i in range(count):
                    if os.preadv(fd, [view[i * size:(i + 1) * size]], offset + i * step * size) != size:
                        return None
                if _stamp(os.fstat(fd)) != self.stamp:
                    return None
        except OSError:
            return None
        return _cast(raw.view(file_dtype), chain)

    # --- reading ----------------------------------------------------------------------------------------------
    def _entry(self, component: str, name: str):
        prefix = self.prefixes.get(component)
        live = self.dtypes.get((component, name))
        if prefix is None or live is None:
            return None
        key = self._key_map.get(prefix + name)
        info = self._index.get(key) if key is not None else None
        if info is None:
            return None
        file_dtype, shape, offset, nbytes = info
        chain = _chain(file_dtype, live, self.no_half)
        if chain is None or not (file_dtype.is_floating_point and live.is_floating_point):
            return None
        return file_dtype, shape, offset, nbytes, live, chain

    def _read(self, entry, out: torch.Tensor) -> bool:
        file_dtype, shape, offset, nbytes, live, chain = entry
        if len(chain) == 1 and out.device.type == "cpu" and out.is_contiguous():
            leased = self._leased_map()
            if leased is not None:
                with leased.reading(lambda st: _stamp(st) == self.stamp) as data:
                    if data is not None:  # nobody can write or truncate the file until this block ends
                        out.view(-1).copy_(data[offset:offset + nbytes].view(file_dtype))
                        return _stamp(leased.fstat()) == self.stamp  # touched meanwhile: not trusted
        try:
            with open(self.filename, "rb", buffering=0) as f:
                fd = f.fileno()
                if _stamp(os.fstat(fd)) != self.stamp:
                    return False
                if file_dtype == live and out.device.type == "cpu" and out.is_contiguous():
                    flat = out.view(torch.uint8).view(-1)  # straight into place
                    lora_parallel_reads.in_parts(
                        nbytes, lambda lo, hi: lora_parallel_reads.pread(fd, flat[lo:hi], offset + lo, self.filename))
                else:
                    self._read_cast(fd, out, file_dtype, offset, nbytes, chain)
                return _stamp(os.fstat(fd)) == self.stamp  # written while we read: the bytes may be mixed
        except OSError as e:
            logger.debug("Lora: cannot re-read %s from %s: %s", entry, self.filename, e)
            return False

    def _leased_map(self) -> lora_leased_map.LeasedMap | None:
        """The checkpoint mapped for reads under a lease (lora_leased_map), made on first use; None where that cannot
        be had (then reads use pread)."""
        with self._map_lock:
            if not self._map_tried:
                self._map_tried = True
                if lora_leased_map.available():
                    try:
                        self._map = lora_leased_map.LeasedMap(self.filename)
                    except (OSError, ValueError) as e:
                        logger.debug("Lora: %s is re-read with pread: %s", self.filename, e)
            return self._map

    def _read_cast(self, fd: int, out: torch.Tensor, file_dtype, offset: int, nbytes: int, chain) -> None:
        """Block by block: pread into a cache-sized buffer, cast into `out` (no weight-sized temporary); a large
        parameter in one contiguous part per torch thread (one thread's kernel copy and cast do not fill the
        memory bandwidth)."""
        size = file_dtype.itemsize
        if not out.is_contiguous():  # a strided weight: whole tensor through a temporary
            tmp = torch.empty(nbytes, dtype=torch.uint8)
            lora_parallel_reads.pread(fd, tmp, offset, self.filename)
            out.copy_(_cast(tmp.view(file_dtype), chain).view(out.shape))
            return
        flat, head = out.view(-1), chain[:-1]

        def part(lo: int, hi: int) -> None:
            per_block = max(1, BLOCK_BYTES // size)
            scratch = lora_parallel_reads.scratch(per_block * size)
            while lo < hi:
                n = min(per_block, hi - lo)
                raw = scratch[:n * size]
                lora_parallel_reads.pread(fd, raw, offset + lo * size, self.filename)
                flat[lo:lo + n].copy_(_cast(raw.view(file_dtype), head) if head else raw.view(file_dtype))
                lo += n

        lora_parallel_reads.in_parts(nbytes // size, part, nbytes)


def _cast(t: torch.Tensor, chain) -> torch.Tensor:
    for dtype in chain:
        t = t.to(dtype)
    return t


# --- finding the model's parts in the file ----------------------------------------------------------------------
def component_prefixes(sd_model, components: dict[str, torch.nn.Module]) -> dict[str, str]:
    """{component: state-dict prefix in the checkpoint} for the compvis layout: `model.diffusion_model.` for the
    UNet, the text tower's path under `cond_stage_model` / `conditioner.embedders.N` without A1111's hijack level
    (`wrapped`), e.g. `cond_stage_model.transformer.`, `conditioner.embedders.1.model.`."""
    res = {}
    diffusion = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if diffusion is not None and components.get("unet") is diffusion:
        res["unet"] = "model.diffusion_model."
    holders = []
    conditioner = getattr(sd_model, "conditioner", None)
    embedders = list(getattr(conditioner, "embedders", None) or []) if conditioner is not None else []
    holders += [(f"conditioner.embedders.{i}.", e) for i, e in enumerate(embedders)]
    if isinstance(getattr(sd_model, "cond_stage_model", None), torch.nn.Module):
        holders.append(("cond_stage_model.", sd_model.cond_stage_model))
    for component in ("text_encoder", "text_encoder_2"):
        tower = components.get(component)
        if tower is None:
            continue
        for prefix, holder in holders:
            inner = getattr(holder, "wrapped", holder)
            for attr in ("transformer", "model"):
                if getattr(inner, attr, None) is tower:
                    res[component] = f"{prefix}{attr}."
    return res


def build(sd_model, layer_map, sd_models=None, cmd_opts=None) -> CheckpointSource | None:
    """The source for an A1111 (compvis-layout) model loaded from a `.safetensors` checkpoint, or None."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None) or getattr(sd_model, "sd_model_checkpoint", None)
    if not isinstance(filename, str) or not filename.lower().endswith(".safetensors"):
        return None
    stamp = trusted_stamp(filename)
    if stamp is None:
        logger.info("Lora: %s changed since it was loaded; restores use the residual path", filename)
        return None
    try:
        with open(filename, "rb") as f:
            if _stamp(os.fstat(f.fileno())) != stamp:
                return None
            index = lora_files.read_safetensors_index(f, filename)
    except (OSError, lora_files.LoraFileError) as e:
        logger.info("Lora: cannot index %s: %s", filename, e)
        return None
    prefixes = component_prefixes(sd_model, layer_map.components)
    dtypes = {}
    for name, module in layer_map.layers.items():
        path = layer_map.module_paths.get(name)
        weight = getattr(module, "weight", None)
        if path is None or not isinstance(weight, torch.Tensor):
            continue
        record = getattr(module, "network_backup", None)
        dtype = getattr(record, "dtype", None) or weight.dtype  # a patched layer: the dtype it was patched in
        dtypes[(path[0], f"{path[1]}.weight")] = dtype
    no_half = bool(getattr(cmd_opts, "no_half", False))
    return CheckpointSource(filename, stamp, index, a1111_key_map(index, sd_models), prefixes, dtypes, no_half)


def attach(sd_model, layer_map) -> None:
    """Gives an A1111 model `original_weights` (ours); a host's own source is left alone."""
    current = getattr(sd_model, "original_weights", None)
    if current is not None and not isinstance(current, CheckpointSource):
        return
    if getattr(layer_map, "layout", None) != "compvis":
        return
    cmd_opts = getattr(shared, "cmd_opts", None)
    try:
        source = build(sd_model, layer_map, sd_models, cmd_opts)
    except Exception as e:  # never stop a model load over this: the patcher has other restore paths
        logger.warning("Lora: no checkpoint source for restores: %s", e)
        source = None
    try:
        sd_model.original_weights = source
    except (AttributeError, TypeError):
        pass


def _install() -> None:
    if sd_models is not None:
        install_read_hook(sd_models)


_install()
