"""Loading in row pieces and kernel form: what is read a piece at a time equals what is read whole, the kernel
form computes what the loaded form does, --quant auto follows the file, and the default context under a
budget follows the planner's rule."""
from __future__ import annotations

import pytest
import torch

from tierlm import native
from tierlm.quant import intdot
from tierlm.offload.planner import PlanInput
from tierlm.offload.plan_input import MIN_DEFAULT_CONTEXT, choose_context
from tierlm.offload.units import layer_tensors
from tierlm.quant import QuantBlocks, QuantScheme, from_blocks, kernels, quantize
from tierlm.weights import open_model
from tierlm.offload.unit_load import load_unit_tensor

MiB = 1 << 20


@pytest.fixture(scope="module")
def embedded():
    src = open_model(None)
    yield src
    src.close()


def test_row_pieces_equal_the_whole_tensor(embedded):
    """GGUF rows read by pread in pieces (q/k un-permuted per head) equal the whole tensor, dense and as blocks."""
    for name in ("layers.0.wq", "layers.0.wk", "layers.2.w_down"):
        whole = embedded.load(name, torch.float32)
        step = 64
        pieces = torch.cat([embedded.load(name, torch.float32, slice(r, r + step)) for r in range(0, whole.shape[0], step)])
        assert torch.equal(pieces, whole), name
        blocks = embedded.load_blocks(name, QuantScheme("int4", 32))
        parts = QuantBlocks.concat([embedded.load_blocks(name, QuantScheme("int4", 32), slice(r, r + step))
                                    for r in range(0, whole.shape[0], step)])
        assert torch.equal(parts.q, blocks.q) and torch.equal(parts.scales, blocks.scales), name


def test_unit_tensor_from_small_pieces_equals_one_piece(embedded, monkeypatch):
    """A fused wqkv / w_gateup assembled from many small pieces equals the one-piece load (kernel form)."""
    present = set(embedded.tensor_names())
    specs = [t for t in layer_tensors(embedded.config, 0) if t.leaf in ("wqkv", "w_gateup")]
    scheme = QuantScheme("int4", 32)
    whole = {s.leaf: load_unit_tensor(embedded, s, torch.bfloat16, scheme, present) for s in specs}
    monkeypatch.setattr(type(embedded), "piece_rows", lambda self, name, target_bytes=0: 64)
    for s in specs:
        pieced = load_unit_tensor(embedded, s, torch.bfloat16, scheme, present)
        # kernel form: torch's, or the loaded form itself on the native kernels
        assert intdot.runs(pieced) or pieced.kernel_scales is not None and pieced.scales is None
        for part, t in whole[s.leaf].parts().items():
            assert torch.equal(pieced.parts()[part], t), (s.leaf, part)


@pytest.mark.parametrize("scheme", [QuantScheme("int4", 32), QuantScheme("int8")])
def test_kernel_form_computes_what_the_loaded_form_does(scheme):
    """prepare() drops scales/mins for the kernel's own (scale, zero) in the activation dtype; the fused kernel
    and the piecewise fallback both read those, and agree with each other and with the loaded form."""
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    qt = quantize(w, scheme)
    ready = kernels.prepare(qt, torch.bfloat16)
    if ready is qt:
        pytest.skip("no fused kernel for this layout on this torch build")
    assert ready.scales is None and ready.mins is None and kernels.prepare(ready, torch.bfloat16) is ready
    x = torch.randn(5, 384, dtype=torch.bfloat16)
    fused = kernels.linear(x, ready).float()
    fallback = kernels.fallback_linear(x, ready).float()
    exact = x.float() @ qt.dequantize().t()
    scale = exact.abs().max()
    assert (fused - fallback).abs().max() < 0.02 * scale
    assert (fallback - exact).abs().max() < 0.02 * scale  # bf16 scale/zero: one rounding of each
    rows = torch.tensor([0, 63, 64, 255])
    dense = ready.dequantize()
    assert torch.equal(kernels.embedding_rows(ready, rows[None], torch.float32)[0], dense[rows])


def test_fallback_pieces_equal_one_piece(monkeypatch):
    torch.manual_seed(1)
    qt = kernels.prepare(quantize(torch.randn(320, 128), QuantScheme("int4", 32)), torch.bfloat16)
    x = torch.randn(200, 128, dtype=torch.bfloat16)
    one = kernels.fallback_linear(x, qt)
    monkeypatch.setattr(kernels, "DEQUANT_PIECE_BYTES", 64 * 128 * 4)  # 64-row pieces
    assert kernels.piece_rows(qt) == 64
    assert torch.equal(kernels.fallback_linear(x, qt), one)


