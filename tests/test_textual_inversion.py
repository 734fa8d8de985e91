"""Embedding words (textual inversion) on the host: files from --embeddings-dir, placed by a hook, never written."""
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modules import processing, sd_hijack, sd_models_diffusers, shared
from modules.textual_inversion import textual_inversion


@pytest.fixture(scope="module")
def models(default_models_dir):
    root = os.path.join(default_models_dir, "Stable-diffusion")
    return {f: sd_models_diffusers.load(os.path.join(root, f"tiny-{f}"), torch.device("cpu"), torch.float32)
            for f in ("sd1", "sdxl")}


@pytest.fixture
def hijack(tmp_path, monkeypatch):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    monkeypatch.setattr(shared.cmd_opts, "embeddings_dir", str(folder))
    fresh = sd_hijack.StableDiffusionModelHijack()
    monkeypatch.setattr(sd_hijack, "model_hijack", fresh)
    return fresh, folder


def _job(model, prompt: str, negative: str = ""):
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=model, prompt=prompt, negative_prompt=negative, steps=2,
                                                    width=64, height=64, seed=3, do_not_save_samples=True)
    return processing.process_images(p)


def test_a1111_embedding_file_changes_the_image_and_writes_no_weight(models, hijack):
    hijack_obj, folder = hijack
    model = models["sd1"]
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "myemb", "step": 10},
               folder / "myemb.pt")
    table_before = model.text_encoder.get_input_embeddings().weight.detach().clone()

    plain = _job(model, "a red house")
    used = _job(model, "a red house, MyEmb")
    assert not np.array_equal(np.array(plain.images[0]), np.array(used.images[0]))
    assert 'TI hashes: "myemb: ' in used.infotexts[0]
    assert "TI hashes" not in plain.infotexts[0]
    weight = model.text_encoder.get_input_embeddings().weight
    assert weight.shape == table_before.shape and torch.equal(weight, table_before)

    # the vectors land exactly where the word was, through the hook
    prompts, _ = hijack_obj.apply_embeddings(model, ["a myemb cat"], [])
    ids = model.tokenizer(prompts, return_tensors="pt").input_ids
    rows = model.text_encoder.get_input_embeddings()(ids)[0]
    assert torch.equal(rows[2], vectors[0]) and torch.equal(rows[3], vectors[1])
    assert torch.equal(rows[4], table_before[ids[0, 4]])  # "cat" is untouched
    hijack_obj.clear_embeddings(model)
    again = _job(model, "a red house")
    assert np.array_equal(np.array(plain.images[0]), np.array(again.images[0]))


def test_sdxl_embedding_needs_both_vectors(models, hijack):
    hijack_obj, folder = hijack
    model = models["sdxl"]
    save_file({"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 64)}, str(folder / "xlemb.safetensors"))
    save_file({"emb_params": torch.randn(1, 32)}, str(folder / "narrow.safetensors"))
    plain, used = _job(model, "a house"), _job(model, "a house xlemb")
    assert not np.array_equal(np.array(plain.images[0]), np.array(used.images[0]))
    narrow = _job(model, "a house narrow")  # 32 wide: kept aside, the word stays plain text
    assert "narrow" in hijack_obj.embedding_db.skipped_embeddings
    assert "TI hashes" not in narrow.infotexts[0] and 'TI hashes: "xlemb: ' in used.infotexts[0]


def test_files_that_need_unpickling_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": torch.zeros(1, 4)}, "x": Evil()}, f)
    db = textual_inversion.EmbeddingDatabase()
    assert db.load_from_file(str(path), "evil.pt") is None
    assert "weights_only" in db.errors[str(path)]
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="NaN"):
        textual_inversion.create_embedding_from_data({"emb_params": torch.tensor([[float("nan")]])}, "bad")
