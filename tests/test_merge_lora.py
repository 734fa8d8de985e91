"""scripts/merge_lora.py as a user runs it: a subprocess on a tiny model and the demo LoRA files."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "merge_lora.py")
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # a kohya target of the demo LoRA


@pytest.fixture(scope="module")
def demo(default_models_dir, tmp_path_factory):
    from scripts.make_demo_loras import make_demo_loras

    folder = tmp_path_factory.mktemp("merge-loras")
    sd1 = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd1")
    sdxl = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sdxl")
    make_demo_loras(str(folder), sd1, sdxl)
    return {"sd1": sd1, "lora_dir": str(folder), "out": str(tmp_path_factory.mktemp("merged"))}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_ARGS", "SD_WEBUI_DATA_DIR")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_merge_writes_every_parameter_with_the_lora_formula(demo):
    out = os.path.join(demo["out"], "merged.safetensors")
    result = _run("--model", demo["sd1"], "--lora-dir", demo["lora_dir"], "--prompt",
                  "<lora:demo_sd1_style:0.8> <lora:demo_locon:1:0.5>", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "demo_sd1_style: 144 layers matched, 0 keys unmatched" in result.stdout
    assert "demo_locon: " in result.stdout

    merged = load_file(out)
    unet = load_file(os.path.join(demo["sd1"], "unet", "diffusion_pytorch_model.safetensors"))
    text = load_file(os.path.join(demo["sd1"], "text_encoder", "model.safetensors"))
    assert set(merged) == {f"unet.{k}" for k in unet} | {f"text_encoder.{k}" for k in text}
    assert all(v.dtype == torch.float32 for v in merged.values())

    # ΔW = Σ m · alpha/rank · up·down over both files (unet multipliers 0.8 and 0.5)
    expected = unet[f"{LAYER}.weight"].clone()
    base = "lora_unet_" + LAYER.replace(".", "_")
    files = (("demo_sd1_style.safetensors", 0.8), (os.path.join("locon", "demo_sd1_locon.safetensors"), 0.5))
    for filename, multiplier in files:
        lora = load_file(os.path.join(demo["lora_dir"], filename))
        up, down = lora[f"{base}.lora_up.weight"].float(), lora[f"{base}.lora_down.weight"].float()
        expected += multiplier * float(lora[f"{base}.alpha"]) / down.shape[0] * (up @ down)
    torch.testing.assert_close(merged[f"unet.{LAYER}.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["unet.conv_in.weight"], unet["conv_in.weight"]), "an untargeted layer changed"
    with safe_open(out, "pt") as f:
        assert "<lora:demo_sd1_style:0.8>" in f.metadata()["merged_prompt"]


def test_dtype_override(demo):
    out = os.path.join(demo["out"], "merged-bf16.safetensors")
    result = _run("--model", demo["sd1"], "--lora-dir", demo["lora_dir"], "--prompt", "<lora:demo_sd1_style>",
                  "--out", out, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert {v.dtype for v in load_file(out).values()} == {torch.bfloat16}


@pytest.mark.parametrize("prompt,message", [
    ("<lora:no_such_lora:1>", "Lora not found: no_such_lora"),
    ("<lora:demo_sd1_style:abc>", "Bad Lora tag <lora:demo_sd1_style:abc>"),
    ("just words", "holds no <lora:...> tag"),
    ("<lora:demo_sdxl_style:1>", "demo_sdxl_style"),  # an SDXL LoRA on the SD1 model
])
def test_bad_input_fails_with_a_message_and_writes_nothing(demo, prompt, message):
    out = os.path.join(demo["out"], "never.safetensors")
    result = _run("--model", demo["sd1"], "--lora-dir", demo["lora_dir"], "--prompt", prompt, "--out", out)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert not os.path.exists(out)


def test_missing_model_fails(demo, tmp_path):
    result = _run("--model", str(tmp_path / "nope"), "--lora-dir", demo["lora_dir"], "--prompt", "<lora:x>",
                  "--out", str(tmp_path / "o.safetensors"))
    assert result.returncode == 1 and "no such file or folder" in result.stderr
