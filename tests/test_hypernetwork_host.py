"""Hypernetworks in the host: the tag on a job's model (diffusers UNet and the original ldm UNet), infotext paste,
and the Hypernetworks card page."""
import copy
import json
import os
import types

import pytest
import torch

from modules import extra_networks, hashes, infotext_utils, script_callbacks, shared, ui_extra_networks
from modules.extra_networks_hypernet import ExtraNetworkHypernet, infotext_pasted
from modules.hypernetworks import hypernetwork as hn

pytestmark = pytest.mark.usefixtures("hypernetwork_dir")  # conftest: a private folder, state reset


def _job(prompt: str, sd_model=None):
    from modules.processing import StableDiffusionProcessingTxt2Img

    p = StableDiffusionProcessingTxt2Img(prompt=prompt, sd_model=sd_model)
    p.all_prompts = [prompt]
    return p


def _activate(p) -> ExtraNetworkHypernet:
    _, data = extra_networks.parse_prompt(p.all_prompts[0])
    handler = ExtraNetworkHypernet()
    handler.activate(p, data["hypernet"])
    return handler


def _composed_reference(unet: torch.nn.Module, hypernetwork: hn.Hypernetwork) -> torch.nn.Module:
    """An independent reference: a copy of the UNet whose to_k/to_v are `Sequential(mlp, to_k)` for every
    attention layer whose context width has a pair (module composition, no hooks)."""
    ref = copy.deepcopy(unet)
    for layer in ref.modules():
        to_k, to_v = getattr(layer, "to_k", None), getattr(layer, "to_v", None)
        if not isinstance(to_k, torch.nn.Linear) or not isinstance(to_v, torch.nn.Linear):
            continue
        pair = hypernetwork.layers.get(to_k.in_features)
        if pair is not None:
            layer.to_k = torch.nn.Sequential(pair[0], to_k)
            layer.to_v = torch.nn.Sequential(pair[1], to_v)
    return ref


def _save_random(name: str, sizes, seed: int) -> str:
    torch.manual_seed(seed)
    h = hn.Hypernetwork(name=name, enable_sizes=sizes, layer_structure=[1, 2, 1], activation_func="relu",
                        weight_init="XavierNormal")
    path = os.path.join(shared.cmd_opts.hypernetwork_dir, f"{name}.pt")
    h.save(path)
    return path


def test_a_job_on_the_diffusers_host_hooks_the_unet_and_matches_the_composed_reference(tiny_sd1):
    unet = tiny_sd1.unet
    widths = hn.attention_context_widths(tiny_sd1)
    assert widths == [8, 16]  # self-attention at the block width 8, cross-attention on the 16-wide text context
    _save_random("style", widths, seed=1)
    torch.manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=context).sample

        p = _job("a cat <hypernet:style:0.8>", sd_model=tiny_sd1)
        handler = _activate(p)
        (loaded,) = shared.loaded_hypernetworks
        assert loaded.multiplier == 0.8
        hooked = unet(sample, 10, encoder_hidden_states=context).sample
        reference = _composed_reference(unet, loaded)
        reference_modules = [m for m in reference.modules() if isinstance(m, torch.nn.Sequential) and
                             isinstance(m[0], hn.HypernetworkModule)]
        hn.remove_hypernetwork_hooks(reference)
        expected = reference(sample, 10, encoder_hidden_states=context).sample

        handler.deactivate(p)
        after = unet(sample, 10, encoder_hidden_states=context).sample
    assert len(reference_modules) == 2 * len([m for m in unet.modules() if hasattr(m, "to_k")])
    assert not torch.allclose(hooked, plain, atol=1e-4)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert torch.equal(after, plain)  # the job ended: the hooks are idle again
    assert p.extra_generation_params["Hypernet hashes"].startswith("style: ")


def test_the_original_ldm_unet_is_hooked_through_model_diffusion_model():
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                     context_dim=16, transformer_depth=1, legacy=False).eval()
    with torch.no_grad():
        for param in unet.parameters():  # ldm zero-initialises output layers: the UNet would answer zeros
            if not param.any():
                param.normal_(0, 0.2)
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    assert hn.attention_context_widths(sd_model) == [16, 32, 64]
    assert any(isinstance(m, CrossAttention) for m in unet.modules())
    _save_random("ldm_style", [16, 32, 64], seed=2)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with torch.no_grad():
        plain = unet(x, t, context=context)
        p = _job("<hypernet:ldm_style>", sd_model=sd_model)
        handler = _activate(p)
        (loaded,) = shared.loaded_hypernetworks
        hooked = unet(x, t, context=context)
        reference = _composed_reference(unet, loaded)
        hn.remove_hypernetwork_hooks(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=reference)))
        expected = reference(x, t, context=context)
        handler.deactivate(p)
    assert not torch.allclose(hooked, plain, atol=1e-4)
    assert torch.allclose(hooked, expected, atol=1e-5)


def test_several_tags_chain_in_prompt_order_on_the_model(tiny_sd1):
    _save_random("first", [8, 16], seed=3)
    _save_random("second", [16], seed=4)
    unet = tiny_sd1.unet
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    with torch.no_grad():
        outputs = {}
        for prompt in ("<hypernet:first:1> <hypernet:second:0.5>", "<hypernet:second:0.5> <hypernet:first:1>"):
            p = _job(prompt, sd_model=tiny_sd1)
            handler = _activate(p)
            names = [h.name for h in shared.loaded_hypernetworks]
            outputs[tuple(names)] = unet(sample, 10, encoder_hidden_states=context).sample
            handler.deactivate(p)
        first, second = hn.load_hypernetwork("first"), hn.load_hypernetwork("second").set_multiplier(0.5)
        ck, cv = hn.apply_hypernetworks([first.set_multiplier(1.0), second], context)
        assert torch.allclose(ck, second.layers[16][0](first.layers[16][0](context)))
    assert set(outputs) == {("first", "second"), ("second", "first")}
    assert not torch.allclose(outputs[("first", "second")], outputs[("second", "first")], atol=1e-5)


