"""A tiny temporary A1111 extension used by scripts/a1111_check.py (copied to
`<webui>/extensions/lora-check-probe/scripts/`, removed afterwards). It adds loopback-only routes that read the
loaded model, so the check can compare weights between A1111's built-in Lora and ours:

- GET  /lora-check/info      pid, resident memory, the loaded checkpoint, which Lora extension is loaded, and
                             `weight_seconds`: the time spent so far in the Lora's weight code (A1111's
                             `networks.network_apply_weights`, which applies and restores layer by layer inside
                             each forward; ours: `lora_patcher.Patcher.sync`), so the check can time a removal
                             inside the server, without the job's noise around it
- POST /lora-check/snapshot  {"file": path or null, "names": [parameter names] or null}: a SHA-1 of every
                             parameter of the model, and the named parameters saved to a safetensors file
- POST /lora-check/merge     {"name": output name, "multiplier": m}: A1111's checkpoint merger (weighted sum of the
                             loaded checkpoint with itself, no half) through modules.extras.run_modelmerger
- POST /lora-check/write-floor {"names": [parameter names], "repeats": n}: the floor of a removal in this server,
                             one write of those parameters' bytes (`p.copy_(copy)` from copies made beforehand,
                             untimed); seconds of each repeat
"""
import functools
import hashlib
import os
import sys
import threading
import time

import safetensors.torch
import torch
from fastapi import HTTPException, Request

from modules import extras, script_callbacks, sd_models, shared


def _rss(field: str = "VmRSS") -> int:
    """A resident-memory figure of /proc/self/status in bytes: VmRSS (all), RssAnon (private memory), RssFile
    (pages of mapped files, shared with the page cache and dropped under memory pressure)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class WeightClock:
    """Wall time spent inside the Lora's weight code (outermost calls only: the code does not nest, but be sure)."""

    def __init__(self):
        self.seconds, self._depth, self._lock = 0.0, threading.local(), threading.Lock()
        self.timed: str | None = None

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    with self._lock:
                        self.seconds += time.perf_counter() - started
        return timed

    def install(self) -> None:
        """Ours: the patcher's sync (every weight write and restore goes through it). A1111's: the global that its
        patched forwards look up at each call."""
        patcher = sys.modules.get("lora_patcher")
        if patcher is not None:
            patcher.Patcher.sync = self.wrap(patcher.Patcher.sync)
            self.timed = "lora_patcher.Patcher.sync"
            return
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "network_apply_weights"):
            networks.network_apply_weights = self.wrap(networks.network_apply_weights)
            self.timed = "networks.network_apply_weights"


weight_clock = WeightClock()


def _loopback(request: Request) -> None:
    if request.client is None or request.client.host not in ("127.0.0.1", "::1"):
        raise HTTPException(status_code=403, detail="loopback only")


def info(request: Request) -> dict:
    _loopback(request)
    networks = sys.modules.get("networks")
    model = shared.sd_model
    return {"pid": os.getpid(), "rss": _rss(), "rss_anon": _rss("RssAnon"), "rss_file": _rss("RssFile"),
            "weight_seconds": weight_clock.seconds, "weight_code": weight_clock.timed,
            "checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None),
            "networks_module": getattr(networks, "__file__", None),
            "loaded": [{"name": getattr(n, "name", "?"), "te": float(getattr(n, "te_multiplier", 0)),
                        "unet": float(getattr(n, "unet_multiplier", 0)),
                        "block_factors": len(getattr(n, "layer_factors", None) or {})}
                       for n in getattr(networks, "loaded_networks", [])]}


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest() + \
        f":{str(data.dtype)}:{tuple(data.shape)}"


async def snapshot(request: Request) -> dict:
    _loopback(request)
    body = await request.json()
    params = dict(shared.sd_model.named_parameters())
    digests = {name: _digest(p) for name, p in params.items()}
    names = body.get("names")
    if body.get("file") and names:
        missing = [n for n in names if n not in params]
        if missing:
            raise HTTPException(status_code=400, detail=f"no such parameters: {missing[:5]}")
        safetensors.torch.save_file({n: params[n].detach().cpu().contiguous().clone() for n in names}, body["file"])
    return {"digests": digests, "rss": _rss()}


async def merge(request: Request) -> dict:
    _loopback(request)
    body = await request.json()
    title = shared.sd_model.sd_checkpoint_info.title
    result = extras.run_modelmerger(None, title, title, None, "Weighted sum", float(body.get("multiplier", 0.3)),
                                    False, body["name"], "safetensors", "A, B or C", "None", "", False, False, "",
                                    "{}")
    message = result[-1] if isinstance(result, (list, tuple)) else str(result)
    if "saved" not in str(message).lower():
        raise HTTPException(status_code=500, detail=str(message))
    sd_models.list_models()
    created = next((c for c in sd_models.checkpoints_list.values() if c.name == f"{body['name']}.safetensors"), None)
    return {"message": str(message), "title": created.title if created else None}


async def write_floor(request: Request) -> dict:
    _loopback(request)
    body = await request.json()
    params = dict(shared.sd_model.named_parameters())
    names = [n for n in body.get("names") or [] if n in params]
    if not names:
        raise HTTPException(status_code=400, detail="no known parameter names")
    pairs = [(params[n], params[n].detach().clone()) for n in names]  # the copies: bigger than any cache
    seconds = []
    with torch.no_grad():
        for _ in range(max(1, int(body.get("repeats", 5)))):
            started = time.perf_counter()
            for p, copy in pairs:
                p.copy_(copy)
            seconds.append(time.perf_counter() - started)
    nbytes = sum(p.numel() * p.element_size() for p, _ in pairs)
    return {"seconds": seconds, "parameters": len(names), "bytes": nbytes}


def add_routes(demo, app) -> None:
    weight_clock.install()
    app.add_api_route("/lora-check/info", info, methods=["GET"])
    app.add_api_route("/lora-check/snapshot", snapshot, methods=["POST"])
    app.add_api_route("/lora-check/merge", merge, methods=["POST"])
    app.add_api_route("/lora-check/write-floor", write_floor, methods=["POST"])


script_callbacks.on_app_started(add_routes)
