"""sd_disable_initialization: no init, meta skeletons, draining loads, and clean restore."""
import os
import threading

import pytest
import torch
import transformers  # noqa: F401  (imported so the transformers patches are exercised)
from safetensors.torch import load_file, save_file

from modules import mapped_memory, safetensors_mmap
from modules import sd_disable_initialization as sdi


def _patch_targets() -> list[tuple[object, str]]:
    import transformers.configuration_utils
    import transformers.modeling_utils
    import transformers.tokenization_utils_base
    import transformers.utils.hub

    targets = [(torch.nn.init, n) for n in sdi.DisableInitialization._skipped_inits]
    targets += [(cls, "__init__") for cls in sdi.InitializeOnMeta.meta_classes]
    targets += [(torch.nn.Module, f) for f in ("to", "load_state_dict", "_load_from_state_dict")]
    targets += [(cls, "_load_from_state_dict") for cls in sdi._classes_overriding("_load_from_state_dict")]
    targets += [(cls, "_load_from_state_dict") for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)]
    targets += [(transformers.CLIPTextModel, "from_pretrained"),
                (transformers.CLIPTextModelWithProjection, "from_pretrained"),
                (transformers.modeling_utils.PreTrainedModel, "_load_pretrained_model"),
                (transformers.utils.hub, "cached_file"), (transformers.tokenization_utils_base, "cached_file"),
                (transformers.configuration_utils, "cached_file")]
    return targets


def _snapshot() -> dict:
    return {(id(obj), field): (field in vars(obj), vars(obj).get(field)) for obj, field in _patch_targets()}


def _enter_all(state_dict):
    return (sdi.DisableInitialization(disable_clip=True), sdi.InitializeOnMeta(),
            sdi.LoadStateDictOnMeta(state_dict, "cpu"))


def test_everything_patched_is_restored_after_exit_and_after_an_exception():
    before = _snapshot()
    a, b, c = _enter_all({})
    with a, b, c:
        inside = _snapshot()
    assert _snapshot() == before
    changed = [k for k in before if before[k] != inside[k]]
    assert len(changed) >= len(sdi.DisableInitialization._skipped_inits) + len(sdi.InitializeOnMeta.meta_classes) + 3

    with pytest.raises(RuntimeError, match="boom"):
        a, b, c = _enter_all({})
        with a, b, c:
            torch.nn.Linear(2, 2)
            raise RuntimeError("boom")
    assert _snapshot() == before
    # inherited attributes are not left pinned on subclasses
    assert "_load_from_state_dict" not in vars(torch.nn.Linear)
    assert "from_pretrained" not in vars(transformers.CLIPTextModel)


def test_disable_initialization_skips_init_only_in_its_thread():
    t = torch.zeros(64)
    other = {}

    def in_other_thread():
        u = torch.zeros(64)
        torch.nn.init.normal_(u)
        other["changed"] = bool(u.abs().sum() > 0)

    with sdi.DisableInitialization():
        torch.nn.init.normal_(t)
        torch.nn.init.uniform_(t)
        torch.nn.init.kaiming_uniform_(t.view(8, 8))
        worker = threading.Thread(target=in_other_thread)
        worker.start()
        worker.join()
    assert t.abs().sum() == 0
    assert other["changed"]
    torch.nn.init.normal_(t)
    assert t.abs().sum() > 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_initialize_on_meta_allocates_no_parameter_memory():
    before = _rss()
    with sdi.InitializeOnMeta():
        # ~270 MB of parameters if they were real (and normally initialised, so touched)
        big = torch.nn.Sequential(torch.nn.Linear(8192, 8192), torch.nn.Conv2d(64, 64, 3),
                                  torch.nn.Embedding(1000, 64), torch.nn.LayerNorm(64), torch.nn.GroupNorm(8, 64),
                                  torch.nn.MultiheadAttention(64, 4), torch.nn.Linear(4, 4, True, "cpu"))
        assert big.to("cpu") is big  # Module.to is a no-op meanwhile
    assert _rss() - before < 50 * 1024 * 1024
    assert all(p.is_meta for p in big.parameters())
    assert not torch.nn.Linear(2, 2).weight.is_meta  # restored


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def _source_state_dict() -> dict:
    torch.manual_seed(1)
    src = _Net()
    src.b[1].running_mean.normal_()
    return {k: v.clone() for k, v in src.state_dict().items()}


