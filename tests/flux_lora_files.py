"""Shared pieces of the Flux Lora tests: the tiny model fixtures, Lora file makers and the checks (targeted parameters
within 1e-5 relative error, every other one bitwise)."""
import copy
import functools
import os

import flux_models
import networks
import pytest
import torch

M = 0.7  # the tag's multiplier in most cases


@functools.cache
def _tiny_flux() -> flux_models.TinyFluxModel:
    return flux_models.build_tiny_flux()


@pytest.fixture
def flux() -> flux_models.TinyFluxModel:
    """A fresh copy of the tiny Flux model (built once per session)."""
    return copy.deepcopy(_tiny_flux())


@pytest.fixture
def write_file(write_lora):
    """write_file(name, tensors, metadata=None) → path of a Lora file with only these tensors (and metadata)."""
    return lambda name, tensors, metadata=None: write_lora(name, tensors=tensors, metadata=metadata or {})


def model_state(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in model.components().items()}


def assert_rel(got: torch.Tensor, want: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))
    assert err < tol, f"{name}: relative error {err:.2e}"


def check(got: dict, want: dict, original: dict) -> int:
    """Targeted (want ≠ original) within 1e-5 relative; the rest bitwise. Returns the targeted count."""
    changed = 0
    for component, state in want.items():
        assert got[component].keys() == state.keys()
        for key, value in state.items():
            name = f"{component}.{key}"
            if torch.equal(value, original[component][key]):
                assert torch.equal(got[component][key], value), f"{name} changed"
            else:
                assert_rel(got[component][key], value, name)
                changed += 1
    return changed


def apply(model, name: str, multiplier: float = M, te: float | None = None) -> dict:
    report = networks.load_networks([name], [M if te is None else te], [multiplier], sd_model=model)
    net = report.networks[0]
    assert not net.unmatched_keys and not net.unsupported_keys and not net.unused_keys, net.unmatched_keys[:5]
    assert not net.load_errors and not net.apply_errors and not report.fatal, (net.load_errors, net.apply_errors)
    return model_state(model)


def assert_restored(model, original: dict) -> None:
    networks.load_networks([], sd_model=model)
    for component, state in model_state(model).items():
        for key, value in state.items():
            assert torch.equal(value, original[component][key]), f"{component}.{key} not restored"


# --- file makers -------------------------------------------------------------------------------------------------
def bfl_linears(bfl: dict) -> list[str]:
    return [k[:-len(".weight")] for k, v in bfl.items() if k.endswith(".weight") and v.dim() == 2]


def lora_factors(shapes: dict[str, tuple[int, int]], rank: int = 2, seed: int = 0) -> dict:
    """{layer: (down, up, alpha)} with factors large enough that a wrong row split shows."""
    g = torch.Generator().manual_seed(seed)
    res = {}
    for i, (name, (out, inp)) in enumerate(sorted(shapes.items())):
        res[name] = (torch.randn(rank, inp, generator=g) * 0.5, torch.randn(out, rank, generator=g) * 0.5,
                     float(1 + i % 3))
    return res


def text_shapes(model) -> dict[str, tuple[int, int]]:
    return {f"{component}.{path}": tuple(m.weight.shape)
            for component, module in model.components().items() if component.startswith("text_encoder")
            for path, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def kohya_text_keys(name: str, t5_prefix: str = "lora_te3_") -> str:
    """kohya/sd-scripts: CLIP-L `lora_te1_text_model_…` (transformers 4's `text_model.` level kept), T5 `lora_te3_…`
    (OneTrainer and older forks: `lora_te2_`)."""
    component, _, path = name.partition(".")
    if ".block." not in path:
        return "lora_te1_text_model_" + path.removeprefix("text_model.").replace(".", "_")
    return t5_prefix + path.replace(".", "_")


def write_factors(factors: dict, base_of, down="lora_down.weight", up="lora_up.weight", alpha=True) -> dict:
    tensors = {}
    for name, (d, u, a) in factors.items():
        base = base_of(name)
        tensors[f"{base}.{down}"] = d
        tensors[f"{base}.{up}"] = u
        if alpha:
            tensors[f"{base}.alpha"] = torch.tensor(a)
    return tensors


def merged_bfl(bfl: dict, deltas: dict[str, torch.Tensor]) -> dict:
    res = dict(bfl)
    for name, delta in deltas.items():
        res[f"{name}.weight"] = bfl[f"{name}.weight"] + delta
    return res


def lora_delta(d, u, a, m=M, alpha=True) -> torch.Tensor:
    return m * (a / d.shape[0] if alpha else 1.0) * (u @ d)


def expected_text(model, factors: dict, m=M) -> dict:
    """W + m·alpha/r·up@down on the text encoders' own Linears."""
    res = {}
    for component in [c for c in model.components() if c.startswith("text_encoder")]:
        state = {k: v.detach().clone() for k, v in getattr(model, component).state_dict().items()}
        for name, (d, u, a) in factors.items():
            c, _, path = name.partition(".")
            if c == component:
                state[f"{path}.weight"] = state[f"{path}.weight"] + lora_delta(d, u, a, m)
        res[component] = state
    return res


def diffusers_fused(model, path: str, components=("transformer", "text_encoder"), scale: float = M) -> dict:
    ref = copy.deepcopy(model)
    pipe = flux_models.flux_pipeline(ref)
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name="x",
                            low_cpu_mem_usage=False)
    pipe.fuse_lora(components=list(components), lora_scale=scale)
    pipe.unload_lora_weights()
    return model_state(ref)


def diffusers_linears(model) -> dict[str, tuple[int, int]]:
    return {path: tuple(m.weight.shape) for path, m in model.transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}
