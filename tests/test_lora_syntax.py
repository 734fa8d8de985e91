"""`<lora:...>` tags (spec 1.2) and what one job does with them: multipliers, bad tags, duplicates, missing names."""
import extra_networks_lora
import lora_syntax
import networks
import pytest
import torch

from modules import extra_networks, processing


def tag(text: str) -> lora_syntax.LoraTag:
    _, data = extra_networks.parse_prompt(text)
    (params,) = data["lora"] + data["lyco"]
    return lora_syntax.parse_lora_params(params)


@pytest.mark.parametrize("text,te,unet,dyn", [
    ("<lora:x>", 1.0, 1.0, None),
    ("<lora:x:0.5>", 0.5, 0.5, None),
    ("<lora:x:0.3:0.9>", 0.3, 0.9, None),
    ("<lora:x:1:0.5:8>", 1.0, 0.5, 8),
    ("<lora:x:0.7:unet=0.2>", 0.7, 0.2, None),
    ("<lora:x:te=0.4>", 0.4, 0.4, None),
    ("<lora:x:te=0.4:unet=0>", 0.4, 0.0, None),
    ("<lora:x:0.6:dyn=4>", 0.6, 0.6, 4),
    ("<lora:x:1:lbw=OUTD>", 1.0, 1.0, None),
    ("<lyco:x:-0.5>", -0.5, -0.5, None),
    ("<lora:x:1e-1>", 0.1, 0.1, None),
])
def test_tag_arguments(text, te, unet, dyn):
    parsed = tag(text)
    assert (parsed.name, parsed.te, parsed.unet, parsed.dyn) == ("x", te, unet, dyn)


@pytest.mark.parametrize("text,message", [
    ("<lora:x:abc>", "not a number"),
    ("<lora:x:nan>", "not a finite number"),
    ("<lora:x:1:1:8.5>", "not a whole number"),
    ("<lora:x:1:dyn=0>", "at least 1"),
    ("<lora:te=1>", "no Lora name"),
])
def test_bad_tags_raise_a_clear_error(text, message):
    with pytest.raises(lora_syntax.LoraTagError, match=message):
        tag(text)


def _job(model, prompt: str):
    p = processing.StableDiffusionProcessing(sd_model=model, prompt=prompt)
    p.all_prompts = [prompt]
    _, data = extra_networks.parse_prompt(prompt)
    handler = extra_networks_lora.ExtraNetworkLora()
    handler.activate(p, data["lora"] + data["lyco"])
    handler.deactivate(p)
    return p


def _weight(model):
    return model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()


def test_bad_tag_skips_only_itself_and_duplicates_apply_once(tiny_sd1, write_lora):
    write_lora("a", tiny_sd1, seed=1)
    write_lora("b", tiny_sd1, seed=2)
    base = _weight(tiny_sd1)

    single = _job(tiny_sd1, "<lora:a:0.7>")
    delta_a = _weight(tiny_sd1) - base
    assert delta_a.abs().max() > 0 and not single.comments

    bad = _job(tiny_sd1, "<lora:a:0.7> <lora:b:abc>")
    assert any("Bad Lora tag <lora:b:abc>" in c for c in bad.comments), bad.comments
    torch.testing.assert_close(_weight(tiny_sd1) - base, delta_a, rtol=0, atol=1e-7)

    twice = _job(tiny_sd1, "<lora:a:0.3> <lora:a:0.7>")  # the last weight, applied once (A1111: 2 × 0.7)
    assert any("more than once" in c for c in twice.comments)
    torch.testing.assert_close(_weight(tiny_sd1) - base, delta_a, rtol=0, atol=1e-7)
    assert twice.extra_generation_params["Lora hashes"].count("a: ") == 1

    missing = _job(tiny_sd1, "<lora:a:0.7> <lora:nope:1>")
    assert "Lora not found: nope" in missing.comments
    torch.testing.assert_close(_weight(tiny_sd1) - base, delta_a, rtol=0, atol=1e-7)

    _job(tiny_sd1, "no tags")
    assert torch.equal(_weight(tiny_sd1), base)


def test_te_and_unet_multipliers_reach_their_layers(tiny_sd1, write_lora):
    write_lora("a", tiny_sd1, seed=3)
    te_layer = tiny_sd1.text_encoder.encoder.layers[0].self_attn.q_proj
    te_base, unet_base = te_layer.weight.detach().clone(), _weight(tiny_sd1)
    _job(tiny_sd1, "<lora:a:1:0>")
    assert not torch.equal(te_layer.weight, te_base) and torch.equal(_weight(tiny_sd1), unet_base)
    _job(tiny_sd1, "<lora:a:te=0:unet=1>")
    assert torch.equal(te_layer.weight, te_base) and not torch.equal(_weight(tiny_sd1), unet_base)
    _job(tiny_sd1, "")
    assert torch.equal(te_layer.weight, te_base) and torch.equal(_weight(tiny_sd1), unet_base)
    networks.loaded_networks.clear()
