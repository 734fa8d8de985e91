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


# --- lora compvis-layout fixtures (key formats and module layouts) ---
# Tiny models in A1111's compvis layout: the original `ldm` UNetModel (PyPI stable-diffusion-sdkit, installed
# with --no-deps), CLIP under `cond_stage_model.wrapped.transformer` / `conditioner.embedders[0].wrapped.transformer`
# and an OpenCLIP-named text tower (open_clip's module names: `transformer.resblocks.N.attn` is a
# torch.nn.MultiheadAttention with a fused in_proj_weight) under `.wrapped.model`. Each comes with a diffusers-layout
# twin holding the same weights, converted by diffusers' own single-file converters (an independent reference
# for which ldm tensor is which diffusers one).
from collections import OrderedDict  # noqa: E402


class OpenClipResidualBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, width * 4)),
                                                    ("gelu", torch.nn.GELU()),
                                                    ("c_proj", torch.nn.Linear(width * 4, width))]))


class OpenClipTransformer(torch.nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = torch.nn.ModuleList([OpenClipResidualBlock(width, heads) for _ in range(layers)])


class OpenClipText(torch.nn.Module):
    """The text half of open_clip's CLIP under open_clip's names (what FrozenOpenCLIPEmbedder keeps as `.model`)."""

    def __init__(self, width: int = 32, layers: int = 2, heads: int = 2, vocab: int = 1000, context: int = 16,
                 projection: int = 32):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = OpenClipTransformer(width, layers, heads)
        self.ln_final = torch.nn.LayerNorm(width)
        self.text_projection = torch.nn.Parameter(torch.randn(width, projection) * width ** -0.5)
        with torch.no_grad():  # non-trivial norms and biases, so a mix-up of tensors shows
            for module in self.modules():
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.MultiheadAttention, torch.nn.Linear)):
                    for name, p in module.named_parameters(recurse=False):
                        if "bias" in name or isinstance(module, torch.nn.LayerNorm):
                            p.add_(torch.randn_like(p) * 0.1)


