"""Perplexity: the sliding-window arithmetic, the CLI table, and quality bounds of the quantised schemes on
the embedded model (real weights) and on a tiny random model requantised from fp32."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli

from tierlm import LLM
from tierlm.errors import UsageError
from tierlm.eval_ppl import llamacpp_chunks, perplexity, windows
from tierlm.weights import open_model
from tierlm.weights.embedded import embedded_model_path

TEXT = Path(__file__).parent / "data" / "english.txt"


def test_windows_score_every_token_once_with_context():
    for n, window, stride in ((10, 4, 2), (1000, 512, 256), (513, 512, 512), (3, 8, 4)):
        ws = windows(n, window, stride)
        scored = [p for _, end, first in ws for p in range(first, end)]
        assert scored == list(range(1, n))  # each token but the first, once, in order
        assert all(end - begin <= window for begin, end, _ in ws)
        assert all(first - begin >= min(window - stride, first) for begin, _, first in ws)


def _ppl(model, quant, ids, window=512, stride=256, dtype="auto"):
    with LLM(model, quant=quant, dtype=dtype, progress=False, max_context=window) as llm:
        return perplexity(llm, ids, window, stride, quant, progress=False).ppl


@pytest.mark.slow
def test_int4_perplexity_bound_on_the_embedded_model():
    """fp32 = the GGUF's own dequantised weights. int4 g=32 maps its Q4_1 blocks without loss (bf16
    activations and the int8 head are what changes): +0.80% on the whole text, +1.27% on these 1024 tokens
    since attention runs in fp32 on CPUs without native bf16 (+0.29% / +0.43% with bf16 attention, on the
    same bf16 inputs: the two differ by about one bf16 ulp per output, and that noise moves a bf16 model
    by this much); +1.5% is asserted (the issue's bound for int4 is +8%). The requantised int8 schemes'
    bounds on this model (g=128 within +1%; per channel +2%: one scale per 576-wide row cannot follow 32-wide
    Q4_1 groups) and the int-dot kernels' are benchmarks/quality.py's table (its rows, with these bounds)."""
    ids = open_model(str(embedded_model_path())).tokenizer.encode(TEXT.read_text())[:1024]
    ref = _ppl(None, "none", ids)
    assert 5 < ref < 60  # a real model on real English
    assert _ppl(None, "int4", ids) <= ref * 1.015


def test_requantised_bounds_on_a_tiny_model(tiny_models):
    path = tiny_models["llama3_rope"].path
    with LLM(path, progress=False) as llm:
        ids = llm.tokenizer.encode(TEXT.read_text())[:300]
    ref = _ppl(path, "none", ids, window=128, stride=64)
    assert _ppl(path, "int8", ids, window=128, stride=64) <= ref * 1.01
    assert _ppl(path, "int4", ids, window=128, stride=64) <= ref * 1.08


def test_cli_prints_the_table(tiny_models, capsys):
    code, out, _ = run_cli(capsys, "eval-ppl", "--model", str(tiny_models["llama3_rope"].path), "--text", str(TEXT),
                           "--quant", "none,int8,int4-g64", "--window", "64", "--stride", "32", "--max-tokens", "100")
    assert code == 0
    table = out.strip().splitlines()[-4:]
    assert table[0].split()[:3] == ["weights", "ppl", "vs"]
    assert [row.split()[0] for row in table[1:]] == ["fp32", "int8-channel", "int4-g64"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval-ppl", "--text", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "missing.txt")
    code, _, err = run_cli(capsys, "eval-ppl", "--text", str(TEXT), "--quant", "int4-gx")
    assert_one_line_error(code, err, "int4-gx")


def test_llamacpp_chunks_are_llama_perplexity_s():
    """llama-perplexity -c 8 over 20 tokens: 2 whole chunks, the last 4 tokens left out; of each chunk the tokens
    after its middle (positions 5..7) are scored, given everything before them in the chunk."""
    assert llamacpp_chunks(20, 8) == [(0, 8, 5), (8, 16, 13)]
    with pytest.raises(UsageError, match="one whole window"):
        llamacpp_chunks(7, 8)


def test_llamacpp_scheme_matches_hf_scoring_the_same_way(tiny_models):
    """The llama.cpp scheme against HF transformers (fp32, the oracle) scoring the same chunks by hand: the
    second half of non-overlapping windows, each chunk starting at BOS."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_models["llama3_rope"].path
    window = 32
    with LLM(path, quant="none", dtype="float32", progress=False, max_context=window) as llm:
        ids = llm.tokenizer.encode(TEXT.read_text())[:100]
        got = perplexity(llm, ids, window, window, "fp32", progress=False, scheme="llama.cpp")
        bos = llm.tokenizer.bos_token_id if llm.tokenizer.add_bos else None
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for c in range(len(ids) // window):
        chunk = ids[c * window:(c + 1) * window]
        chunk = chunk if bos is None else [bos] + chunk[1:]
        with torch.no_grad():
            logp = hf(torch.tensor([chunk])).logits[0].double().log_softmax(-1)
        for j in range(window // 2 + 1, window):
            nll -= float(logp[j - 1, chunk[j]])
            count += 1
    assert got.tokens == count == 3 * 15
    assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
