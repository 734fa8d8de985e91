"""The Settings tab: one component per option of `shared.opts.data_labels`, grouped by section, and Apply."""
from __future__ import annotations

import html
import re
from typing import Any

import gradio as gr

from modules import errors, shared, ui_common
from modules.options import OptionInfo

# Shown at the top of the page instead (A1111 quicksettings); a second copy here would fight the first one.
quicksettings = ("sd_model_checkpoint", "forge_additional_modules")

_tags = re.compile(r"<[^>]+>")


def _plain(text: str) -> str:
    return html.unescape(_tags.sub("", text or "")).strip()


def _component_args(info: OptionInfo) -> dict:
    args = info.component_args() if callable(info.component_args) else info.component_args
    return dict(args or {})


def _value_for(key: str) -> Any:
    info = shared.opts.data_labels[key]
    return shared.opts.data.get(key, info.default)


def _component_for(key: str, info: OptionInfo):
    """A1111's choice of component: the option's own, else by the type of its default."""
    args = _component_args(info)
    value = _value_for(key)
    comp = info.component
    if comp is None:
        t = type(info.default)
        if "choices" in args:
            comp = gr.CheckboxGroup if t is list else (gr.Radio if len(args["choices"]) <= 4 else gr.Dropdown)
        elif t is bool:
            comp = gr.Checkbox
        elif t in (int, float):
            comp = gr.Number
        elif t is list:
            comp = gr.Dropdown
            args.setdefault("multiselect", True)
            args.setdefault("allow_custom_value", True)
            args.setdefault("choices", value or [])
        else:
            comp = gr.Textbox
    if comp is gr.Dropdown and "choices" in args and value not in (None, "") and not isinstance(value, list):
        if value not in args["choices"]:
            args["allow_custom_value"] = True
    info_text = _plain(info.comment_after) or None
    kwargs = {"label": info.label or key, "value": value, "elem_id": f"setting_{key}", **args}
    if info_text and "info" not in kwargs:
        kwargs["info"] = info_text
    try:
        return comp(**kwargs)
    except TypeError:
        kwargs.pop("info", None)
        return comp(**kwargs)


def coerce(key: str, value: Any) -> Any:
    """Gradio hands back floats for Number and None for empty fields: give the option its own type back."""
    default = shared.opts.data_labels[key].default
    if value is None:
        return default if isinstance(default, (bool, int, float, list)) else value
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sections() -> dict[tuple, list[tuple[str, OptionInfo]]]:
    sections: dict[tuple, list] = {}
    for key, info in shared.opts.data_labels.items():
        if key in quicksettings:
            continue
        section = tuple(info.section) if info.section else ("other", "Other")
        sections.setdefault(section, []).append((key, info))
    return sections


class SettingsUi:
    """Builds the tab and keeps the (key, component) pairs that Apply and the page load use."""

    def __init__(self):
        self.keys: list[str] = []
        self.components: list = []
        self.refreshable: list[tuple[str, Any]] = []
        self.result = None
        self.apply_button = None

    def create(self) -> None:
        with gr.Row(elem_id="settings_top"):
            self.apply_button = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=0,
                                          min_width=180)
            self.result = gr.HTML(elem_id="settings_result", js_on_load=None)
        gr.Markdown("The Stable Diffusion checkpoint is chosen at the top of the page.",
                    elem_classes=["settings-note"])
        with gr.Tabs(elem_id="settings_sections"):
            for (section_id, section_label), items in _sections().items():
                with gr.Tab(section_label, id=f"settings_{section_id}", elem_id=f"settings_section_{section_id}"):
                    for key, info in items:
                        self._add(key, info)

    def _add(self, key: str, info: OptionInfo) -> None:
        if info.do_not_save:
            gr.HTML(f"<div class='settings-comment'>{html.escape(_plain(str(info.default)))}</div>",
                    js_on_load=None)
            return
        try:
            if info.refresh is not None:
                with gr.Row(equal_height=True):
                    component = _component_for(key, info)
                    button = gr.Button(ui_common.refresh_symbol, elem_id=f"refresh_{key}", scale=0, min_width=48,
                                       elem_classes=["tool-button"])
                    button.click(fn=self._refresher(key), outputs=[component])
                self.refreshable.append((key, component))
            else:
                component = _component_for(key, info)
        except Exception as e:
            errors.display(e, f"creating the settings component for {key}")
            return
        self.keys.append(key)
        self.components.append(component)

    @staticmethod
    def _refresher(key: str):
        def refresh():
            info = shared.opts.data_labels[key]
            try:
                info.refresh()
            except Exception as e:
                errors.display(e, f"refreshing choices of {key}")
            args = _component_args(info)
            return gr.update(value=_value_for(key), **{k: v for k, v in args.items() if k == "choices"})
        return refresh

    def apply(self, *values) -> str:
        """Sets every changed option, saves config.json atomically, and says what changed."""
        changed, failed = [], []
        for key, value in zip(self.keys, values, strict=True):
            value = coerce(key, value)
            if shared.opts.data.get(key, shared.opts.data_labels[key].default) == value:
                continue
            try:
                if shared.opts.set(key, value):
                    changed.append(key)
            except Exception as e:
                errors.display(e, f"setting {key}")
                failed.append(f"{key} ({type(e).__name__}: {e})")
        try:
            shared.opts.save(shared.config_filename)
        except OSError as e:
            failed.append(f"saving {shared.config_filename} ({e})")
        parts = [f"{len(changed)} settings changed" + (": " + ", ".join(changed) if changed else "") + "."]
        if failed:
            parts.append("Failed: " + "; ".join(failed))
        cls = "settings-result error" if failed else "settings-result"
        return f"<div class='{cls}'>{html.escape(' '.join(parts))}</div>"

    def current_values(self) -> list:
        """Fresh values (and choices) for every component, so a reload shows changes made through the API."""
        updates = []
        for key in self.keys:
            info = shared.opts.data_labels[key]
            update = {"value": _value_for(key)}
            if callable(info.component_args):
                try:
                    args = _component_args(info)
                    if "choices" in args:
                        update["choices"] = args["choices"]
                except Exception as e:
                    errors.display(e, f"reading choices of {key}")
            updates.append(gr.update(**update))
        return updates
