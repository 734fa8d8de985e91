"""The in-process API as in A1111 (README): load a checkpoint through modules.sd_models, then process_images."""
import os
import re

import networks
import numpy as np
import torch


def test_load_model_then_process_images_with_a_lora(default_models_dir, lora_dir):
    from modules import extra_networks, processing, scripts, sd_models
    from scripts.make_demo_loras import make_demo_loras

    sd1 = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1")
    make_demo_loras(str(lora_dir), sd1, None)
    scripts.load_scripts()  # the Lora extension: <lora:...> handler, model-loaded callback
    extra_networks.register_extra_network(networks.extra_network_lora)
    networks.list_available_networks()

    sd_model = sd_models.load_model(sd_models.CheckpointInfo(sd1))
    try:
        original = {k: v.clone() for k, v in sd_model.unet.state_dict().items()}

        def run(prompt: str):
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=sd_model, prompt=prompt, negative_prompt="<lora:demo_sd1_style:1> ugly", steps=3, width=64,
                height=64, seed=7, batch_size=1, cfg_scale=7, do_not_save_samples=True)
            return processing.process_images(p)

        plain = run("a red house")
        styled = run("a red house <lora:demo_sd1_style:0.9> <lora:missing_one:1>")
        assert re.search(r'Lora hashes: "demo_sd1_style: [0-9a-f]{12}"', styled.infotexts[0]), styled.infotexts[0]
        assert "Lora not found: missing_one" in styled.comments
        assert "negative prompt are ignored" in styled.comments
        assert not np.array_equal(np.array(plain.images[0]), np.array(styled.images[0]))
        assert any(not torch.equal(v, original[k]) for k, v in sd_model.unet.state_dict().items())

        again = run("a red house")
        assert np.array_equal(np.array(plain.images[0]), np.array(again.images[0]))
        assert all(torch.equal(v, original[k]) for k, v in sd_model.unet.state_dict().items())
    finally:
        sd_models.unload_model_weights()
