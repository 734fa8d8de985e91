"""The Lora card page against A1111's gradio 3.41.2: page registration, card data, editor routes, page scripts.

    venv/bin/python scripts/gradio3_smoke.py build           # makes .venv-gradio3 (pinned, see PINS; minutes)
    venv/bin/python scripts/gradio3_smoke.py check           # runs the checks in that venv (seconds)
    .venv-gradio3/bin/python scripts/gradio3_smoke.py serve --port N --data-dir DIR   # a gradio 3 page

Our host runs gradio 6; the extension's UI code and the card framework must also work where A1111 runs gradio
3.41.2. `check` builds a gradio 3 Blocks page with a prompt box and the extension's Lora page inside
`txt2img_extra_tabs`, mounts it on FastAPI with the card routes and the page scripts, and checks over HTTP:
the page and its config hold the card pane, the scripts are served, the card data lists the LoRAs, the editor
reads and writes the sidecar (and refuses a write without the page header), single-card refresh, metadata,
previews. `serve` runs the same page for tests/test_gradio3_smoke.py, which drives it in Chromium.

The venv is `.venv-gradio3` in the repository (LORA_GRADIO3_VENV overrides). Pins: gradio==3.41.2,
fastapi==0.94.0, httpx==0.24.1, huggingface_hub<1, diffusers==0.37.1, transformers==4.57.6, torch==2.13.0
first (the local CPU wheel), open_clip_torch --no-deps; never torchvision.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("LORA_GRADIO3_VENV") or os.path.join(ROOT, ".venv-gradio3")
PINS = ["gradio==3.41.2", "fastapi==0.94.0", "httpx==0.24.1", "huggingface_hub<1", "diffusers==0.37.1",
        "transformers==4.57.6", "safetensors==0.8.0", "pillow", "numpy<2"]
STAMP = ".lora-gradio3-smoke"


def venv_python(venv: str = VENV) -> str:
    return os.path.join(venv, "bin", "python")


def venv_ready(venv: str = VENV) -> bool:
    """Built by `build` (its stamp), or any venv LORA_GRADIO3_VENV names (`check` verifies its gradio)."""
    if not os.path.isfile(venv_python(venv)):
        return False
    return os.path.isfile(os.path.join(venv, STAMP)) or bool(os.environ.get("LORA_GRADIO3_VENV"))


# --- build --------------------------------------------------------------------------------------------------------
def build(venv: str = VENV) -> None:
    def pip(*args: str) -> None:
        cmd = [venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
        print("+", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)

    if venv_ready(venv):
        print(f"{venv} is ready")
        return
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip("torch==2.13.0")  # first, from the local CPU wheel, so nothing pulls a CUDA build
    pip(*PINS)
    pip("--no-deps", "open_clip_torch==3.3.0")
    with open(os.path.join(venv, STAMP), "w") as f:
        f.write("\n".join(PINS))
    print(f"{venv} is ready")


# --- test data ----------------------------------------------------------------------------------------------------
def tiny_lora(metadata: dict) -> bytes:
    """A valid safetensors file with one rank-1 LoRA pair (no torch needed)."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": [1, 8], f"{key}.lora_up.weight": [8, 1]}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 32]}
        offset += 32
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(range(offset))


PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d4944415478da636060f80f0000010401005f0d9d0c0000000049454e44ae426082")


def make_data(data_dir: str) -> None:
    lora_dir = os.path.join(data_dir, "models", "Lora")
    os.makedirs(os.path.join(lora_dir, "sub"), exist_ok=True)
    with open(os.path.join(lora_dir, "g3_style.safetensors"), "wb") as f:
        f.write(tiny_lora({"ss_output_name": "g3_style", "ss_base_model_version": "sd_v1",
                           "ss_tag_frequency": json.dumps({"1_x": {"red": 3, "blue": 1}})}))
    with open(os.path.join(lora_dir, "g3_style.preview.png"), "wb") as f:
        f.write(PNG_1PX)
    with open(os.path.join(lora_dir, "g3_style.json"), "w", encoding="utf8") as f:
        json.dump({"activation text": "g3 words", "preferred weight": 0.7, "other": 1}, f)
    with open(os.path.join(lora_dir, "sub", "g3_other.safetensors"), "wb") as f:
        f.write(tiny_lora({"ss_output_name": "g3_other"}))


# --- the gradio 3 page (inside the gradio 3 venv) ----------------------------------------------------------------
def setup_host(data_dir: str) -> None:
    sys.path.insert(0, ROOT)
    sys.path.append(os.path.join(ROOT, "extensions-builtin", "Lora"))
    os.environ["SD_WEBUI_DATA_DIR"] = data_dir
    sys.argv = [sys.argv[0], "--data-dir", data_dir, "--lora-dir", os.path.join(data_dir, "models", "Lora"),
                "--no-hashing"]
    from modules import extra_networks, scripts
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
    scripts.load_scripts()