# --- infotext paste ---

def _paste(infotext: str) -> dict:
    ExtraNetworkHypernet()  # creating the handler registers the paste callback (once)
    d = infotext_utils.parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, d)
    return d


def test_paste_turns_old_hypernet_fields_into_a_tag():
    _save_random("anime_style_v2", [8], seed=5)
    hn.refresh_hypernetworks()
    d = _paste("a girl\nSteps: 20, Sampler: Euler a, Hypernet: anime_style_v2, Hypernet strength: 0.6, Seed: 1")
    assert d["Prompt"] == "a girl<hypernet:anime_style_v2:0.6>"
    # an old name that is part of a local one maps to it (A1111's closest match); no strength means 1.0
    d = _paste("a girl\nSteps: 20, Sampler: Euler a, Hypernet: anime_style, Seed: 1")
    assert d["Prompt"] == "a girl<hypernet:anime_style_v2:1.0>"
    # a tag already in the prompt is not added twice
    d = _paste("x <hypernet:anime_style_v2:0.3>\nSteps: 20, Sampler: Euler a, Hypernet: anime_style_v2, Seed: 1")
    assert d["Prompt"] == "x <hypernet:anime_style_v2:0.3>"
    assert sum(cb.callback is infotext_pasted for cb in script_callbacks.callback_map["callbacks_infotext_pasted"]) == 1


def test_paste_repoints_tags_by_hypernet_hashes():
    path = _save_random("renamed_locally", [8], seed=6)
    hn.refresh_hypernetworks()
    shorthash = hashes.sha256(path, "hypernet/renamed_locally")[0:10]
    d = _paste(f"a <hypernet:original:0.7> b <hypernet:other:1>\nSteps: 20, Sampler: Euler a, Seed: 1, "
               f"Hypernet hashes: \"original: {shorthash}, other: 0123456789\"")
    assert d["Prompt"] == "a <hypernet:renamed_locally:0.7> b <hypernet:other:1>"


def test_infotext_of_a_job_pastes_back_to_the_same_tag(tiny_sd1):
    _save_random("roundtrip", [16], seed=7)
    p = _job("a dog <hypernet:roundtrip:0.9>", sd_model=tiny_sd1)
    handler = _activate(p)
    handler.deactivate(p)
    infotext = infotext_utils.build_infotext(p.all_prompts[0], "", {"Steps": 20, "Sampler": "Euler a",
                                                                     **p.extra_generation_params})
    shutil_target = os.path.join(shared.cmd_opts.hypernetwork_dir, "roundtrip.pt")
    os.rename(shutil_target, os.path.join(shared.cmd_opts.hypernetwork_dir, "kept_under_new_name.pt"))
    hn.refresh_hypernetworks()
    assert _paste(infotext)["Prompt"] == "a dog <hypernet:kept_under_new_name:0.9>"


# --- the card page ---

def test_hypernetworks_card_page(hypernetwork_dir):
    from modules.ui_extra_networks_hypernets import ExtraNetworksPageHypernetworks

    (hypernetwork_dir / "styles").mkdir()
    path = _save_random("ink", [8], seed=8)
    nested = hn.create_hypernetwork("styles/plain", [8])  # the name is sanitised: "stylesplain" at the top
    os.replace(nested, hypernetwork_dir / "styles" / "watercolour.pt")
    (hypernetwork_dir / "ink.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (hypernetwork_dir / "ink.txt").write_text("inky lines")

    page = ExtraNetworksPageHypernetworks()
    items = {item["name"]: item for item in page.list_items()}
    assert list(items) == ["ink", "watercolour"]
    ink = items["ink"]
    assert ink["filename"] == path and ink["description"] == "inky lines"
    assert ink["preview"].startswith("./sd_extra_networks/thumb?filename=") and "ink.preview.png" in ink["preview"]
    assert ui_extra_networks.prompt_parts_from_js(ink["prompt"]) == [
        {"text": "<hypernet:ink:"}, {"opt": "extra_networks_default_multiplier"}, {"text": ">"}]
    assert items["watercolour"]["search_terms"] == ["hypernetworks/styles/watercolour.pt"]
    assert page.allowed_directories_for_previews() == [str(hypernetwork_dir)]

    sha256 = hashes.sha256(path, "hypernet/ink")  # once hashed, the hash finds the card too
    assert sha256 in page.create_item("ink")["search_terms"]

    payload = json.loads(page.cards_json("txt2img")[0])
    card = next(c for c in payload["items"] if c["name"] == "ink")
    assert card["prompt"] == ["<hypernet:ink:", {"opt": "extra_networks_default_multiplier"}, ">"]
    (hypernetwork_dir / "late.pt").write_bytes(b"")
    page.do_refresh()
    assert "late" in [c["name"] for c in json.loads(page.cards_json("txt2img")[0])["items"]]


def test_the_page_is_a_default_page():
    from modules.ui_extra_networks_hypernets import ExtraNetworksPageHypernetworks

    saved = list(ui_extra_networks.extra_pages)
    try:
        ui_extra_networks.initialize()
        ui_extra_networks.register_default_pages()
        assert [type(p) for p in ui_extra_networks.extra_pages] == [ExtraNetworksPageHypernetworks]
        assert ui_extra_networks.get_page("hypernetworks").title == "Hypernetworks"
    finally:
        ui_extra_networks.extra_pages[:] = saved
