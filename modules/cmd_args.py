"""The host's command-line flags (A1111 names where A1111 has them). Extensions add theirs in preload.py."""
import argparse
import os

from modules.paths_internal import data_path, models_path, script_path

parser = argparse.ArgumentParser(description="Lora web UI host")
parser.add_argument("--data-dir", type=str, default=os.environ.get("SD_WEBUI_DATA_DIR", script_path),
                    help="base folder for models/, outputs/, config.json and cache/")
parser.add_argument("--models-dir", type=str, default=None, help="base folder for models (default DATA_DIR/models)")
parser.add_argument("--ckpt", type=str, default=None,
                    help="checkpoint to load at start: a .safetensors/.ckpt file or a diffusers folder")
parser.add_argument("--ckpt-dir", type=str, default=None,
                    help="folder with checkpoints (default models/Stable-diffusion)")
parser.add_argument("--vae-dir", type=str, default=None, help="folder with VAE files (default models/VAE)")
parser.add_argument("--text-encoder-dir", type=str, default=None,
                    help="folder with text encoder files, e.g. clip_l, t5xxl (default models/text_encoder)")
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(data_path, "config.json"))
parser.add_argument("--port", type=int, default=7860)
parser.add_argument("--listen", action="store_true", help="bind to 0.0.0.0 instead of 127.0.0.1")
parser.add_argument("--server-name", type=str, default=None, help="address to bind to (default 127.0.0.1)")
parser.add_argument("--api", action="store_true", help="kept for A1111 compatibility: the API is always on")
parser.add_argument("--api-auth", type=str, default=None, help="user:password[,user2:password2] for /sdapi/v1/*")
parser.add_argument("--gradio-auth", type=str, default=None,
                    help="user:password[,user2:password2]: login for the whole UI (and /sdapi/v1/* without --api-auth)")
parser.add_argument("--gradio-auth-path", type=str, default=None,
                    help="file with user:password entries, comma- or newline-separated (added to --gradio-auth)")
parser.add_argument("--cors-allow-origins", type=str, default=None,
                    help="other origins allowed to use the server, comma-separated (e.g. http://127.0.0.1:8000)")
parser.add_argument("--cors-allow-origins-regex", type=str, default=None,
                    help="a regular expression for other origins allowed to use the server")
parser.add_argument("--nowebui", action="store_true", help="serve only the HTTP API")
parser.add_argument("--device", type=str, default=None, help="torch device (default: cuda when available, else cpu)")
parser.add_argument("--precision", type=str, default=None, choices=["fp32", "fp16", "bf16"],
                    help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
parser.add_argument("--no-half", action="store_true", help="same as --precision fp32")
parser.add_argument("--no-hashing", action="store_true", help="never compute sha256 of files")
parser.add_argument("--lowram", action="store_true", help="load network files straight to the device")
parser.add_argument("--skip-install", action="store_true", help="do not run install.py steps")
parser.add_argument("--skip-model-build", action="store_true", help="do not build the embedded tiny models")
parser.add_argument("--exit", action="store_true", help="run set-up, then exit without starting the UI")
parser.add_argument("--disable-model-loading-ram-optimization", action="store_true")
parser.add_argument("--disable-safe-unpickle", action="store_true",
                    help="ignored: pickles are never unpickled beyond torch.load(weights_only=True)")
parser.add_argument("--hypernetwork-dir", type=str, default=os.path.join(models_path, "hypernetworks"))
parser.add_argument("--embeddings-dir", type=str, default=os.path.join(data_path, "embeddings"))
