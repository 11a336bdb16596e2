"""Weight-only quantisation: round-trip bounds, the packed layout, fused kernels against the dequantising
fallback, GGUF blocks without loss, and quantised tiers computing exactly what quantised residency does."""
from __future__ import annotations

import gguf
import pytest
import torch
from gguf_writer import write_gguf
from helpers import assert_one_line_error, run_cli
from test_tiered import PROMPT, _logits

from tierlm import native
from tierlm.quant import intdot
from tierlm.errors import UsageError
from tierlm.offload.weight_store import WeightStore
from tierlm.offload.tier import Tier
from tierlm.offload.units import HEAD, layer_unit, unit_nbytes
from tierlm.quant import QuantBlocks, QuantScheme, QuantTensor, from_blocks, int4, kernels, quantize
from tierlm.weights import open_model

D, K = Tier.DEVICE, Tier.DISK
SCHEMES = [QuantScheme("int8"), QuantScheme("int8", 32), QuantScheme("int8", 128),
           QuantScheme("int4", 32), QuantScheme("int4", 64), QuantScheme("int4", 128)]


def _weight(n: int = 192, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 5] = 0.9  # an outlier: its group's step is large, every other group must stay fine
    return w


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_is_within_half_a_step(scheme):
    w = _weight()
    qt = quantize(w, scheme)
    n, k = w.shape
    g = qt.group_size
    err = (qt.dequantize() - w).abs().reshape(n, k // g, g).amax(-1)  # [N, G] worst error per group
    step = qt.scales.float().reshape(n, -1)  # [N, G]
    slack = 0 if qt.mins is None else qt.mins.float().abs() * 2**-11  # fp16 rounding of the stored min
    # half a step, plus fp16 rounding of the stored scale (at most 15 steps * 2^-11) and min
    assert (err <= step * (0.5 + 15 * 2**-11) + slack + 1e-7).all()
    assert err.amax() < (0.02 if scheme.kind == "int8" else 0.2) * w.abs().amax()
    assert qt.nbytes < w.numel() * 4 / (3.5 if scheme.kind == "int8" else 5)  # vs fp32: ~4x / 6-7x smaller


def test_int4_layout_is_torch_cpu_int4pack_and_unpacks():
    lanes = int4.torch_lanes()
    assert lanes in (16, 32)
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    for layout in (lanes, int4.GGUF):
        assert torch.equal(int4.unpack(int4.pack(q, layout), 96, layout), q)
    assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(q.int(), 1), int4.pack(q, lanes))
    assert int4.pack(q, int4.GGUF)[5, 3] == q[5, 3] | (q[5, 19] << 4)  # GGUF: columns t and t + 16 of a group
    # the layout in use: GGUF with the native kernels, else torch's (its fused kernel form)
    assert (int4.layout() == int4.GGUF) == native.available() and int4.layout_matches_torch() != native.available()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.kind == "int4" or s.group_size is None], ids=str)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_kernel_matches_dequantising_fallback(scheme, rows, dtype):
    qt = quantize(_weight(), scheme)
    ready = kernels.prepare(qt, dtype)
    on_native = intdot.runs(ready)  # else torch's fused kernel, where its layout is the one in use
    assert on_native or ready.kernel_scales is not None or not int4.layout_matches_torch() and scheme.kind == "int4"
    x = torch.randn(rows, 256).to(dtype)
    bias = torch.randn(192).to(dtype)
    fused, ref = kernels.linear(x, ready, bias).float(), kernels.fallback_linear(x, qt, bias).float()
    exact = x.float() @ qt.dequantize().T + bias.float()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 rounding of the activations and outputs
    if on_native:  # int8 activations: about 1% of the output's scale; the exact kernels: rounding only
        assert (fused - exact).abs().max() <= 3e-2 * exact.abs().max()
        fused = kernels.linear(x, ready, bias, exact=True).float()
    assert (fused - exact).abs().max() <= tol * exact.abs().max()
    assert (fused - ref).abs().max() <= tol * exact.abs().max()


def test_rows_of_a_quantised_matrix_are_rows_of_its_dense_form():
    for scheme in (QuantScheme("int8"), QuantScheme("int4", 32)):
        qt = quantize(_weight(), scheme)
        ids = torch.tensor([[0, 63, 64, 191, 63]])
        rows = kernels.embedding_rows(qt, ids, torch.float32)  # [1, 5, K]
        assert torch.equal(rows[0], qt.dequantize()[ids[0]])


def test_fused_rows_concatenate_quantised_pieces():
    a, b = quantize(_weight(64, 128, 1), QuantScheme("int4", 32)), quantize(_weight(128, 128, 2), QuantScheme("int4", 32))
    both = QuantTensor.from_parts(a.meta() | {"shape": [192, 128]}, {k: torch.cat([a.parts()[k], b.parts()[k]])
                                                                      for k in a.parts()})
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def test_scheme_rules():
    q4 = QuantScheme.parse("int4")
    assert q4 == QuantScheme("int4", 32)
    assert q4.for_matrix("lm_head", (512, 64)) == QuantScheme("int8")  # the head stays at 8 bits
    assert q4.for_matrix("attn_norm", (64,)) == QuantScheme()
    assert QuantScheme("int4", 128).for_matrix("wo", (576, 576)) == QuantScheme("int4", 64)  # 576 % 128 != 0
    assert q4.for_matrix("wqkv", (96, 64)) == QuantScheme()  # N not a multiple of the 64-row int4 block
    for bad in (("int5", None), ("none", 32), ("int8", 48)):
        with pytest.raises(UsageError):
            QuantScheme.parse(*bad)


