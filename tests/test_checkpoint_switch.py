"""Issue 13 item 4, in process: a checkpoint switch is all or nothing (sd_models.load_model). The HTTP API, the UI
and the listing are tested through a server in test_checkpoint_server.py."""
import os
import shutil

import numpy as np
import pytest
from checkpoint_files import BAD_FILES, overwrite_in_place, render, tiny_sd1_ldm, truncate, write_bad, write_good

from modules import sd_models, sd_models_diffusers, shared


@pytest.fixture(scope="module")
def files(default_models_dir, tmp_path_factory) -> dict[str, str]:
    ldm = tiny_sd1_ldm(default_models_dir)
    folder = str(tmp_path_factory.mktemp("switch-files"))
    return {**write_good(ldm, folder), **write_bad(ldm, folder)}


@pytest.fixture
def loaded(files, tmp_path):
    """A private copy of the good checkpoint, loaded the way the UI loads one; (model, info, its first image)."""
    path = str(tmp_path / "current.safetensors")
    shutil.copyfile(files["safetensors"], path)
    saved = shared.opts.data.get("sd_model_checkpoint")
    info = sd_models.CheckpointInfo(path)
    model = sd_models.load_model(info)
    yield model, info, render(model)
    sd_models.unload_model_weights()
    shared.opts.data["sd_model_checkpoint"] = saved


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_checkpoint_leaves_the_loaded_model_loaded_and_selected(name, files, loaded):
    model, info, image = loaded
    bad = files[name]
    with pytest.raises(sd_models.CheckpointLoadError) as caught:
        sd_models.load_model(sd_models.CheckpointInfo(bad))
    message = str(caught.value)
    assert bad in message and BAD_FILES[name] in message and f"{info.title} stays loaded" in message, message
    assert caught.value.bad_file
    assert sd_models.model_data.sd_model is model, "the loaded model was given up for a file that cannot load"
    assert shared.opts.data["sd_model_checkpoint"] == info.title
    assert np.array_equal(render(shared.sd_model), image)


def _cut_after_check(monkeypatch, victim: str) -> None:
    """Another process truncates `victim` after its check passed and before its weights are read."""
    real_prepare = sd_models_diffusers.prepare

    def prepare(filename, *args, **kwargs):
        prepared = real_prepare(filename, *args, **kwargs)
        if filename == victim:
            truncate(victim)
        return prepared

    monkeypatch.setattr(sd_models_diffusers, "prepare", prepare)


def test_a_switch_that_fails_while_reading_loads_the_previous_model_back(files, loaded, tmp_path, monkeypatch):
    model, info, image = loaded
    victim = str(tmp_path / "cut.safetensors")
    shutil.copyfile(files["safetensors"], victim)
    _cut_after_check(monkeypatch, victim)
    with pytest.raises(sd_models.CheckpointLoadError) as caught:
        sd_models.load_model(sd_models.CheckpointInfo(victim))
    assert victim in str(caught.value) and "truncated" in str(caught.value), str(caught.value)
    assert f"{info.title} stays loaded" in str(caught.value)
    again = sd_models.model_data.sd_model
    assert again is not None and again.sd_checkpoint_info is info  # freed for the switch, then loaded back
    assert shared.opts.data["sd_model_checkpoint"] == info.title
    assert np.array_equal(render(again), image)


def test_a_previous_model_that_cannot_be_loaded_again_is_kept_through_a_failed_switch(files, loaded, tmp_path,
                                                                                      monkeypatch):
    model, info, image = loaded
    overwrite_in_place(info.filename)  # its file is not the model any more: freeing it would lose it
    victim = str(tmp_path / "cut.safetensors")
    shutil.copyfile(files["safetensors"], victim)
    _cut_after_check(monkeypatch, victim)
    with pytest.raises(sd_models.CheckpointLoadError):
        sd_models.load_model(sd_models.CheckpointInfo(victim))
    assert sd_models.model_data.sd_model is model
    assert shared.opts.data["sd_model_checkpoint"] == info.title
    assert np.array_equal(render(model), image)


def test_a_good_switch_replaces_the_model(files, loaded):
    model, info, image = loaded
    other = sd_models.CheckpointInfo(files["ckpt"])
    new = sd_models.load_model(other)
    assert new is not model and sd_models.model_data.sd_model is new
    assert shared.opts.data["sd_model_checkpoint"] == other.title
    assert np.array_equal(render(new), image)  # the same weights in the other format
    assert os.path.exists(info.filename)
