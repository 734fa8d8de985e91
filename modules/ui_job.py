"""Running a job from a UI button: in a worker thread while the progress bar follows shared.state; every comment of
the job also becomes a warning toast; an error is shown under the gallery and the server keeps running."""
from __future__ import annotations

import contextvars
import threading
import time
from typing import Any

from modules import processing, progress, shared, txt2img


def run_for_ui(p: processing.StableDiffusionProcessing, progress_bar: Any = None):
    """Returns (images, infotext HTML, generation info state)."""
    import gradio as gr

    from modules import errors, ui_common

    outcome: dict = {}

    def work():
        try:
            outcome["processed"] = txt2img.run(p)
        except Exception as e:
            if not isinstance(e, errors.JobInputError):
                errors.display(e, p.job_name)
            outcome["error"] = str(e) if isinstance(e, errors.JobInputError) else f"{type(e).__name__}: {e}"

    # The context copy lets gr.Warning raised inside the job (by extensions) reach this event's page.
    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(work,), name=f"{p.job_name}-job", daemon=True)
    started = time.time()
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if progress_bar is not None:
            if progress.is_active():
                progress_bar(shared.state.progress(), desc=progress.describe())
            else:
                progress_bar(None, desc="Waiting for the model..." if time.time() - started > 0.5 else None)

    if "error" in outcome:
        gr.Warning(outcome["error"])
        return [], ui_common.infotext_html("", error=outcome["error"]), {"infotexts": [], "comments": ""}

    processed: processing.Processed = outcome["processed"]
    for line in (processed.comments or "").split("\n"):
        if line.strip():
            gr.Warning(line)
    info = {"infotexts": list(processed.infotexts), "comments": processed.comments or ""}
    first = processed.infotexts[0] if processed.infotexts else processed.info
    return list(processed.images), ui_common.infotext_html(first, processed.comments), info
