"""The native kernels (tierlm/native): integer-dot int4/int8 matmuls against a float reference on every ISA
path this CPU has, row invariance, the one-call layer step against the Python layer, and the fallback when the
library is missing. The perplexity cost of int8 activations (vs the exact path) is benchmarks/quality.py's."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from helpers import engine_logits

from tierlm import LLM, native
from tierlm.native import build
from tierlm.model import native_layer

from tierlm.quant import int4

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"native kernels {native.status()}")


@contextlib.contextmanager
def _mode(value: str | None):
    """TIERLM_NATIVE=value (None: unset) for the block; the caches that read it are cleared on both sides."""
    def put(v: str | None) -> None:
        if v is None:
            os.environ.pop("TIERLM_NATIVE", None)
        else:
            os.environ["TIERLM_NATIVE"] = v
        native._load.cache_clear(), int4.layout.cache_clear()
    old = os.environ.get("TIERLM_NATIVE")
    put(value)
    try:
        yield
    finally:  # a failing test must not leave the next ones in its mode
        put(old)


@pytest.fixture(scope="module", autouse=True)
def native_on():
    """The engine on the integer-dot kernels for this module (opt-in: TIERLM_NATIVE=1), the default after it."""
    with _mode("1"):
        yield
SHAPES = [(64, 96, 1), (128, 576, 3), (192, 1536, 17), (64, 4096, 5), (320, 160, 64), (64, 224, 33)]


def _pack4(q: torch.Tensor) -> torch.Tensor:  # GGUF nibble order, written independently of int4.pack
    n, k = q.shape
    v = q.view(n, k // 32, 2, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _act_q8(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernels see it: int8 per 32 columns, scale amax / 127, rounded to nearest even."""
    m, k = x.shape
    xv = x.double().view(m, k // 32, 32)
    amax = xv.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(xv * (127 / amax.clamp_min(1e-300))), torch.zeros_like(xv)).clamp(-127, 127)
    return (q * amax / 127).view(m, k)


