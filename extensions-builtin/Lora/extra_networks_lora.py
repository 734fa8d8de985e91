"""The `<lora:...>` / `<lyco:...>` handler (A1111 name): tags → networks.load_networks, and the job's report.

Differences from A1111 on purpose: a bad tag is reported by its text and only that tag is skipped; a network
mentioned twice is applied once with the last weights (A1111 applies it twice); a Lora that matches no layer
of the model, or leaves keys unmatched, is reported instead of silently doing nothing (lora_coverage: layers
matched, unmatched keys by group, and "it looks like an SDXL LoRA, the loaded model is SD1").
"""
from __future__ import annotations

import logging
import re
import sys

import lora_block_weights
import lora_bundled
import lora_coverage
import lora_discovery
import lora_layers
import lora_step_weights
import lora_syntax
import networks

from modules import extra_networks, script_callbacks, shared

logger = logging.getLogger("lora")
# `<lora:>` has no argument text, so the tag parser (A1111's `<(\w+):([^>]+)>`) leaves it in the prompt as words
re_empty_tag = re.compile(r"<(?:lora|lyco):>")


def _prompts_of(p) -> list[str]:
    res = []
    for value in (getattr(p, "prompt", ""), getattr(p, "hr_prompt", ""), getattr(p, "all_prompts", None)):
        if isinstance(value, str):
            res.append(value)
        elif isinstance(value, (list, tuple)):
            res.extend(x for x in value if isinstance(x, str))
    return res


def tag_text(p, params) -> str:
    """The tag as the user wrote it (`<lyco:x:abc>`), found in the job's prompts; else rebuilt as `<lora:...>`."""
    args = ":".join(str(x) for x in params.items)
    for prompt in _prompts_of(p):
        for m in extra_networks.re_extra_net.finditer(prompt):
            if m.group(2) == args and m.group(1) in ("lora", "lyco"):
                return m.group(0)
    return f"<lora:{args}>"


def model_family(sd_model) -> str | None:
    """The family ("SD1", "SD2", "SDXL") the model's layer map was built for."""
    if sd_model is None:
        return None
    layer_map = getattr(sd_model, "network_layer_map", None)
    if layer_map is not None:
        return layer_map.family
    return lora_layers.model_family(sd_model, 0)


def block_layer_names(sd_model, family: str | None) -> list[str]:
    """The loaded model's layer names where its block ids depend on them (transformers: their depth), else []."""
    sd_model = sd_model if sd_model is not None else getattr(shared, "sd_model", None)
    if sd_model is None or family in lora_block_weights.ALL_IDS:
        return []
    return list(lora_layers.get_layer_map(sd_model).layers)


LBW_TITLE = "LoRA Block Weight"


def lbw_script_active(p) -> bool:
    """Whether LoRA Block Weight's script is on for this job (its *Active* box, the second of its arguments: its
    `process(p, loraratios, useblocks, ...)`). Then it applies the tags' block weights and start/stop itself."""
    runner, args = getattr(p, "scripts", None), getattr(p, "script_args", None)
    for script in getattr(runner, "alwayson_scripts", None) or []:
        try:
            if script.title() == LBW_TITLE:
                return bool(args[script.args_from + 1])
        except Exception:  # another extension's object: not LBW's, or not set up for this job
            continue
    return False


