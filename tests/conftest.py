"""Shared test set-up. Sections are owned by topic; keep edits additive.

`modules.shared` parses flags once, at first import: under pytest it takes the data folder from
SD_WEBUI_DATA_DIR and extra flags from SD_WEBUI_ARGS, so both are set here before anything imports it.
"""
import os
import sys
import tempfile

# --- base set-up (host) ---
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
LORA_EXT_DIR = os.path.join(ROOT, "extensions-builtin", "Lora")
if LORA_EXT_DIR not in sys.path:
    sys.path.append(LORA_EXT_DIR)

TEST_DATA_DIR = os.environ.get("SD_WEBUI_TEST_DATA_DIR") or tempfile.mkdtemp(prefix="lora-webui-test-")
os.environ["SD_WEBUI_DATA_DIR"] = TEST_DATA_DIR
os.environ.setdefault("SD_WEBUI_ARGS", f"--lora-dir {os.path.join(TEST_DATA_DIR, 'models', 'Lora')}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ARTIFACTS_DIR = os.path.join(ROOT, "test-artifacts")