class Holder(torch.nn.Module):
    """An attribute path (`wrapped`, `transformer`, `model`, `text_model`) as A1111's wrappers have it."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class TinyLdmModel:
    """Stands in for A1111's LatentDiffusion / DiffusionEngine: `model.diffusion_model`, `cond_stage_model` or
    `conditioner.embedders`, and the is_sd1/is_sd2/is_sdxl flags."""

    def __init__(self, family: str, unet, cond_stage_model=None, embedders=None):
        self.model = Holder(diffusion_model=unet)
        if cond_stage_model is not None:
            self.cond_stage_model = cond_stage_model
        if embedders is not None:
            self.conditioner = Holder(embedders=torch.nn.ModuleList(embedders))
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"

    def ldm_state_dict(self) -> dict:
        """The single-file checkpoint layout (`model.diffusion_model.*`, `cond_stage_model.*`,
        `conditioner.embedders.N.*`) as A1111 saves it: without the `wrapped.` level of its hijack."""
        res = {f"model.diffusion_model.{k}": v for k, v in self.model.diffusion_model.state_dict().items()}
        if hasattr(self, "cond_stage_model"):
            res.update({f"cond_stage_model.{k}": v for k, v in self.cond_stage_model.wrapped.state_dict().items()})
        if hasattr(self, "conditioner"):
            for i, embedder in enumerate(self.conditioner.embedders):
                inner = getattr(embedder, "wrapped", embedder)
                res.update({f"conditioner.embedders.{i}.{k}": v for k, v in inner.state_dict().items()})
        return res


LDM_UNET_CONFIGS = {
    # ldm UNetModel kwargs, diffusers UNet2DConditionModel kwargs
    "sd1": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                 attention_resolutions=[1], channel_mult=(1, 2), num_head_channels=16, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=16, legacy=False),
            dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=16,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32)),
    "sd2": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                 attention_resolutions=[1], channel_mult=(1, 2), num_head_channels=16, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=32, legacy=False, use_linear_in_transformer=True),
            dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32,
                 use_linear_projection=True)),
    "sdxl": (dict(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                  attention_resolutions=[2, 4], channel_mult=(1, 2, 2), num_head_channels=16,
                  use_spatial_transformer=True, transformer_depth=2, context_dim=[48, 48], legacy=False,
                  use_linear_in_transformer=True),
             dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(2, 4, 4), norm_num_groups=32, use_linear_projection=True,
                  transformer_layers_per_block=2, addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=56)),
}


def _randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)


def _clip_twin(hidden: int, with_projection: bool, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_attention_heads=2,
                            num_hidden_layers=2, vocab_size=1000, projection_dim=32, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1, max_position_embeddings=16, hidden_act=hidden_act)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _load_converted(model: torch.nn.Module, converted: dict, ignore: tuple = ()) -> None:
    """Loads diffusers-converted text encoder weights (named with `text_model.`) into either transformers naming."""
    own = model.state_dict()
    fixed = {}
    for key, value in converted.items():
        name = key if key in own else key[len("text_model."):] if key.startswith("text_model.") else key
        if name.startswith(ignore):
            continue
        fixed[name] = value
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)


def build_tiny_ldm_pair(family: str) -> tuple[TinyLdmModel, TinyDiffusersModel]:
    """A compvis-layout tiny model and its diffusers-layout twin with the same weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed({"sd1": 11, "sd2": 12, "sdxl": 13}[family])
    ldm_kwargs, diffusers_kwargs = LDM_UNET_CONFIGS[family]
    unet = UNetModel(**ldm_kwargs)
    if family == "sdxl":  # sgm's `num_classes="sequential"` embedding (the SD2-era ldm code has no such option)
        width = 4 * ldm_kwargs["model_channels"]
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(diffusers_kwargs["projection_class_embeddings_input_dim"], width), torch.nn.SiLU(),
            torch.nn.Linear(width, width)))
    _randomize_norms(unet)
    unet.eval()
    twin_unet = UNet2DConditionModel(**diffusers_kwargs).eval()
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v.clone() for k, v in
                                             unet.state_dict().items()}, dict(twin_unet.config))
    twin_unet.load_state_dict(converted, strict=True)

    if family == "sd1":
        clip = _clip_twin(16, False)
        _randomize_norms(clip)
        # transformers 4 names (`text_model.encoder...`), as A1111's environment has them
        ldm = TinyLdmModel(family, unet, cond_stage_model=Holder(wrapped=Holder(transformer=Holder(
            text_model=copy.deepcopy(clip)))))
        return ldm, TinyDiffusersModel(family, twin_unet, clip)
    if family == "sd2":
        openclip = OpenClipText(width=32)
        ldm = TinyLdmModel(family, unet, cond_stage_model=Holder(wrapped=Holder(model=openclip)))
        twin_te = _clip_twin(32, False, "gelu")
        prefix = "cond_stage_model.model."
        _load_converted(twin_te, convert_open_clip_checkpoint(twin_te, {prefix + k: v.clone() for k, v in
                                                                        openclip.state_dict().items()}, prefix),
                        ignore=("text_projection",))
        return ldm, TinyDiffusersModel(family, twin_unet, twin_te)
    clip = _clip_twin(16, False)
    _randomize_norms(clip)
    openclip = OpenClipText(width=32, projection=32)
    embedders = [Holder(wrapped=Holder(transformer=copy.deepcopy(clip))),  # transformers 5 names
                 Holder(wrapped=Holder(model=openclip)),
                 Holder()]  # a conditioning embedder without a text tower (sgm's size/crop embedders)
    ldm = TinyLdmModel(family, unet, embedders=embedders)
    twin_te2 = _clip_twin(32, True, "gelu")
    prefix = "conditioner.embedders.1.model."
    _load_converted(twin_te2, convert_open_clip_checkpoint(twin_te2, {prefix + k: v.clone() for k, v in
                                                                      openclip.state_dict().items()}, prefix))
    return ldm, TinyDiffusersModel(family, twin_unet, clip, twin_te2)


@pytest.fixture(scope="session")
def _tiny_ldm_pairs() -> dict:
    return {}


@pytest.fixture
def tiny_ldm_pair(_tiny_ldm_pairs):
    """tiny_ldm_pair(family) → (compvis-layout model, diffusers-layout twin), fresh copies per call."""
    def get(family: str):
        if family not in _tiny_ldm_pairs:
            _tiny_ldm_pairs[family] = build_tiny_ldm_pair(family)
        return copy.deepcopy(_tiny_ldm_pairs[family])
    return get


