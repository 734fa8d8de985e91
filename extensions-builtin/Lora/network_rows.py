"""Modules for file layers that are not one loaded layer (lora_flux.FusedLayer): a fused BFL layer (q/k/v[/mlp]
stacked by rows) becomes one module per real layer, each holding that layer's rows of the file's ΔW.

- plain LoRA (the common case): a NetworkModuleLora per layer with the layer's rows of `lora_up` and the shared
  `lora_down` and alpha, so the patcher's low-rank fast path and functional mode's low-rank hooks still apply;
  a DoRA magnitude per output channel is split by the same rows (each row is normalised on its own);
- any other type whose ΔW does not read the weight (LoHa, LoKr, full, ...): NetworkModuleRows, which computes the
  file layer's ΔW (block by block where the type can) and keeps the layer's rows;
- XLabs' old single-block `proj_lora` on linear2's output: NetworkModuleOutputLora, ΔW = m·s·B·A·W, Δb = m·s·B·A·b,
  which is exactly `out + m·s·B·A·out` folded into the layer.
What cannot be split exactly (DoRA per input channel, OFT, IA3, ...) raises ValueError naming why; the loader records
it for the coverage report and the rest of the file applies.
"""
from __future__ import annotations

import lora_bypass
import lyco_helpers
import network
import network_lora
import torch

_LOW_RANK_PARTS = ("lora_up.weight", "lora_down.weight")


def _weights(module: network.NetworkModule, target: str, sd_module, w: dict) -> network.NetworkWeights:
    for part, value in (("alpha", module.alpha), ("scale", module.scale)):
        if value is not None:
            w[part] = torch.tensor(value)
    return network.NetworkWeights(network_key=module.network_key, sd_key=target, w=w, sd_module=sd_module)


def _take(t: torch.Tensor, ranges) -> torch.Tensor:
    return torch.cat([t[r0:r1] for r0, r1 in ranges], dim=0)


def _output_dora_rows(module: network.NetworkModule, shape: tuple[int, int]) -> torch.Tensor | None:
    """The module's DoRA magnitude as (rows, 1), or None without DoRA; ValueError when it is per input channel."""
    scale = getattr(module, "dora_scale", None)
    if scale is None:
        return None
    axis = lyco_helpers.dora_axis(tuple(scale.shape), shape, module.dora_square_default)
    if axis != lyco_helpers.DORA_OUTPUT_AXIS:
        raise ValueError("its DoRA magnitude is per input channel, which needs the whole fused weight of the layers "
                         "it spans; not applied")
    return scale.reshape(-1, 1)


def _is_plain_lora(module) -> bool:
    return type(module) is network_lora.NetworkModuleLora and module.mid is None and module.bias is None and \
        module.up.dim() == 2 and module.down.dim() == 2


def split(module: network.NetworkModule, fused, layers: dict) -> dict[str, network.NetworkModule]:
    """{real layer: module} for a module built on the fused layer `fused` (lora_flux.FusedLayer)."""
    if fused.output_side and _is_plain_lora(module) and module.down.shape[1] != fused.shape[1]:
        return {fused.targets[0][0]: NetworkModuleOutputLora(module, fused.targets[0][0], layers[fused.targets[0][0]])}
    module.validate(fused.shape)
    dora = _output_dora_rows(module, fused.shape)
    res = {}
    for target, ranges in fused.targets:
        if _is_plain_lora(module):
            w = {"lora_up.weight": _take(module.up, ranges), "lora_down.weight": module.down}
            if dora is not None:
                w["dora_scale"] = _take(dora, ranges)
            piece = network_lora.NetworkModuleLora(module.network, _weights(module, target, layers[target], w))
            piece.dora_square_default = lyco_helpers.DORA_OUTPUT_AXIS
            res[target] = piece
        else:
            if module.delta_depends_on_weight or module.applies_multiplier:
                raise ValueError(f"a {type(module).__name__} delta reads the whole fused weight of the layers it "
                                 f"spans; not applied")
            res[target] = NetworkModuleRows(module, target, layers[target], ranges, fused.shape, dora)
    return res


