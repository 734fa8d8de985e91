"""LoRA / LoCon / Tucker-LoCon / DyLoRA (A1111 file name): ΔW = m · s · up·down, s = alpha/rank or `scale`.

Conv LoCon: down is (r, in, kh, kw), up (out, r, 1, 1). Tucker LoCon: down (r, in, 1, 1), mid (r, r, kh, kw),
up (out, r, 1, 1). `dyn=d` keeps the first d ranks (of mid too) and scales by alpha/d, as DyLoRA trains them.
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import torch

# Other trainers' names for the same parts (PEFT `lora_A/lora_B`, old diffusers `lora.down/lora.up`) and
# PEFT's DoRA magnitude, which is per output channel.
PART_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
}
PEFT_MAGNITUDE_PARTS = ("lora_magnitude_vector", "lora_magnitude_vector.weight")


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        w = weights.w
        from_peft_magnitude = any(k in w for k in PEFT_MAGNITUDE_PARTS)
        if any(k in w for k in PART_ALIASES):
            w = {PART_ALIASES.get(k, k): v for k, v in w.items()}
            weights = network.NetworkWeights(weights.network_key, weights.sd_key, w, weights.sd_module)
        if "lora_up.weight" in w and "lora_down.weight" in w:
            module = NetworkModuleLora(net, weights)
            if from_peft_magnitude:
                module.dora_square_default = lyco_helpers.DORA_OUTPUT_AXIS
            return module
        return None


def diff_weight(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, shape,
                rank: int | None = None) -> torch.Tensor:
    """U = up·down reshaped to `shape`, or Tucker U[i, j, ...] = Σ mid[n, m, ...]·up[i, n]·down[m, j]; `rank` keeps
    the first ranks of all three (dyn)."""
    if mid is not None:
        return lyco_helpers.rebuild_cp_decomposition(up, down, mid, rank)
    return lyco_helpers.rebuild_conventional(up, down, shape, rank)


def forward_diff(x: torch.Tensor, op: lora_bypass.LayerOp, up: torch.Tensor, down: torch.Tensor,
                 mid: torch.Tensor | None, factor: float) -> torch.Tensor:
    """factor·U applied to x without forming U: down with the layer's kernel geometry (Tucker: a 1×1 down, then
    mid with it), then the 1×1 up; the factor is applied on the rank-sized intermediate."""
    h = op.first(x, down) if mid is None else op.first(op.pointwise(x, down), mid)
    return op.pointwise(h * factor, up)


class LowRankBypass(lora_bypass.Bypass):
    def __init__(self, op: lora_bypass.LayerOp, up, down, mid, factor: float):
        super().__init__()
        self.op, self.factor = op, factor
        self.up, self.down, self.mid = (self.hold(t, op) for t in (up, down, mid))

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        c = lora_bypass.cast
        return forward_diff(x, self.op, c(self.up, x), c(self.down, x), c(self.mid, x), self.factor)


class FactorView:
    """A1111's `up_model`/`down_model`/`mid_model` stand-in: `.weight` reads and assigns the module's factor, so
    extensions that scale `module.up_model.weight` (LoRA Block Weight, Regional Prompter) change what is merged."""

    def __init__(self, module: network.NetworkModule, part: str):
        self._where = (module, part)

    @property
    def weight(self) -> torch.Tensor:
        module, part = self._where
        return getattr(module, part)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        module, part = self._where
        setattr(module, part, value)


class NetworkModuleLora(network.NetworkModule):
    delta_reads_weight = False

    @property
    def up_model(self) -> FactorView:
        return FactorView(self, "up")

    @property
    def down_model(self) -> FactorView:
        return FactorView(self, "down")

    @property
    def mid_model(self) -> FactorView | None:
        return FactorView(self, "mid") if self.mid is not None else None

    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        w = weights.w
        self.up = lyco_helpers.factor(w["lora_up.weight"])
        self.down = lyco_helpers.factor(w["lora_down.weight"])
        self.mid = lyco_helpers.factor(w.get("lora_mid.weight"))
        self.parts_used |= {"lora_up.weight", "lora_down.weight"}
        if self.mid is not None:
            self.parts_used.add("lora_mid.weight")
        up, down = tuple(self.up.shape), tuple(self.down.shape)
        if self.up.dim() not in (2, 4) or self.down.dim() not in (2, 4):
            raise ValueError(f"lora_up {up} / lora_down {down} must be 2-D or 4-D")
        if self.up.dim() == 4 and up[2:] != (1, 1):
            raise ValueError(f"lora_up {up} must be a 1×1 kernel")
        rank = down[0]
        if self.mid is None and up[1] != rank:
            raise ValueError(f"lora_up {up} and lora_down {down} disagree on the rank")
        if self.mid is not None:
            mid = tuple(self.mid.shape)
            if self.mid.dim() != 4 or mid[0] != up[1] or mid[1] != rank:
                raise ValueError(f"lora_mid {mid} does not fit lora_up {up} and lora_down {down}")
            if self.down.dim() == 4 and down[2:] != (1, 1):
                raise ValueError(f"lora_down {down} must be a 1×1 kernel when lora_mid is present")
        self.dim = rank

    def truncated_rank(self, dyn_dim: int | None) -> int | None:
        """The rank dyn keeps, or None for all of them."""
        if dyn_dim is None or self.dim is None or dyn_dim >= self.dim:
            return None
        return max(1, int(dyn_dim))

    def calc_scale(self, dyn_dim: int | None = None) -> float:
        """alpha/d for `dyn=d` (the rank actually used), as DyLoRA scales a truncated rank."""
        rank = self.truncated_rank(dyn_dim)
        if rank is None or self.scale is not None or not self.alpha:
            return super().calc_scale()
        return self.alpha / rank

    def delta_shape(self) -> tuple:
        shape = (self.up.shape[0], self.down.shape[1])
        if self.mid is not None:
            return shape + tuple(self.mid.shape[2:])
        if self.down.dim() == 4:
            return shape + tuple(self.down.shape[2:])
        return shape

    def calc_delta(self, orig_weight: torch.Tensor, dyn_dim: int | None = None, multiplier: float = 1.0,
                   orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        up = self.up.to(device, torch.float32)
        down = self.down.to(device, torch.float32)
        mid = None if self.mid is None else self.mid.to(device, torch.float32)
        output_shape = list(self.delta_shape())
        return diff_weight(up, down, mid, output_shape, self.truncated_rank(dyn_dim)), output_shape, None

    def bypass_weight(self, op: lora_bypass.LayerOp, factor: float, dyn_dim: int | None = None):
        """Two (Tucker: three) small products per call; None where the factors do not chain into the layer's op
        (a grouped conv, an inpainting conv_in's padded delta)."""
        rank = self.truncated_rank(dyn_dim)
        up, down = self.up[:, :rank], self.down[:rank]
        mid = None if self.mid is None else self.mid[:rank, :rank]
        shape = op.weight_shape
        if not op.chainable or up.shape[0] != shape[0] or up.dim() == 4 and up.shape[2:] != (1, 1):
            return None
        if mid is not None:
            if op.kind != "conv" or tuple(mid.shape[2:]) != shape[2:] or down[0].numel() != shape[1]:
                return None
        elif down[0].numel() != torch.Size(shape[1:]).numel() or op.kind == "conv" and down.dim() == 4 and \
                down.shape[1:] != shape[1:]:
            return None
        else:  # a kernel stored flat (or a Linear-shaped LoRA on a 1×1 conv): as the layer's kernel
            down = down.reshape(down.shape[0], *shape[1:])
        return LowRankBypass(op, lyco_helpers.flat2d(up), down, mid, factor)

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """ΔW as fp32 factors (m·s·up) @ down of the weight's 2-D view, Tucker's `mid` folded into down, or None
        where the generic compute() is needed (a weight-shaped `bias` part, a delta that must be padded). With DoRA:
        lyco_helpers.DoraRows over it."""
        if self.bias is not None or \
                not lyco_helpers.own_math(self, NetworkModuleLora, "calc_delta", "delta_shape"):
            return None
        rank = self.truncated_rank(dyn_dim)
        up = lyco_helpers.flat2d(self.up)[:, :rank].to(device, torch.float32)
        down = self.down[:rank].to(device, torch.float32)
        if self.mid is not None:  # ΔW[i, j, ...] = Σ_nm mid[n, m, ...]·up[i, n]·down[m, j] = up @ (mid ∘ down)
            mid = self.mid[:rank, :rank].to(device, torch.float32)
            down = torch.einsum("n m ..., m j -> n j ...", mid, lyco_helpers.flat2d(down))
        down = lyco_helpers.flat2d(down)
        weight_shape = torch.Size(weight_shape)
        if len(weight_shape) < 2 or up.shape[1] != down.shape[0] or up.shape[0] != weight_shape[0] or \
                up.shape[0] * down.shape[1] != weight_shape.numel():
            return None
        m = 1.0 if self.dora_scale is not None else float(multiplier)  # DoRA takes m after its norms
        rows = LowRankRows(up, down, float(self.calc_scale(dyn_dim)) * m)
        return lyco_helpers.dora_rows(self, rows, weight_shape, multiplier)


class LowRankRows(lyco_helpers.RowDelta):
    """ΔW = alpha · up @ down (up: out × rank, down: rank × cols, fp32; alpha: multiplier × scale, applied by the
    GEMM, so the factors are used as loaded, without a scaled copy per job)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float = 1.0):
        self.up, self.down, self.alpha = up, down, float(alpha)

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        torch.addmm(out, self.up[r0:r1], self.down, beta=1 if accumulate else 0, alpha=self.alpha, out=out)

    def add_to(self, weight: torch.Tensor, scratch, block_elements: int) -> None:
        weight.addmm_(self.up, self.down, alpha=self.alpha)  # one GEMM over the layer: MKL blocks it better
