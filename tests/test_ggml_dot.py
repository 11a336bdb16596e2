"""Matrices in GGUF's own blocks (quant/ggml.py, native/csrc/ggml_dot.cpp): the kernels against gguf-py's
dequantisation times the activations quantised as the kernels quantise them (exact up to fp32 summation order)
and against the dense product, on every ISA path this CPU has; row invariance; runs of mixed types; the
tile-at-a-time fallback; real blocks from the real files; the loader keeping a Q5_0 file's blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fetch_real import FILES
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from tierlm import native
from tierlm.quant import ggml, kernels
from tierlm.quant.tensor import QuantTensor

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"native kernels {native.status()}")

TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS)  # Q8_K activations
NO_QUANTIZE = (*K_QUANTS, Q.IQ4_NL)  # gguf-py cannot quantise these: random bits
# byte offsets of each type's fp16 scale fields (the rest of a block is any bits: every pattern is valid)
HALVES = {Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q8_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
          Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}


def _isas() -> list[int]:
    return list(range(native.lib().best_isa() + 1))


def random_blocks(t: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n rows of k values in type t as uint8 [n, row bytes]: where gguf-py quantises t, real quantised rows;
    else random bits with sane fp16 scales (every scale/min/value bit pattern is exercised)."""
    rng = np.random.default_rng(seed)
    if t not in NO_QUANTIZE:
        return quantize(rng.standard_normal((n, k)).astype(np.float32), t).reshape(n, -1)
    qk, size = GGML_QUANT_SIZES[t]
    b = rng.integers(0, 256, size=(n, k // qk, size), dtype=np.uint8)
    for off in HALVES[t]:
        b[..., off:off + 2] = rng.uniform(0.001, 0.02, size=b.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(n, -1)


def act_roundtrip(x: np.ndarray, qk: int) -> np.ndarray:
    """x [M, K] as the kernels see it: per qk columns d = amax / 127, q = rint(x * (127 / amax)) in [-127, 127]."""
    m, k = x.shape
    xb = x.reshape(m, k // qk, qk).astype(np.float32)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q * (amax / np.float32(127))).reshape(m, k)


def run(x: torch.Tensor, blocks: np.ndarray, runs: ggml.Runs, k: int) -> torch.Tensor:
    q = torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1).copy())
    return native.lib().ggml_linear(x, q, ggml.runs_tensor(runs, k), None)


@pytest.fixture(autouse=True)
def best_isa():
    yield
    native.lib().set_isa(native.lib().best_isa())


def check_product(t: Q, blocks: np.ndarray, k: int, x: np.ndarray, what: str) -> None:
    w = dequantize(blocks, t).reshape(blocks.shape[0], k).astype(np.float64)
    ref = act_roundtrip(x, 256 if t in K_QUANTS else 32).astype(np.float64) @ w.T
    dense = x.astype(np.float64) @ w.T
    for isa in _isas():
        native.lib().set_isa(isa)
        y = run(torch.from_numpy(x), blocks, ((int(t), blocks.shape[0]),), k).double().numpy()
        err = np.abs(y - ref).max() / np.abs(ref).max()
        assert err < 2e-6, f"{what} isa {isa}: {err:.2e} from dequantised W times quantised x"
        rel = np.linalg.norm(y - dense) / np.linalg.norm(dense)
        assert rel < 2e-2, f"{what} isa {isa}: {rel:.2e} from the dense product"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_matches_dequantised_product(t):
    n, k = 37, 512
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    check_product(t, random_blocks(t, n, k), k, x, t.name)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_row_invariant(t):
    """A row's result is the same bits whether it is multiplied alone or among 37 or 300 rows."""
    n, k = 21, 256
    blocks = random_blocks(t, n, k, seed=2)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(3))
    for isa in _isas():
        native.lib().set_isa(isa)
        full = run(x, blocks, ((int(t), n),), k)
        some = run(x[:37], blocks, ((int(t), n),), k)
        assert torch.equal(some, full[:37]), f"isa {isa}"
        for r in (0, 36, 299):
            assert torch.equal(run(x[r:r + 1], blocks, ((int(t), n),), k), full[r:r + 1]), f"isa {isa} row {r}"


def test_mixed_runs_are_their_products_side_by_side():
    """A fused q/k/v of a Q4_K_M file: Q5_0 rows then Q8_0 rows (then Q4_K), one matrix."""
    k = 256
    parts = [(Q.Q5_0, 64), (Q.Q8_0, 16), (Q.Q4_K, 8)]
    blocks = [random_blocks(t, r, k, seed=i) for i, (t, r) in enumerate(parts)]
    x = torch.randn(3, k)
    whole = run(x, np.concatenate([b.reshape(-1) for b in blocks]), tuple((int(t), r) for t, r in parts), k)
    each = torch.cat([run(x, b, ((int(t), r),), k) for b, (t, r) in zip(blocks, parts)], dim=1)
    assert torch.equal(whole, each)


def test_fallback_dequantises_tiles_and_embedding_rows():
    """Without the library's kernel (other devices): rows dequantised a piece at a time, same product up to
    the activations' quantisation; embedding rows read from their blocks."""
    k, runs = 256, ((int(Q.Q6_K), 40), (int(Q.Q5_0), 24))
    blocks = np.concatenate([random_blocks(Q.Q6_K, 40, k).reshape(-1), random_blocks(Q.Q5_0, 24, k).reshape(-1)])
    w = QuantTensor("ggml", (64, k), k, torch.from_numpy(blocks.copy()), None, runs=runs)
    dense = w.dequantize()
    x = torch.randn(4, k)
    fb = kernels.fallback_linear(x, w)
    assert torch.allclose(fb, x @ dense.t(), rtol=1e-5, atol=1e-5)
    rel = (kernels.linear(x, w) - fb).norm() / fb.norm()
    assert rel < 2e-2
    tokens = torch.tensor([[3, 63, 3, 40]])
    assert torch.equal(kernels.embedding_rows(w, tokens, torch.float32), dense[tokens])
    back = QuantTensor.from_parts(w.meta(), w.parts())
    assert back.runs == runs and back.meta() == w.meta()


def _real(name: str) -> Path:
    f = next(f for f in FILES if f.name == name)
    if not f.path.exists():
        pytest.skip(f"{f.path} missing (python tests/fetch_real.py)")
    return f.path


@pytest.fixture(scope="module")
def qwen_file():
    from tierlm.weights.gguf_file import GGUFFile
    f = GGUFFile(_real("qwen2.5-coder-0.5b-instruct"))
    yield f
    f.close()


@pytest.mark.parametrize("tensor", ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight",
                                    "blk.0.attn_v.weight"])
