"""The Train tab (A1111 names and element ids): create a hypernetwork, and train one on a folder of images.

Training runs in a worker thread under the queue lock (so never at the same time as a generation) while the
progress bar follows shared.state; Interrupt stops it after the current step, and the steps done are saved.
"""
from __future__ import annotations

import contextvars
import html
import os
import threading
import time

import gradio as gr

from modules import call_queue, errors, progress, shared, txt2img, ui_common
from modules.hypernetworks import hypernetwork as hn

DEFAULT_SIZES = (768, 320, 640, 1280)  # A1111's defaults: SD1's text width and UNet widths
KNOWN_SIZES = (768, 1024, 2048, 320, 640, 1280)
ACTIVATIONS = ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"]


def _loaded_model():
    from modules import sd_models
    return sd_models.model_data.sd_model  # never starts a load


def size_choices() -> tuple[list[str], list[str]]:
    """(choices, default value) for the sizes: the known widths plus the loaded model's; its widths by default."""
    widths = hn.attention_context_widths(_loaded_model()) if _loaded_model() is not None else []
    choices = [str(x) for x in KNOWN_SIZES] + [str(x) for x in widths if x not in KNOWN_SIZES]
    value = [str(x) for x in widths] if widths else [str(x) for x in DEFAULT_SIZES]
    return choices, value


def _sizes_update() -> dict:
    choices, value = size_choices()
    return {"choices": choices, "value": value}


def _activation_choices() -> list[str]:
    return ACTIVATIONS + sorted(x for x in hn.HypernetworkModule.activation_dict if x not in ACTIVATIONS)


def _hypernetwork_names() -> list[str]:
    return list(hn.refresh_hypernetworks())


def _message(text: str, error: bool = False) -> str:
    cls = "error" if error else "info"
    return f"<p class='train-{cls}'>{html.escape(text)}</p>"


def create_hypernetwork(name: str, sizes: list[str], overwrite: bool, layer_structure: str, activation: str,
                        weight_init: str, add_layer_norm: bool, use_dropout: bool, dropout_structure: str):
    """The Create button: (message HTML, dropdown update for the Train sub-tab)."""
    try:
        filename = hn.create_hypernetwork(name, [int(x) for x in sizes or []], overwrite, layer_structure,
                                          activation, weight_init, add_layer_norm, use_dropout, dropout_structure)
    except (ValueError, FileExistsError) as e:
        return _message(f"Cannot create hypernetwork {name!r}: {e}", error=True), gr.update()
    if not sizes:
        return _message(f"Created {filename}, with no sizes: it changes nothing", error=True), \
            gr.update(choices=_hypernetwork_names())
    stem = os.path.splitext(os.path.basename(filename))[0]
    return _message(f"Created: {filename}"), gr.update(choices=_hypernetwork_names(), value=stem)


def _latest_preview(log_directory: str, name: str):
    """The newest preview image written by this training run (images/<name>-<step>.png)."""
    day = time.strftime("%Y-%m-%d")
    folder = os.path.join(log_directory, day, name, "images")
    try:
        names = [x for x in os.listdir(folder) if x.startswith(name + "-") and x.endswith(".png")]
    except OSError:
        return None
    if not names:
        return None
    from PIL import Image

    # an image object, not a path: gradio serves only files from the folders it allows
    with Image.open(os.path.join(folder, max(names, key=lambda x: os.path.getmtime(os.path.join(folder, x))))) as im:
        return im.copy()


