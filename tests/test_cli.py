"""The command line on the embedded model: generate (streamed and not), chat, info, python -m."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
from helpers import run_cli


def test_generate_chat_answers_paris(capsys):
    code, out, _ = run_cli(capsys, "generate", "--prompt", "What is the capital of France?", "--chat",
                           "--max-tokens", "24")
    assert code == 0
    assert "Paris" in out


@pytest.mark.slow
def test_streamed_equals_no_stream(capsys):
    args = ["generate", "--prompt", "Once upon a time", "--max-tokens", "20", "--temperature", "0"]
    _, streamed, _ = run_cli(capsys, *args)
    _, whole, _ = run_cli(capsys, *args, "--no-stream")
    assert streamed == whole and len(streamed.strip()) > 10


@pytest.mark.slow
def test_seeded_sampling_reproducible(capsys):
    args = ["generate", "--prompt", "Tell me a story", "--max-tokens", "16", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7"]
    _, a, _ = run_cli(capsys, *args)
    _, b, _ = run_cli(capsys, *args)
    assert a == b


def test_stats_goes_to_stderr(capsys):
    code, out, err = run_cli(capsys, "generate", "--prompt", "Hi", "--max-tokens", "4", "--stats")
    assert code == 0 and "tok/s" in err and "tok/s" not in out


@pytest.mark.slow
def test_chat_repl_keeps_history(capsys, monkeypatch):
    from tierlm import LLM, SamplingParams
    from tierlm.chat_repl import run_chat

    llm = LLM(progress=False)
    prompts: list[str] = []
    real_stream = llm.stream

    def recording_stream(ids, params, out):  # the real stream, with the prompt it was given recorded
        prompts.append(llm.tokenizer.decode(ids, skip_special_tokens=False))
        return real_stream(ids, params, out)

    monkeypatch.setattr(llm, "stream", recording_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nHi\n"))
    code = run_chat(llm, SamplingParams(temperature=0.0, max_tokens=16), system="Be brief.")
    out = capsys.readouterr().out
    assert code == 0 and len(prompts) == 3
    first_reply = out.splitlines()[0]
    # Turn 2 carries the system prompt, turn 1 and the model's first reply; /reset drops them again.
    assert "Be brief." in prompts[1] and "My name is Ada." in prompts[1] and first_reply.strip() in prompts[1]
    assert "Be brief." in prompts[2] and "Ada" not in prompts[2]


def test_info_memory_table(capsys):
    code, out, _ = run_cli(capsys, "info", "--context", "2048", "--batch", "4")
    assert code == 0
    assert "134.5M" in out and "KV cache" in out and "activation buffers" in out
    for scheme in ("fp32", "bf16", "int8", "int4"):
        assert scheme in out
    # KV per token: 2 (k, v) × 30 layers × 3 kv heads × 64 dims × 4 bytes = 45 KiB
    assert "45.0 KiB per token" in out


@pytest.mark.slow
def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "tierlm", "generate", "--prompt", "Hello", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_info_on_hf_directory(capsys, tiny_models):
    code, out, _ = run_cli(capsys, "info", str(tiny_models["qwen2"].path), "--dtype", "bfloat16")
    assert code == 0
    assert "safetensors" in out and "qwen2" in out and "untied" in out and "q/k/v biases" in out
    assert "KV cache (bf16" in out


def test_serve_replicas_bad_input_is_one_line_exit_2(capsys, monkeypatch):
    for argv, says in [(["--replicas", "0"], "--replicas: must be >= 1"),
                       (["--replicas", "2", "--routing", "sticky"], "--routing: invalid choice"),
                       (["--replicas", "2", "--threads", "0"], "--threads: must be >= 1")]:
        code, out, err = run_cli(capsys, "serve", *argv)
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err, (argv, err)
    ours = ("ray.", "tierlm.serve.cluster", "tierlm.serve.replicas", "tierlm.serve.router")
    for name in [m for m in sys.modules if m == "ray" or m.startswith(ours)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, out, err = run_cli(capsys, "serve", "--replicas", "2")
    assert code == 2 and err.count("\n") == 1 and "--replicas needs Ray Serve" in err and "tierlm[ray]" in err


def test_an_empty_api_key_is_refused(capsys, monkeypatch):
    """`--api-key ""` (or an empty $TIERLM_API_KEY) would turn authentication off without a word: one line, exit 2."""
    from helpers import assert_one_line_error
    code, _, err = run_cli(capsys, "serve", "--api-key", "")
    assert_one_line_error(code, err, "API key is empty")
    monkeypatch.setenv("TIERLM_API_KEY", " ")
    code, _, err = run_cli(capsys, "serve")
    assert_one_line_error(code, err, "API key is empty")
