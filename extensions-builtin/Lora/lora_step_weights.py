"""The running pass's Lora weights when some tag schedules them (keyframes, start=/stop=): re-sync at each step.

The host calls A1111's on_cfg_denoiser callbacks before every sampling step. At each step the wanted multipliers
are computed; only when they differ from the ones merged now is the set loaded again, and then the patcher's plan
rewrites only the layers whose (network, multiplier) changed: a schedule with k distinct weights costs k applies in
merged mode, and in functional mode a re-sync swaps the hooks' multipliers without writing any weight.
"""
from __future__ import annotations

import logging

import networks

logger = logging.getLogger("lora")


class StepWeights:
    """One pass of one job: its tags (lora_syntax.LoraTag by name), their block weights and the merged state."""

    def __init__(self, tags: dict, blocks: dict, sd_model, hires: bool, steps: int):
        self.tags = tags
        self.blocks = blocks
        self.sd_model = sd_model
        self.hires = hires
        self.steps = steps
        self.current = self.multipliers(0, steps)
        self.resyncs = 0
        self.layers_written = 0

    def multipliers(self, step: int, steps: int) -> list[tuple[float, float]]:
        return [tag.multipliers(step, steps, self.hires) for tag in self.tags.values()]

    def at_step(self, step: int, steps: int) -> int:
        """Merges the weights of `step` when they changed; returns the layers written."""
        wanted = self.multipliers(step, steps or self.steps)
        if wanted == self.current:
            return 0
        names = list(self.tags)
        report = networks.load_networks(names, [te for te, _ in wanted], [unet for _, unet in wanted],
                                        [t.dyn for t in self.tags.values()], sd_model=self.sd_model,
                                        block_weights=[self.blocks.get(n) for n in names])
        if report.fatal:
            logger.warning("Lora: the weights of step %d could not be applied: %s", step, report.fatal)
        self.current = wanted
        self.resyncs += 1
        self.layers_written += report.layers_written
        return report.layers_written


def pass_steps(p) -> int:
    """The steps of the pass being activated: the hires pass's own, else the job's."""
    if getattr(p, "is_hr_pass", False):
        return int(getattr(p, "hr_second_pass_steps", 0) or getattr(p, "steps", 1) or 1)
    return int(getattr(p, "steps", 1) or 1)
