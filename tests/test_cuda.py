"""CUDA path: skipped without a GPU (CI has none). Resident GPU run equals the CPU run token for token."""
from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_greedy_matches_cpu():
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    cpu = LLM(progress=False).chat(prompt, params)
    gpu = LLM(device="cuda", progress=False).chat(prompt, params)
    assert gpu.token_ids == cpu.token_ids
    assert "Paris" in gpu.text


def test_cuda_sampling_runs():
    out = LLM(device="cuda", progress=False).generate("Once upon a time",
                                                       SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=1))
    assert len(out[0].token_ids) >= 1
