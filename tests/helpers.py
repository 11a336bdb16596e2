"""Helpers shared by test modules (plain functions, imported explicitly)."""
from __future__ import annotations

import subprocess

from tierlm.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def cached_pages(path) -> int:
    """Resident pages of `path` per util-linux fincore."""
    out = subprocess.run(["fincore", "--raw", "--noheadings", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def flip(path, offset: int) -> None:
    """Corrupt one byte of `path` in place (bit-flip), as a failing disk would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user error: exit code 2 and exactly one line on stderr naming each of `needles`."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tierlm: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def chunked_engine(llm, chunk: int, max_num_seqs: int = 4):
    """An engine over llm's runner and KV pool that prefills in chunks of `chunk` tokens (llm.engine is
    left as it is)."""
    from tierlm.engine.engine import Engine
    saved, llm.runner.prefill_chunk = llm.runner.prefill_chunk, chunk
    try:
        return Engine(llm.runner, llm.tokenizer, llm.kv, max_num_seqs, chunk + max_num_seqs)
    finally:
        llm.runner.prefill_chunk = saved


def runner_engine(runner, tokenizer, tokens: int = 64, block_size: int = 16):
    """An engine around a bare Runner, with a pool of `tokens` KV slots in the runner's KV dtype."""
    from tierlm.engine.engine import Engine
    from tierlm.kvcache.paged import PagedKV
    kv = PagedKV(runner.config, -(-tokens // block_size), block_size, dtype=runner.kv_dtype, device=runner.device)
    return Engine(runner, tokenizer, kv, 4, runner.prefill_chunk + 4)


def engine_logits(engine, prompt: list[int], steps: int = 0, score: bool = True):
    """Every logit the engine computes for `prompt` and then `steps` greedy decode steps (each sampled token fed
    back): (logits [len(fed), V] fp32, the tokens fed). score: every prompt position (prompt_logprobs), else
    only the last one (the head runs on the last prefill chunk only), then the decode steps."""
    import torch

    from tierlm.engine.sampler import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True,
                            prompt_logprobs=0 if score else None)
    req = engine.add_request(list(prompt), params, keep_logits=True)
    engine.run()
    assert req.out.finish_reason == "length" and len(req.out.token_ids) == steps + 1
    return torch.cat(req.logits), list(prompt) + req.out.token_ids[:-1]
