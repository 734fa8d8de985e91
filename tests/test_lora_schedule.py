"""Step schedules in the tag (loractl keyframes, LBW's start=/stop=, loractl's hr=): parsing, the weight at each
step (hand-computed values), and a job that re-syncs only when the weight changes and restores exactly."""
import extra_networks_lora
import lora_schedule
import lora_syntax
import networks
import pytest
import torch

from modules import extra_networks, processing, script_callbacks, shared


def _tag(text: str) -> lora_syntax.LoraTag:
    _, data = extra_networks.parse_prompt(text)
    (params,) = data["lora"]
    return lora_syntax.parse_lora_params(params)


def test_keyframes_interpolate_linearly_and_hold_outside():
    s = lora_schedule.parse("0@0,1@0.5")  # fractions of a 21-step pass: step 10 is the middle
    assert [s.weight_at(i, 21) for i in (0, 5, 10, 15, 20)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    steps = lora_schedule.parse("1@2;0.2~6")  # step numbers (largest position > 1), `;` and `~` as loractl allows
    assert [round(steps.weight_at(i, 10), 6) for i in (0, 2, 3, 4, 6, 9)] == [1.0, 1.0, 0.8, 0.6, 0.2, 0.2]
    implicit = lora_schedule.parse("0.5@0,1")  # a weight without a position sits at 1 (the last step)
    assert implicit.weight_at(4, 5) == 1.0 and implicit.weight_at(2, 5) == 0.75
    assert lora_schedule.parse("0@0,1@0.5").distinct_weights(20) == 11


@pytest.mark.parametrize("text,message", [
    ("<lora:x:1@0.5,0@0.2>", "out of order"),
    ("<lora:x:1@a>", "not a number"),
    ("<lora:x:1@0@1>", "not weight@position"),
    ("<lora:x:1@0,,0@1>", "empty keyframe"),
    ("<lora:x:inf@0,1@1>", "not a finite number"),
    ("<lora:x:1:start=10:stop=5>", "not before stop"),
    ("<lora:x:1:start=-1>", "negative"),
    ("<lora:x:1:hr=abc>", "not a number"),
])
def test_bad_schedules_name_the_problem(text, message):
    with pytest.raises(lora_syntax.LoraTagError, match=message):
        _tag(text)


def test_multipliers_per_pass_and_window():
    t = _tag("<lora:x:0@0,1@1:hr=0.3>")
    assert t.scheduled and t.multipliers(0, 11) == (0.0, 0.0) and t.multipliers(5, 11) == (0.0, 0.5)
    assert t.multipliers(3, 6, hires=True) == (0.3, 0.3)  # hr= replaces both in the hires pass
    w = _tag("<lora:x:0.8:start=0.25:stop=6>")
    # the text encoders run once before step 0: start/stop switch the UNet part only
    assert [w.multipliers(i, 8) for i in (0, 1, 2, 5, 6)] == [(0.8, 0.0), (0.8, 0.0), (0.8, 0.8), (0.8, 0.8),
                                                               (0.8, 0.0)]
    split = _tag("<lora:x:te=0.5:unet=1@0,0@1:hrunet=2>")
    assert split.multipliers(0, 3) == (0.5, 1.0) and split.multipliers(2, 3) == (0.5, 0.0)
    assert split.multipliers(2, 3, hires=True) == (0.5, 2.0)
    assert not _tag("<lora:x:0.5:unet=1>").scheduled


def _unet_weight(model):
    return model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()


def _unet_output(model):
    """The layer's output for a fixed input: what the step computes, merged or through functional hooks."""
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.linspace(-1, 1, layer.in_features).unsqueeze(0)
    with torch.no_grad():
        return layer(x)


def _run_pass(model, prompt: str, steps: int, hires: bool = False):
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=prompt)
    p.all_prompts = [prompt]
    p.steps = steps
    _, data = extra_networks.parse_prompt(prompt)
    handler = extra_networks_lora.ExtraNetworkLora()
    handler.activate(p, data["lora"])
    seen = []
    for step in range(steps):
        script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(
            None, None, None, step, steps, None, None))
        seen.append((_unet_weight(model), _unet_output(model)))
    resyncs = handler.step_weights.resyncs if handler.step_weights else 0
    handler.deactivate(p)
    script_callbacks.remove_callbacks_for_function(handler.before_step)
    return seen, resyncs


@pytest.mark.parametrize("functional", [False, True])
def test_a_scheduled_job_follows_the_keyframes_and_restores_exactly(tiny_sd1, write_lora, monkeypatch, functional):
    monkeypatch.setitem(shared.opts.data, "lora_functional", functional)
    write_lora("sched", tiny_sd1, seed=9)
    base, base_out = _unet_weight(tiny_sd1), _unet_output(tiny_sd1)
    seen, _ = _run_pass(tiny_sd1, "<lora:sched:1>", 1)
    full_out = seen[0][1] - base_out
    assert full_out.abs().max() > 1e-4
    seen, resyncs = _run_pass(tiny_sd1, "<lora:sched:0@0,1@0.5>", 5)  # steps 0..4: 0, 0.5, 1, 1, 1
    for (weight, out), factor in zip(seen, (0.0, 0.5, 1.0, 1.0, 1.0), strict=True):
        torch.testing.assert_close(out - base_out, factor * full_out, rtol=1e-4, atol=1e-6)
        assert torch.equal(weight, base) == (functional or factor == 0)  # functional: hooks, no weight written
    assert resyncs == 2  # only the steps where the weight changed
    seen, resyncs = _run_pass(tiny_sd1, "<lora:sched:1:stop=2>", 4)
    assert [torch.equal(out, base_out) for _, out in seen] == [False, False, True, True]
    assert resyncs == 1
    _run_pass(tiny_sd1, "", 1)
    assert torch.equal(_unet_weight(tiny_sd1), base)
    networks.loaded_networks.clear()
