"""UI pieces shared by tabs (A1111 names): escaped infotext HTML, the output panel, refresh buttons."""
from __future__ import annotations

import html
from typing import Callable

import gradio as gr

refresh_symbol = "\u27f3"


def plaintext_to_html(text: str, classname: str | None = None) -> str:
    """Escapes text and keeps its line breaks."""
    content = "<br>\n".join(html.escape(x) for x in (text or "").split("\n"))
    return f"<p class='{classname}'>{content}</p>" if classname else f"<p>{content}</p>"


def infotext_html(infotext: str, comments: str = "", error: str = "") -> str:
    """The block under the gallery: the infotext, then the job's comments (e.g. `Lora not found: x`)."""
    parts = ["<div class='infotext'>", plaintext_to_html(infotext), "</div>"]
    lines = [x for x in (comments or "").split("\n") if x.strip()]
    if lines:
        parts.append("<div class='comments'>" + "".join(f"<p>{html.escape(x)}</p>" for x in lines) + "</div>")
    if error:
        parts.append(f"<div class='error'>{html.escape(error)}</div>")
    return "".join(parts)


def create_output_panel(tabname: str):
    """Gallery, the infotext of the selected image, and a State with every image's infotext and the comments."""
    with gr.Column(variant="panel", elem_id=f"{tabname}_results", elem_classes=["results-panel"]):
        gallery = gr.Gallery(label="Output", show_label=False, elem_id=f"{tabname}_gallery", columns=2,
                             height=None, format="png", object_fit="contain", preview=False, interactive=False)
        html_info = gr.HTML(elem_id=f"html_info_{tabname}", elem_classes=["infotext-panel"], js_on_load=None)
        generation_info = gr.State({"infotexts": [], "comments": ""})

    def on_select(info: dict, evt: gr.SelectData):
        texts = (info or {}).get("infotexts") or []
        index = evt.index if isinstance(evt.index, int) else 0
        text = texts[index] if 0 <= index < len(texts) else ""
        return infotext_html(text, (info or {}).get("comments", ""))

    gallery.select(fn=on_select, inputs=[generation_info], outputs=[html_info], show_progress="hidden")
    return gallery, html_info, generation_info


def create_refresh_button(component, refresh_method: Callable, refreshed_args, elem_id: str):
    """A small button that calls refresh_method() and then updates the component with refreshed_args."""
    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        return gr.update(**(args or {}))

    button = gr.Button(refresh_symbol, elem_id=elem_id, elem_classes=["tool-button"], scale=0, min_width=48)
    button.click(fn=refresh, inputs=[], outputs=[component])
    return button
