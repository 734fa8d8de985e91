"""Background hashing of Lora files that have no known hash yet, with progress for the card page.

A1111 hashes a LoRA only when a prompt first uses it, in the middle of that generation. Here, once the web UI
has started the worker, every file a scan finds without a hash (none embedded, none cached for its path, size
and mtime) is queued and hashed in a daemon thread, one file at a time and never while a generation runs, so
the page never waits for it. Results go into the same cache entries `modules.hashes.sha256` uses, so a later
`read_hash()` finds them.
"""
from __future__ import annotations

import collections
import os
import threading
import time

import lora_discovery
import lora_identity

from modules import cache, hashes, shared

_lock = threading.Lock()
_queue: collections.deque = collections.deque()
_queued: set[str] = set()
_thread: threading.Thread | None = None
_started = False
_finished_callbacks: list = []
_state = {"done": 0, "total": 0, "errors": 0, "current": "", "started_at": 0.0, "finished_at": 0.0,
          "generation": 0}


def enabled() -> bool:
    return _started and not getattr(shared.cmd_opts, "no_hashing", False)


def start() -> None:
    """Turns the worker on (the Lora card page does, when the web UI is built) and queues what is unhashed."""
    global _started
    _started = True
    lora_discovery.on_records_changed(enqueue)
    enqueue(list(lora_discovery._ordered))


def enqueue(entries: list) -> None:
    """Queues the records that have no hash; starts the thread when needed."""
    global _thread
    if not enabled():
        return
    with _lock:
        new = [e for e in entries if not e.hash and e.filename not in _queued]
        if not new:
            return
        if not _queue and not _state["current"]:  # a new batch: the progress counts start again
            _state.update(done=0, total=0, errors=0, started_at=time.time(), finished_at=0.0)
        _queue.extend(new)
        _queued.update(e.filename for e in new)
        _state["total"] += len(new)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="lora-hashing", daemon=True)
            _thread.start()


def status() -> dict:
    """{"running", "done", "total", "pending", "errors", "current", "generation"} for the page's progress."""
    with _lock:
        pending = len(_queue)
        running = _thread is not None and _thread.is_alive() and (pending > 0 or bool(_state["current"]))
        return {"running": running, "done": _state["done"], "total": _state["total"], "pending": pending,
                "errors": _state["errors"], "current": _state["current"], "generation": _state["generation"],
                "enabled": enabled()}


def wait(timeout: float = 60.0) -> bool:
    """Blocks until the queue is empty (tests, scripts); True when it emptied in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not status()["running"] and not _queue:
            return True
        time.sleep(0.05)
    return False


def _busy() -> bool:
    """A generation is running: its disk reads and CPU come first."""
    return bool(getattr(shared.state, "job", "")) if hasattr(shared, "state") else False


def hash_file(entry) -> str | None:
    """The hash `modules.hashes.sha256` would compute (tensor-data "addnet" hash for safetensors, file sha256
    otherwise), stored in the same cache entry. The file's size and mtime must hold during the read, or the
    result is dropped (the next scan queues the file again)."""
    title = lora_identity.cache_title(entry.filename)
    cached = hashes.sha256_from_cache(entry.filename, title, use_addnet_hash=entry.is_safetensors)
    if cached:
        return cached
    before = os.stat(entry.filename)
    if entry.is_safetensors:
        with open(entry.filename, "rb") as f:
            value = hashes.addnet_hash_safetensors(f)
    else:
        value = hashes.calculate_sha256(entry.filename)
    after = os.stat(entry.filename)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return None
    cache.cache("hashes-addnet" if entry.is_safetensors else "hashes")[title] = {
        "mtime": after.st_mtime, "size": after.st_size, "sha256": value}
    return value


def _run() -> None:
    started = time.time()
    count = 0
    while True:
        while _busy():
            time.sleep(0.5)
        with _lock:
            if not _queue:
                _state.update(current="", finished_at=time.time())
                break
            entry = _queue.popleft()
            _state["current"] = entry.name
        try:
            value = None if entry.hash else hash_file(entry)
            if value:
                # The record may have been replaced by a rescan meanwhile: give the hash to the current one.
                current = lora_discovery._records.get(entry.filename)
                for record in {id(x): x for x in (entry, current) if x is not None}.values():
                    if record.identity == entry.identity and not record.hash:
                        record.set_hash(value)
                count += 1
        except Exception as e:  # one bad file (a header length past 2**63 raises ValueError) must not end the run
            with _lock:
                _state["errors"] += 1
            print(f"*** Lora: cannot hash {entry.filename}: {type(e).__name__}: {e}")
        finally:
            with _lock:
                _queued.discard(entry.filename)
                _state["done"] += 1
                _state["generation"] += 1
        time.sleep(0)  # let request threads in between files
    if count:
        print(f"Lora: hashed {count} file(s) in the background in {time.time() - started:.1f}s")
        for callback in list(_finished_callbacks):
            try:
                callback()
            except Exception as e:
                print(f"*** Lora: after hashing: {type(e).__name__}: {e}")


def on_finished(callback) -> None:
    """callback() in the hashing thread after a run that hashed something (the card page rebuilds its data)."""
    if callback not in _finished_callbacks:
        _finished_callbacks.append(callback)


def stop() -> None:
    """Turns the worker off (tests); a file being hashed is finished, the rest of the queue dropped."""
    global _started
    _started = False
    with _lock:
        _queue.clear()
        _queued.clear()
    if _thread is not None:
        _thread.join(timeout=30)
    if enqueue in lora_discovery._listeners:
        lora_discovery._listeners.remove(enqueue)
    _finished_callbacks.clear()