def _cases(n: int, k: int, g: torch.Generator):
    q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    mn = (-torch.rand(n, k // 32, generator=g) * 0.1).half()
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    dch = torch.rand(n, generator=g) * 0.01
    yield "int4", (4, _pack4(q4), d, mn, None), (q4.double().view(n, -1, 32) * d.double()[..., None] + mn.double()[..., None]).view(n, k)
    yield "q8_0", (8, q8, d, None, None), (q8.double().view(n, -1, 32) * d.double()[..., None]).view(n, k)
    yield "int8/channel", (8, q8, None, None, dch), q8.double() * dch.double()[:, None]


@pytest.mark.parametrize("isa", [2, 1, 0], ids=["avx512-vnni", "avx2", "scalar"])
def test_kernels_match_a_float_reference(isa):
    lib = native.lib()
    if isa > lib.best_isa():
        pytest.skip("this CPU lacks the instructions")
    lib.set_isa(isa)
    try:
        g = torch.Generator().manual_seed(isa)
        for n, k, m in SHAPES:
            x = torch.randn(m, k, generator=g)
            bias = torch.randn(n, generator=g)
            for name, mat, w in _cases(n, k, g):
                y, ye = lib.linear(x, mat, bias, False), lib.linear(x, mat, bias, True)
                ref, ref_exact = _act_q8(x) @ w.t() + bias.double(), x.double() @ w.t() + bias.double()
                scale = ref.abs().max()
                assert (y.double() - ref).abs().max() < 1e-5 * scale, (name, n, k, m)  # only float rounding
                assert (ye.double() - ref_exact).abs().max() < 1e-5 * scale, (name, n, k, m)
                # the int8 activations cost a little accuracy, not more
                assert (y.double() - ref_exact).abs().max() < 0.05 * scale
                # row invariance: every row alone gives the bits it got among the others
                assert torch.equal(torch.cat([lib.linear(x[i:i + 1], mat, bias, False) for i in range(m)]), y)
            bf = lib.linear(x.bfloat16(), mat, None, False)
            assert bf.dtype == torch.bfloat16 and bf.shape == (m, n)
    finally:
        lib.set_isa(lib.best_isa())


def test_isa_is_the_best_this_cpu_has():
    assert native.status() == "int-dot " + ["scalar", "avx2", "avx512-vnni"][native.lib().best_isa()]
    assert int4.layout() == int4.GGUF


@pytest.fixture(scope="module")
def fp32_llm():
    llm = LLM(progress=False, dtype="float32", kernels="exact")  # the embedded Q4_1 model, fp32 activations
    yield llm
    llm.close()


def _logits(llm: LLM, ids: list[int], native_layers: bool, step: bool = False) -> torch.Tensor:
    """[T, V] through the engine: the prompt prefilled (and scored) whole, or (step) its first token, then
    each greedy token decoded one at a time (the tokens fed are then checked against a prefill of them)."""
    r = llm.runner
    saved, r.native = r.native, native_layers
    try:
        if not step:
            return llm.prompt_logits(ids)  # [T, V]
        logits, fed = engine_logits(llm.engine, ids[:1], steps=len(ids) - 1)  # token by token: [T, V]
        return logits, fed
    finally:
        r.native = saved


IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712] * 3


@pytest.mark.slow
def test_layer_step_matches_the_python_layer(fp32_llm):
    assert fp32_llm.runner.native
    a, b = _logits(fp32_llm, IDS, True), _logits(fp32_llm, IDS, False)
    assert (a - b).abs().max() < 2e-3 * b.abs().max()  # both fp32; only summation orders differ
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["int8", "exact"])
def test_decoded_tokens_equal_a_prefill(kernels):
    with LLM(progress=False, kernels=kernels) as llm:  # bf16 activations, bf16 KV
        decoded, fed = _logits(llm, IDS, True, step=True)
        # not one token repeated: the comparison means something (greedy from one token falls into a short
        # loop; 6 distinct tokens where the CPU has no native bf16 and KV is fp32)
        assert len(set(fed)) > 4
        assert torch.equal(decoded, _logits(llm, fed, True))


@pytest.mark.slow
def test_the_default_layer_step_runs_torch_matmuls():
    """Without TIERLM_NATIVE: int4 stays in torch's layout and kernels, inside the one-call layer step; decoded
    tokens equal a prefill bit for bit, and the logits stay close to the Python layer's."""
    with _mode(None), LLM(progress=False) as llm:
        assert native.status().startswith("layer step") and int4.layout() != int4.GGUF and llm.runner.native
        w = llm.store.acquire(0)
        assert w.wqkv.kernel_scales is not None and native_layer.layer_supported(w)
        llm.store.release(0)
        a, b = _logits(llm, IDS, True), _logits(llm, IDS, False)
        decoded, fed = _logits(llm, IDS, True, step=True)  # greedy tokens fed back one at a time
        assert torch.equal(decoded, _logits(llm, fed, True))  # ...equal a prefill of the same tokens
        # fp32 between the matmuls vs bf16: near-ties may go either way
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9 and (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.slow
def test_without_the_library_torch_kernels_run():
    code = ("from tierlm import native, LLM, SamplingParams; from tierlm.quant import int4;"
            "print(native.status()); print(int4.layout_tag());"
            "llm = LLM(progress=False); print(llm.generate(['Hi'], SamplingParams(max_tokens=4, temperature=0))[0].text)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TIERLM_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    status, tag, _ = out.stdout.split("\n", 2)
    assert status == "off (TIERLM_NATIVE=0)" and tag.startswith("int4pack")


def test_a_failed_build_is_one_line_and_not_fatal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "OUT", tmp_path / "out")
    monkeypatch.setattr(build, "SOURCES", [tmp_path / "broken.cpp"])
    (tmp_path / "broken.cpp").write_text("this is not C++")
    monkeypatch.setattr(sys, "argv", ["build"])
    assert build.main() == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("tierlm: native kernels not built") and "\n" not in err
