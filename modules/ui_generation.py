"""The txt2img tab (with its Hires. fix accordion) and the img2img tab, A1111's element ids. Both have the prompt row,
the generation settings, the extra-network card panes and the output panel."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from modules import (
    dit_generation,
    images,
    img2img,
    infotext_paste,
    samplers,
    shared,
    txt2img,
    ui_common,
    ui_extra_networks,
    upscaler,
)

SAME_SAMPLER = infotext_paste.SAME_SAMPLER
# components that follow the loaded model: (component, "sampler" | "hires_sampler" | "distilled")
_model_dependent: list[tuple[gr.components.Component, str]] = []


def model_dependent() -> list[gr.components.Component]:
    return [component for component, _ in _model_dependent]


def model_updates() -> list:
    """Updates for the components that follow the loaded model (this never loads one): the sampler dropdowns list
    its samplers (Flux: flow-matching ones) with its default selected; the Distilled CFG slider shows for Flux."""
    from modules import sd_models

    model = sd_models.model_data.sd_model
    names = samplers.samplers_for(model)
    default = samplers.default_for(model) if model is not None else samplers.default_sampler_name
    res = []
    for _, kind in _model_dependent:
        if kind == "sampler":
            res.append(gr.update(choices=names, value=default))
        elif kind == "hires_sampler":
            res.append(gr.update(choices=[SAME_SAMPLER] + names, value=SAME_SAMPLER))
        else:
            res.append(gr.update(visible=bool(getattr(model, "is_flux", False)) and not getattr(model, "is_chroma",
                                                                                                  False)))
    return res


def _toprow(tabname: str) -> SimpleNamespace:
    with gr.Row(elem_id=f"{tabname}_toprow", equal_height=False):
        with gr.Column(scale=6, elem_id=f"{tabname}_prompt_container"):
            prompt = gr.Textbox(label="Prompt", show_label=False, lines=3, max_lines=12, elem_id=f"{tabname}_prompt",
                                placeholder="Prompt (click a Lora card to add it)")
            negative_prompt = gr.Textbox(label="Negative prompt", show_label=False, lines=2, max_lines=8,
                                         elem_id=f"{tabname}_neg_prompt", placeholder="Negative prompt")
        with gr.Column(scale=1, min_width=180, elem_id=f"{tabname}_actions_column"):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tabname}_generate")
            interrupt = gr.Button("Interrupt", variant="stop", elem_id=f"{tabname}_interrupt")
            paste = gr.Button("\u2199 Paste parameters", elem_id=f"{tabname}_paste", size="sm")
    return SimpleNamespace(prompt=prompt, negative_prompt=negative_prompt, generate=generate, interrupt=interrupt,
                           paste=paste)


def _settings(tabname: str, size: int) -> SimpleNamespace:
    """Sampler, steps, size, batch, CFG and seed (inside the Generation tab)."""
    with gr.Row():
        sampler_name = gr.Dropdown(samplers.all_samplers, value=samplers.default_sampler_name,
                                   label="Sampling method", elem_id=f"{tabname}_sampling")
        _model_dependent.append((sampler_name, "sampler"))
        steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tabname}_steps")
    with gr.Row():
        width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id=f"{tabname}_width")
        height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id=f"{tabname}_height")
    with gr.Row():
        batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tabname}_batch_count")
        batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tabname}_batch_size")
    cfg_scale = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG Scale", elem_id=f"{tabname}_cfg_scale")
    distilled_cfg_scale = gr.Slider(0.0, 30.0, value=dit_generation.DEFAULT_DISTILLED_CFG, step=0.1,
                                    label="Distilled CFG Scale", elem_id=f"{tabname}_distilled_cfg_scale",
                                    info="FLUX.1-dev's guidance (it has no CFG)", visible=False)
    _model_dependent.append((distilled_cfg_scale, "distilled"))
    return SimpleNamespace(sampler_name=sampler_name, steps=steps, width=width, height=height,
                           batch_count=batch_count, batch_size=batch_size, cfg_scale=cfg_scale,
                           distilled_cfg_scale=distilled_cfg_scale)


def _seed(tabname: str) -> gr.Number:
    with gr.Row(equal_height=True):
        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{tabname}_seed")
        random_seed = gr.Button("\u21ba", elem_id=f"{tabname}_random_seed", scale=0, min_width=48,
                                elem_classes=["tool-button"])
    random_seed.click(fn=lambda: -1, inputs=[], outputs=[seed], show_progress="hidden", queue=False)
    return seed


def _hires_accordion(tabname: str) -> SimpleNamespace:
    """A1111's Hires. fix block: upscaler, steps, denoising, scale or target size, sampler, its own prompts."""
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tabname}_hr"):
        enable_hr = gr.Checkbox(label="Enable Hires. fix", value=False, elem_id=f"{tabname}_enable_hr")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row1"):
            hr_upscaler = gr.Dropdown(upscaler.hires_upscaler_names(shared.sd_upscalers),
                                      value=upscaler.latent_upscale_default_mode, label="Upscaler",
                                      elem_id=f"{tabname}_hr_upscaler")
            hr_second_pass_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps",
                                             elem_id=f"{tabname}_hires_steps")
            denoising_strength = gr.Slider(0.0, 1.0, value=0.7, step=0.01, label="Denoising strength",
                                           elem_id=f"{tabname}_denoising_strength")
        with gr.Row(elem_id=f"{tabname}_hires_fix_row2"):
            hr_scale = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id=f"{tabname}_hr_scale")
            hr_resize_x = gr.Slider(0, 2048, value=0, step=8, label="Resize width to",
                                    elem_id=f"{tabname}_hr_resize_x")
            hr_resize_y = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                    elem_id=f"{tabname}_hr_resize_y")
        hr_sampler_name = gr.Dropdown([SAME_SAMPLER] + samplers.all_samplers, value=SAME_SAMPLER,
                                      label="Hires sampling method", elem_id=f"{tabname}_hr_sampler")
        _model_dependent.append((hr_sampler_name, "hires_sampler"))
        with gr.Row(elem_id=f"{tabname}_hires_fix_row4"):
            hr_prompt = gr.Textbox(label="Hires prompt", lines=3, elem_id=f"{tabname}_hr_prompt",
                                   placeholder="Prompt for hires fix pass.\nLeave empty to use the same prompt as "
                                               "in the first pass.")
            hr_negative_prompt = gr.Textbox(label="Hires negative prompt", lines=3,
                                            elem_id=f"{tabname}_hr_neg_prompt",
                                            placeholder="Negative prompt for hires fix pass.\nLeave empty to use the "
                                                        "same negative prompt as in the first pass.")
    return SimpleNamespace(enable_hr=enable_hr, hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_second_pass_steps,
                           denoising_strength=denoising_strength, hr_scale=hr_scale, hr_resize_x=hr_resize_x,
                           hr_resize_y=hr_resize_y, hr_sampler_name=hr_sampler_name, hr_prompt=hr_prompt,
                           hr_negative_prompt=hr_negative_prompt)


