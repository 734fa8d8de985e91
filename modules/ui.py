"""The gradio page (A1111 names): create_ui(), head_html(), css(), allowed_paths(), and the page's own routes."""
from __future__ import annotations

import os
import urllib.parse

import gradio as gr

from modules import (
    call_queue,
    errors,
    extensions_preload,
    paths_internal,
    progress,
    script_callbacks,
    sd_modules,
    shared,
    ui_common,
    ui_extra_networks,
    ui_generation,
    ui_settings,
    ui_train,
)

ASSETS_ROUTE = "/webui-assets"


# --- static assets: page scripts and styles -----------------------------------------------------------------------
def _script_dirs() -> list[tuple[str, str]]:
    """(url prefix, folder) for the host's javascript/ and every extension's javascript/, host first."""
    found = [("javascript", os.path.join(paths_internal.script_path, "javascript"))]
    for ext_dir in extensions_preload.extension_dirs():
        folder = os.path.join(ext_dir, "javascript")
        if os.path.isdir(folder):
            found.append((f"extensions/{os.path.basename(ext_dir)}/javascript", folder))
    return found


def list_scripts() -> list[tuple[str, str]]:
    """(url path, file path) of every page script, sorted by name within each folder."""
    result = []
    for prefix, folder in _script_dirs():
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".js"):
                result.append((f"{prefix}/{name}", os.path.join(folder, name)))
    return result


def head_html() -> str:
    """One <script> per page script, served by /webui-assets with the file's mtime to bust caches.

    `defer` keeps the files in order however gradio inserts them; they only define functions and register
    start-up hooks, so they may run before or after the app mounts.
    """
    tags = []
    for url_path, path in list_scripts():
        url = f"{ASSETS_ROUTE}/{urllib.parse.quote(url_path)}?v={int(os.path.getmtime(path))}"
        tags.append(f'<script type="text/javascript" src="{url}" defer></script>')
    return "\n".join(tags)


def css() -> str:
    """The host's style.css followed by each extension's style.css."""
    files = [os.path.join(paths_internal.script_path, "style.css")]
    files += [os.path.join(d, "style.css") for d in extensions_preload.extension_dirs()]
    parts = []
    for path in files:
        if os.path.isfile(path):
            with open(path, "r", encoding="utf8") as f:
                parts.append(f"/* {os.path.relpath(path, paths_internal.script_path)} */\n{f.read()}")
    return "\n".join(parts)


def allowed_paths() -> list[str]:
    """Folders gradio may serve files from: none; images reach the gallery through gradio's own cache."""
    return []


def _resolve_asset(asset_path: str) -> str | None:
    for prefix, folder in _script_dirs():
        if asset_path.startswith(prefix + "/"):
            name = asset_path[len(prefix) + 1:]
            if "/" in name or "\\" in name or not name.endswith(".js"):
                return None
            path = os.path.join(folder, name)
            return path if os.path.isfile(path) else None
    return None


