"""The Lora card editor (A1111 name): sidecar fields, file and training facts, training tags.

The rows, tags and random prompt are host-neutral; `LoraUserMetadataEditor` here is our host's dialog, and
ui_edit_user_metadata_a1111.py builds the same editor from A1111's gradio components."""
from __future__ import annotations

import datetime
import math
import random
import re

from modules import ui_extra_networks_user_metadata

re_word = re.compile(r"[-_\w']+")
sd_versions = ["SD1", "SD2", "SDXL", "Unknown"]
TAG_COUNT = 24
RANDOM_PROMPT_TAGS = 1000  # keeps the dialog's data small for captions with thousands of words
MAX_COUNT = 2 ** 53 - 1  # the largest count the page's JavaScript numbers hold exactly


def metadata_count(value) -> int | None:
    """A count from training metadata as an int within ±MAX_COUNT (`1e999` is clamped, not an OverflowError);
    None for something that is not a number."""
    try:
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        return None
    if isinstance(number, float) and math.isnan(number):
        return None
    return int(max(-MAX_COUNT, min(MAX_COUNT, number)))


def is_non_comma_tagset(tags: dict) -> bool:
    """Captions written as sentences: the average "tag" is 16 characters or longer."""
    average_tag_length = sum(len(x) for x in tags.keys()) / len(tags)
    return average_tag_length >= 16


def build_tags(metadata: dict) -> list[tuple[str, int]]:
    """Summed `ss_tag_frequency` counts, most frequent first; sentence captions are split into words (≥3 chars)."""
    tags: dict[str, int] = {}
    frequency = (metadata or {}).get("ss_tag_frequency", {})
    if isinstance(frequency, dict):
        for tags_dict in frequency.values():
            if not isinstance(tags_dict, dict):
                continue
            for tag, tag_count in tags_dict.items():
                tag = str(tag).strip()
                count = metadata_count(tag_count)
                if count is not None:
                    tags[tag] = min(MAX_COUNT, tags.get(tag, 0) + count)
    if tags and is_non_comma_tagset(tags):
        words: dict[str, int] = {}
        for text, text_count in tags.items():
            for word in re.findall(re_word, text):
                if len(word) >= 3:
                    words[word] = min(MAX_COUNT, words.get(word, 0) + text_count)
        tags = words
    ordered = sorted(tags.keys(), key=tags.get, reverse=True)
    return [(tag, tags[tag]) for tag in ordered]


def _resolutions(bucket_info) -> tuple[str, str] | None:
    if not isinstance(bucket_info, dict) or not isinstance(bucket_info.get("buckets"), dict):
        return None
    counts: dict[str, int] = {}
    for bucket in bucket_info["buckets"].values():
        try:
            res = bucket["resolution"]
            key = f"{res[1]}x{res[0]}"
            count = metadata_count(bucket["count"])
        except (KeyError, IndexError, TypeError):
            continue
        if count is not None:
            counts[key] = min(MAX_COUNT, counts.get(key, 0) + count)
    ordered = sorted(counts.keys(), key=counts.get, reverse=True)
    if not ordered:
        return None
    text = ", ".join(ordered[:4]) + (", ..." if len(ordered) > 4 else "")
    return text, ", ".join(ordered)


def lora_table_rows(metadata: dict) -> list[tuple]:
    """The Lora rows of the editor's file table: (label, text) or (label, short text, full text)."""
    rows: list[tuple] = []
    labels = {"ss_output_name": "Output name:", "ss_sd_model_name": "Model:", "ss_clip_skip": "Clip skip:",
              "ss_network_module": "Kohya module:"}
    for key, label in labels.items():
        value = metadata.get(key)
        if value is not None and str(value) != "None":
            rows.append((label, str(value)))
    started = metadata.get("ss_training_started_at")
    if started:
        try:
            when = datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc)
            rows.append(("Date trained:", when.strftime("%Y-%m-%d %H:%M")))
        except (TypeError, ValueError, OverflowError):
            pass
    resolutions = _resolutions(metadata.get("ss_bucket_info"))
    if resolutions:
        label = "Resolutions:" if "," in resolutions[1] else "Resolution:"
        rows.append((label, resolutions[0], resolutions[1]))
    image_count = 0
    dataset_dirs = metadata.get("ss_dataset_dirs")
    if isinstance(dataset_dirs, dict):
        for params in dataset_dirs.values():
            count = metadata_count(params.get("img_count", 0)) if isinstance(params, dict) else None
            image_count = min(MAX_COUNT, image_count + (count or 0))
    if image_count:
        rows.append(("Dataset size:", str(image_count)))
    return rows


def random_prompt(tags: list[tuple[str, int]], rng: random.Random | None = None) -> str:
    """A1111's "Generate": each tag with probability count / highest count, brackets escaped, sorted."""
    rng = rng or random
    highest = tags[0][1] if tags else 0
    picked = []
    for tag, count in tags:
        if highest and count > rng.random() * highest:
            for bracket in "({[]})":
                tag = tag.replace(bracket, "\\" + bracket)
            picked.append(tag)
    return ", ".join(sorted(picked))


class LoraUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """The editor for our host, whose dialog is built in the browser from editor_data (fields, table, tags)."""

    def get_metadata_table(self, name: str) -> list[tuple]:
        return super().get_metadata_table(name) + lora_table_rows(self.get_item(name).get("metadata") or {})

    def editor_fields(self, name: str, user_metadata: dict) -> list[dict]:
        item = self.get_item(name)
        sd_version = user_metadata.get("sd version") or item.get("sd_version") or "Unknown"
        try:
            weight = float(user_metadata.get("preferred weight", 0.0) or 0.0)
        except (TypeError, ValueError, OverflowError):
            weight = 0.0
        if not math.isfinite(weight):  # "NaN" kept as text from an older save
            weight = 0.0
        description, notes = super().editor_fields(name, user_metadata)
        return [
            description,
            {"key": "sd version", "label": "Stable Diffusion version", "type": "select", "choices": sd_versions,
             "value": sd_version if sd_version in sd_versions else "Unknown"},
            {"key": "activation text", "label": "Activation text", "type": "text",
             "info": "Will be added to prompt along with Lora", "value": str(user_metadata.get("activation text", ""))},
            {"key": "preferred weight", "label": "Preferred weight", "type": "slider", "min": 0.0, "max": 2.0,
             "step": 0.01, "info": "Set to 0 to disable", "value": weight},
            {"key": "negative text", "label": "Negative prompt", "type": "text",
             "info": "Will be added to negative prompts", "value": str(user_metadata.get("negative text", ""))},
            notes,
        ]

    def editor_extras(self, name: str, user_metadata: dict) -> dict:
        tags = build_tags(self.get_item(name).get("metadata") or {})
        return {"tags": [[tag, count] for tag, count in tags[:TAG_COUNT]], "tags_target": "activation text",
                "random_prompt_tags": [[tag, count] for tag, count in tags[:RANDOM_PROMPT_TAGS]]}