def hash_key(name: str) -> str:
    return name.replace(":", "").replace(",", "")


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.errors: dict[str, int] = {}  # network name → failed layers, posted by deactivate
        self.error_details: dict[str, str] = {}
        self.step_weights: lora_step_weights.StepWeights | None = None  # the pass's schedules, if any
        if hasattr(script_callbacks, "on_cfg_denoiser"):
            script_callbacks.on_cfg_denoiser(self.before_step)

    def before_step(self, params) -> None:
        """A1111's cfg_denoiser callback: the scheduled weights of the step about to run."""
        if self.step_weights is not None:
            self.step_weights.at_step(int(params.sampling_step), int(params.total_sampling_steps))

    def activate(self, p, params_list) -> None:
        if not getattr(p, "is_hr_pass", False):
            self.errors.clear()
            self.error_details.clear()
        params_list = list(params_list)
        self._remove_empty_tags(p)
        self._add_sd_lora(p, params_list)

        sd_model = getattr(p, "sd_model", None)
        family = model_family(sd_model if sd_model is not None else getattr(shared, "sd_model", None))
        presets = lora_block_weights.all_presets(getattr(shared, "data_path", None))
        lbw_owns_blocks = lbw_script_active(p)
        tags: dict[str, lora_syntax.LoraTag] = {}
        blocks: dict[str, dict[str, float] | None] = {}
        for params in params_list:
            try:
                tag = lora_syntax.parse_lora_params(params, presets, leave_lbw_syntax=lbw_owns_blocks)
                weights = tag.blocks.for_family(family, block_layer_names(sd_model, family)) \
                    if tag.blocks is not None else None
            except (lora_syntax.LoraTagError, lora_block_weights.BlockWeightError) as e:
                p.comment(f"Bad Lora tag {tag_text(p, params)}: {e}; it was skipped")
                continue
            if tag.name in tags:
                p.comment(f"Lora {tag.name} is mentioned more than once; only the last one is used: "
                          f"{tag_text(p, params)}")
            tags[tag.name] = tag
            blocks[tag.name] = weights

        names = list(tags)
        hires, steps = bool(getattr(p, "is_hr_pass", False)), lora_step_weights.pass_steps(p)
        first = [t.multipliers(0, steps, hires) for t in tags.values()]
        report = networks.load_networks(names, [te for te, _ in first], [unet for _, unet in first],
                                        [t.dyn for t in tags.values()], sd_model=sd_model,
                                        block_weights=[blocks[n] for n in names])
        scheduled = any(t.scheduled for t in tags.values()) and not report.fatal
        self.step_weights = lora_step_weights.StepWeights(tags, blocks, sd_model, hires, steps) \
            if scheduled else None
        self._report(p, report)
        self._add_hashes(p, report)
        for message in lora_bundled.register(report.networks, getattr(p, "sd_model", None)):
            p.comment(message)

    @staticmethod
    def _remove_empty_tags(p) -> None:
        """`<lora:>` is named in the job's comments and taken out of the text the text encoder sees (in the hires
        pass, out of the Hires prompts)."""
        attr = "hr_prompts" if getattr(p, "is_hr_pass", False) else "prompts"
        prompts = getattr(p, attr, None)
        if not isinstance(prompts, list):
            return
        found = [m.group(0) for prompt in prompts if isinstance(prompt, str) for m in re_empty_tag.finditer(prompt)]
        for tag in dict.fromkeys(found):
            p.comment(f"Bad Lora tag {tag}: no Lora name; it was removed from the prompt")
        if found:
            setattr(p, attr, [re_empty_tag.sub("", x) if isinstance(x, str) else x for x in prompts])

    def _add_sd_lora(self, p, params_list: list) -> None:
        """Option "Add network to prompt": the network is appended once to every prompt that lacks it."""
        additional = getattr(shared.opts, "sd_lora", "None")
        if not additional or additional == "None" or additional not in networks.available_networks:
            return
        if any(x.items and x.items[0] == additional for x in params_list):
            return
        multiplier = getattr(shared.opts, "extra_networks_default_multiplier", 1.0)
        tag = f"<lora:{additional}:{multiplier}>"
        if isinstance(getattr(p, "all_prompts", None), list):
            p.all_prompts = [x if tag in x else f"{x}{tag}" for x in p.all_prompts]
        params_list.append(extra_networks.ExtraNetworkParams(items=[additional, str(multiplier)]))

    def _report(self, p, report: networks.LoadReport) -> None:
        for name in report.duplicates:
            p.comment(f"Lora {name} names a file that is already in this prompt; it is applied once, "
                      f"with the last weights")
        if report.missing:
            message = "Lora not found: " + ", ".join(report.missing)
            p.comment(message)
            for name in report.missing:
                ambiguous = lora_discovery.ambiguous_alias_files(name)
                if ambiguous:
                    p.comment(f"Lora alias {name} is shared by several files ("
                              + ", ".join(e.name for e in ambiguous) + "); use the file name instead")
            if getattr(shared.opts, "lora_not_found_warning_console", False):
                print(f"\n{message}\n")
            if getattr(shared.opts, "lora_not_found_gradio_warning", False) and "gradio" in sys.modules:
                sys.modules["gradio"].Warning(message)
        for name, error in report.load_errors.items():
            p.comment(f"Lora {name} could not be loaded: {error}")
        sd_model = getattr(p, "sd_model", None)
        family = model_family(sd_model if sd_model is not None else getattr(shared, "sd_model", None))
        for net in report.networks:
            cov = lora_coverage.coverage_of(net, family)
            for line in lora_coverage.messages(cov):
                p.comment(line)
            zeroed = lora_block_weights.zero_blocks(net.block_weights) if net.block_weights else []
            if zeroed:
                p.comment(f"Lora {net.mentioned_name or net.name}: block weights set these blocks to 0: "
                          + ", ".join(zeroed))
            if net.unmatched_count:
                logger.info("Lora %s: unmatched keys: %s", net.name,
                            (net.unmatched_keys + net.unsupported_keys + net.unused_keys)[:20])
            failed = {**net.load_errors, **net.apply_errors}
            if failed:
                self.errors[net.name] = len(failed)
                layer, error = next(iter(failed.items()))
                self.error_details[net.name] = f"{layer}: {error}"
        for note in report.notes:
            p.comment(note)
        if report.fatal:
            p.comment(f"Loras were not applied: {report.fatal}")

    def _add_hashes(self, p, report: networks.LoadReport) -> None:
        if not getattr(shared.opts, "lora_add_hashes_to_infotext", True):
            return
        if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        for net in report.networks:
            shorthash = net.network_on_disk.shorthash if net.network_on_disk else None
            if shorthash and net.mentioned_name:
                p.lora_hashes[hash_key(net.mentioned_name)] = shorthash
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())
        else:
            p.extra_generation_params.pop("Lora hashes", None)

    def deactivate(self, p) -> None:
        self.step_weights = None
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            for name, detail in self.error_details.items():
                p.comment(f"Lora {name}: layers that failed include {detail}")
            self.errors.clear()
            self.error_details.clear()