def test_planner_sizes_shrink_with_the_scheme():
    from tierlm.config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                      num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=2048)  # TinyLlama
    fp32 = unit_nbytes(cfg, layer_unit(0), torch.float32)
    assert unit_nbytes(cfg, layer_unit(0), torch.bfloat16, QuantScheme("int8")) < fp32 / 3.9
    assert unit_nbytes(cfg, layer_unit(0), torch.bfloat16, QuantScheme("int4", 32)) < fp32 / 6.3
    assert unit_nbytes(cfg, layer_unit(0), torch.bfloat16, QuantScheme("int4", 128)) < fp32 / 7.5
    assert unit_nbytes(cfg, HEAD, torch.bfloat16, QuantScheme("int4")) < unit_nbytes(cfg, HEAD, torch.float32) / 3


@pytest.fixture(scope="module")
def q4_gguf(tiny_models, tmp_path_factory):
    tm = tiny_models["llama_gqa_tied"]
    return write_gguf(tm.hf, tm.path, tmp_path_factory.mktemp("q") / "q4_0.gguf", gguf.GGMLQuantizationType.Q4_0)


@pytest.mark.parametrize("source", ["embedded-q4_1-q8_0", "q4_0"])
def test_gguf_blocks_map_without_loss(source, q4_gguf):
    src = open_model(None if source.startswith("embedded") else q4_gguf)
    names = ["layers.0.wq", "layers.1.w_down"] + (["layers.0.wk", "embed"] if source.startswith("embedded") else [])
    for name in names:
        kind = "int8" if src._tensors[name].qtype.name == "Q8_0" else "int4"
        blocks = src.load_blocks(name, QuantScheme(kind, 32))
        assert blocks is not None and blocks.kind == kind
        qt = from_blocks(QuantBlocks.concat([blocks]))  # packed as stored and streamed
        assert torch.equal(qt.dequantize(), src.load(name, torch.float32)), name  # bit for bit
    assert src.load_blocks("layers.0.wq", QuantScheme("int4", 64)) is None  # another group: requantised instead
    if not source.startswith("embedded"):  # wk/wv have 32 rows: only the fused wqkv fits the 64-row layout
        from tierlm.offload.units import layer_tensors
        from tierlm.offload.unit_load import load_unit_tensor
        spec = layer_tensors(src.config, 0)[1]
        fused = load_unit_tensor(src, spec, torch.float32, QuantScheme("int4", 32), set(src.tensor_names()))
        dense = torch.cat([src.load(n, torch.float32) for n in spec.source_names])
        assert fused.group_size == 32 and torch.equal(fused.dequantize(), dense)
    src.close()


def _store(path, tmp_path, quant, layers=None, head=D, embed=D, ring=2) -> WeightStore:
    src = open_model(path)
    n = src.config.num_layers
    return WeightStore.load_placed(src, torch.bfloat16, torch.device("cpu"), layers or [D] * n, head, embed,
                                   progress=False, ring_depth=ring, offload_dir=tmp_path / "off", quant=quant)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("model", ["llama3_rope", "qwen2", "llama_gqa_tied"])
def test_quantised_offload_equals_quantised_resident(tiny_models, tmp_path, quant, model):
    path = tiny_models[model].path
    scheme = QuantScheme.parse(quant)
    resident = _store(path, tmp_path, scheme)
    tok = open_model(path).tokenizer
    ref = _logits(tok, resident, PROMPT, steps=4, dtype=torch.bfloat16)
    n = resident.config.num_layers
    for k, (layers, head, embed) in enumerate((([K] * n, K, K), ([D] + [K] * (n - 1), D, K))):
        tiered = _store(path, tmp_path / str(k), scheme, layers, head, embed)  # a store each (one holding more
        # units would serve the second placement too)
        got = _logits(tok, tiered, PROMPT, steps=4, dtype=torch.bfloat16)
        assert tiered.stats.disk_bytes > 0
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (layers, head, embed)
        tiered.close()
    # the stored bytes are the packed ones: the offload store is far smaller than the fp32 model
    fp32_bytes = sum(p.numel() * 4 for p in tiny_models[model].hf.parameters())
    assert (tmp_path / "1" / "off" / "layers.bin").stat().st_size < fp32_bytes / (2.5 if quant == "int8" else 3.5)


def test_quantised_greedy_tokens_follow_the_dense_model(tiny_models):
    from tierlm import LLM, SamplingParams
    path = tiny_models["llama3_rope"].path
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    dense = LLM(path, progress=False).generate([PROMPT], params)[0].token_ids
    # the weights' quantisation alone (exact kernels: fp32 activations); int8 activations move this random
    # model's nearly flat logits further (tests/test_native.py bounds their perplexity cost on a real model)
    q8 = LLM(path, progress=False, quant="int8", kernels="exact").generate([PROMPT], params)[0].token_ids
    assert q8[:4] == dense[:4]


def test_cli_rejects_a_bad_quant_in_one_line(tiny_models, capsys):
    model = str(tiny_models["llama3_rope"].path)
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi", "--quant", "int3")
    assert_one_line_error(code, err, "int3")
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi", "--group-size", "32")
    assert_one_line_error(code, err, "group-size")
