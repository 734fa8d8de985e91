"""Starts the host: extensions, model, HTTP API and the gradio UI on one FastAPI app (127.0.0.1:7860)."""
from __future__ import annotations

import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

startup_started = time.time()


def initialize() -> None:
    """Loads extension scripts and lists checkpoints; the model itself loads in the background."""
    from modules import extra_networks, scripts, sd_models, sd_modules, shared

    sd_models.list_models()
    if shared.cmd_opts.ckpt:  # an explicit --ckpt wins over the saved setting for this run
        info = next((x for x in sd_models.checkpoints_list.values()
                     if x.filename == os.path.abspath(shared.cmd_opts.ckpt)), None)
        if info is not None:
            shared.opts.data["sd_model_checkpoint"] = info.title
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
    scripts.load_scripts()
    shared.opts.onchange("sd_model_checkpoint", _on_checkpoint_option_change, call=False)
    shared.opts.onchange(sd_modules.OPTION, _on_checkpoint_option_change, call=False)  # the picked TE / VAE files


def _on_checkpoint_option_change() -> None:
    from modules import call_queue, sd_models
    with call_queue.queue_lock:
        sd_models.reload_model_weights()


def load_model_in_background() -> threading.Thread:
    from modules import processing, sd_models_diffusers, shared  # noqa: F401

    # diffusers imports its submodules lazily: two threads importing it at once can see a half-initialised
    # module ("cannot import name 'DDIMScheduler'"), so everything the loader needs is imported here first.
    sd_models_diffusers.pipeline_class("sd1"), sd_models_diffusers.pipeline_class("sdxl")

    def load():
        try:
            shared.sd_model  # noqa: B018  (reading the property loads the model)
        except Exception as e:
            from modules import errors
            errors.display(e, "loading the Stable Diffusion model")

    thread = threading.Thread(target=load, name="model-loader", daemon=True)
    thread.start()
    return thread


def create_app():
    """Builds the FastAPI app with the API routes, the gradio UI mounted at / and extension routes."""
    import gradio as gr
    from fastapi import FastAPI

    from modules import call_queue, http_security, script_callbacks, shared
    from modules.api.api import Api

    app = FastAPI(title="Lora web UI")
    Api(app, call_queue.queue_lock)
    demo = None
    if not shared.cmd_opts.nowebui:
        from modules import ui
        demo = ui.create_ui()
        shared.demo = demo
        app = gr.mount_gradio_app(app, demo, path="/", head=ui.head_html(), css=ui.css(),
                                  allowed_paths=ui.allowed_paths(), footer_links=[],
                                  auth=http_security.gradio_auth(shared.cmd_opts))
    script_callbacks.app_started_callback(demo, app)
    http_security.install(app, shared.cmd_opts)  # origin policy and login around every route, gradio's too
    return app


def webui() -> None:
    import uvicorn

    from modules import http_security, shared

    host = shared.cmd_opts.server_name or ("0.0.0.0" if shared.cmd_opts.listen else "127.0.0.1")
    warning = http_security.exposure_warning(shared.cmd_opts, host)
    if warning:
        print(warning, file=sys.stderr)
    try:  # before anything slow: a bad auth or CORS flag must stop the start, not leave the server open
        http_security.check_flags(shared.cmd_opts)
    except http_security.SecurityConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    if shared.cmd_opts.disable_safe_unpickle:  # accepted so A1111 command lines start, but never honoured
        print("--disable-safe-unpickle is ignored: files are only read with torch.load(weights_only=True)",
              file=sys.stderr)
    initialize()
    load_model_in_background()
    app = create_app()
    print(f"Running on http://{host}:{shared.cmd_opts.port} (started in {time.time() - startup_started:.1f}s)")
    uvicorn.run(app, host=host, port=shared.cmd_opts.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    webui()
