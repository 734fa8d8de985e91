"""Issue 13 item 3: the loaded weights live in process memory, not in a memory map of the checkpoint file; the
original-weight source only re-reads a file that is unchanged. (Truncating a loaded file is tested through the
server in test_checkpoint_server.py: on failure it ends the process with SIGBUS.)"""
import os
import shutil

import numpy as np
import pytest
import torch
from checkpoint_files import overwrite_in_place, render, tiny_sd1_ldm, write_good

from modules import mapped_memory, sd_models_diffusers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def good_files(default_models_dir, tmp_path_factory) -> dict[str, str]:
    return write_good(tiny_sd1_ldm(default_models_dir), str(tmp_path_factory.mktemp("memory-good")))


@pytest.fixture
def victim(good_files, tmp_path):
    """victim(fmt): a private copy of the good checkpoint in that format."""
    def copy(fmt: str) -> str:
        path = str(tmp_path / f"victim.{fmt}")
        shutil.copyfile(good_files[fmt], path)
        return path
    return copy


def _mapped_ranges_of(path: str) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    return [(m.start, m.end) for m in mapped_memory.file_mappings() if m.path.split(" (deleted)")[0] == real]


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "folder"])
def test_no_parameter_or_buffer_shares_memory_with_the_file(fmt, victim, default_models_dir, tmp_path):
    if fmt == "folder":
        path = str(tmp_path / "tiny-sd1")
        shutil.copytree(os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1"), path)
    else:
        path = victim(fmt)
    model = sd_models_diffusers.load(path, CPU, torch.float32)
    tensors = mapped_memory.module_tensors(model.components())
    assert len(tensors) > 500
    assert mapped_memory.file_backed_tensors(model.components()) == []
    # the same from the other side: no byte of any parameter lies in a mapping of the checkpoint's files
    files = [path] if fmt != "folder" else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    ranges = [r for f in files for r in _mapped_ranges_of(f)]
    for name, t in tensors:
        start = t.untyped_storage().data_ptr()
        end = start + t.untyped_storage().nbytes()
        assert not any(a < end and start < b for a, b in ranges), name


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_the_model_survives_its_file_rewritten_in_place_and_deleted(fmt, victim):
    path = victim(fmt)
    model = sd_models_diffusers.load(path, CPU, torch.float32)
    before = render(model)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    overwrite_in_place(path)
    assert np.array_equal(render(model), before), "rewriting the file changed the loaded model"
    os.remove(path)
    assert np.array_equal(render(model), before)
    assert all(torch.equal(v, weights[k]) for k, v in model.unet.state_dict().items())


def test_original_weights_read_only_an_unchanged_file(victim, tmp_path):
    path = victim("safetensors")
    model = sd_models_diffusers.load(path, CPU, torch.float32)
    source = model.original_weights
    key = ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    loaded = model.unet.state_dict()[key[1]]
    assert source.valid() and torch.equal(source.read(*key), loaded)

    # same inode, size and mtime, other bytes (`rsync --inplace -t`): only the change time tells
    overwrite_in_place(path, keep_times=True)
    assert not source.valid()
    assert source.read(*key) is None, "changed bytes were read as originals"
    assert source.sample(*key, 5) is None and source.read_into(*key, torch.empty_like(loaded)) is False

    # a new file put in its place (`mv new FILE`), with the old size and mtime: another inode
    fresh = victim("safetensors")
    st = os.stat(fresh)
    os.replace(fresh, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source.read(*key) is None and not source.valid()

    # the source of a fresh load reads its file; truncated, the file gives None (a short read, no SIGBUS)
    again = sd_models_diffusers.load(path, CPU, torch.float32)
    assert torch.equal(again.original_weights.read(*key), loaded)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert again.original_weights.read(*key) is None
    assert torch.equal(again.unet.state_dict()[key[1]], loaded)


@pytest.fixture
def lora_host(default_models_dir, lora_dir):
    """The Lora extension registered in this process with the demo LoRAs of the tiny SD1 model; run(model, prompt)
    renders through processing.process_images."""
    import networks

    from modules import extra_networks, processing, scripts
    from scripts.make_demo_loras import make_demo_loras

    make_demo_loras(str(lora_dir), os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1"), None)
    scripts.load_scripts()
    extra_networks.register_extra_network(networks.extra_network_lora)
    networks.list_available_networks()

    def run(sd_model, prompt: str) -> np.ndarray:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=sd_model, prompt=prompt, negative_prompt="", steps=3, width=64, height=64, seed=7,
            batch_size=1, cfg_scale=7, do_not_save_samples=True)
        return np.array(processing.process_images(p).images[0])
    return run


def test_a_lora_is_removed_exactly_when_the_file_changed_before_it_was_applied(victim, lora_host):
    """The patcher gets no original from a changed file and keeps its own restore data instead (residual/clone)."""
    from modules import sd_models

    path = victim("safetensors")
    sd_model = sd_models.load_model(sd_models.CheckpointInfo(path))
    try:
        original = {k: v.clone() for k, v in sd_model.unet.state_dict().items()}
        plain = lora_host(sd_model, "a red house")
        overwrite_in_place(path, keep_times=True)
        styled = lora_host(sd_model, "a red house <lora:demo_sd1_style:1>")
        assert not np.array_equal(plain, styled)
        assert np.array_equal(lora_host(sd_model, "a red house"), plain)
        assert [k for k, v in sd_model.unet.state_dict().items() if not torch.equal(v, original[k])] == []
    finally:
        sd_models.unload_model_weights()


def test_a_file_changed_while_a_lora_is_applied_is_not_read_back_as_originals(victim, lora_host):
    """Layers whose original was to be re-read from the file come back as W - delta (close, not bit-exact: the
    patcher logs it) instead of the file's new bytes."""
    from modules import sd_models

    path = victim("safetensors")
    sd_model = sd_models.load_model(sd_models.CheckpointInfo(path))
    try:
        original = {k: v.clone() for k, v in sd_model.unet.state_dict().items()}
        lora_host(sd_model, "a red house <lora:demo_sd1_style:1>")
        changed = [k for k, v in sd_model.unet.state_dict().items() if not torch.equal(v, original[k])]
        assert changed
        overwrite_in_place(path, keep_times=True)
        lora_host(sd_model, "a red house")
        for k, v in sd_model.unet.state_dict().items():
            scale = float(original[k].abs().max()) or 1.0
            assert float((v - original[k]).abs().max()) <= 1e-5 * scale, k
    finally:
        sd_models.unload_model_weights()