def train_hypernetwork(name: str, learn_rate: str, batch_size: float, gradient_step: float, data_root: str,
                       log_directory: str, template: str, width: float, height: float, steps: float,
                       create_image_every: float, save_every: float, preview_prompt: str, shuffle_tags: bool,
                       tag_drop_out: float, latent_sampling_method: str, clip_grad_mode: str, clip_grad_value: str,
                       progress_bar=None):
    """The Train button: (message HTML, the last preview image or None)."""
    from modules.hypernetworks import training

    if not name:
        return _message("Choose a hypernetwork to train (create one first)", error=True), None
    log_directory = log_directory or os.path.join(shared.data_path, "textual_inversion")
    kwargs = dict(data_root=data_root or "", steps=int(steps), learn_rate=learn_rate, batch_size=int(batch_size),
                  gradient_step=int(gradient_step), log_directory=log_directory, training_width=int(width),
                  training_height=int(height), clip_grad_mode=None if clip_grad_mode == "disabled" else clip_grad_mode,
                  clip_grad_value=clip_grad_value, shuffle_tags=bool(shuffle_tags), tag_drop_out=float(tag_drop_out),
                  latent_sampling_method=latent_sampling_method, template=template or "[filewords]",
                  save_hypernetwork_every=int(save_every), create_image_every=int(create_image_every),
                  preview_prompt=preview_prompt or None)
    outcome: dict = {}

    def work():
        try:
            with call_queue.queue_lock:
                outcome["result"] = training.train_hypernetwork(name, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            outcome["error"] = str(e)
        except Exception as e:
            errors.display(e, "training hypernetwork")
            outcome["error"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="train-hypernetwork",
                              daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if progress_bar is not None and progress.is_active() and shared.state.job == "train-hypernetwork":
            s = shared.state
            progress_bar(s.progress(), desc=f"Step {s.job_no}/{s.job_count}")

    if "error" in outcome:
        return _message(f"Training failed: {outcome['error']}", error=True), None
    trained, filename = outcome["result"]
    info = shared.state.textinfo or f"Training finished at step {trained.step}; saved {filename}"
    return _message(info), _latest_preview(log_directory, name)


def create_ui() -> None:
    """The Train tab's contents (called inside its gr.Tab)."""
    choices, value = size_choices()
    with gr.Tabs(elem_id="train_tabs"):
        with gr.Tab("Create hypernetwork", id="train_create_hypernetwork_tab"):
            new_name = gr.Textbox(label="Name", elem_id="train_new_hypernetwork")
            with gr.Row(equal_height=True):
                sizes = gr.CheckboxGroup(label="Modules (context widths)", choices=choices, value=value,
                                         elem_id="train_new_hypernetwork_sizes")
                ui_common.create_refresh_button(sizes, lambda: None, _sizes_update, "refresh_train_hypernetwork_sizes")
            layer_structure = gr.Textbox("1, 2, 1", label="Hypernetwork layer structure (starts and ends with 1)",
                                         placeholder="1st and last digit must be 1. ex:'1, 2, 1'",
                                         elem_id="train_new_hypernetwork_layer_structure")
            with gr.Row():
                activation = gr.Dropdown(_activation_choices(), value="linear", label="Activation function",
                                         elem_id="train_new_hypernetwork_activation_func")
                weight_init = gr.Dropdown(list(hn.WEIGHT_INITS), value="Normal",
                                          label="Layer weights initialization",
                                          elem_id="train_new_hypernetwork_initialization_option")
            with gr.Row():
                add_layer_norm = gr.Checkbox(label="Add layer normalization",
                                             elem_id="train_new_hypernetwork_add_layer_norm")
                use_dropout = gr.Checkbox(label="Use dropout", elem_id="train_new_hypernetwork_use_dropout")
                overwrite = gr.Checkbox(label="Overwrite old hypernetwork", elem_id="train_overwrite_old_hypernetwork")
            dropout_structure = gr.Textbox("0, 0, 0", label="Dropout structure (one value per layer, 0 <= p < 1)",
                                           elem_id="train_new_hypernetwork_dropout_structure")
            create_button = gr.Button("Create hypernetwork", variant="primary", elem_id="train_create_hypernetwork")
            create_output = gr.HTML(elem_id="train_create_output")

        with gr.Tab("Train hypernetwork", id="train_train_tab"):
            with gr.Row(equal_height=True):
                names = _hypernetwork_names()
                train_name = gr.Dropdown(names, value=names[0] if names else None, label="Hypernetwork",
                                         elem_id="train_hypernetwork", allow_custom_value=True)
                ui_common.create_refresh_button(train_name, lambda: None,
                                                lambda: {"choices": _hypernetwork_names()},
                                                "refresh_train_hypernetwork_name")
            with gr.Row():
                learn_rate = gr.Textbox("0.00001", label="Hypernetwork learning rate (RATE or RATE:STEP, ...)",
                                        elem_id="train_hypernetwork_learn_rate")
                batch_size = gr.Number(1, precision=0, minimum=1, label="Batch size", elem_id="train_batch_size")
                gradient_step = gr.Number(1, precision=0, minimum=1, label="Gradient accumulation steps",
                                          elem_id="train_gradient_step")
            data_root = gr.Textbox(label="Dataset directory (images with <name>.txt captions)",
                                   placeholder="Path to directory with input images",
                                   elem_id="train_dataset_directory")
            log_directory = gr.Textbox(os.path.join(shared.data_path, "textual_inversion"), label="Log directory",
                                       elem_id="train_log_directory")
            template = gr.Textbox("[filewords]", lines=2, label="Prompt template ([filewords]: the caption, "
                                  "[name]: the hypernetwork; one line picked per image)", elem_id="train_template")
            size = txt2img.default_size()
            with gr.Row():
                width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="train_training_width")
                height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="train_training_height")
            with gr.Row():
                steps = gr.Number(100, precision=0, minimum=1, label="Max steps", elem_id="train_steps")
                create_image_every = gr.Number(0, precision=0, minimum=0,
                                               label="Save an image to log directory every N steps, 0 to disable",
                                               elem_id="train_create_image_every")
                save_every = gr.Number(0, precision=0, minimum=0,
                                       label="Save a copy of the hypernetwork to log directory every N steps, "
                                             "0 to disable", elem_id="train_save_embedding_every")
            preview_prompt = gr.Textbox(label="Preview prompt (empty: the first image's prompt)",
                                        elem_id="train_preview_prompt")
            with gr.Row():
                shuffle_tags = gr.Checkbox(label="Shuffle tags by ',' when creating prompts",
                                           elem_id="train_shuffle_tags")
                tag_drop_out = gr.Slider(0, 0.9, value=0, step=0.1, label="Drop out tags when creating prompts",
                                         elem_id="train_tag_drop_out")
            with gr.Row():
                latent_sampling_method = gr.Radio(["once", "deterministic", "random"], value="once",
                                                  label="Choose latent sampling method",
                                                  elem_id="train_latent_sampling_method")
                clip_grad_mode = gr.Dropdown(["disabled", "value", "norm"], value="disabled", label="Gradient Clipping",
                                             elem_id="train_clip_grad_mode")
                clip_grad_value = gr.Textbox("0.1", label="Gradient clipping value", elem_id="train_clip_grad_value")
            with gr.Row():
                train_button = gr.Button("Train Hypernetwork", variant="primary", elem_id="train_train_hypernetwork")
                interrupt_button = gr.Button("Interrupt", variant="stop", elem_id="train_interrupt_training")
            train_output = gr.HTML(elem_id="ti_output")
            train_preview = gr.Image(label="Last preview", type="pil", interactive=False, elem_id="ti_preview")

    create_button.click(fn=create_hypernetwork,
                        inputs=[new_name, sizes, overwrite, layer_structure, activation, weight_init, add_layer_norm,
                                use_dropout, dropout_structure],
                        outputs=[create_output, train_name], api_visibility="private")

    def train_fn(*args, progress_bar=gr.Progress()):
        return train_hypernetwork(*args, progress_bar=progress_bar)

    train_button.click(fn=train_fn,
                       inputs=[train_name, learn_rate, batch_size, gradient_step, data_root, log_directory, template,
                               width, height, steps, create_image_every, save_every, preview_prompt, shuffle_tags,
                               tag_drop_out, latent_sampling_method, clip_grad_mode, clip_grad_value],
                       outputs=[train_output, train_preview], show_progress="full", concurrency_id="train",
                       api_visibility="private")
    interrupt_button.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[], queue=False,
                           api_visibility="private")
