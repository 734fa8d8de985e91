"""`<lora:NAME[:te[:unet[:dyn]]]>` arguments (A1111 1.2) → LoraTag, with a clear error for a bad tag.

A1111 raises on a bad tag and then disables every Lora of the batch; here only the bad tag is skipped, and
multipliers must be finite numbers (A1111 accepts `nan`/`inf`). Beyond A1111, as popular extensions write them:
- block weights (`lbw=`/`w=`, LBW's positional preset form, `in=`/`mid=`/`out=`) → LoraTag.blocks
  (lora_block_weights);
- step schedules (loractl's keyframes `0@0,1@0.5` in the multiplier, `te=`, `unet=`; LBW's `start=`/`stop=`) and
  the hires pass's own weights (loractl's `hr=`, `hrte=`, `hrunet=`) (lora_schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import lora_block_weights
import lora_schedule

Weight = float | lora_schedule.Schedule


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float  # the multipliers at the first step of the first pass (what A1111's plain syntax gives)
    unet: float
    dyn: int | None
    text: str  # the tag's argument text, `NAME:0.5:unet=1`
    blocks: lora_block_weights.BlockWeights | None = None
    te_weight: Weight | None = None  # the first pass's weights, schedules included (None: `te`/`unet`)
    unet_weight: Weight | None = None
    hr_te: Weight | None = None  # the hires pass's (None: the first pass's)
    hr_unet: Weight | None = None
    window: lora_schedule.Window | None = None

    @property
    def scheduled(self) -> bool:
        """Whether the weights can change from one step to the next."""
        weights = (self.te_weight, self.unet_weight, self.hr_te, self.hr_unet)
        return self.window is not None or any(isinstance(w, lora_schedule.Schedule) for w in weights)

    def multipliers(self, step: int, steps: int, hires: bool = False) -> tuple[float, float]:
        """(te, unet) at `step` of a pass of `steps` steps. The text encoders run once per pass, before the first
        step, so their weight is the schedule's at step 0, and start=/stop= switch the UNet part only (as in LBW)."""
        te = self.te_weight if self.te_weight is not None else self.te
        unet = self.unet_weight if self.unet_weight is not None else self.unet
        if hires:
            te = self.hr_te if self.hr_te is not None else te
            unet = self.hr_unet if self.hr_unet is not None else unet
        if self.window is not None and not self.window.active(step, steps):
            return _at(te, 0, steps), 0.0
        return _at(te, 0, steps), _at(unet, step, steps)


def _at(weight: Weight, step: int, steps: int) -> float:
    return weight.weight_at(step, steps) if isinstance(weight, lora_schedule.Schedule) else float(weight)


class LoraTagError(ValueError):
    pass


def _multiplier(value: str, what: str) -> float:
    try:
        res = float(value)
    except (TypeError, ValueError):
        raise LoraTagError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(res):
        raise LoraTagError(f"{what} {value!r} is not a finite number")
    return res


def _weight(value: str, what: str) -> Weight:
    """A multiplier, or a keyframe schedule (`0@0,1@0.5`)."""
    if lora_schedule.is_schedule(value):
        try:
            return lora_schedule.parse(value, what)
        except lora_schedule.ScheduleError as e:
            raise LoraTagError(str(e)) from None
    return _multiplier(value, what)


def _dyn(value: str) -> int:
    try:
        res = int(value)
    except (TypeError, ValueError):
        raise LoraTagError(f"dyn {value!r} is not a whole number") from None
    if res < 1:
        raise LoraTagError(f"dyn {value!r} must be at least 1")
    return res


def _first(weight: Weight) -> float:
    return weight.keyframes[0][1] if isinstance(weight, lora_schedule.Schedule) else weight


LBW_KEYS = ("lbw", "w", "start", "stop")


def parse_lora_params(params, presets: dict[str, str] | None = None, leave_lbw_syntax: bool = False) -> LoraTag:
    """One ExtraNetworkParams → LoraTag. Unknown named keys are ignored, as in A1111.

    `presets`: block-weight presets by name (lora_block_weights.all_presets; the built-ins when None).
    `leave_lbw_syntax`: LoRA Block Weight is active and applies its own syntax (`lbw=`, `w=`, `start=`, `stop=`,
    the positional preset) by scaling the loaded modules: those are read as A1111 reads them (ignored)."""
    presets = lora_block_weights.BUILTIN_PRESETS if presets is None else presets
    positional = list(params.positional)
    named = dict(params.named)
    if leave_lbw_syntax:
        named = {k: v for k, v in named.items() if k not in LBW_KEYS}
    text = ":".join(str(x) for x in params.items)
    if not positional or not str(positional[0]).strip():
        raise LoraTagError("no Lora name")
    blocks = None
    # LBW's older form puts the block weights where A1111 has the unet multiplier: `<lora:x:1:OUTALL>`
    if len(positional) > 2 and lora_block_weights.looks_like_vector_or_preset(str(positional[2]).strip(), presets):
        blocks = None if leave_lbw_syntax else _blocks(lora_block_weights.parse_vector, str(positional[2]), presets)
        positional = positional[:2]
    te = _weight(positional[1], "multiplier") if len(positional) > 1 else 1.0
    te = _weight(named["te"], "te") if "te" in named else te
    unet = _weight(positional[2], "unet multiplier") if len(positional) > 2 else te
    unet = _weight(named["unet"], "unet") if "unet" in named else unet
    dyn = _dyn(positional[3]) if len(positional) > 3 else None
    dyn = _dyn(named["dyn"]) if "dyn" in named else dyn
    hr = _weight(named["hr"], "hr") if "hr" in named else None
    hr_te = _weight(named["hrte"], "hrte") if "hrte" in named else hr
    hr_unet = _weight(named["hrunet"], "hrunet") if "hrunet" in named else hr

    window = None
    if "start" in named or "stop" in named:
        window = lora_schedule.Window(named.get("start"), named.get("stop"))
        try:
            window.check()
        except lora_schedule.ScheduleError as e:
            raise LoraTagError(str(e)) from None

    vector_text = named.get("lbw", named.get("w"))
    if vector_text is not None:
        if blocks is not None:
            raise LoraTagError("block weights are given twice")
        blocks = _blocks(lora_block_weights.parse_vector, vector_text, presets)
    readable = _blocks(lambda x, _: lora_block_weights.parse_named(x), named, presets)
    if readable is not None:
        if blocks is not None:
            raise LoraTagError("use either lbw=/w= or in=/mid=/out=, not both")
        blocks = readable
    return LoraTag(name=positional[0], te=_first(te), unet=_first(unet), dyn=dyn, text=text, blocks=blocks,
                   te_weight=te, unet_weight=unet, hr_te=hr_te, hr_unet=hr_unet, window=window)


def _blocks(parse, value, presets):
    try:
        return parse(value, presets)
    except lora_block_weights.BlockWeightError as e:
        raise LoraTagError(str(e)) from None