class NetworkModuleRows(network.NetworkModule):
    """The rows `ranges` of another module's ΔW for a file layer of shape `fused_shape` (that module's delta must
    not read the weight). A DoRA magnitude per output channel is applied here, on the layer's own rows.
    Bypass forward (Linear layers): the inner type's forward on the file layer, this layer's channels taken."""

    delta_reads_weight = False

    def __init__(self, inner: network.NetworkModule, target: str, sd_module, ranges, fused_shape, dora_rows=None):
        super().__init__(inner.network, network.NetworkWeights(inner.network_key, target, {}, sd_module))
        self.inner = inner
        self.ranges = tuple(ranges)
        self.nbytes = getattr(inner, "nbytes", 0)
        self.fused_shape = tuple(fused_shape)
        self.rows_count = sum(r1 - r0 for r0, r1 in self.ranges)
        inner.dora_scale = None  # applied per layer below, on that layer's rows
        self.dora_scale = None if dora_rows is None else _take(dora_rows, self.ranges)
        self.dora_square_default = lyco_helpers.DORA_OUTPUT_AXIS
        self.parts_used = set(inner.parts_used)
        self.dim = inner.dim

    @property
    def delta_depends_on_weight(self) -> bool:
        """The rows' ΔW reads the weight only through DoRA (the inner type's must not read it at all)."""
        return self.dora_scale is not None

    def delta_shape(self) -> tuple:
        return (self.rows_count, self.fused_shape[1])

    def validate(self, weight_shape: tuple) -> None:
        if tuple(weight_shape) != self.delta_shape():
            raise ValueError(f"rows {self.ranges} of the file layer make a delta of shape {self.delta_shape()}, the "
                             f"layer's weight has shape {tuple(weight_shape)}")

    def compute(self, orig_weight: torch.Tensor, multiplier: float, dyn_dim: int | None = None,
                orig_bias: torch.Tensor | None = None):
        # the inner type reads only the device and shape of the weight it is given
        stand_in = torch.zeros((), device=orig_weight.device, dtype=torch.float32).expand(self.fused_shape)
        strength = 1.0 if self.dora_scale is not None else multiplier
        dw, db = self.inner.compute(stand_in, strength, dyn_dim)
        dw = _take(dw, self.ranges)
        db = None if db is None else _take(db, self.ranges)
        if self.dora_scale is not None:
            dw = lyco_helpers.weight_decompose(dw, orig_weight.to(dw.device, torch.float32),
                                               self.dora_scale.to(dw.device, torch.float32),
                                               lyco_helpers.DORA_OUTPUT_AXIS) * multiplier
            db = None if db is None else db * multiplier
        return dw.reshape(orig_weight.shape), db

    def bypass(self, layer: torch.nn.Module, multiplier: float, dyn_dim: int | None = None) -> lora_bypass.Bypass:
        op = lora_bypass.LayerOp(layer)
        self.validate(op.weight_shape)
        if self.dora_scale is not None or op.kind != "linear":
            return lora_bypass.ComputedBypass(self, op, multiplier, dyn_dim)
        inner = self.inner.bypass_on(lora_bypass.LayerOp(layer, self.fused_shape), multiplier, dyn_dim)
        index = torch.cat([torch.arange(r0, r1) for r0, r1 in self.ranges]).to(op.device)
        return RowsBypass(inner, index)

    def row_delta(self, weight_shape, device, multiplier: float, dyn_dim: int | None = None):
        """The inner type's block-by-block ΔW, read at this layer's rows; None when it has none (or with DoRA)."""
        inner_rows = getattr(self.inner, "row_delta", None)
        if self.dora_scale is not None or not callable(inner_rows) or \
                tuple(weight_shape) != self.delta_shape():
            return None
        rows = inner_rows(torch.Size(self.fused_shape), device, multiplier, dyn_dim)
        if rows is None or getattr(rows, "reads_original", False):  # it would read the file layer's weight
            return None
        return RowsOf(rows, self.ranges)


