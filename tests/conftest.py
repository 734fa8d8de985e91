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


# --- server fixtures ---
# One real server per test session (`python webui.py` in a subprocess) with its own data folder holding the
# tiny default models and the demo LoRAs. Set WEBUI_TEST_URL (and WEBUI_TEST_SERVER_DATA_DIR) to test a
# server you started yourself instead.
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

SERVER_AUTH = ("tester", "s3cret:pw")  # a ':' in the password checks that only the first ':' splits


class WebuiServer:
    def __init__(self, url: str, data_dir: str, process=None, log_path: str | None = None):
        self.url = url.rstrip("/")
        self.data_dir = data_dir
        self.lora_dir = os.path.join(data_dir, "models", "Lora")
        self.process = process
        self.log_path = log_path
        self.auth = SERVER_AUTH

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "r", encoding="utf8", errors="replace") as f:
            return f.read()[-chars:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_server_data(data_dir: str, built_models: str | None = None) -> None:
    """The tiny default checkpoints and the demo LoRAs, built by the same functions install.py uses (the models are
    copied from `built_models` when given, which saves building them twice)."""
    from modules.default_models import ensure_default_models
    from scripts.make_demo_loras import make_demo_loras

    models_path = os.path.join(data_dir, "models")
    if built_models:
        shutil.copytree(os.path.join(built_models, "Stable-diffusion"), os.path.join(models_path, "Stable-diffusion"),
                        dirs_exist_ok=True)
    sd1_dir, sdxl_dir = ensure_default_models(models_path)[:2]
    make_demo_loras(os.path.join(models_path, "Lora"), sd1_dir, sdxl_dir)


def _wait_until_ready(server: WebuiServer, timeout: float) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"webui.py exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/sdapi/v1/samplers", auth=server.auth, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"webui.py did not answer within {timeout:.0f}s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def default_models_dir() -> str:
    """A models folder holding the tiny default checkpoints (tiny-sd1, tiny-sdxl), built once per test session."""
    from modules.default_models import ensure_default_models

    models_path = os.path.join(TEST_DATA_DIR, "models")
    ensure_default_models(models_path)
    return models_path


@pytest.fixture(scope="session")
def webui_server(tmp_path_factory, default_models_dir):
    external = os.environ.get("WEBUI_TEST_URL")
    if external:
        yield WebuiServer(external, os.environ["WEBUI_TEST_SERVER_DATA_DIR"])
        return
    data_dir = str(tmp_path_factory.mktemp("server-data"))
    build_server_data(data_dir, default_models_dir)
    port = _free_port()
    log_path = os.path.join(data_dir, "server.log")
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    cmd = [sys.executable, os.path.join(ROOT, "webui.py"), "--data-dir", data_dir, "--port", str(port),
           "--api-auth", ":".join(SERVER_AUTH), "--lora-dir", os.path.join(data_dir, "models", "Lora")]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = WebuiServer(f"http://127.0.0.1:{port}", data_dir, process, log_path)
    try:
        _wait_until_ready(server, timeout=180)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if os.environ.get("WEBUI_TEST_KEEP_LOG"):
            shutil.copy(log_path, os.path.join(ARTIFACTS_DIR, "server.log"))


@pytest.fixture(scope="session")
def sdapi(webui_server):
    """A requests session with the server's basic-auth credentials and base URL."""
    import requests

    class Client(requests.Session):
        def request(self, method, url, *args, **kwargs):
            kwargs.setdefault("timeout", 300)
            return super().request(method, webui_server.url + url, *args, **kwargs)

    client = Client()
    client.auth = webui_server.auth
    yield client
    client.close()


@pytest.fixture(scope="session")
def sd1_checkpoint(sdapi) -> str:
    """Makes the tiny SD1 model the loaded one and returns its title."""
    models = sdapi.get("/sdapi/v1/sd-models").json()
    title = next(m["title"] for m in models if "tiny-sd1" in m["title"])
    response = sdapi.post("/sdapi/v1/options", json={"sd_model_checkpoint": title})
    assert response.status_code == 200, response.text
    return title


@pytest.fixture(scope="session")
def sd1_lora(webui_server, sdapi, sd1_checkpoint) -> str:
    """The name of a demo LoRA for SD1 that loads without error (from the card data, filtered for SD1)."""
    cards = sdapi.get("/sd_extra_networks/cards", params={"page": "lora", "tabname": "txt2img"}).json()
    names = [c["name"] for c in cards["items"] if c.get("sd") == "SD1" and not c.get("error")]
    assert names, f"no SD1 demo LoRA in {[c['name'] for c in cards['items']]}"
    return names[0]


# --- lora fixtures ---
# Tiny SD1-like and SDXL-like diffusers models (built once, deep-copied per test) and a private Lora folder.
import copy  # noqa: E402

import torch  # noqa: E402


class TinyDiffusersModel:
    """Stands in for modules.sd_models_diffusers.DiffusersSdModel in Lora tests: same attributes, no pipeline."""

    def __init__(self, family: str, unet, text_encoder, text_encoder_2=None):
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"
        self.model_type = family.upper()

    def components(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def _tiny_clip(hidden: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=1000, projection_dim=hidden, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1, max_position_embeddings=16)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_tiny_model(family: str) -> TinyDiffusersModel:
    from diffusers import UNet2DConditionModel
    torch.manual_seed({"sd1": 1, "sdxl": 2}[family])
    if family == "sd1":  # conv proj_in, UpBlock2D first (its upsampler is output_blocks_2_1_conv)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=2, cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=4)
        return TinyDiffusersModel("sd1", unet.eval(), _tiny_clip(16, False))
    # SDXL-like: linear proj_in, CrossAttnUpBlock2D first (its upsampler is output_blocks_2_2_conv), two TEs
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
        norm_num_groups=4, use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40)
    return TinyDiffusersModel("sdxl", unet.eval(), _tiny_clip(16, False), _tiny_clip(16, True))


@pytest.fixture(scope="session")
def _tiny_models() -> dict:
    return {"sd1": build_tiny_model("sd1"), "sdxl": build_tiny_model("sdxl")}


@pytest.fixture
def tiny_sd1(_tiny_models) -> TinyDiffusersModel:
    return copy.deepcopy(_tiny_models["sd1"])


@pytest.fixture
def tiny_sdxl(_tiny_models) -> TinyDiffusersModel:
    return copy.deepcopy(_tiny_models["sdxl"])


@pytest.fixture
def lora_dir(tmp_path, monkeypatch):
    """An empty Lora folder (and LyCORIS folder) for this test; the extension's state is reset around it."""
    import networks  # extensions-builtin/Lora is on sys.path (base set-up)

    from modules import shared

    folder = tmp_path / "Lora"
    folder.mkdir()
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(folder))
    monkeypatch.setattr(shared.cmd_opts, "lyco_dir_backcompat", str(tmp_path / "LyCORIS"))
    networks.loaded_networks.clear()
    networks.networks_in_memory.clear()
    networks.list_available_networks()
    yield folder
    networks.loaded_networks.clear()
    networks.networks_in_memory.clear()