def setup_ui_api(demo, app) -> None:
    """Routes the page itself needs (no API auth): scripts, the card pane, progress."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    def asset(asset_path: str):
        path = _resolve_asset(asset_path)
        if path is None:
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=31536000"})

    app.add_api_route(ASSETS_ROUTE + "/{asset_path:path}", asset, methods=["GET"])
    ui_extra_networks.add_pages_to_demo(app)
    progress.setup_progress_api(app)
    keep_gradio_mount_last(app)
    ui_extra_networks.warm_cards_cache()


def keep_gradio_mount_last(app) -> None:
    """gradio is mounted at "/", which matches every path: routes added after it (by app_started callbacks,
    like the Lora extension's /sdapi/v1/loras) are unreachable unless the mount is moved to the end."""
    mounts = [r for r in app.router.routes if type(r).__name__ == "Mount" and getattr(r, "path", None) == ""]
    for route in mounts:
        app.router.routes.remove(route)
        app.router.routes.append(route)


def _on_app_started(demo, app) -> None:
    setup_ui_api(demo, app)


# --- checkpoint selector ------------------------------------------------------------------------------------------
def _checkpoint_choices() -> list[str]:
    try:
        return list(shared.list_checkpoint_tiles())
    except Exception as e:
        errors.display(e, "listing checkpoints")
        return []


def _current_checkpoint() -> str | None:
    value = shared.opts.sd_model_checkpoint
    if value:
        return value
    try:
        from modules import sd_models
        model = getattr(sd_models.model_data, "sd_model", None)
        info = getattr(model, "sd_checkpoint_info", None) or sd_models.select_checkpoint()
        return getattr(info, "title", None)
    except Exception:
        return None


def _checkpoint_update() -> dict:
    choices = _checkpoint_choices()
    value = _current_checkpoint()
    if value is not None and value not in choices:
        from modules import sd_models

        # a title from before the file was hashed names a listed checkpoint: show that entry, not a second one
        match = sd_models.get_closet_checkpoint_match(value)
        if match is not None and match.title in choices:
            value = match.title
        else:
            choices = [value] + choices
    return gr.update(choices=choices, value=value)


def change_checkpoint(title: str):
    """Switches the model (under the queue lock, so never in the middle of a job) and saves the choice."""
    if not title or title == shared.opts.sd_model_checkpoint:
        return gr.update()
    from modules import sd_models

    previous = shared.opts.sd_model_checkpoint
    try:
        with call_queue.queue_lock:
            shared.opts.set("sd_model_checkpoint", title, run_callbacks=False)
            sd_models.reload_model_weights()
        shared.opts.save(shared.config_filename)
    except Exception as e:
        errors.display(e, f"loading checkpoint {title}")
        if shared.opts.sd_model_checkpoint == title:  # load_model puts the loaded one back; anything else too
            shared.opts.set("sd_model_checkpoint", previous, run_callbacks=False)
        gr.Warning(str(e) if isinstance(e, sd_models.CheckpointLoadError) else
                   f"Could not load {title}: {type(e).__name__}: {e}")
    # fresh choices: loading hashes the file, which renames its entry (the old name would be listed twice)
    return _checkpoint_update()


def refresh_checkpoints():
    with call_queue.queue_lock:
        shared.refresh_checkpoints()
    return _checkpoint_update()


# --- text encoder / VAE files (Forge's "VAE / Text Encoder") --------------------------------------------------------
def _modules_update() -> dict:
    selected = list(shared.opts.data.get(sd_modules.OPTION) or [])
    return gr.update(choices=list(dict.fromkeys(list(sd_modules.list_modules()) + selected)), value=selected)


def change_modules(names: list[str] | None):
    """Picks the text encoder / VAE files; a loaded Flux single file is loaded again with them."""
    from modules import sd_models

    names = list(names or [])
    previous = list(shared.opts.data.get(sd_modules.OPTION) or [])
    if names == previous:
        return gr.update()
    try:
        with call_queue.queue_lock:
            shared.opts.set(sd_modules.OPTION, names, run_callbacks=False)
            current = sd_models.model_data.sd_model
            if current is not None and sd_modules.changed_for(current):
                sd_models.reload_model_weights()
        shared.opts.save(shared.config_filename)
    except Exception as e:
        errors.display(e, "picking text encoder / VAE files")
        shared.opts.set(sd_modules.OPTION, previous, run_callbacks=False)
        gr.Warning(str(e) if isinstance(e, (sd_models.CheckpointLoadError, ValueError)) else
                   f"Could not load with {', '.join(names)}: {type(e).__name__}: {e}")
    return _modules_update()


# --- the page -----------------------------------------------------------------------------------------------------
def create_ui() -> gr.Blocks:
    """Builds the page: checkpoint selector, the txt2img and img2img tabs with their Lora panes, Train, Settings,
    extension tabs."""
    ui_extra_networks.initialize()
    ui_extra_networks.register_default_pages()
    script_callbacks.before_ui_callback()  # the Lora extension registers its card page here
    script_callbacks.ui_settings_callback()  # extensions add their options here

    settings = ui_settings.SettingsUi()
    ui_generation._model_dependent.clear()
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False, fill_width=True) as demo:
        with gr.Row(elem_id="quicksettings", equal_height=True):
            checkpoint = gr.Dropdown(choices=_checkpoint_choices(), value=_current_checkpoint(),
                                     label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                     allow_custom_value=True, scale=0, min_width=360)
            refresh_button = gr.Button(ui_common.refresh_symbol, elem_id="refresh_sd_model_checkpoint", scale=0,
                                       min_width=48, elem_classes=["tool-button"])
            modules_dropdown = gr.Dropdown(choices=list(sd_modules.list_modules()), multiselect=True,
                                           value=list(shared.opts.data.get(sd_modules.OPTION) or []),
                                           label=sd_modules.LABEL, elem_id="setting_forge_additional_modules",
                                           allow_custom_value=True, scale=0, min_width=360)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                ui_generation.create_txt2img_tab()
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                ui_generation.create_img2img_tab()
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                ui_train.create_ui()
            for interface, label, ifid in script_callbacks.ui_tabs_callback():
                with gr.Tab(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings.create()

        reload_cards_js = "() => { if (window.extraNetworksReloadAll) window.extraNetworksReloadAll(); }"
        samplers_out = ui_generation.model_dependent()
        checkpoint.input(fn=change_checkpoint, inputs=[checkpoint], outputs=[checkpoint],
                          show_progress="full", concurrency_id="checkpoint", api_visibility="private").then(
            fn=ui_generation.model_updates, outputs=samplers_out, api_visibility="private").then(
            fn=None, js=reload_cards_js)
        modules_dropdown.input(fn=change_modules, inputs=[modules_dropdown], outputs=[modules_dropdown],
                               show_progress="full", concurrency_id="checkpoint", api_visibility="private").then(
            fn=ui_generation.model_updates, outputs=samplers_out, api_visibility="private")
        refresh_button.click(fn=refresh_checkpoints, inputs=[], outputs=[checkpoint], api_visibility="private").then(
            fn=_modules_update, outputs=[modules_dropdown], api_visibility="private")
        settings.apply_button.click(fn=settings.apply, inputs=settings.components, outputs=[settings.result],
                                    api_visibility="private").then(fn=None, js=reload_cards_js)
        demo.load(fn=lambda: [_checkpoint_update(), _modules_update(), *ui_generation.model_updates(),
                              *settings.current_values()], inputs=[],
                  outputs=[checkpoint, modules_dropdown, *samplers_out, *settings.components], show_progress="hidden",
                  api_visibility="private")

    script_callbacks.remove_callbacks_for_function(_on_app_started)
    script_callbacks.on_app_started(_on_app_started)
    return demo
