"""Issue 13 item 10: cards insert tags that resolve, pickle-only .pt/.ckpt Loras show their problem at scan time
with advice to convert them, and empty-name tags are named in the job's comments."""
import argparse

import lora_discovery
import networks
import pytest
import torch
from extra_networks_lora import ExtraNetworkLora

from modules import extra_networks, processing, ui_extra_networks

ADVICE = "Convert it to .safetensors"


@pytest.fixture
def lora_page(lora_dir):
    import lora_hashing
    import ui_extra_networks_lora
    page = ui_extra_networks_lora.ExtraNetworksPageLora()
    yield page
    lora_hashing.stop()


def _items(page) -> dict:
    return {item["filename"]: item for item in page.list_items()}


def _inserted(item) -> str:
    return "".join(part.get("text", "1") for part in item["prompt_parts"])


def _resolves_to(tag: str, filename: str) -> bool:
    _, data = extra_networks.parse_prompt(tag)
    params = data.get("lora", [])
    return len(params) == 1 and getattr(lora_discovery.find_network(params[0].positional[0]), "filename", None) \
        == filename


def test_names_and_aliases_with_tag_characters_insert_a_tag_that_resolves(tiny_sd1, write_lora, lora_page, lora_dir):
    paths = {
        "colon_alias": write_lora("style_v2", tiny_sd1, metadata={"ss_output_name": "style:v2"}),
        "gt_alias": write_lora("eyes", tiny_sd1, seed=2, metadata={"ss_output_name": "eyes>blue"}),
        "eq_alias": write_lora("hair", tiny_sd1, seed=3, metadata={"ss_output_name": "hair=red"}),
        "colon_stem": write_lora("sub/v1:final", tiny_sd1, seed=4, metadata={"ss_output_name": "plain_alias"}),
        "hopeless": write_lora("a:b", tiny_sd1, seed=5),
    }
    items = _items(lora_page)
    for case in ("colon_alias", "gt_alias", "eq_alias", "colon_stem"):
        item = items[paths[case]]
        tag = _inserted(item)
        assert _resolves_to(tag, paths[case]), (case, tag)
        assert not item.get("error"), (case, item.get("error"))
    hopeless = items[paths["hopeless"]]
    assert hopeless["prompt_parts"] == [] and "cannot be put into a prompt" in hopeless["error"]
    assert "':'" in hopeless["error"]
    card = ui_extra_networks.card_from_item(lora_page, hopeless, 0)
    assert card["prompt"] == [] and "rename the file" in card["error"]


def _pickle_only_pt(path, with_object: bool) -> None:
    data = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4)}
    if with_object:
        data["training_args"] = argparse.Namespace(lr=1e-4)  # anything but tensors needs real unpickling
    torch.save(data, str(path))


def test_pickle_only_pt_files_show_their_problem_on_the_card_at_scan_time(lora_page, lora_dir):
    _pickle_only_pt(lora_dir / "unsafe.pt", True)
    _pickle_only_pt(lora_dir / "unsafe_old.ckpt", True)
    _pickle_only_pt(lora_dir / "fine.pt", False)
    networks.list_available_networks()
    items = _items(lora_page)
    for name in ("unsafe.pt", "unsafe_old.ckpt"):
        error = items[str(lora_dir / name)]["error"]
        assert name in error and ADVICE in error and "Namespace" in error, error
        assert "weights_only" not in error and "add_safe_globals" not in error, error
    assert not items[str(lora_dir / "fine.pt")].get("error")

    from lora_files import LoraFileError, load_state_dict
    with pytest.raises(LoraFileError) as e:
        load_state_dict(str(lora_dir / "unsafe.pt"))
    assert ADVICE in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.parametrize("tag", ["<lora:>", "<lora::1>", "<lora: :1>", "<lyco:>"])
def test_empty_name_tags_are_named_in_the_job_comments(tiny_sd1, lora_dir, tag):
    prompt = f"a house {tag} at night"
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=tiny_sd1, prompt=prompt, negative_prompt="", steps=1,
                                                    width=32, height=32, seed=1)
    p.prompts, data = extra_networks.parse_prompts([prompt])
    ExtraNetworkLora().activate(p, data.get("lora", []) + data.get("lyco", []))
    assert any(tag in c and "no Lora name" in c for c in p.comments), p.comments
    assert all("<lora:" not in x and "<lyco:" not in x for x in p.prompts), p.prompts
