"""The extension's settings (A1111 9.1 keys, defaults and labels), in section ("extra_networks", "Extra Networks").

`register()` runs at import (so the options exist without a UI) and again from on_ui_settings with gradio
components.
"""
from __future__ import annotations

import gradio as gr
import lora_discovery
import networks

from modules import shared

SECTION = ("extra_networks", "Extra Networks")
COMPATIBILITY_SECTION = ("compatibility", "Compatibility")


def _sd_lora_choices() -> dict:
    return {"choices": ["None", *lora_discovery.available_networks]}


def _purge() -> None:
    networks.purge_networks_from_memory()  # under networks.state_lock: never touches a running job's networks


def options(with_components: bool = False) -> dict[str, shared.OptionInfo]:
    def component(kind: str):
        return getattr(gr, kind) if with_components else None

    opts = {
        "sd_lora": shared.OptionInfo(
            "None", "Add network to prompt", component("Dropdown"), _sd_lora_choices,
            refresh=lora_discovery.list_available_networks),
        "lora_preferred_name": shared.OptionInfo(
            "Alias from file", "When adding to prompt, refer to Lora by", component("Radio"),
            {"choices": ["Alias from file", "Filename"]}),
        "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
        "lora_bundled_ti_to_infotext": shared.OptionInfo(
            True, "Add Lora name as TI hashes for bundled Textual Inversion").info(
            '"Add Textual Inversion hashes to infotext" needs to be enabled'),
        "lora_show_all": shared.OptionInfo(False, "Always show all networks on the Lora page").info(
            "otherwise, those detected as for incompatible version of Stable Diffusion will be hidden"),
        "lora_hide_unknown_for_versions": shared.OptionInfo(
            [], "Hide networks of unknown versions for model versions", component("CheckboxGroup"),
            {"choices": ["SD1", "SD2", "SDXL", "SD3", "Flux", "Chroma"]}),
        "lora_in_memory_limit": shared.OptionInfo(
            2, "Number of Lora networks to keep cached in memory", component("Number"), {"precision": 0},
            onchange=_purge).info("besides the current job's; A1111's default is 0, which re-reads a file on every "
                                  "switch back to it"),
        "lora_not_found_warning_console": shared.OptionInfo(
            False, "Lora not found warning in console"),
        "lora_not_found_gradio_warning": shared.OptionInfo(
            False, "Lora not found warning popup in webui").info("the job comment is shown as a warning already"),
        "lora_fp8_strategy": shared.OptionInfo(
            "auto", "Loras on fp8 weights", component("Radio"),
            {"choices": ["auto", "upcast", "stochastic", "bypass"]}).info(
            "rounding a Lora into fp8 loses most of it; upcast: touched layers held in the compute dtype while a Lora "
            "is active (memory); stochastic: seeded unbiased rounding into fp8 (no memory, noisier); bypass: fp8 "
            "weights untouched, the Lora added in each forward; auto: upcast or bypass when it costs at most 10 % of "
            "the model, else stochastic. Restore is exact in every case"),
    }
    for info in opts.values():
        info.section = SECTION
    functional = shared.OptionInfo(
        False, "Lora/Networks: use old method that takes longer when you have multiple Loras active and produces "
               "same results as kohya-ss/sd-webui-additional-networks extension").info(
        "adds each Lora's output change in every forward instead of merging it into the weights: no weight is "
        "written or copied, only the Loras' own factors are used (on a GPU one copy of them is kept there; LoHa and "
        "full diffs rebuild their delta in each forward); sampling is slower; works for every network type")
    functional.section = COMPATIBILITY_SECTION
    opts["lora_functional"] = functional
    return opts


def register(with_components: bool = False) -> None:
    for key, info in options(with_components).items():
        shared.opts.add_option(key, info)
