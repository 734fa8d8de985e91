"""Embeddings bundled in a Lora file (`bundle_emb.*`): a word in the prompt while that Lora is active, not after."""
import os

import networks
import numpy as np
import pytest
import torch

from modules import extra_networks, processing, sd_hijack, sd_models_diffusers, shared


@pytest.fixture(scope="module")
def sd1(default_models_dir):
    return sd_models_diffusers.load(os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1"),
                                    torch.device("cpu"), torch.float32)


@pytest.fixture
def embeddings_dir(tmp_path, monkeypatch):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    monkeypatch.setattr(shared.cmd_opts, "embeddings_dir", str(folder))
    monkeypatch.setattr(sd_hijack, "model_hijack", sd_hijack.StableDiffusionModelHijack())
    return folder


def _job(model, prompt: str):
    extra_networks.register_extra_network(networks.extra_network_lora or _handler())
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=model, prompt=prompt, steps=2, width=64, height=64,
                                                    seed=11, do_not_save_samples=True)
    return processing.process_images(p)


def _handler():
    import extra_networks_lora
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    return networks.extra_network_lora


def test_bundled_word_works_only_with_its_lora(sd1, write_lora, embeddings_dir):
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
               "bundle_emb.zorbword.string_to_param.*": vectors}
    write_lora("bundled", tensors=tensors, metadata={"ss_output_name": "bundled"})

    without = _job(sd1, "a zorbword house")
    with_lora = _job(sd1, "a zorbword house <lora:bundled:1>")
    assert 'TI hashes: "zorbword: bundled"' in with_lora.infotexts[0], with_lora.infotexts[0]
    # the Lora's own layers are zero: any change comes from the word
    assert not np.array_equal(np.array(without.images[0]), np.array(with_lora.images[0]))
    after = _job(sd1, "a zorbword house")
    assert np.array_equal(np.array(without.images[0]), np.array(after.images[0]))
    assert "zorbword" not in sd_hijack.model_hijack.embedding_db.word_embeddings

    # an embeddings-folder file of the same name wins, with a message
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}}, embeddings_dir / "zorbword.pt")
    clash = _job(sd1, "a zorbword house <lora:bundled:1>")
    assert any("Skip bundle embedding" in c for c in clash.comments.split("\n")), clash.comments
    assert 'TI hashes: "zorbword: ' in clash.infotexts[0] and "zorbword: bundled" not in clash.infotexts[0]
    networks.loaded_networks.clear()