def _wire(tabname: str, row: SimpleNamespace, fn, inputs: list, outputs: list, api_name: str | None) -> None:
    generate_kwargs = {"api_name": api_name} if api_name else {"api_visibility": "private"}
    row.generate.click(fn=fn, inputs=inputs, outputs=outputs, show_progress="full", show_progress_on=[outputs[0]],
                       concurrency_id=tabname, **generate_kwargs)
    row.prompt.submit(fn=fn, inputs=inputs, outputs=outputs, show_progress="full", show_progress_on=[outputs[0]],
                      concurrency_id=tabname, api_visibility="private")
    interrupt_kwargs = {"api_name": "interrupt"} if tabname == "txt2img" else {"api_visibility": "private"}
    row.interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[], queue=False, **interrupt_kwargs)


def _paste(row: SimpleNamespace, fields: dict) -> None:
    """The paste button: infotext in the prompt box fills `fields` (infotext_paste names → components)."""
    names = list(fields)

    def paste(*values):
        current = dict(zip(names, values, strict=True))
        result = infotext_paste.field_values(current["prompt"] or "", current)
        return [result[k] for k in names]

    components = list(fields.values())
    row.paste.click(fn=paste, inputs=components, outputs=components, show_progress="hidden",
                    api_visibility="private")


