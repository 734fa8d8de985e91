"""Host pieces the extension relies on: tag parsing, infotext, options, caches and hashes."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from modules import cache, extra_networks, hashes, infotext_utils
from modules.options import OptionInfo, Options


def test_parse_prompt_strips_tags_and_keeps_surrounding_text():
    prompt, data = extra_networks.parse_prompt("a, <lora:x:1>, b <lyco:y:0.5:te=1> <hypernet:h>")
    assert prompt == "a, , b  "
    assert [p.items for p in data["lora"]] == [["x", "1"]]
    assert data["lyco"][0].positional == ["y", "0.5"] and data["lyco"][0].named == {"te": "1"}
    assert data["hypernet"][0].items == ["h"]


def test_params_with_two_equals_signs_are_positional():
    params = extra_networks.ExtraNetworkParams(["x", "a=b=c", "unet=0.5"])
    assert params.positional == ["x", "a=b=c"]
    assert params.named == {"unet": "0.5"}


def test_parse_prompts_first_prompt_of_batch_wins():
    prompts, data = extra_networks.parse_prompts(["p <lora:x:1>", "q <lora:y:1>"])
    assert prompts == ["p ", "q "]
    assert [p.items[0] for p in data["lora"]] == ["x"]


def test_infotext_round_trip_quotes_values_with_separators():
    params = {"Steps": 4, "Sampler": "Euler a", "Seed": 7, "Size": "64x64",
              "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Skipped": None}
    text = infotext_utils.build_infotext("cat <lora:a:1>", "ugly", params)
    assert 'Lora hashes: "a: 0123456789ab, b: ba9876543210"' in text
    assert "Skipped" not in text
    parsed = infotext_utils.parse_generation_parameters(text)
    assert parsed["Prompt"] == "cat <lora:a:1>"
    assert parsed["Negative prompt"] == "ugly"
    assert parsed["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"
    assert parsed["Size-1"] == "64" and parsed["Steps"] == "4"


def test_options_save_and_load(tmp_path):
    labels = {"a": OptionInfo(1, "A"), "b": OptionInfo("x", "B")}
    opts = Options(labels)
    assert opts.set("a", 5) and not opts.set("a", 5)
    assert not opts.set("unknown", 1)
    path = tmp_path / "config.json"
    opts.save(str(path))
    assert json.loads(path.read_text()) == {"a": 5, "b": "x"}
    fresh = Options({"a": OptionInfo(1, "A"), "b": OptionInfo("x", "B")})
    fresh.load(str(path))
    assert fresh.a == 5


def test_options_keep_defaults_when_settings_file_is_corrupt(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    opts = Options({"a": OptionInfo(1, "A")})
    opts.load(str(path))
    assert opts.a == 1
    assert "config.json" in capsys.readouterr().out
    assert path.read_text() == "{not json"  # the user's file is left alone


def test_addnet_hash_is_sha256_of_tensor_bytes(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.arange(10, dtype=torch.float32)}, path, metadata={"ss_output_name": "x"})
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    with open(path, "rb") as f:
        assert hashes.addnet_hash_safetensors(f) == hashlib.sha256(data[8 + n:]).hexdigest()


def test_hash_cache_is_keyed_by_title_and_invalidated_by_mtime(tmp_path):
    path = str(tmp_path / "y.safetensors")
    save_file({"w": torch.ones(3)}, path)
    title = f"lora/{path}"
    first = hashes.sha256(path, title, use_addnet_hash=True)
    assert hashes.sha256_from_cache(path, title, use_addnet_hash=True) == first
    assert hashes.sha256_from_cache(path, "lora/other", use_addnet_hash=True) is None
    save_file({"w": torch.zeros(3)}, path)
    os.utime(path, (1, 1))
    assert hashes.sha256_from_cache(path, title, use_addnet_hash=True) is None


def test_cached_data_for_file_recomputes_after_change(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("one")
    calls = []

    def compute():
        calls.append(1)
        return {"text": path.read_text()}

    title = f"test/{path}"
    assert cache.cached_data_for_file("test-section", title, str(path), compute) == {"text": "one"}
    assert cache.cached_data_for_file("test-section", title, str(path), compute) == {"text": "one"}
    assert len(calls) == 1
    path.write_text("two!")
    os.utime(path, (5, 5))
    assert cache.cached_data_for_file("test-section", title, str(path), compute) == {"text": "two!"}
    assert len(calls) == 2


@pytest.mark.parametrize("value,expected", [("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"')])
def test_quote(value, expected):
    assert infotext_utils.quote(value) == expected
