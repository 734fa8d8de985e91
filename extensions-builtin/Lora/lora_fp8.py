"""Loras on fp8-stored weights (`float8_e4m3fn` / `float8_e5m2`), setting `lora_fp8_strategy`.

Merging a Lora into fp8 by rounding to nearest loses most of it: a typical Lora changes a weight by less than half
an fp8 step (3 mantissa bits), so most elements round back to where they were ("fp8 makes Loras weak"). Three ways
out, each restoring the exact original fp8 bytes:
    upcast      while a Lora touches a layer, the layer's weight is a compute-dtype (bf16/fp32) tensor holding
                W0 + ΔW; the fp8 parameter is kept aside untouched and put back on restore (bit-exact by
                construction). Costs the touched layers' size in the compute dtype.
    stochastic  W0 + ΔW rounded into the fp8 weight in place, up or down with the probability that makes the
                rounding unbiased, from a generator seeded by the layer and the Lora set (the same set gives the
                same bits). Restore re-reads the original bytes (host source) or a clone of the fp8 layer; the
                rounding has no residual, and every write starts from the original, so nothing drifts.
    bypass      the fp8 weight is not written; each layer's forward adds the Lora's output change (functional
                mode's hooks, lora_functional), with the factors in the compute dtype.
    auto        the one with the smallest measured layer-output error whose memory cost is within 10 % of the
                model: upcast, then bypass (equal error within noise: upcast costs nothing per step), else
                stochastic. See scripts/bench_lora_fp8.py and README.
The patcher calls in here for fp8 layers; networks.apply_plan routes bypassed layers to the hooks.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

try:  # both hosts have them (imported at load time: A1111 drops the extension folder from sys.path later)
    from modules import devices, shared
except ImportError:  # a tool or a bare test without a host
    devices = shared = None

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
AUTO, UPCAST, STOCHASTIC, BYPASS = "auto", "upcast", "stochastic", "bypass"
STRATEGIES = (AUTO, UPCAST, STOCHASTIC, BYPASS)
MEMORY_BUDGET = 0.10  # auto: the largest memory cost, as a fraction of the model's bytes
_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in FP8_DTYPES}


def is_fp8(dtype: torch.dtype | None) -> bool:
    return dtype in FP8_DTYPES


def setting() -> str:
    """The `lora_fp8_strategy` option (auto when unset or unknown)."""
    try:
        value = str(getattr(shared.opts, "lora_fp8_strategy", AUTO)).lower()
    except Exception:  # no host (a tool, a bare test)
        value = AUTO
    return value if value in STRATEGIES else AUTO


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the layer computes in: its bias's (fp8 storage casts biases to the compute dtype), else the host's
    `devices.dtype`, else bfloat16."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point() and not is_fp8(bias.dtype):
        return bias.dtype
    try:
        dtype = getattr(devices, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and not is_fp8(dtype):
            return dtype
    except Exception:
        pass
    return torch.bfloat16


def fp8_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The layer's fp8 weight (kept aside while it is upcast), or None for a layer that does not store one."""
    rec = getattr(module, "network_backup", None)
    state = getattr(rec, "fp8", None)
    if isinstance(state, Fp8State) and state.original is not None:
        return state.original
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and is_fp8(weight.dtype) else None


# --- choosing -----------------------------------------------------------------------------------------------------
def _module_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _bypass_bytes(layer: torch.nn.Module, contributions: list, size: int) -> int:
    """What the hooks would hold: the networks' own tensors (factors, scales) in the compute dtype; the bypass
    forwards form nothing weight-sized to keep (lora_bypass)."""
    n = 0
    for c in contributions:
        n += sum(t.numel() for t in vars(c.module).values() if isinstance(t, torch.Tensor) and t.is_floating_point())
    return n * size


@dataclass
class Costs:
    """Memory each strategy would take for a plan's fp8 layers, and the model's size, in bytes."""

    layers: int = 0
    upcast: int = 0
    bypass: int = 0
    model: int = 0

    def fraction(self, strategy: str) -> float:
        return getattr(self, strategy, 0) / self.model if self.model else 0.0


def costs(layers: dict[str, torch.nn.Module], plan: dict, components) -> Costs:
    """What upcasting or bypassing the plan's fp8 layers would hold (`components`: the model's modules)."""
    res = Costs()
    for name, contributions in plan.items():
        layer = layers.get(name)
        weight = fp8_weight(layer) if layer is not None else None
        if weight is None or not contributions:
            continue
        size = torch.empty((), dtype=compute_dtype(layer)).element_size()
        res.layers += 1
        res.upcast += weight.numel() * size
        res.bypass += _bypass_bytes(layer, contributions, size)
    if res.layers:  # the model's size only matters (and is only summed) when fp8 layers are touched
        res.model = _module_bytes(components)
    return res


def resolve(strategy: str, cost: Costs, hookable: bool = True) -> str:
    """auto → the strategy for this plan: upcast if it fits the memory budget, else bypass if it does, else
    stochastic (see the module docstring for the order)."""
    if strategy != AUTO:
        return strategy
    budget = MEMORY_BUDGET * cost.model
    if cost.upcast <= budget:
        return UPCAST
    if hookable and cost.bypass <= budget:
        return BYPASS
    return STOCHASTIC


# --- writing ------------------------------------------------------------------------------------------------------
@dataclass
class Fp8State:
    """How the patcher wrote an fp8 layer (RestoreRecord.fp8)."""

    strategy: str
    original: torch.Tensor | None = None  # upcast: the untouched fp8 parameter, put back on restore
    seed: int = 0  # stochastic