def test_load_state_dict_on_meta_drains_converts_per_key_and_keeps_buffers():
    expected = _source_state_dict()
    sd = {k: v.clone() for k, v in expected.items()}
    sd["unused.weight"] = torch.ones(2)
    with sdi.DisableInitialization(), sdi.InitializeOnMeta():
        net = _Net()
    conversion = {"a": torch.float16, "": torch.bfloat16}
    with sdi.LoadStateDictOnMeta(sd, "cpu", weight_dtype_conversion=conversion) as loader:
        assert loader.get_weight_dtype("a.weight") == torch.float16
        assert loader.get_weight_dtype("b.0.bias") == torch.bfloat16
        result = net.load_state_dict(sd, strict=False)
    assert list(sd) == ["unused.weight"]  # drained: only what the model did not take is left
    assert result.unexpected_keys == ["unused.weight"] and result.missing_keys == []
    assert net.a.weight.dtype == torch.float16 and net.b[0].weight.dtype == torch.bfloat16
    assert net.b[1].running_mean.dtype == torch.float32  # buffers are not converted
    assert net.steps.dtype == torch.int64
    for key, value in net.state_dict().items():
        assert not value.is_meta
        assert torch.equal(value, expected[key].to(value.dtype)), key
    assert isinstance(net.a.weight, torch.nn.Parameter) and net.a.weight.requires_grad


def test_load_state_dict_on_meta_leaves_other_loads_alone():
    sd = _source_state_dict()
    plain = torch.nn.Linear(4, 8)
    other = {"weight": torch.ones(8, 4), "bias": torch.zeros(8)}
    with sdi.LoadStateDictOnMeta(sd, "cpu"):
        plain.load_state_dict(other)
    assert torch.equal(plain.weight, torch.ones(8, 4))
    assert len(sd) == len(_source_state_dict())


def test_missing_keys_become_zeros_and_strict_reports_them():
    sd = _source_state_dict()
    del sd["a.bias"]
    with sdi.InitializeOnMeta():
        net = _Net()
    with sdi.LoadStateDictOnMeta(sd, "cpu"):
        result = net.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["a.bias"]
    assert torch.equal(net.a.bias, torch.zeros(8))

    sd = _source_state_dict()
    del sd["a.bias"]
    with pytest.raises(RuntimeError, match="a.bias"):
        sdi.load_state_dict_lean(_Net, sd)


def test_safetensors_mmap_matches_safetensors_and_loads_into_process_memory(tmp_path):
    path = str(tmp_path / "net.safetensors")
    save_file(_source_state_dict(), path, metadata={"format": "pt"})
    reference = load_file(path)
    sd = safetensors_mmap.open_safetensors_mmap(path)
    assert sd.metadata == {"format": "pt"}
    assert sorted(sd) == sorted(reference)
    for key in reference:
        assert sd[key].dtype == reference[key].dtype and torch.equal(sd[key], reference[key])
    pointers = {k: v.data_ptr() for k, v in sd.items()}

    net, result = sdi.load_state_dict_lean(_Net, sd, "cpu", None)
    assert len(sd) == 0 and not result.missing_keys
    # same dtype, yet read out of the file: no parameter is the file's page (a rewrite or truncation of the file
    # would change it or raise SIGBUS)
    assert net.a.weight.data_ptr() != pointers["a.weight"]
    assert mapped_memory.file_backed_tensors({"net": net}) == []
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())
    net.a.weight.data.add_(1)
    assert torch.equal(load_file(path)["a.weight"], reference["a.weight"])


def test_release_pages_drops_resident_memory_but_data_stays_readable(tmp_path):
    path = str(tmp_path / "big.safetensors")
    save_file({"x": torch.arange(16 * 1024 * 1024, dtype=torch.float32)}, path)  # 64 MB
    sd = safetensors_mmap.open_safetensors_mmap(path)
    x = sd["x"]
    before = _rss()
    assert float(x.sum()) > 0
    touched = _rss()
    assert safetensors_mmap.release_pages(x)
    released = _rss()
    assert touched - before > 48 * 1024 * 1024
    assert touched - released > 48 * 1024 * 1024
    assert float(x[-1]) == 16 * 1024 * 1024 - 1  # re-read from the file
    assert not safetensors_mmap.release_pages(torch.ones(10))  # not a mapped tensor: nothing happens