def test_quant_auto_follows_the_file(embedded):
    assert QuantScheme.resolve("auto", None, embedded.storage_types(), embedded.head_storage_type()) == \
        QuantScheme("int4", 32, head_q8=native.available())  # Q4_1 layers; the tied Q8_0 head keeps its blocks
    # on the native kernels, else is requantised to int8 per channel
    assert QuantScheme.resolve("auto", None, {"Q4_0": 200, "F32": 60}, "Q4_0") == QuantScheme("int4", 32, head_int4=True)
    assert QuantScheme.resolve("auto", None, {"Q8_0": 200, "F32": 60}, "Q8_0") == \
        QuantScheme("int8", 32, head_q8=native.available())
    assert QuantScheme.resolve("auto", None, {"Q4_K": 150, "Q6_K": 30}, "Q6_K") == QuantScheme("int4", 32)
    assert QuantScheme.resolve("auto", None, {"Q6_K": 150}, None) == QuantScheme("int8")
    assert QuantScheme.resolve("auto", None, {"bfloat16": 200}, None) == QuantScheme()
    assert QuantScheme.resolve("none", None, {"Q4_1": 200}, "Q4_1") == QuantScheme()
    assert QuantScheme.resolve("int4", None, {"Q4_1": 200}, "Q4_1") == QuantScheme("int4", 32, head_int4=True)
    assert QuantScheme.resolve("int4", 64, {"Q4_1": 200}, "Q4_1") == QuantScheme("int4", 64)
    head = QuantScheme("int4", 32, head_int4=True).for_matrix("lm_head", (49152, 4096))
    assert head == QuantScheme("int4", 32)
    assert QuantScheme("int4", 32).for_matrix("lm_head", (49152, 4096)) == QuantScheme("int8")


def _inp(context: int, layer_mib: int = 100, kv_mib_per_k: int = 256) -> PlanInput:
    return PlanInput(num_layers=32, layer_bytes=layer_mib * MiB, head_bytes=100 * MiB, embed_bytes=0,
                     kv_bytes=kv_mib_per_k * MiB * context // 1024, activation_bytes=50 * MiB, fixed_bytes=MiB,
                     cuda=False, cpu_budget=1536 * MiB, device_budget=None, disk_gbps=2.0, h2d_gbps=None,
                     compute_gbps=16.0, layer_overhead_s=1e-4)


class _Cfg:
    max_position_embeddings = 8192


def test_default_context_trades_kv_against_weights():
    """KV that costs resident layers is taken only while predicted s/token stays within 10% of 512 tokens'."""
    context, inp, options = choose_context(_Cfg(), _inp)
    fits = {o.context: o.placement for o in options if o.placement is not None}
    base = fits[MIN_DEFAULT_CONTEXT].token_s
    assert context >= MIN_DEFAULT_CONTEXT and fits[context].token_s <= base * 1.1
    longer = [c for c in fits if c > context]
    assert all(fits[c].token_s > base * 1.1 for c in longer)  # the next step up would cost more than 10%
    assert inp.kv_bytes == _inp(context).kv_bytes
    # cheap KV (1/16 the bytes) buys the longest candidate
    assert choose_context(_Cfg(), lambda c: _inp(c, kv_mib_per_k=16))[0] == 4096


@pytest.mark.parametrize("lanes", [16, 32])
def test_gguf_nibbles_pack_directly_into_the_int4_layout(lanes):
    """Byte-to-byte repacking of Q4 nibbles equals unpacking them one value a byte and packing (both layouts)."""
    from tierlm.quant import int4

    torch.manual_seed(2)
    qs = torch.randint(0, 256, (128, 6, 16), dtype=torch.uint8)  # [R, G, 16]: 128 rows, K = 192
    values = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(128, 192)  # element t low, t + 16 high
    assert torch.equal(int4.pack_gguf_nibbles(qs, lanes), int4.pack(values, lanes))


def test_load_packed_equals_blocks_then_pack(embedded):
    for name in ("layers.0.wq", "layers.0.wk", "layers.3.w_gate"):
        direct = embedded.load_packed(name, QuantScheme("int4", 32), slice(64, 192))
        blocks = embedded.load_blocks(name, QuantScheme("int4", 32), slice(64, 192))
        ref = from_blocks(blocks)
        assert all(torch.equal(direct.parts()[k], v) for k, v in ref.parts().items()), name
    assert embedded.load_packed("embed", QuantScheme("int4", 32)) is None  # Q8_0: no direct repack


def test_a_failed_load_leaves_no_file_open():
    """A constructor that raises after opening the model (here: a budget that needs an offload_dir) must not
    leak the GGUF's descriptor: a server retrying with other budgets would run out of them."""
    import gc
    import os

    from tierlm import LLM
    from tierlm.errors import UsageError

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(UsageError, match="offload_dir"):
            LLM(None, max_memory={"cpu": "64MiB"}, progress=False)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
