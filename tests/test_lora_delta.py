"""The fused per-type deltas (row_delta: LoRA/LoCon/Tucker, LoHa incl. Tucker, LoKr in all its layouts, full, and the
types that read the original weight: IA3, OFT, GLoRA) give the
same ΔW as each type's compute() (tested against lycoris-lora in test_lora_lycoris_reference) and as torch.kron /
the Hadamard product written out here, for any block of rows; and the patcher writes them bit-exact-restorably."""
import lora_delta
import lora_loader
import lyco_helpers
import network
import network_glora
import network_hada
import network_ia3
import network_lokr
import network_lora
import network_oft
import pytest
import torch

G = torch.Generator().manual_seed(99)


def rnd(*shape, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=G) * scale


def build(parts: dict, shape: tuple):
    net = network.Network("t", None)
    layer = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else \
        torch.nn.Conv2d(shape[1], shape[0], shape[2], padding=shape[2] // 2)
    weights = network.NetworkWeights(network_key="lora_unet_x", sd_key="unet.x", w=dict(parts), sd_module=layer)
    module = lora_loader.build_module(net, weights)
    assert module is not None
    return module, layer.weight.detach()


class Scratch:
    def get(self, name, dtype, n):
        return torch.empty(n, dtype=dtype)


def all_rows(rd, rows: int, cols: int, step: int) -> torch.Tensor:
    out = torch.full((rows, cols), float("nan"))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        rd.rows(out[r0:r1], r0, r1, Scratch(), accumulate=False)
    return out


def check(module, weight, m: float = 0.7, kind=None, reference=None):
    expected = module.compute(weight, m)[0].reshape(weight.shape[0], -1)
    rd = module.row_delta(weight.shape, weight.device, m, None)
    assert rd is not None and (kind is None or isinstance(rd, kind))
    rows, cols = expected.shape
    for step in (1, 2, 3, 5, rows):
        torch.testing.assert_close(all_rows(rd, rows, cols, step), expected, rtol=2e-6, atol=1e-7)
    if reference is not None:
        torch.testing.assert_close(expected, reference.reshape(expected.shape), rtol=2e-6, atol=1e-7)
    acc = torch.ones(rows, cols)  # accumulate mode adds
    rd.rows(acc, 0, rows, Scratch(), accumulate=True)
    torch.testing.assert_close(acc, expected + 1, rtol=2e-6, atol=1e-7)
    w = torch.zeros(rows, cols)
    rd.add_to(w, Scratch(), block_elements=3 * cols)
    torch.testing.assert_close(w, expected, rtol=2e-6, atol=1e-7)


def test_lora_locon_and_tucker_fuse_into_one_lowrank_product():
    up, down = rnd(6, 3), rnd(3, 5)
    module, w = build({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)}, (6, 5))
    check(module, w, kind=network_lora.LowRankRows, reference=0.7 * 0.5 * up @ down)
    up, mid, down = rnd(6, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    module, w = build({"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down}, (6, 4, 3))
    reference = 0.7 * torch.einsum("nmkl,in,mj->ijkl", mid, up[:, :, 0, 0], down[:, :, 0, 0])
    check(module, w, kind=network_lora.LowRankRows, reference=reference)


@pytest.mark.parametrize("conv", [False, True])
def test_loha_rows_are_the_hadamard_product(conv):
    shape = (6, 4, 3) if conv else (7, 5)
    cols = 4 * 9 if conv else 5
    parts = {"hada_w1_a": rnd(shape[0], 2), "hada_w1_b": rnd(2, cols), "hada_w2_a": rnd(shape[0], 2),
             "hada_w2_b": rnd(2, cols), "alpha": torch.tensor(1.0)}
    module, w = build(parts, shape)
    reference = 0.7 * 0.5 * (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    check(module, w, kind=network_hada.HadaRows, reference=reference)


def test_loha_tucker_rows():
    parts = {"hada_w1_a": rnd(2, 6), "hada_w1_b": rnd(2, 4), "hada_t1": rnd(2, 2, 3, 3),
             "hada_w2_a": rnd(2, 6), "hada_w2_b": rnd(2, 4), "hada_t2": rnd(2, 2, 3, 3)}
    module, w = build(parts, (6, 4, 3))
    w1 = torch.einsum("ijkl,ip,jq->pqkl", parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
    w2 = torch.einsum("ijkl,ip,jq->pqkl", parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
    check(module, w, reference=0.7 * w1 * w2)


@pytest.mark.parametrize("layout", ["full", "lowrank_w2", "lowrank_both", "conv", "tucker"])
def test_lokr_rows_are_the_kronecker_product(layout):
    if layout == "full":
        w1, w2 = rnd(2, 3), rnd(4, 2)
        parts, shape = {"lokr_w1": w1, "lokr_w2": w2}, (8, 6)
    elif layout == "lowrank_w2":
        w1, a, b = rnd(3, 2), rnd(4, 2), rnd(2, 5)
        w2 = a @ b
        parts, shape = {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": torch.tensor(1.0)}, (12, 10)
    elif layout == "lowrank_both":
        a1, b1, a2, b2 = rnd(2, 2), rnd(2, 3), rnd(5, 2), rnd(2, 2)
        w1, w2 = a1 @ b1, a2 @ b2
        parts, shape = {"lokr_w1_a": a1, "lokr_w1_b": b1, "lokr_w2_a": a2, "lokr_w2_b": b2}, (10, 6)
    elif layout == "conv":
        w1, a, b = rnd(2, 2), rnd(3, 2), rnd(2, 2 * 9)
        w2 = (a @ b).reshape(3, 2, 3, 3)
        parts, shape = {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": torch.tensor(4.0)}, (6, 4, 3)
    else:
        w1, a, b, t = rnd(2, 2), rnd(2, 3), rnd(2, 2), rnd(2, 2, 3, 3)
        w2 = torch.einsum("ijkl,ip,jq->pqkl", t, a, b)
        parts, shape = {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "lokr_t2": t}, (6, 4, 3)
    module, w = build(parts, shape)
    kron = torch.kron(w1.reshape(*w1.shape, *([1] * (w2.dim() - 2))), w2.contiguous())
    check(module, w, kind=network_lokr.KronRows, reference=0.7 * module.calc_scale() * kron)


def test_kron_rows_against_torch_kron_for_every_block():
    w1, w2 = rnd(3, 4), rnd(5, 6)
    expected = torch.kron(w1, w2)
    for r0 in range(15):
        for r1 in range(r0 + 1, 16):
            out = torch.empty(r1 - r0, 24)
            network_lokr.kron_rows(out, w1, w2, r0, r1, accumulate=False)
            torch.testing.assert_close(out, expected[r0:r1], rtol=0, atol=0)


def test_row_blocks_keep_runs_whole_or_cut_them_evenly():
    # 12 rows of 10 columns, runs of 4 rows (a LoKr with c = 4)
    assert list(lora_delta.row_blocks(12, 10, 100)) == [(0, 10), (10, 12)]
    assert list(lora_delta.row_blocks(12, 10, 100, run=4)) == [(0, 8), (8, 12)]  # 10 rows → 2 whole runs
    assert list(lora_delta.row_blocks(12, 10, 30, run=4)) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    assert list(lora_delta.row_blocks(10, 10, 30, run=4)) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    assert list(lora_delta.row_blocks(7, 10, 1000, run=4)) == [(0, 7)]  # the whole layer: one block
    assert lora_delta.row_run([]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lokr_merge_in_blocks_that_keep_its_runs(dtype, monkeypatch):
    w1, w2 = rnd(3, 2), rnd(4, 5)
    module, _ = build({"lokr_w1": w1, "lokr_w2": w2}, (12, 10))
    original = rnd(12, 10).to(dtype)
    expected = (original.float() + 0.5 * torch.kron(w1, w2)).to(dtype)
    for block in (30, 50, 120):  # runs cut in pieces, two whole runs per block, the whole layer
        monkeypatch.setattr(lora_delta, "CPU_CHUNK", block)
        for terms in (1, 2):  # one term (fp32: one fused op), two (summed block by block)
            delta = lora_delta.LayerDelta()
            for _ in range(terms):
                delta.parts.append(module.row_delta(original.shape, original.device, 0.5 / terms))
            assert delta.parts[0].row_run == 4 and lora_delta.row_run(delta.parts) == 4
            out = torch.empty_like(original)
            delta.merge(out, original, Scratch())
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 0.02)


def test_bias_parts_and_changed_math_keep_the_generic_path():
    up, down = rnd(6, 3), rnd(3, 5)
    biased, w = build({"lora_up.weight": up, "lora_down.weight": down, "bias": rnd(6, 5)}, (6, 5))
    assert biased.row_delta(w.shape, w.device, 1.0) is None

    class Doubled(network_hada.NetworkModuleHada):  # a third-party subclass with its own math
        def calc_delta(self, *args, **kwargs):
            updown, shape, bias = super().calc_delta(*args, **kwargs)
            return updown * 2, shape, bias

    parts = {"hada_w1_a": rnd(6, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(6, 2), "hada_w2_b": rnd(2, 5)}
    net = network.Network("t", None)
    module = Doubled(net, network.NetworkWeights("k", "unet.x", parts, None))
    assert module.row_delta((6, 5), torch.device("cpu"), 1.0) is None
    assert not lyco_helpers.own_math(module, network_hada.NetworkModuleHada, "calc_delta")


def test_layer_delta_sums_fused_lowrank_and_generic_terms_in_blocks():
    up1, down1, up2, down2 = rnd(6, 2), rnd(2, 5), rnd(6, 3), rnd(3, 5)
    lora1, w = build({"lora_up.weight": up1, "lora_down.weight": down1}, (6, 5))
    lora2, _ = build({"lora_up.weight": up2, "lora_down.weight": down2}, (6, 5))
    loha, _ = build({"hada_w1_a": rnd(6, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(6, 2),
                     "hada_w2_b": rnd(2, 5)}, (6, 5))
    biased, _ = build({"lora_up.weight": rnd(6, 2), "lora_down.weight": rnd(2, 5), "bias": rnd(6, 5)},
                      (6, 5))  # A1111's weight-shaped `bias` part: generic

    class C:  # the contribution fields compute_delta reads
        def __init__(self, module, m):
            self.module, self.multiplier, self.dyn_dim = module, m, None
            self.network = network.Network("n", None)

    contributions = [C(lora1, 1.0), C(loha, 0.5), C(lora2, -0.3), C(biased, 0.8)]
    delta = lora_delta.compute_delta("unet.x", None, w, contributions)
    assert [type(t) for t in delta.parts] == [network_lora.LowRankRows, network_hada.HadaRows,
                                              network_lora.LowRankRows]
    assert delta.full is not None and delta.single is None
    expected = sum(c.module.compute(w, c.multiplier)[0] for c in contributions)
    got = torch.cat([d for _, _, d in delta.blocks(w.shape, w.device, Scratch())]).reshape(w.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_blocks_shrink_for_loha_temporaries_and_merge_every_block(monkeypatch):
    """A LoHa term uses two block-sized temporaries next to the merged rows, so its layer's blocks are a third of
    the device's block: 30 elements → 10 = two 5-wide rows per block. Every block is merged: a bf16 weight ends
    as the single rounding of W0 + ΔW, and the residual path's blocks cover the weight in the same steps."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 30)
    up, down = rnd(12, 2), rnd(2, 5)
    lora, w = build({"lora_up.weight": up, "lora_down.weight": down}, (12, 5))
    loha, _ = build({"hada_w1_a": rnd(12, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(12, 2),
                     "hada_w2_b": rnd(2, 5)}, (12, 5))

    class C:
        def __init__(self, module):
            self.module, self.multiplier, self.dyn_dim = module, 1.0, None
            self.network = network.Network("n", None)

    w0 = w.to(torch.bfloat16)
    only_lora = lora_delta.compute_delta("unet.x", None, w0, [C(lora)])
    assert lora_delta.block_for(only_lora.terms, w0.device) == 30
    both = lora_delta.compute_delta("unet.x", None, w0, [C(lora), C(loha)])
    assert lora_delta.block_for(both.terms, w0.device) == 10
    assert [(a, b) for a, b, _ in both.blocks(w0.shape, w0.device, Scratch())] == \
        [(i, i + 10) for i in range(0, 60, 10)]
    expected = w0.float() + lora.compute(w, 1.0)[0] + loha.compute(w, 1.0)[0]
    out = w0.clone()
    both.merge(out, out, Scratch())
    assert out.dtype == torch.bfloat16
    # one rounding of the fp32 sum (the sum's order may differ from the reference's in the last fp32 bit)
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)
    assert not torch.equal(out, w0)


def test_fp32_merge_of_several_terms_goes_block_by_block(monkeypatch):
    """Several fused terms and a whole ΔW on an fp32 weight, merged from an original held elsewhere: each block of
    rows gets its original, then every term (here 3 blocks of 2 rows). Hand-computed: W0 = 1 everywhere,
    ΔW1 = 2·[[1, 0], ..] @ [[1, 2]], ΔW2 = (up2 @ down2), full = 0.5."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 4)
    a = network_lora.LowRankRows(torch.tensor([[1.0], [0.0], [2.0], [0.0], [1.0], [3.0]]), torch.tensor([[1.0, 2.0]]),
                                 alpha=2.0)
    b = network_lora.LowRankRows(torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0], [1.0]]), torch.tensor([[-1.0, 4.0]]))
    delta = lora_delta.LayerDelta(parts=[a, b], full=torch.full((6, 2), 0.5))
    original = torch.ones(6, 2)
    out = torch.full((6, 2), float("nan"))
    delta.merge(out, original, Scratch())
    expected = torch.tensor([[3.5, 5.5], [0.5, 5.5], [5.5, 9.5], [0.5, 5.5], [3.5, 5.5], [6.5, 17.5]])
    assert torch.equal(out, expected)
    assert torch.equal(original, torch.ones(6, 2))
    in_place = torch.ones(6, 2)
    delta.merge(in_place, in_place, Scratch())
    assert torch.equal(in_place, expected)


def test_write_batch_budget_counts_what_the_deltas_made():
    """A batch of planned writes is full when the tensors its deltas made pass the budget: a whole ΔW (6×2 fp32 =
    48 bytes) and a LoKr term's scaled W1 and rebuilt W2 count; a LoRA's factors, read in place, do not. A write on
    another device than the CPU runs at once."""
    import lora_patch_job

    lokr, w = build({"lokr_w1": rnd(2, 2), "lokr_w2_a": rnd(3, 1), "lokr_w2_b": rnd(1, 1)}, (6, 2))
    kron = lokr.row_delta(w.shape, w.device, 1.0)
    assert kron.nbytes == 4 * (4 + 3)
    lora = network_lora.LowRankRows(rnd(6, 1), rnd(1, 2))
    assert lora.nbytes == 0

    def step(delta, device="cpu"):
        weight = torch.empty(6, 2, device="meta") if device == "meta" else w
        return lora_patch_job.DeferredWrite("x", None, [], (), weight, delta, None, rows=False)

    batch = lora_patch_job.WriteBatch(max_bytes=100)
    assert not batch.add(step(lora_delta.LayerDelta(parts=[lora])))
    assert not batch.add(step(lora_delta.LayerDelta(full=torch.zeros(6, 2))))  # 48
    assert not batch.add(step(lora_delta.LayerDelta(parts=[kron, lora])))  # 76
    assert batch.add(step(lora_delta.LayerDelta(full=torch.zeros(6, 2))))  # 124: run now
    assert len(batch.take()) == 4 and batch.nbytes == 0 and batch.steps == []
    assert batch.add(step(lora_delta.LayerDelta(parts=[lora]), "meta"))


def test_cpu_block_is_half_the_cores_l2_cache(tmp_path):
    """Linux's sysfs lists a core's caches; on one thread the block is half the L2 in fp32 elements, a power of two
    in 2^16..2^21; on several threads 2^21."""
    def cache(entry, level, kind, size):
        folder = tmp_path / entry
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")

    cache("index0", "1", "Data", "48K")
    cache("index1", "1", "Instruction", "32K")
    cache("index2", "2", "Unified", "2048K")
    cache("index3", "3", "Unified", "307200K")
    assert lora_delta.l2_cache_bytes(str(tmp_path)) == 2 * 1024 * 1024
    assert lora_delta.cpu_block_elements(2 * 1024 * 1024) == 262144  # 1 MiB of fp32
    assert lora_delta.cpu_block_elements(1280 * 1024) == 131072  # 640 KiB → the power of two below: 512 KiB
    assert lora_delta.cpu_block_elements(256 * 1024) == 65536  # at least 2^16
    assert lora_delta.cpu_block_elements(32 * 1024 * 1024) == 2097152  # at most 2^21
    assert lora_delta.cpu_block_elements(None) == 262144
    assert lora_delta.cpu_block_elements(2 * 1024 * 1024, threads=2) == 2097152  # several threads: 2^21
    assert lora_delta.cpu_block_elements(None, threads=16) == 2097152
    assert lora_delta.l2_cache_bytes(str(tmp_path / "absent")) is None


def test_terms_that_read_the_original_are_fused_and_each_reads_the_original(monkeypatch):
    """IA3, kohya OFT (its bias turned too) and a LoRA on one 2×3 layer, merged block by block. Worked by hand
    (the OFT numbers as in test_lora_types' kohya OFT test): W = [[1, 2, 3], [4, 5, 6]], b = [0.5, −1],
    x = [1, 0, −1] give y = [−1.5, −3] and Wx = [−2, −2]; the OFT alone gives y' = [0.71895141, −3.27614237];
    IA3 w = [0.5, −1] adds w ⊙ Wx = [−1, 2]; the LoRA up = [1, 2], down = [1, 1, 0] adds [1, 2]. Each term must
    read the original rows (not the rows another term already changed), and OFT's 2-row block must not be cut
    although the device block holds 3 elements (one row)."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 3)
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))

    def module(key, parts):
        weights = network.NetworkWeights(network_key=key, sd_key="unet.x", w=parts, sd_module=layer)
        return lora_loader.build_module(network.Network("t", None), weights)

    oft = module("oft_unet_x", {"oft_blocks": torch.tensor([[[0.0, 0.5], [0.0, 0.0]]]), "alpha": torch.tensor(0.25)})
    ia3 = module("lora_unet_x", {"weight": torch.tensor([0.5, -1.0])})
    lora = module("lora_unet_x", {"lora_up.weight": torch.tensor([[1.0], [2.0]]),
                                  "lora_down.weight": torch.tensor([[1.0, 1.0, 0.0]])})

    class C:
        def __init__(self, module):
            self.module, self.multiplier, self.dyn_dim = module, 1.0, None
            self.network = network.Network("n", None)

    x = torch.tensor([1.0, 0.0, -1.0])
    want = torch.tensor([0.71895141, -3.27614237]) + torch.tensor([-1.0, 2.0]) + torch.tensor([1.0, 2.0])
    for dtype in (torch.float32, torch.bfloat16):
        w0 = layer.weight.detach().to(dtype)
        delta = lora_delta.compute_delta("unet.x", None, w0, [C(lora), C(ia3), C(oft)], layer.bias.detach())
        assert [type(t) for t in delta.parts] == [network_ia3.Ia3Rows, network_oft.OftRows, network_lora.LowRankRows]
        assert delta.full is None
        out = torch.empty_like(w0)
        delta.merge(out, w0, Scratch())
        y = out.float() @ x + layer.bias.detach() + delta.bias
        torch.testing.assert_close(y, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 0.05)
        in_place = w0.clone()
        delta.merge(in_place, in_place, Scratch())
        assert torch.equal(in_place, out)
        with pytest.raises(RuntimeError, match="reads the original"):
            list(delta.blocks(w0.shape, w0.device, Scratch()))


@pytest.mark.parametrize("axis,magnitude_shape", [("output", (6, 1)), ("input", (1, 5))])
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full", "glora"])
def test_dora_is_fused_over_each_type_with_its_norms_from_the_whole_original(monkeypatch, axis, magnitude_shape,
                                                                            kind):
    """DoRA over a LoRA, LoHa, LoKr, full or GLoRA, merged in blocks of one row (the norms still come from every row):
    W' = W + m·(M ⊙ V/‖V‖ − W), V = W + U, the norm written out here per channel of the axis."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 5)
    parts = {"lora": {"lora_up.weight": rnd(6, 3), "lora_down.weight": rnd(3, 5)},
             "loha": {"hada_w1_a": rnd(6, 2), "hada_w1_b": rnd(2, 5), "hada_w2_a": rnd(6, 2),
                      "hada_w2_b": rnd(2, 5)},
             "lokr": {"lokr_w1": rnd(2, 1), "lokr_w2": rnd(3, 5)},
             "full": {"diff": rnd(6, 5)},
             "glora": {"a1.weight": rnd(5, 2), "a2.weight": rnd(2, 5), "b1.weight": rnd(6, 2),
                       "b2.weight": rnd(2, 5)}}[kind]
    magnitude = 1 + rnd(*magnitude_shape)
    dora, w = build({**parts, "dora_scale": magnitude, "alpha": torch.tensor(1.0)}, (6, 5))
    plain, _ = build({**parts, "alpha": torch.tensor(1.0)}, (6, 5))
    assert lora_delta.delta_depends_on_weight(dora)
    u = plain.compute(w, 1.0)[0]

    class C:
        def __init__(self, module, m):
            self.module, self.multiplier, self.dyn_dim = module, m, None
            self.network = network.Network("n", None)

    for m in (1.0, 0.6):
        v = w + u
        norm = v.norm(dim=1, keepdim=True) if axis == "output" else v.norm(dim=0, keepdim=True)
        expected = w + m * (magnitude.reshape(norm.shape) * v / norm - w)
        for dtype in (torch.float32, torch.bfloat16):
            w0 = w.to(dtype)
            delta = lora_delta.compute_delta("unet.x", None, w0, [C(dora, m)])
            assert [type(t) for t in delta.parts] == [lyco_helpers.DoraRows] and delta.full is None
            out = w0.clone()
            delta.merge(out, out, Scratch())
            tol = 1e-5 if dtype == torch.float32 else 0.02
            torch.testing.assert_close(out.float(), expected.to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boft_is_fused_in_whole_butterfly_spans(monkeypatch, dtype):
    """BOFT with 3 stages of 2-row blocks on 16 output rows mixes rows within spans of 2²·2 = 8: blocks of one row
    (the device block holds 6 elements) become whole spans, and the merge equals W0 + the type's compute(), which
    test_lora_lycoris_reference checks against lycoris-lora's BOFT."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 6)
    module, w = build({"oft_blocks": rnd(3, 8, 2, 2), "rescale": 1 + rnd(16, 1)}, (16, 6))

    class C:
        def __init__(self, m):
            self.module, self.multiplier, self.dyn_dim = module, m, None
            self.network = network.Network("n", None)

    for m in (1.0, 0.5):
        w0 = w.to(dtype)
        delta = lora_delta.compute_delta("unet.x", None, w0, [C(m)])
        assert [type(t) for t in delta.parts] == [network_oft.OftRows] and delta.parts[0].row_run == 8
        assert list(lora_delta.row_blocks(16, 6, lora_delta.block_for(delta.parts, w0.device), 8, True)) == \
            [(0, 8), (8, 16)]
        out = w0.clone()
        delta.merge(out, out, Scratch())
        expected = (w0.float() + module.compute(w0.float(), m)[0]).to(dtype)
        tol = 1e-6 if dtype == torch.float32 else 0.02
        torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("tucker", [False, True])
def test_glora_on_a_3x3_conv_is_fused_with_and_without_bm(monkeypatch, tucker):
    """GLoRA (LyCORIS layout) on a 3×3 conv: W·A mixes the input channels at each kernel position, B = b1·b2 or the
    Tucker rebuild with bm; written out here with einsum, merged in blocks of one output channel."""
    monkeypatch.setattr(lora_delta, "CPU_CHUNK", 36)
    a1, a2, b1 = rnd(4, 2, 1, 1), rnd(2, 4, 1, 1), rnd(6, 2, 1, 1)
    parts = {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "alpha": torch.tensor(2.0)}
    if tucker:
        bm, b2 = rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
        parts.update({"bm.weight": bm, "b2.weight": b2})
        wb = torch.einsum("mnkl,im,nj->ijkl", bm, b1[:, :, 0, 0], b2[:, :, 0, 0])
    else:
        b2 = rnd(2, 4, 3, 3)
        parts["b2.weight"] = b2
        wb = torch.einsum("or,rikl->oikl", b1[:, :, 0, 0], b2)
    module, w = build(parts, (6, 4, 3))

    class C:
        def __init__(self):
            self.module, self.multiplier, self.dyn_dim = module, 0.5, None
            self.network = network.Network("n", None)

    wa = torch.einsum("oikl,ij->ojkl", w, a1[:, :, 0, 0] @ a2[:, :, 0, 0])
    expected = w + 0.5 * (2.0 / 2) * (wa + wb)  # strength 0.5, alpha / rank = 1
    delta = lora_delta.compute_delta("unet.x", None, w, [C()])
    assert [type(t) for t in delta.parts] == [network_glora.GLoraRows]
    for out, original in ((w.clone(), None), (torch.empty_like(w), w)):
        delta.merge(out, out if original is None else original, Scratch())
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