def create_app():
    """A gradio 3 page shaped like A1111's txt2img: prompt boxes, an echo of what gradio holds, the card pages."""
    import gradio as gr
    from fastapi import FastAPI

    from modules import script_callbacks, ui, ui_extra_networks

    ui_extra_networks.initialize()
    script_callbacks.before_ui_callback()
    with gr.Blocks(css=ui.css(), analytics_enabled=False) as demo:
        prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
        negative = gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt", lines=2)
        echo = gr.Textbox(label="What gradio holds", elem_id="smoke_echo")
        button = gr.Button("Echo", elem_id="smoke_echo_button")
        with gr.Tabs(elem_id="txt2img_extra_tabs"):
            with gr.Tab("Generation", elem_id="txt2img_generation_tab"):
                gr.HTML("settings would be here")
            pages = ui_extra_networks.create_ui("txt2img")
        button.click(fn=lambda p, n: f"{p} || {n}", inputs=[prompt, negative], outputs=[echo])
    assert pages and pages[0][0].name == "lora", "the Lora page was not registered"

    # gradio 3 has no `head=`: add the page scripts to its HTML the way A1111 does (modules/ui_gradio_extensions).
    import gradio.routes
    head = ui.head_html()
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", f"{head}</head>".encode("utf8"))
        response.init_headers()
        return response

    gradio.routes.templates.TemplateResponse = template_response
    app = FastAPI()
    app = gr.mount_gradio_app(app, demo, path="/")
    ui.setup_ui_api(demo, app)
    return app


def run_checks() -> list[str]:
    import gradio as gr
    from fastapi.testclient import TestClient

    assert gr.__version__ == "3.41.2", gr.__version__
    client = TestClient(create_app())
    done = []

    def check(name: str, condition: bool, detail: object = "") -> None:
        if not condition:
            raise AssertionError(f"{name}: {detail}")
        done.append(name)

    page = client.get("/")
    check("page served", page.status_code == 200, page.status_code)
    check("page scripts in the page", "extraNetworks.js" in page.text and "webui.js" in page.text)
    script = page.text.split('src="/webui-assets/')[1].split('"')[0]
    asset = client.get("/webui-assets/" + script)
    check("page script served", asset.status_code == 200 and "function" in asset.text, asset.status_code)
    config = client.get("/config").json()
    html_values = [c.get("props", {}).get("value", "") for c in config["components"]]
    check("card pane in the gradio 3 config", any("extra-network-pane" in str(v) for v in html_values))
    check("Lora tab in the config", any(c.get("props", {}).get("elem_id") == "txt2img_lora"
                                        for c in config["components"]))
    query = {"page": "lora", "tabname": "txt2img"}
    cards = client.get("/sd_extra_networks/cards", params=query).json()
    names = sorted(c["name"] for c in cards["items"])
    check("card data lists the LoRAs", names == ["g3_other", "g3_style"], names)
    style = next(c for c in cards["items"] if c["name"] == "g3_style")
    check("card prompt parts", style["prompt"] == ["<lora:g3_style:", "0.7", ">", " g3 words"], style["prompt"])
    preview = client.get(style["preview"].lstrip("."))
    check("preview served", preview.status_code == 200 and preview.content == PNG_1PX, preview.status_code)
    editor = client.get("/sd_extra_networks/user-metadata", params={**query, "name": "g3_style"}).json()
    check("editor fields", [f["key"] for f in editor["fields"]][:3] == ["description", "sd version",
                                                                       "activation text"], editor.get("fields"))
    check("editor tags", editor["tags"] == [["red", 3], ["blue", 1]], editor.get("tags"))
    refused = client.post("/sd_extra_networks/user-metadata", params={**query, "name": "g3_style"},
                          json={"notes": "x"})
    check("editor write needs the page header", refused.status_code == 403, refused.status_code)
    saved = client.post("/sd_extra_networks/user-metadata", params={**query, "name": "g3_style"},
                        json={"notes": "from gradio 3"}, headers={"X-Webui-Request": "1"})
    check("editor saves", saved.status_code == 200, saved.text)
    from modules import shared
    with open(os.path.join(shared.cmd_opts.lora_dir, "g3_style.json"), encoding="utf8") as f:
        sidecar = json.load(f)
    check("sidecar keeps other keys", sidecar["other"] == 1 and sidecar["notes"] == "from gradio 3", sidecar)
    single = client.get("/sd_extra_networks/get-single-card", params={**query, "name": "g3_style"}).json()
    check("single card", single["item"]["name"] == "g3_style", single)
    meta = client.get("/sd_extra_networks/metadata", params={"page": "lora", "item": "g3_style"}).json()
    check("metadata", "ss_output_name" in json.loads(meta["metadata"]), meta)
    status = client.get("/sd_extra_networks/background-status", params={"page": "lora"}).json()
    check("background status", status["status"]["label"] == "Hashing", status)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("command", choices=["build", "check", "serve"])
    parser.add_argument("--port", type=int, default=7880)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.command == "build":
        build()
        return 0
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(VENV)
    if not in_venv:  # run ourselves with the gradio 3 venv's python
        if not venv_ready():
            print(f"{VENV} is not built: run `venv/bin/python scripts/gradio3_smoke.py build` first", file=sys.stderr)
            return 2
        return subprocess.run([venv_python(), os.path.abspath(__file__), *sys.argv[1:]]).returncode
    data_dir = os.path.abspath(args.data_dir or tempfile.mkdtemp(prefix="lora-gradio3-"))
    try:
        if not os.path.isdir(os.path.join(data_dir, "models", "Lora")):
            make_data(data_dir)
        setup_host(data_dir)
        if args.command == "serve":
            import uvicorn
            uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")
            return 0
        done = run_checks()
        print(f"gradio 3.41.2 smoke: {len(done)} checks passed: " + "; ".join(done))
        return 0
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