class RowsOf(lyco_helpers.RowDelta):
    """Rows of another RowDelta: this layer's row i is row `ranges`-mapped i of the file layer's ΔW."""

    def __init__(self, inner: lyco_helpers.RowDelta, ranges):
        self.inner = inner
        self.ranges = tuple(ranges)
        self.nbytes = getattr(inner, "nbytes", 0)
        bias = getattr(inner, "bias", None)
        self.bias = None if bias is None else _take(bias, self.ranges)

    def rows(self, out: torch.Tensor, r0: int, r1: int, scratch, accumulate: bool) -> None:
        start = 0  # this layer's first row of the current range
        for f0, f1 in self.ranges:
            a, b = max(r0, start), min(r1, start + f1 - f0)
            if a < b:
                self.inner.rows(out[a - r0:b - r0], f0 + a - start, f0 + b - start, scratch, accumulate)
            start += f1 - f0


class RowsBypass(lora_bypass.Bypass):
    """Channels `index` of a file layer's output change (the inner forward never reads y0: its ΔW reads no W)."""

    def __init__(self, inner: lora_bypass.Bypass, index: torch.Tensor):
        super().__init__()
        self.inner, self.index = inner, index

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def __call__(self, x: torch.Tensor, y0: torch.Tensor | None) -> torch.Tensor:
        return self.inner(x, None).index_select(-1, self.index)


class OutputLoraBypass(lora_bypass.Bypass):
    """Δy = m·s·up(down(y0)): the LoRA on the layer's output, as XLabs applies it."""

    def __init__(self, op: lora_bypass.LayerOp, up: torch.Tensor, down: torch.Tensor, factor: float):
        super().__init__()
        self.op, self.factor = op, factor
        self.up, self.down = self.hold(up, op), self.hold(down, op)

    def __call__(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        c = lora_bypass.cast
        return network_lora.forward_diff(y0, self.op, c(self.up, y0), c(self.down, y0), None, self.factor)


class NetworkModuleOutputLora(network.NetworkModule):
    """A LoRA added to a Linear's output (XLabs' early single-block `proj_lora`: out + m·s·up(down(out))): the same
    as the Linear with W' = (I + m·s·up·down)·W and b' = (I + m·s·up·down)·b."""

    delta_reads_weight = True

    def __init__(self, lora: network_lora.NetworkModuleLora, target: str, sd_module):
        super().__init__(lora.network, _weights(lora, target, sd_module, {}))
        self.up, self.down = lora.up, lora.down
        self.dim = lora.dim
        self.parts_used = {"lora_up.weight", "lora_down.weight"} | ({"alpha"} if lora.alpha is not None else set())
        if lora.dora_scale is not None:
            raise ValueError("DoRA on a LoRA applied to a layer's output is not defined")

    def delta_shape(self) -> tuple | None:
        return None

    def validate(self, weight_shape: tuple) -> None:
        out = weight_shape[0]
        if len(weight_shape) != 2 or tuple(self.up.shape) != (out, self.dim) or \
                tuple(self.down.shape) != (self.dim, out):
            raise ValueError(f"an output-side LoRA of shapes up {tuple(self.up.shape)} / down {tuple(self.down.shape)} "
                             f"does not fit a weight of shape {tuple(weight_shape)}")

    def _rank_scale(self, dyn_dim: int | None) -> tuple[int, float]:
        rank = self.dim if dyn_dim is None or dyn_dim >= self.dim else max(1, int(dyn_dim))
        return rank, self.scale if self.scale is not None else (self.alpha / rank if self.alpha else 1.0)

    def bypass(self, layer: torch.nn.Module, multiplier: float, dyn_dim: int | None = None) -> lora_bypass.Bypass:
        op = lora_bypass.LayerOp(layer)
        self.validate(op.weight_shape)
        rank, scale = self._rank_scale(dyn_dim)
        return OutputLoraBypass(op, self.up[:, :rank], self.down[:rank], scale * float(multiplier))

    def compute(self, orig_weight: torch.Tensor, multiplier: float, dyn_dim: int | None = None,
                orig_bias: torch.Tensor | None = None):
        device = orig_weight.device
        rank, scale = self._rank_scale(dyn_dim)
        mix = (self.up[:, :rank].to(device, torch.float32) * (scale * multiplier)) @ \
            self.down[:rank].to(device, torch.float32)
        dw = mix @ orig_weight.to(device, torch.float32)
        db = None if orig_bias is None else mix @ orig_bias.to(device, torch.float32)
        return dw, db
