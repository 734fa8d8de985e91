"""The patcher and each operation's floor (scripts/bench_lora_floors.py) timed in pairs, for
scripts/bench_lora_patcher.py.

This machine's speed drifts by 10-25 % over minutes (a shared VM), so timing all of ours and then all of the floor
compares two different machines. Here each repeat times every operation on both sides back to back, the side that
goes first alternating from one repeat to the next, and an operation's ratio is the median of its per-repeat ratios
(ours / floor of the same repeat); the times reported are medians as before.

Both sides work on the model's own weights. The floor's put-back (a copy from its in-memory originals) is a write the
patcher did not make, so before an operation that starts from the original weights ours is brought back to a known
state untimed (apply A, remove it), which also lets it check the host's source again, as it would after any foreign
write; this is setup, like the floor's put-back, and not part of either time.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable

OPS = ("apply 1", "apply 3", "loha", "lokr", "switch", "multiplier", "same set", "remove")
FLOOR_OPS = ("apply 1", "apply 3", "loha", "lokr", "switch", "multiplier", "remove")
FROM_ORIGINAL = ("apply 1", "apply 3", "loha", "lokr")  # ops that start from the original weights


class Ours:
    """The patcher with one restore strategy ("source": the host's original weights, "residual": none)."""

    def __init__(self, layers: dict, module_paths: dict, nets: dict, strategy: str, source, clock,
                 trim: Callable[[], None], memory: Callable[[], int], paired: bool = True):
        import lora_patcher
        prefer = {"source": (lora_patcher.SOURCE, lora_patcher.CLONE),
                  "residual": (lora_patcher.RESIDUAL, lora_patcher.CLONE)}[strategy]
        self.patcher = lora_patcher.Patcher(prefer=prefer)
        self.layers, self.module_paths, self.nets, self.source = layers, module_paths, nets, source
        self.clock, self.trim, self.memory = clock, trim, memory
        self.paired = paired  # another side writes the weights between our runs
        self.times: dict[str, list] = {op: [] for op in OPS}
        self.plans: dict[str, list] = {op: [] for op in OPS}
        self.held: dict[str, list] = {}

    def _plan(self, *names: str, m: float = 1.0) -> dict:
        import lora_plan
        networks = [self.nets[n] for n in names]
        for n in networks:
            n.te_multiplier = n.unet_multiplier = m
        return lora_plan.build_plan(self.layers, networks)

    def sync(self, plan: dict) -> int:
        return self.patcher.sync(self.layers, plan, self.source, self.module_paths)

    WANTS = {"apply 1": ("A",), "apply 3": ("A", "B", "C"), "loha": ("H",), "lokr": ("K",), "switch": ("B",),
             "multiplier": ("A",), "same set": ("A",), "remove": ()}

    def run(self, op: str) -> float:
        """Sets up (untimed), times `op`, puts the original weights back (untimed); returns the time."""
        self.sync({})
        if op in FROM_ORIGINAL:
            if self.paired:  # known state after the floor's writes (see the module's docstring)
                self.sync(self._plan("A"))
                self.sync({})
        else:
            self.sync(self._plan("A"))
        measure = op in ("apply 1", "apply 3")
        if measure:
            self.trim()
            before = self.memory()
        t_plan, plan = self.clock(self._plan, *self.WANTS[op], m=0.7 if op == "multiplier" else 1.0)
        self.plans[op].append(t_plan)  # timed apart: the "incl. read+parse" columns add it
        t, written = self.clock(self.sync, plan)
        if op == "same set":
            assert written == 0, written
        elif op != "remove":
            assert written == len(plan), (op, written, len(plan))
        if measure:
            self.trim()
            n = op[-1]
            self.held.setdefault(f"held {n} (accounted)", []).append(self.patcher.held_bytes(self.layers))
            self.held.setdefault(f"held {n} (memory growth)", []).append(self.memory() - before)
        self.sync({})
        self.times[op].append(t)
        return t

    def result(self, ratios: dict[str, list] | None = None) -> dict:
        res = {op: statistics.median(v) for op, v in self.times.items() if v}
        res["plan"] = {op: statistics.median(v) for op, v in self.plans.items() if v}
        res.update({k: statistics.median(v) for k, v in self.held.items()})
        res["stats"] = dict(self.patcher.stats)
        if ratios is not None:
            res["paired ratio"] = {op: statistics.median(v) for op, v in ratios.items() if v}
        return res


class Floor:
    """Each operation's floor (scripts/bench_lora_floors.py) at the block size that was fastest for it in a
    calibration run (multiplier uses switch's: the same loop on the same shapes)."""

    def __init__(self, layers: dict, nets: dict, device, clock, ops: tuple[str, ...] = FLOOR_OPS):
        """`ops`: the operations to time (a subset of FLOOR_OPS; always with "apply 1", which remove starts from);
        `nets` needs the Loras those use (A; B for switch; A+B+C, H, K for apply 3, loha, lokr)."""
        from scripts.bench_lora_floors import Floors, chunk_name
        self.floors = f = Floors(layers, nets, device)
        self.one = one = f.lora_factors("A")
        makers = {"apply 1": lambda: one, "apply 3": lambda: f.lora_factors("ABC"), "loha": lambda: f.loha_factors("H"),
                  "lokr": lambda: f.lokr_factors("K"), "switch": lambda: f.lora_factors("B"),
                  "multiplier": lambda: f.lora_factors("A", 0.7), "remove": lambda: None}
        loops = {"apply 1": f.apply_lora, "apply 3": f.apply_lora, "loha": f.apply_loha, "lokr": f.apply_lokr,
                 "switch": lambda x: f.apply_lora(x, from_original=True),
                 "multiplier": lambda x: f.apply_lora(x, from_original=True), "remove": lambda _: f.remove()}
        self.ops = {op: (lambda loop=loops[op], factors=makers[op](): loop(factors)) for op in ops}
        self.clock = clock
        self.chunks, self.calibration = {}, {}
        for op in ("apply 1", "apply 3", "loha", "lokr", "switch"):
            if op in self.ops:
                self.chunks[op], self.calibration[op] = f.calibrate(self.ops[op], clock)
        self.loop_names = {}
        if "apply 3" in self.ops:  # several LoRAs: concatenated, or one GEMM each per block, whichever is cheaper
            parts = f.lora_parts("ABC")
            per_lora = lambda: f.apply_lora_parts(parts)  # noqa: E731
            chunk, times = f.calibrate(per_lora, clock)
            if min(times.values()) < min(self.calibration["apply 3"].values()):
                self.ops["apply 3"], self.chunks["apply 3"] = per_lora, chunk
                self.loop_names["apply 3"] = "per LoRA"
            self.calibration["apply 3"] = {**{f"{k}, concatenated": v for k, v in self.calibration["apply 3"].items()},
                                           **{f"{k}, per LoRA": v for k, v in times.items()}}
        if "multiplier" in self.ops:  # the same loop on the same shapes as switch
            self.chunks["multiplier"] = self.chunks["switch"] if "switch" in self.chunks else \
                f.calibrate(self.ops["multiplier"], clock)[0]
        self.chunks["remove"] = None
        self.blocks = {op: chunk_name(c) + (f", {self.loop_names[op]}" if op in self.loop_names else "")
                       for op, c in self.chunks.items() if op != "remove"}
        self.times: dict[str, list] = {op: [] for op in ops}

    def run(self, op: str) -> float:
        f = self.floors
        if op == "remove":
            f.chunk = self.chunks["apply 1"]
            f.apply_lora(self.one)
        f.chunk = self.chunks[op]
        t = self.clock(self.ops[op])[0]
        f.remove()
        self.times[op].append(t)
        return t

    def result(self) -> dict:
        res = {op: statistics.median(v) for op, v in self.times.items() if v}
        res["blocks"] = self.blocks
        res["calibration"] = self.calibration  # {op: {block size: best of 2}}
        return res


def run_pairs(ours: Ours, floor: Floor, repeats: int, ops: tuple[str, ...] = OPS) -> dict[str, list]:
    """`repeats` rounds of every op on both sides back to back (who goes first alternates); {op: [ours / floor]}."""
    ratios: dict[str, list] = {op: [] for op in ops if op in floor.ops}
    for r in range(repeats):
        for op in ops:
            if op not in floor.ops:
                ours.run(op)
                continue
            if r % 2 == 0:
                t_ours, t_floor = ours.run(op), floor.run(op)
            else:
                t_floor, t_ours = floor.run(op), ours.run(op)
            ratios[op].append(t_ours / t_floor)
    return ratios


def run_alone(ours: Ours, repeats: int, ops: tuple[str, ...] = OPS) -> None:
    for _ in range(repeats):
        for op in ops:
            ours.run(op)