def test_real_blocks(tensor, qwen_file):
    """Real Q6_K / Q4_K / Q5_0 / Q8_0 matrices of the Qwen2.5-Coder file (96 rows of each)."""
    t = qwen_file.tensors[tensor]
    k = t.shape[1]
    blocks = qwen_file.raw(t, slice(0, 96))
    x = np.random.default_rng(4).standard_normal((3, k)).astype(np.float32)
    check_product(Q(t.qtype), blocks, k, x, f"{tensor} {t.qtype.name}")


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2"])
def test_gguf_file_keeps_its_blocks(name, tiny_models, tmp_path):
    """A Q5_0 file runs in its own blocks (auto): the loader's matrices are its bytes (q/k rows un-permuted),
    the planner counts those bytes, and the engine's logits are the dense reading's up to int8 activations."""
    from gguf_writer import write_gguf

    from tierlm import LLM
    from tierlm.offload.unit_load import load_unit_tensor
    from tierlm.offload.units import layer_unit, unit_nbytes, unit_tensors
    from tierlm.quant.scheme import QuantScheme
    from tierlm.weights.gguf import GGUFSource
    tm = tiny_models[name]
    path = write_gguf(tm.hf, tm.path, tmp_path / "m.gguf", Q.Q5_0)
    src = GGUFSource(path)
    quant = QuantScheme.resolve("auto", None, src.storage_types(), src.head_storage_type(), src.ggml_tensors())
    assert quant.kind == "ggml"
    spec = next(s for s in unit_tensors(src.config, layer_unit(0)) if s.leaf == "wqkv")
    scheme = spec.scheme(quant)
    assert scheme.runs == ((int(Q.Q5_0), spec.shape[0]),)
    w = load_unit_tensor(src, spec, torch.float32, quant, set(src.tensor_names()))
    assert w.kind == "ggml" and w.nbytes == ggml.nbytes(scheme.runs, spec.shape[1])
    dense = torch.cat([src.load(n, torch.float32) for n in spec.source_names])  # gguf-py, HF row order
    assert torch.equal(w.dequantize(), dense)
    parts = [t for t in unit_tensors(src.config, layer_unit(0))]
    assert unit_nbytes(src.config, layer_unit(0), torch.float32, quant) >= sum(
        ggml.nbytes(p.scheme(quant).runs, p.shape[1]) for p in parts if p.scheme(quant).kind == "ggml")
    src.close()
    ids = torch.randint(2, tm.hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks, ref = LLM(str(path), dtype="float32"), LLM(str(path), dtype="float32", quant="none")
    assert blocks.quant.kind == "ggml"
    # the embedding too is held in its blocks (untied: its own; tied: the head's), never a dense copy
    embed, head = blocks.store.embed_weight, blocks.store.head_weight
    assert embed.kind == "ggml" and embed.nbytes == ggml.nbytes(((int(Q.Q5_0), tm.hf.config.vocab_size),),
                                                               tm.hf.config.hidden_size)
    assert (embed is head) == tm.hf.config.tie_word_embeddings
    a, b = blocks.prompt_logits(ids), ref.prompt_logits(ids)
    # int8 activations on these deliberately sensitive random models: 0.057 / 0.030 relative (llama_gqa_tied /
    # qwen2), what the int8-g32 path measures on the same models' Q8_0 files (0.057 / 0.028)
    assert ((a - b).norm() / b.norm()).item() < 0.1


@pytest.mark.parametrize("name", ["qwen2", "llama_gqa_tied"])
def test_streamed_blocks_equal_resident(name, tiny_models, tmp_path):
    """The offload store holds a layer's blocks as they are (manifest: kind ggml and its runs): layers streamed
    under a 500 KiB budget (every layer and the head on disk) give the resident run's logits bit for bit. The
    embedding's rows are read from its blocks on disk (untied: its own unit; tied: the head's), each row
    checksummed."""
    from gguf_writer import write_gguf

    from tierlm import LLM
    from tierlm.offload.tier import Tier
    from tierlm.offload.units import EMBED, HEAD
    tm = tiny_models[name]
    path = write_gguf(tm.hf, tm.path, tmp_path / "m.gguf", Q.Q5_0)
    ids = torch.randint(2, tm.hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with LLM(str(path), dtype="float32", progress=False, max_context=64) as resident:
        ref = resident.prompt_logits(ids)
    with LLM(str(path), dtype="float32", progress=False, max_memory={"cpu": "500KiB"}, max_context=64,
             offload_dir=tmp_path / "off") as streamed:
        store = streamed.store
        assert streamed.quant.kind == "ggml" and streamed.plan.count(Tier.DISK) == tm.hf.config.num_hidden_layers
        assert store.embed_weight is None and store.head_weight is None
        rows = store.offload.units[HEAD if tm.hf.config.tie_word_embeddings else EMBED]
        assert [m["kind"] for m in rows.quant.values()] == ["ggml"] and len(rows.row_sums) == tm.hf.config.vocab_size
        assert EMBED not in store.offload.units or not tm.hf.config.tie_word_embeddings  # no dense copy
        assert torch.equal(streamed.prompt_logits(ids), ref)
