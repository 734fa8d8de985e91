"""Issue 13 item 8: a folder rescan or a `lora_in_memory_limit` change never changes what a running job uses.

100 jobs on the tiny SD1 model, each with a random Lora set, run one at a time under the host's job lock (as the
UI and the API run them) while another thread adds and removes Lora files, rescans the folders and flips
`lora_in_memory_limit` between 0 and 3 in a loop. Every image must equal the same job run alone, no job may
report `Lora not found`, and neither thread may raise. The interpreter switches threads every 100 µs during the
test (instead of every 5 ms) so the interleavings that matter happen in a few seconds.
"""
import os
import random
import sys
import threading
import time

import networks
import numpy as np
import pytest

from scripts import make_demo_loras as demo

SETS = [
    (),
    (("r0", 1.0),),
    (("r1", 0.8),),
    (("r0", 0.5), ("r2", 1.0)),
    (("r1", 1.0), ("r3", 0.7)),
    (("r2", 0.6), ("r3", 1.0), ("r0", 0.4)),
]
JOBS = int(os.environ.get("EXT_JOBS", "100"))


def _lora_bytes(stem: str, shapes, structure, seed: int) -> bytes:
    tensors = demo.lora_tensors(demo.select_layers(shapes, False), "sd1", structure, rank=4, alpha=2.0, seed=seed,
                                strength=2.0)
    return demo.safetensors_bytes(tensors, demo.kohya_metadata(stem, "sd1", False, 4, 2.0, "tiny-sd1", {"x": 1}))


def _write_lora(folder, stem: str, shapes, structure, seed: int) -> None:
    with open(os.path.join(str(folder), stem + ".safetensors"), "wb") as f:
        f.write(_lora_bytes(stem, shapes, structure, seed))


@pytest.fixture
def sd1_model(default_models_dir, lora_dir):
    from modules import extra_networks, scripts, sd_models
    scripts.load_scripts()
    extra_networks.register_extra_network(networks.extra_network_lora)
    model_dir = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1")
    shapes, structure = demo.layer_shapes_from_folder(model_dir)
    for i in range(4):
        _write_lora(lora_dir, f"r{i}", shapes, structure, seed=100 + i)
    networks.list_available_networks()
    sd_model = sd_models.load_model(sd_models.CheckpointInfo(model_dir))
    try:
        yield sd_model, shapes, structure
    finally:
        networks.restore_all(sd_model)
        sd_models.unload_model_weights()


def _job(sd_model, lora_set):
    from modules import call_queue, processing
    prompt = "a red house " + " ".join(f"<lora:{name}:{w}>" for name, w in lora_set)
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=prompt, negative_prompt="", steps=1, width=32, height=32, seed=11, batch_size=1,
        cfg_scale=7, do_not_save_samples=True)
    with call_queue.queue_lock:
        processed = processing.process_images(p)
    return np.array(processed.images[0]), processed.comments


def test_rescans_and_cache_limit_changes_never_change_a_running_job(sd1_model, lora_dir):
    from modules import shared
    sd_model, shapes, structure = sd1_model
    reference = {}
    for lora_set in SETS:
        image, comments = _job(sd_model, lora_set)
        assert "Lora not found" not in comments, comments
        reference[lora_set] = image
    assert len({r.tobytes() for r in reference.values()}) == len(SETS), "each set must give its own image"

    stop = threading.Event()
    background_errors: list[BaseException] = []
    rounds = [0]

    extra = _lora_bytes("extra", shapes, structure, seed=7)

    def churn():
        i = 0
        try:
            while not stop.is_set():
                path = os.path.join(str(lora_dir), f"extra{i % 3}.safetensors")
                if os.path.exists(path):
                    os.remove(path)
                else:
                    with open(path, "wb") as f:
                        f.write(extra)
                networks.list_available_networks()  # the set of files changed: the name maps are rebuilt
                shared.opts.set("lora_in_memory_limit", 0 if i % 2 else 3)
                i += 1
                rounds[0] = i
                time.sleep(0.02)  # leaves the job thread most of the CPU
        except BaseException as e:  # noqa: BLE001 - reported by the test
            background_errors.append(e)

    old_interval = sys.getswitchinterval()
    old_limit = shared.opts.lora_in_memory_limit
    rng = random.Random(13)
    mismatches, not_found, job_errors = [], [], []
    thread = threading.Thread(target=churn, daemon=True)
    sys.setswitchinterval(1e-4)
    thread.start()
    try:
        for n in range(JOBS):
            lora_set = rng.choice(SETS)
            try:
                image, comments = _job(sd_model, lora_set)
            except Exception as e:  # noqa: BLE001 - reported by the test
                job_errors.append(f"job {n} {lora_set}: {type(e).__name__}: {e}")
                continue
            if "Lora not found" in comments or "could not be loaded" in comments:
                not_found.append(f"job {n} {lora_set}: {comments}")
            if not np.array_equal(image, reference[lora_set]):
                mismatches.append(f"job {n} {lora_set}")
    finally:
        stop.set()
        thread.join(30)
        sys.setswitchinterval(old_interval)
        shared.opts.set("lora_in_memory_limit", old_limit)
    assert rounds[0] > 10, "the rescan thread must really have run alongside the jobs"
    assert not background_errors, background_errors
    assert not job_errors, job_errors
    assert not not_found, not_found
    assert not mismatches, mismatches