def test_load_state_dict_lean_builds_a_working_unet_and_text_encoder():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
               norm_num_groups=8)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg).eval()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    unet, _ = sdi.load_state_dict_lean(lambda: UNet2DConditionModel(**cfg), sd, "cpu", torch.float32)
    assert not sd
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(ref(x, 3, c).sample, unet.eval()(x, 3, c).sample)

    ccfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
    cref = CLIPTextModel(ccfg).eval()
    sd = {k: v.clone() for k, v in cref.state_dict().items()}
    clip, _ = sdi.load_state_dict_lean(lambda: CLIPTextModel(ccfg), sd, "cpu", torch.bfloat16)
    embeddings = _text_model(clip).embeddings
    assert embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert embeddings.position_ids.dtype == torch.int64  # non-persistent buffer, built normally
    ids = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        out = clip.eval().float()(ids).last_hidden_state
        assert torch.allclose(cref(ids).last_hidden_state, out, atol=0.1)


def _text_model(clip):
    return getattr(clip, "text_model", clip)  # transformers 5 dropped the text_model level


def test_a_layer_that_skips_the_loader_is_reported():
    class Stubborn(torch.nn.Linear):
        def _load_from_state_dict(self, *args, **kwargs):
            pass  # never calls the original: its weights would stay on meta

    sd = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
    with pytest.raises(RuntimeError, match="not loaded"):
        sdi.load_state_dict_lean(lambda: Stubborn(2, 2), sd)


def test_clip_from_pretrained_builds_from_config_without_weights(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    ccfg = CLIPTextConfig(hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1,
                          vocab_size=100, max_position_embeddings=8, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    saved = CLIPTextModel(ccfg)
    with torch.no_grad():
        _text_model(saved).final_layer_norm.weight.fill_(3.0)
    saved.save_pretrained(str(tmp_path))
    with sdi.DisableInitialization(disable_clip=True):
        built = CLIPTextModel.from_pretrained(str(tmp_path))
    assert built.name_or_path == str(tmp_path)
    expected = _text_model(saved).final_layer_norm.weight
    assert not torch.equal(_text_model(built).final_layer_norm.weight, expected)
    loaded = CLIPTextModel.from_pretrained(str(tmp_path))
    assert torch.equal(_text_model(loaded).final_layer_norm.weight, expected)


def test_a_skeleton_from_build_on_meta_is_filled_in_place_without_a_second_build(monkeypatch):
    expected = _source_state_dict()
    built = []

    def factory():
        built.append(1)
        return _Net()

    skeleton = sdi.build_on_meta(factory)
    assert skeleton.a.weight.is_meta and skeleton.b[0].weight.is_meta  # (BatchNorm is built normally)
    assert sorted(skeleton.state_dict()) == sorted(expected)  # the keys a loader maps, from the skeleton itself
    sd = {k: v.clone() for k, v in expected.items()}
    net, result = sdi.load_state_dict_lean(skeleton, sd, "cpu", torch.float64)
    assert net is skeleton and built == [1] and not sd and not result.missing_keys
    assert net.a.weight.dtype == torch.float64 and torch.equal(net.a.weight, expected["a.weight"].double())
    assert torch.equal(net.steps, expected["steps"])

    # with the optimisation off a skeleton is an ordinary module, loaded by copy
    monkeypatch.setattr(sdi, "_ram_optimization_disabled", lambda: True)
    plain = sdi.build_on_meta(factory)
    assert not any(p.is_meta for p in plain.parameters())
    net, _ = sdi.load_state_dict_lean(plain, {k: v.clone() for k, v in expected.items()}, "cpu", None)
    assert torch.equal(net.b[0].weight, expected["b.0.weight"])


def _resident_pages(path: str) -> tuple[int, int]:
    """(resident, total) pages of the file in the page cache, from mincore(2) on a fresh map of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(mm)
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) == 0
        del buf
        return sum(v & 1 for v in vec), pages
    finally:
        mm.close()


def _drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_the_map_prefetches_the_file_in_the_background(tmp_path):
    path = str(tmp_path / "prefetch.safetensors")
    save_file({"x": torch.arange(8 * 1024 * 1024, dtype=torch.float32)}, path)  # 32 MB
    _drop(path)
    resident, total = _resident_pages(path)
    if resident > total // 4:
        pytest.skip("this system does not drop a file's pages from the page cache on request")
    sd = safetensors_mmap.open_safetensors_mmap(path, prefetch=False)
    assert _resident_pages(path)[0] <= total // 4  # nothing read yet: a lazy map
    del sd
    sd = safetensors_mmap.open_safetensors_mmap(path)
    for thread in [t for t in threading.enumerate() if t.name == "safetensors-prefetch"]:
        thread.join(30)
    resident, total = _resident_pages(path)
    assert resident >= total * 0.9, (resident, total)  # read ahead in the background, before any access
    assert float(sd["x"][-1]) == 8 * 1024 * 1024 - 1