def handles(weight: torch.Tensor, strategy: str | None) -> str | None:
    """The strategy the patcher uses for this weight: upcast or stochastic for an fp8 one (bypass, which the
    patcher only sees for layers that cannot be hooked, falls back to stochastic), None otherwise."""
    if strategy is None or not is_fp8(weight.dtype):
        return None
    return UPCAST if strategy == UPCAST else STOCHASTIC


def stale(rec, strategy: str | None) -> bool:
    """Whether a layer's record was written by another fp8 strategy than the one wanted now."""
    state = getattr(rec, "fp8", None)
    if not isinstance(state, Fp8State):
        return False
    want = UPCAST if strategy == UPCAST else STOCHASTIC if strategy is not None else None
    return state.strategy != want


def seed_for(name: str, contributions) -> int:
    """A seed from the layer's name and the Lora set (file name, size, multiplier, dyn): the same set rounds the
    same way in every job and process."""
    parts = [name]
    for c in contributions:
        identity = getattr(c.network, "identity", (getattr(c.network, "name", "?"),))
        parts.append(repr((str(identity[0]).replace("\\", "/").rsplit("/", 1)[-1], tuple(identity[1:2]),
                           round(float(c.multiplier), 9), c.dyn_dim)))
    return zlib.crc32("|".join(parts).encode())


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """`values` (fp32) rounded into fp8 `dtype`: to the neighbour below or above with probabilities that make the
    result unbiased, chosen by `noise` (uniform in [0, 1), same shape). Values beyond fp8's range saturate."""
    limit = _MAX[dtype]
    x = values.clamp(-limit, limit)
    nearest = x.to(dtype)
    near = nearest.float()
    err = x - near
    bits = nearest.view(torch.uint8).to(torch.int16)
    magnitude, sign = bits & 0x7F, bits & 0x80
    away = (near == 0) | ((err > 0) == (near > 0))  # the other neighbour lies further from zero
    top = 0x7E if dtype == torch.float8_e4m3fn else 0x7B  # the largest finite magnitude's bits
    other_mag = torch.where(away, magnitude + 1, magnitude - 1).clamp_(0, top)
    other_sign = torch.where(near == 0, torch.where(err < 0, 0x80, 0), sign)
    other = (other_sign | other_mag).to(torch.uint8).view(dtype).float()
    gap = other - near
    p = torch.where(gap != 0, err / gap.where(gap != 0, torch.ones_like(gap)), torch.zeros_like(err))
    return torch.where(noise < p, other, near).to(dtype)


def merge_stochastic(delta, out: torch.Tensor, original: torch.Tensor, scratch, seed: int, block: int) -> None:
    """out (fp8) = stochastic_round(original + Σ ΔW), through cache-sized fp32 row blocks. `out` may be
    `original`; both contiguous."""
    rows = out.shape[0] if out.dim() else 1
    out2 = out.view(rows, max(1, out.numel() // max(rows, 1)))
    generator = torch.Generator(device=out.device).manual_seed(seed)
    for r0, r1, s in delta.summed_rows(out, original, scratch, block):
        noise = scratch.get("noise", torch.float32, s.numel()).view_as(s)
        torch.rand(s.shape, generator=generator, device=s.device, out=noise)
        out2[r0:r1].copy_(stochastic_round(s, out.dtype, noise))


def write_upcast(module: torch.nn.Module, attr: str, original: torch.Tensor, delta, scratch) -> Fp8State:
    """The layer's weight becomes a compute-dtype parameter holding original + Σ ΔW (reusing the one an earlier
    upcast made); the fp8 parameter is kept aside untouched."""
    current = getattr(module, attr)
    state = getattr(getattr(module, "network_backup", None), "fp8", None)
    fp8_param = state.original if isinstance(state, Fp8State) and state.original is not None else current
    dtype = compute_dtype(module)
    if current is fp8_param or current.dtype != dtype or current.shape != fp8_param.shape:
        current = torch.nn.Parameter(torch.empty(fp8_param.shape, dtype=dtype, device=fp8_param.device),
                                     requires_grad=False)
    delta.merge(current.data, original if original.is_contiguous() else original.contiguous(), scratch)
    setattr(module, attr, current)
    return Fp8State(UPCAST, original=fp8_param)


def restore_upcast(module: torch.nn.Module, attr: str, state: Fp8State) -> None:
    """Puts the untouched fp8 parameter back (the upcast copy is dropped)."""
    setattr(module, attr, state.original)


def upcast_bytes(layers: dict[str, torch.nn.Module]) -> tuple[int, int]:
    """(layers upcast, bytes their compute-dtype weights take) right now."""
    n, total = 0, 0
    for module in layers.values():
        state = getattr(getattr(module, "network_backup", None), "fp8", None)
        if isinstance(state, Fp8State) and state.strategy == UPCAST:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight is not state.original:
                n += 1
                total += weight.numel() * weight.element_size()
    return n, total


def summary(strategy: str, chosen: str, cost: Costs, layers: dict, held_by_hooks: int) -> str | None:
    """The job's line about fp8 layers (None when the plan touches none)."""
    if not cost.layers:
        return None
    mib = 2 ** 20
    how = f"{chosen} (auto)" if strategy == AUTO else chosen
    if chosen == UPCAST:
        n, nbytes = upcast_bytes(layers)
        cost_text = f"{n} layers upcast, {nbytes / mib:.1f} MiB ({nbytes / max(cost.model, 1):.1%} of the model)"
    elif chosen == BYPASS:
        cost_text = f"hooks hold {held_by_hooks / mib:.1f} MiB ({held_by_hooks / max(cost.model, 1):.1%} of the model)"
    else:
        cost_text = "merged in place with seeded stochastic rounding, no extra memory"
    return f"Lora on fp8 weights ({cost.layers} layers): {how}; {cost_text}"