# --- card pane browser fixtures (Lora cards tab) ---
# A session-wide headless Debian Chromium and, per test module, one page on the test server (loading gradio
# once per module keeps the browser tests fast). Helpers for LoRA files the card tests create live here too.
CHROMIUM_PATH = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium():
    if not os.path.exists(CHROMIUM_PATH):
        pytest.skip(f"{CHROMIUM_PATH} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def cards_page(chromium, webui_server, sd1_checkpoint):
    """A page on the test server with the prompt box ready; `page.page_errors` collects uncaught errors and
    `page.dialogs` every alert/confirm that opened (none should)."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=webui_server.url)
    page = context.new_page()
    page.page_errors = []
    page.dialogs = []
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))

    def on_dialog(dialog):
        page.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(webui_server.url + "/")
    page.wait_for_selector("#txt2img_prompt textarea", timeout=90000)
    yield page
    context.close()


def tiny_lora_bytes(metadata: dict | None = None, seed: int = 0, width: int = 16) -> bytes:
    """A small valid kohya-style safetensors file (one SD1-shaped layer pair, rank 1) with `metadata`."""
    import safetensors.torch

    gen = torch.Generator().manual_seed(seed)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.randn(1, width, generator=gen),
               f"{key}.lora_up.weight": torch.randn(8, 1, generator=gen)}
    return safetensors.torch.save(tensors, metadata={k: str(v) for k, v in metadata.items()} if metadata else None)


@pytest.fixture
def server_files(webui_server, sdapi):
    """server_files(relpath, data) writes a file under the server's Lora folder; every file (and folder) it made
    is removed afterwards and the server rescanned."""
    made: list[str] = []

    def write(relpath: str, data: bytes | str) -> str:
        path = os.path.join(webui_server.lora_dir, *relpath.split("/"))
        folder = os.path.dirname(path)
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode("utf8") if isinstance(data, str) else data)
        made.append(path)
        made.extend(missing)
        return path

    yield write
    for path in made:
        if os.path.isfile(path):
            os.remove(path)
    for path in sorted((p for p in made if os.path.isdir(p)), key=len, reverse=True):
        shutil.rmtree(path, ignore_errors=True)
    sdapi.post("/sdapi/v1/refresh-loras")


# --- hypernetwork fixtures ---
@pytest.fixture
def hypernetwork_dir(tmp_path, monkeypatch):
    """An empty --hypernetwork-dir for the test, with the loaded and listed hypernetworks reset around it."""
    from modules import shared
    from modules.hypernetworks import hypernetwork as hn

    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    monkeypatch.setattr(shared.cmd_opts, "hypernetwork_dir", str(folder))
    for state in (shared.hypernetworks, shared.loaded_hypernetworks, hn._cache):
        state.clear()
    yield folder
    for state in (shared.hypernetworks, shared.loaded_hypernetworks, hn._cache):
        state.clear()


# --- network security fixtures (origins and login) ---
# A Chromium that resolves the test's made-up host names (`webui.lan`, `evil.test`, ...) to 127.0.0.1, a small page
# server for "another site" on its own port, and one extra webui server with --gradio-auth, --gradio-auth-path,
# --api-auth and allowed CORS origins. No traffic leaves the loopback range.
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

MAPPED_HOSTS_RULES = "MAP *.lan 127.0.0.1, MAP *.test 127.0.0.1"
SECURED_UI_USERS = {"alice": "pw1", "bob": "pw:2", "carol": "pw3", "dave": "pw4", "erin": "pw5"}
SECURED_API_AUTH = ("apiuser", "apikey")


@pytest.fixture(scope="session")
def chromium_mapped(chromium):
    """A second headless Chromium whose resolver maps every *.lan and *.test name to 127.0.0.1 (launched through
    the session browser's Playwright: one sync Playwright may run at a time)."""
    browser = chromium.browser_type.launch(executable_path=CHROMIUM_PATH,
                                           args=[*CHROMIUM_ARGS, f"--host-resolver-rules={MAPPED_HOSTS_RULES}"])
    yield browser
    browser.close()


class _ForeignPageHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"<!doctype html><title>another site</title><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def foreign_page_port():
    """The port of a plain page served on 127.0.0.1 under any host name: "another site" for cross-origin tests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ForeignPageHandler)
    thread = threading.Thread(target=server.serve_forever, name="foreign-page", daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def secured_server(tmp_path_factory, default_models_dir, foreign_page_port):
    """A second webui with a login: alice and bob from --gradio-auth, carol, dave and erin from --gradio-auth-path;
    --api-auth apiuser:apikey; http://allowed.test:<foreign port> and http://trusted-<letters>.test:<port> allowed
    as CORS origins. `server.ui_users` holds the UI logins."""
    data_dir = str(tmp_path_factory.mktemp("secured-server-data"))
    build_server_data(data_dir, default_models_dir)
    users_file = os.path.join(data_dir, "users.txt")
    with open(users_file, "w", encoding="utf8") as f:
        f.write("carol:pw3\n\n  dave:pw4, erin:pw5\n")
    port = _free_port()
    log_path = os.path.join(data_dir, "server.log")
    env = {k: v for k, v in os.environ.items() if k not in ("SD_WEBUI_DATA_DIR", "SD_WEBUI_ARGS")}
    cmd = [sys.executable, os.path.join(ROOT, "webui.py"), "--data-dir", data_dir, "--port", str(port),
           "--lora-dir", os.path.join(data_dir, "models", "Lora"),
           "--gradio-auth", "alice:pw1,bob:pw:2", "--gradio-auth-path", users_file,
           "--api-auth", ":".join(SECURED_API_AUTH),
           "--cors-allow-origins", f"http://allowed.test:{foreign_page_port}",
           "--cors-allow-origins-regex", r"http://trusted-[a-z]+\.test:\d+"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = WebuiServer(f"http://127.0.0.1:{port}", data_dir, process, log_path)
    server.auth = SECURED_API_AUTH
    server.port = port
    server.ui_users = dict(SECURED_UI_USERS)
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


# --- flux host fixtures ---
# The tiny-flux diffusers folder (built with the default models) and its files in the layouts users have: a BFL
# single-file transformer, clip_l / t5xxl / ae files in a models folder, an all-in-one file, fp8 copies. Written once.
@pytest.fixture(scope="session")
def tiny_flux_dir(default_models_dir) -> str:
    return os.path.join(default_models_dir, "Stable-diffusion", "tiny-flux")


@pytest.fixture(scope="session")
def flux_files(tiny_flux_dir, tmp_path_factory) -> dict[str, str]:
    """{"folder", "bfl", "bfl_prefixed", "full", "fp8", "clip_l", "t5", "t5_fp8", "ae", "models"} → paths; the
    module files lie in models/text_encoder and models/VAE under "models"."""
    import flux_files as ff

    from modules import flux_layout, sd_models_diffusers

    model = sd_models_diffusers.load(tiny_flux_dir, torch.device("cpu"), torch.float32)
    c = model.components()
    root = tmp_path_factory.mktemp("flux-files")
    models = root / "models"
    bfl = flux_layout.to_bfl_state_dict(c["transformer"])
    return {
        "folder": tiny_flux_dir, "models": str(models),
        "bfl": ff.write(bfl, str(root / "ckpt" / "flux1-tiny-dev.safetensors")),
        "bfl_prefixed": ff.write(flux_layout.to_bfl_state_dict(c["transformer"], "model.diffusion_model."),
                                 str(root / "ckpt" / "flux1-tiny-dev-comfy.safetensors")),
        "full": ff.write(ff.all_in_one(c), str(root / "ckpt" / "flux1-tiny-dev-full.safetensors")),
        "fp8": ff.write(ff.to_fp8(bfl), str(root / "ckpt" / "flux1-tiny-dev-fp8.safetensors")),
        "clip_l": ff.write(ff.clip_l_tensors(c["text_encoder"]), str(models / "text_encoder" / "clip_l.safetensors")),
        "t5": ff.write(ff.t5_tensors(c["text_encoder_2"]), str(models / "text_encoder" / "t5xxl_fp16.safetensors")),
        "t5_fp8": ff.write(ff.to_fp8(ff.t5_tensors(c["text_encoder_2"])),
                           str(models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors")),
        "ae": ff.write(ff.ae_tensors(c["vae"]), str(models / "VAE" / "ae.safetensors")),
    }


@pytest.fixture(scope="session")
def sd3_files(default_models_dir, tmp_path_factory) -> dict[str, str]:
    """{"folder", "full", "no_t5", "transformer", "clip_l", "clip_g", "t5", "vae"} → paths of tiny-sd3 in SAI's
    single-file layout and as separate files."""
    import flux_files as ff

    from modules import sd3_layout, sd_models_diffusers

    folder = os.path.join(default_models_dir, "Stable-diffusion", "tiny-sd3")
    c = sd_models_diffusers.load(folder, torch.device("cpu"), torch.float32).components()
    root = tmp_path_factory.mktemp("sd3-files")
    return {
        "folder": folder,
        "full": ff.write(ff.sd3_all_in_one(c), str(root / "sd3.5-tiny.safetensors")),
        "no_t5": ff.write(ff.sd3_all_in_one(c, with_t5=False), str(root / "sd3.5-tiny-no-t5.safetensors")),
        "transformer": ff.write(sd3_layout.to_single_file_state_dict(c["transformer"]),
                                str(root / "sd3.5-tiny-mmdit.safetensors")),
        "clip_l": ff.write(ff.clip_l_tensors(c["text_encoder"]), str(root / "te" / "clip_l.safetensors")),
        "clip_g": ff.write(ff.clip_l_tensors(c["text_encoder_2"]), str(root / "te" / "clip_g.safetensors")),
        "t5": ff.write(ff.t5_tensors(c["text_encoder_3"]), str(root / "te" / "t5xxl_fp16.safetensors")),
        "vae": ff.write(ff.ae_tensors(c["vae"]), str(root / "vae" / "sd3_vae.safetensors")),
    }
