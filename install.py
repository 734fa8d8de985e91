"""Set-up, run by webui.sh and run_tests.sh inside the venv: pinned packages, then the embedded models.

Each step is skipped when already done, so a second start costs a stat or two.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
OPEN_CLIP_PIN = "open_clip_torch==3.3.0"  # only for its CLIP BPE vocabulary file; installed without deps
SDKIT_PIN = "stable-diffusion-sdkit==2.1.5"  # tests only: the original `ldm` code for compvis-layout models; no deps


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def _requirements_digest(files: list[str]) -> str:
    h = hashlib.sha256((OPEN_CLIP_PIN + SDKIT_PIN).encode())
    for name in files:
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_packages(with_tests: bool) -> None:
    files = ["requirements.txt"] + (["requirements_test.txt"] if with_tests else [])
    stamp = os.path.join(sys.prefix, ".lora-webui-install-" + ("test" if with_tests else "run"))
    digest = _requirements_digest(files)
    if os.path.exists(stamp) and open(stamp).read() == digest:
        return
    # torch first, from the pinned CPU wheel, so nothing else pulls a CUDA build; never torchvision.
    _pip("torch==2.13.0")
    for name in files:
        _pip("-r", os.path.join(ROOT, name))
    _pip("--no-deps", OPEN_CLIP_PIN)
    if with_tests:
        _pip("--no-deps", SDKIT_PIN)
    with open(stamp, "w") as f:
        f.write(digest)


MODEL_SOURCES = ("modules/default_models.py", "modules/default_models_dit.py", "modules/t5_tokenizer.py",
                 "scripts/make_demo_loras.py")


def _models_stamp(models_path: str) -> tuple[str, str]:
    """(stamp file, digest of the code that builds the models): equal digests mean the models are current."""
    h = hashlib.sha256()
    for name in MODEL_SOURCES:
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    return os.path.join(models_path, ".install-models"), h.hexdigest()


def ensure_models(data_dir: str) -> None:
    """Builds the tiny default checkpoints and the demo LoRAs when missing (a stamp check first: no torch import)."""
    models_path = os.path.join(data_dir, "models")
    stamp, digest = _models_stamp(models_path)
    try:
        with open(stamp, encoding="utf8") as f:
            recorded = json.load(f)
        if recorded.get("digest") == digest and all(os.path.exists(p) for p in recorded.get("paths", [])):
            return
    except (OSError, ValueError):
        pass
    sys.path.insert(0, ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modules.default_models import ensure_default_models
    from scripts.make_demo_loras import make_demo_loras

    folders = ensure_default_models(models_path)
    sd1_dir, sdxl_dir = folders[:2]
    loras = make_demo_loras(os.path.join(models_path, "Lora"), sd1_dir, sdxl_dir)
    with open(stamp, "w", encoding="utf8") as f:  # only the models must exist: a deleted demo LoRA stays deleted
        json.dump({"digest": digest, "paths": list(folders), "demo_loras": loras}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests", action="store_true", help="also install the test-only packages")
    parser.add_argument("--data-dir", default=os.environ.get("SD_WEBUI_DATA_DIR", ROOT))
    parser.add_argument("--skip-models", action="store_true")
    args, _ = parser.parse_known_args()
    ensure_packages(args.tests)
    if not args.skip_models:
        ensure_models(os.path.abspath(args.data_dir))


if __name__ == "__main__":
    main()
