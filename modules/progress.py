"""What the current job is doing, read from `shared.state` (for the API's /progress and the UI's progress bar)."""
from __future__ import annotations

import time

from modules import shared


def state_dict() -> dict:
    s = shared.state
    return {
        "skipped": bool(s.skipped),
        "interrupted": bool(s.interrupted),
        "stopping_generation": False,
        "job": s.job,
        "job_count": s.job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(s.time_start)) if s.time_start else "0",
        "job_no": s.job_no,
        "sampling_step": s.sampling_step,
        "sampling_steps": s.sampling_steps,
    }


def is_active() -> bool:
    return bool(shared.state.job)


def progress_snapshot() -> dict:
    """A1111's ProgressResponse shape: progress 0..1, eta_relative in seconds, the state dict."""
    s = shared.state
    progress = s.progress() if is_active() else 0.0
    eta = 0.0
    if is_active() and s.time_start and progress > 0.01:
        elapsed = time.time() - s.time_start
        eta = max(0.0, elapsed / progress - elapsed)
    return {"progress": progress, "eta_relative": eta, "state": state_dict(), "current_image": None,
            "textinfo": s.textinfo}


def describe() -> str:
    """A short line for the progress bar, e.g. `Step 3/20`."""
    s = shared.state
    if not is_active():
        return "Waiting..."
    text = f"Step {s.sampling_step}/{s.sampling_steps}" if s.sampling_steps else "Starting..."
    if s.job_count > 1:
        text = f"Batch {s.job_no + 1}/{s.job_count}, {text}"
    return text


def setup_progress_api(app) -> None:
    """GET /internal/progress for the page (no API auth, as in A1111)."""
    app.add_api_route("/internal/progress", progress_snapshot, methods=["GET"])
