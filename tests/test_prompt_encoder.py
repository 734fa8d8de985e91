"""A1111 prompt encoding on the diffusers host: emphasis, 75-token chunks, BREAK, CLIP skip; plain prompts encode
exactly as diffusers does."""
import os

import pytest
import torch

from modules import prompt_encoder, sd_models_diffusers, shared
from modules.prompt_parser import parse_prompt_attention


@pytest.fixture(scope="module")
def models(default_models_dir):
    root = os.path.join(default_models_dir, "Stable-diffusion")
    return {f: sd_models_diffusers.load(os.path.join(root, f"tiny-{f}"), torch.device("cpu"), torch.float32)
            for f in ("sd1", "sdxl")}


@pytest.mark.parametrize("text,expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, sky.",
     [["a ", 1.0], ["house", 1.1 * 1.1 * 1.3], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, sky.", 1.1]]),
    ("\\(literal\\) [x]", [["(literal) ", 1.0], ["x", 1 / 1.1]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("(unclosed", [["unclosed", 1.1]]),
    ("", [["", 1.0]]),
])
def test_emphasis_syntax(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_plain_prompts_encode_exactly_as_diffusers(models, family):
    model = models[family]
    with torch.inference_mode():
        ours = prompt_encoder.encode(model, ["a red house, blue sky"], ["ugly"])
        kwargs = {"prompt": ["a red house, blue sky"], "device": torch.device("cpu"), "num_images_per_prompt": 1,
                  "do_classifier_free_guidance": True, "negative_prompt": ["ugly"]}
        theirs = model.pipe.encode_prompt(**kwargs)
    assert torch.equal(ours["prompt_embeds"], theirs[0])
    assert torch.equal(ours["negative_prompt_embeds"], theirs[1])
    if family == "sdxl":
        assert torch.equal(ours["pooled_prompt_embeds"], theirs[2])
        assert torch.equal(ours["negative_pooled_prompt_embeds"], theirs[3])


def test_long_prompts_break_and_emphasis(models):
    model = models["sd1"]
    long_prompt = ", ".join(["a big red old house"] * 30)  # 6 tokens an item: 179 tokens, three chunks
    chunks = prompt_encoder.tokenize_line(model.tokenizer, long_prompt)
    assert len(chunks) == 3 and all(len(c.tokens) == 77 for c in chunks)
    # the 13th item does not fit: the chunk ends after the 12th item's comma and the item moves on whole
    comma, eos = model.tokenizer.convert_tokens_to_ids(",</w>"), model.tokenizer.eos_token_id
    assert chunks[0].tokens.index(eos) == 1 + 12 * 6 and chunks[0].tokens[12 * 6] == comma
    assert chunks[1].tokens[1:6] == model.tokenizer("a big red old house", add_special_tokens=False).input_ids
    assert len(prompt_encoder.tokenize_line(model.tokenizer, "a BREAK b")) == 2
    with torch.inference_mode():
        res = prompt_encoder.encode(model, [long_prompt], [""])
        assert res["prompt_embeds"].shape[1] == 3 * 77 and res["negative_prompt_embeds"].shape[1] == 3 * 77
        plain = prompt_encoder.encode(model, ["a red house"], [""])["prompt_embeds"]
        strong = prompt_encoder.encode(model, ["a (red:1.5) house"], [""])["prompt_embeds"]
    red = model.tokenizer("a red house").input_ids.index(model.tokenizer.convert_tokens_to_ids("red</w>"))
    changed = (plain - strong).abs().amax(dim=-1)[0]
    assert changed[red] > 0.1 and changed.mean() < changed[red]
    torch.testing.assert_close(strong.mean(), plain.mean())  # A1111 restores the mean


def test_clip_skip(models, monkeypatch):
    model = models["sd1"]
    with torch.inference_mode():
        base = prompt_encoder.encode(model, ["a cat"], [""])["prompt_embeds"]
        monkeypatch.setitem(shared.opts.data, "CLIP_stop_at_last_layers", 2)
        skipped = prompt_encoder.encode(model, ["a cat"], [""])["prompt_embeds"]
        ids = model.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = model.text_encoder(ids, output_hidden_states=True)
        expected = model.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert not torch.equal(base, skipped)
    assert torch.equal(skipped, expected)