def create_txt2img_tab() -> None:
    tabname = "txt2img"
    row = _toprow(tabname)
    with gr.Row(elem_id=f"{tabname}_main_row", equal_height=False):
        with gr.Column(scale=3, min_width=360, elem_id=f"{tabname}_left"):
            with gr.Tabs(elem_id=f"{tabname}_extra_tabs"):
                with gr.Tab("Generation", id=f"{tabname}_generation", elem_id=f"{tabname}_generation_tab"):
                    s = _settings(tabname, txt2img.default_size())
                    seed = _seed(tabname)
                    hr = _hires_accordion(tabname)
                ui_extra_networks.create_ui(tabname)
        with gr.Column(scale=2, min_width=320, elem_id=f"{tabname}_right"):
            gallery, html_info, generation_info = ui_common.create_output_panel(tabname)

    def generate_fn(prompt_text, negative_text, steps_value, sampler, w, h, seed_value, size_value, count_value,
                    cfg_value, enable_hr, hr_upscaler, hr_steps, denoising, hr_scale, hr_x, hr_y, hr_sampler,
                    hr_prompt, hr_negative, distilled, progress_bar=gr.Progress()):
        return txt2img.txt2img_ui(prompt_text, negative_text, steps_value, sampler, w, h, seed_value, size_value,
                                  count_value, cfg_value, progress_bar=progress_bar, distilled_cfg_scale=distilled,
                                  enable_hr=enable_hr,
                                  hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_steps,
                                  denoising_strength=denoising, hr_scale=hr_scale, hr_resize_x=hr_x,
                                  hr_resize_y=hr_y, hr_sampler_name=hr_sampler, hr_prompt=hr_prompt,
                                  hr_negative_prompt=hr_negative)

    inputs = [row.prompt, row.negative_prompt, s.steps, s.sampler_name, s.width, s.height, seed, s.batch_size,
              s.batch_count, s.cfg_scale, hr.enable_hr, hr.hr_upscaler, hr.hr_second_pass_steps,
              hr.denoising_strength, hr.hr_scale, hr.hr_resize_x, hr.hr_resize_y, hr.hr_sampler_name, hr.hr_prompt,
              hr.hr_negative_prompt, s.distilled_cfg_scale]
    _wire(tabname, row, generate_fn, inputs, [gallery, html_info, generation_info], api_name="txt2img")
    fields = {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "steps": s.steps,
              "sampler_name": s.sampler_name, "cfg_scale": s.cfg_scale, "seed": seed, "width": s.width,
              "height": s.height, "distilled_cfg_scale": s.distilled_cfg_scale}
    fields.update({name: getattr(hr, name) for name in infotext_paste.HIRES_FIELDS})
    _paste(row, fields)


def create_img2img_tab() -> None:
    tabname = "img2img"
    row = _toprow(tabname)
    with gr.Row(elem_id=f"{tabname}_main_row", equal_height=False):
        with gr.Column(scale=3, min_width=360, elem_id=f"{tabname}_left"):
            with gr.Tabs(elem_id=f"{tabname}_extra_tabs"):
                with gr.Tab("Generation", id=f"{tabname}_generation", elem_id=f"{tabname}_generation_tab"):
                    init_image = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA",
                                          sources=["upload", "clipboard"], elem_id="img2img_image", height=320)
                    resize_mode = gr.Radio(images.RESIZE_MODES, value=images.RESIZE_MODES[0], type="index",
                                           label="Resize mode", elem_id=f"{tabname}_resize_mode")
                    s = _settings(tabname, txt2img.default_size())
                    denoising_strength = gr.Slider(0.0, 1.0, value=0.75, step=0.01, label="Denoising strength",
                                                   elem_id=f"{tabname}_denoising_strength")
                    seed = _seed(tabname)
                ui_extra_networks.create_ui(tabname)
        with gr.Column(scale=2, min_width=320, elem_id=f"{tabname}_right"):
            gallery, html_info, generation_info = ui_common.create_output_panel(tabname)

    def generate_fn(image, prompt_text, negative_text, steps_value, sampler, mode, w, h, denoising, seed_value,
                    size_value, count_value, cfg_value, distilled, progress_bar=gr.Progress()):
        return img2img.img2img_ui(image, prompt_text, negative_text, steps_value, sampler, mode, w, h, denoising,
                                  seed_value, size_value, count_value, cfg_value, progress_bar=progress_bar,
                                  distilled_cfg_scale=distilled)

    inputs = [init_image, row.prompt, row.negative_prompt, s.steps, s.sampler_name, resize_mode, s.width, s.height,
              denoising_strength, seed, s.batch_size, s.batch_count, s.cfg_scale, s.distilled_cfg_scale]
    _wire(tabname, row, generate_fn, inputs, [gallery, html_info, generation_info], api_name="img2img")
    _paste(row, {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "steps": s.steps,
                 "sampler_name": s.sampler_name, "cfg_scale": s.cfg_scale, "seed": seed, "width": s.width,
                 "height": s.height, "denoising_strength": denoising_strength,
                 "distilled_cfg_scale": s.distilled_cfg_scale})