@pytest.fixture
def write_lora(lora_dir):
    """write_lora(name, model, family="sd1", locon=False, ..., tensors=None, metadata=None) → path: a kohya file
    for the model's layers (or the given tensors) in the test's Lora folder, listed at once."""
    import lora_layers
    import networks

    from scripts import make_demo_loras as demo

    def write(name: str, model=None, family: str = "sd1", locon: bool = False, rank: int = 4, alpha: float = 2.0,
              seed: int = 0, tensors: dict | None = None, metadata: dict | None = None, layers=None) -> str:
        if tensors is None:
            shapes = demo.layer_shapes_from_components(model.components())
            selected = demo.select_layers(shapes, locon) if layers is None else {k: shapes[k] for k in layers}
            structure = lora_layers.LayerMap(model).structure
            tensors = demo.lora_tensors(selected, family, structure, rank=rank, alpha=alpha, seed=seed,
                                        dtype=torch.float32)
        if metadata is None:
            metadata = demo.kohya_metadata(os.path.basename(name), family, locon, rank, alpha, "tiny", {"x": 1})
        path = os.path.join(str(lora_dir), *name.split("/")) + ".safetensors"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(demo.safetensors_bytes(tensors, metadata) if metadata else _plain_safetensors(tensors))
        networks.list_available_networks()
        return path

    return write


def _plain_safetensors(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors)
