"""The Lora card editor inside A1111 v1.10.1: the same fields, table, tag cloud and random prompt as in our host,
built from A1111's gradio 3 components (its UserMetadataEditor has create_editor / put_values_into_components /
write_user_metadata instead of our host's editor_fields).

Unlike A1111's own editor, the sidecar is written atomically and strictly (a temporary file renamed over it; finite
numbers only), keys it does not know are kept as they are on disk now, every value shown in the dialog's HTML is
escaped, and it writes only next to a Lora file inside a Lora folder.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import secrets

import gradio as gr
import lora_discovery
import ui_edit_user_metadata

from modules import ui_extra_networks_user_metadata

re_comma = re.compile(r" *, *")
SIDECAR_KEYS = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")


class EditorError(ValueError):
    """A save the editor refuses, with the reason (shown to the user as a gradio error)."""


def _inside(path: str, folders: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(folder) + os.sep) for folder in folders if folder)


def write_json_atomically(path: str, data: dict) -> None:
    """Strict JSON (no NaN/Infinity) into a temporary file next to `path`, then renamed over it: a reader sees
    the old file or the new one, never half of one. The temporary name is the one the Lora scan cleans up after
    a save that was killed (lora_discovery.TEMP_PREFIX)."""
    text = json.dumps(data, indent=4, ensure_ascii=False, allow_nan=False)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f"{lora_discovery.TEMP_PREFIX}{secrets.token_hex(6)}")
    try:
        with open(tmp, "w", encoding="utf8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read_sidecar(path: str) -> dict:
    """The sidecar as it is on disk now, not the copy the page read, so keys someone else wrote meanwhile are kept.
    One that cannot be read as a JSON object is refused rather than overwritten (its content would be lost)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise EditorError(f"{path} cannot be read as JSON ({e}); fix or remove it first") from e
    if not isinstance(data, dict):
        raise EditorError(f"{path} holds {type(data).__name__}, not a JSON object; fix or remove it first")
    return data


def clean_sidecar_values(desc, sd_version, activation_text, preferred_weight, negative_text, notes) -> dict:
    """The editor's fields as stored; a weight that is not a finite number in [0, 2] is refused."""
    try:
        weight = float(preferred_weight or 0.0)
    except (TypeError, ValueError) as e:
        raise EditorError(f"preferred weight {preferred_weight!r} is not a number") from e
    if not math.isfinite(weight) or not 0.0 <= weight <= 2.0:
        raise EditorError(f"preferred weight {preferred_weight!r} must be a number from 0 to 2")
    version = sd_version if sd_version in ui_edit_user_metadata.sd_versions else "Unknown"
    values = (str(desc or ""), version, str(activation_text or ""), weight, str(negative_text or ""),
              str(notes or ""))
    return dict(zip(SIDECAR_KEYS, values, strict=True))


class LoraUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    def __init__(self, ui, tabname, page):
        super().__init__(ui, tabname, page)
        self.select_sd_version = None
        self.taginfo = None
        self.edit_activation_text = None
        self.slider_preferred_weight = None
        self.edit_negative_text = None

    def _item(self, name: str) -> dict:
        return self.page.items.get(name) or {}

    def _tags(self, name: str) -> list[tuple[str, int]]:
        try:
            return ui_edit_user_metadata.build_tags(self._item(name).get("metadata") or {})
        except Exception:  # odd ss_tag_frequency shapes must not break the dialog
            return []

    # --- reading ------------------------------------------------------------------------------------------------
    def get_metadata_table(self, name: str) -> list[tuple]:
        return super().get_metadata_table(name) + ui_edit_user_metadata.lora_table_rows(
            self._item(name).get("metadata") or {})

    def _table_html(self, name: str) -> str:
        try:
            rows = self.get_metadata_table(name)
        except Exception as e:
            rows = [("Error:", f"{type(e).__name__}: {e}")]
        cells = []
        for row in rows:
            label, text = row[0], row[1]
            if text is None or str(text) in ("", "None"):
                continue
            title = f" title='{html.escape(str(row[2]))}'" if len(row) > 2 else ""
            cells.append(f"<tr><th>{html.escape(str(label))}</th><td{title}>{html.escape(str(text))}</td></tr>")
        return '<table class="file-metadata">' + "".join(cells) + "</table>"

    def put_values_into_components(self, name):
        item = self._item(name)
        user_metadata = self.get_user_metadata(name)
        tags = self._tags(name)
        try:
            weight = float(user_metadata.get("preferred weight", 0.0) or 0.0)
        except (TypeError, ValueError):
            weight = 0.0
        if not math.isfinite(weight):
            weight = 0.0
        version = user_metadata.get("sd version") or item.get("sd_version") or "Unknown"
        cloud = [(tag, str(count)) for tag, count in tags[:ui_edit_user_metadata.TAG_COUNT]]
        return [
            html.escape(str(name)),
            str(user_metadata.get("description", item.get("description") or "") or ""),
            self._table_html(name),
            self.get_card_html(name),
            str(user_metadata.get("notes", "") or ""),
            version if version in ui_edit_user_metadata.sd_versions else "Unknown",
            gr.HighlightedText.update(value=cloud, visible=bool(tags)),
            str(user_metadata.get("activation text", "") or ""),
            weight,
            str(user_metadata.get("negative text", "") or ""),
            gr.update(visible=bool(tags)),
            gr.update(value=ui_edit_user_metadata.random_prompt(tags[:ui_edit_user_metadata.RANDOM_PROMPT_TAGS]),
                      visible=bool(tags)),
        ]

    def generate_random_prompt(self, name):
        return ui_edit_user_metadata.random_prompt(self._tags(name)[:ui_edit_user_metadata.RANDOM_PROMPT_TAGS])

    # --- writing ------------------------------------------------------------------------------------------------
    def sidecar_path(self, name: str) -> str:
        filename = self._item(name).get("filename")
        if not filename:
            raise EditorError(f"no Lora card named {name!r}")
        if not _inside(filename, self.page.allowed_directories_for_previews()):
            raise EditorError(f"{filename} is not inside a Lora folder")
        return os.path.splitext(filename)[0] + ".json"

    def write_user_metadata(self, name, metadata):
        path = self.sidecar_path(name)
        write_json_atomically(path, metadata)
        self.page.lister.update_file_entry(path)
        item = self._item(name)
        item["user_metadata"] = metadata

    def save_lora_user_metadata(self, name, desc, sd_version, activation_text, preferred_weight, negative_text,
                                notes):
        try:
            values = clean_sidecar_values(desc, sd_version, activation_text, preferred_weight, negative_text, notes)
            path = self.sidecar_path(name)
            self.write_user_metadata(name, {**read_sidecar(path), **values})
        except (EditorError, OSError) as e:
            raise gr.Error(f"Lora {name}: not saved: {e}") from e

    # --- the dialog ---------------------------------------------------------------------------------------------
    def create_extra_default_items_in_left_column(self):
        self.select_sd_version = gr.Dropdown(ui_edit_user_metadata.sd_versions, value="Unknown",
                                             label="Stable Diffusion version", interactive=True)

    def create_editor(self):
        self.create_default_editor_elems()
        self.taginfo = gr.HighlightedText(label="Training dataset tags")
        self.edit_activation_text = gr.Text(label="Activation text", info="Will be added to prompt along with Lora")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="Set to 0 to disable", minimum=0.0,
                                                 maximum=2.0, step=0.01)
        self.edit_negative_text = gr.Text(label="Negative prompt", info="Will be added to negative prompts")
        with gr.Row() as row_random_prompt:
            with gr.Column(scale=8):
                random_prompt = gr.Textbox(label="Random prompt", lines=4, max_lines=4, interactive=False)
            with gr.Column(scale=1, min_width=120):
                generate_random_prompt = gr.Button("Generate", size="lg", scale=1)
        self.edit_notes = gr.TextArea(label="Notes", lines=4)

        generate_random_prompt.click(fn=self.generate_random_prompt, inputs=[self.edit_name_input],
                                     outputs=[random_prompt], show_progress=False)

        def select_tag(activation_text, evt: gr.SelectData):
            tag = evt.value[0]
            words = re.split(re_comma, activation_text)
            if tag in words:
                return ", ".join(x for x in words if x != tag and x.strip())
            return activation_text + ", " + tag if activation_text else tag

        self.taginfo.select(fn=select_tag, inputs=[self.edit_activation_text], outputs=[self.edit_activation_text],
                            show_progress=False)
        self.create_default_buttons()

        viewed = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                  self.select_sd_version, self.taginfo, self.edit_activation_text, self.slider_preferred_weight,
                  self.edit_negative_text, row_random_prompt, random_prompt]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=viewed) \
            .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        edited = [self.edit_description, self.select_sd_version, self.edit_activation_text,
                  self.slider_preferred_weight, self.edit_negative_text, self.edit_notes]
        self.setup_save_handler(self.button_save, self.save_lora_user_metadata, edited)
