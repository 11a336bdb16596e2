"""CLI for tiered weights: plan (table, --plot), bench, generate under a budget, and their errors."""
from __future__ import annotations

import pytest
from helpers import assert_one_line_error, run_cli

MODEL = "llama3_rope"  # 2 layers of 168 KiB, head and embedding 128 KiB each (fp32)


def test_plan_table(capsys, tiny_models, tmp_path):
    path = str(tiny_models[MODEL].path)
    code, out, _ = run_cli(capsys, "plan", path, "--max-memory", "cpu=660KiB", "--max-context", "64",
                           "--profile", str(tmp_path / "none.json"))
    assert code == 0
    assert "layers 0-1  disk" in out and "head" in out and "of 660.0 KiB budget" in out
    assert "uncalibrated" in out  # no profile saved at that path: the note says so
    assert "predicted" in out and "ms/token" in out


def test_plan_plot_writes_a_png(capsys, tiny_models, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    code, out, _ = run_cli(capsys, "plan", str(tiny_models[MODEL].path), "--max-memory", "cpu=700KiB",
                           "--max-context", "64", "--plot", str(png))
    assert code == 0 and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_measured_vs_predicted(capsys, tiny_models, tmp_path):
    code, out, _ = run_cli(capsys, "bench", "--model", str(tiny_models[MODEL].path), "--max-memory", "cpu=660KiB",
                           "--offload-dir", str(tmp_path / "off"), "--max-context", "64", "--prompt-tokens", "8",
                           "--tokens", "4")
    assert code == 0
    assert "measured/predicted" in out and "disk" in out and "overlap η" in out


def test_generate_under_budget_equals_unbudgeted(capsys, tiny_models, tmp_path):
    base = ["generate", "--model", str(tiny_models[MODEL].path), "--prompt", "The quick brown fox",
            "--max-tokens", "10", "--temperature", "0", "--ignore-eos", "--no-stream"]
    _, want, _ = run_cli(capsys, *base)
    code, got, err = run_cli(capsys, *base, "--max-memory", "cpu=660KiB", "--offload-dir", str(tmp_path / "o"),
                             "--max-context", "64", "--stats")
    assert code == 0 and got == want
    assert "/token" in err and "peak RSS" in err


@pytest.mark.parametrize("extra, needle", [
    (["--max-memory", "cpu=100KiB"], "below this model's minimum of"),
    (["--max-memory", "cpu=660KiB"], "--offload-dir"),  # part of the model must stream: where to?
    (["--max-memory", "cpu"], "KEY=SIZE"),
    (["--max-memory", "gpu=1GiB"], "unknown memory"),
    (["--max-memory", "cuda:0=1GiB"], "is cpu"),
    (["--ring-depth", "0"], "ring-depth"),
])
def test_budget_errors(capsys, tiny_models, extra, needle):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_models[MODEL].path), "--prompt", "x",
                           "--max-context", "64", *extra)
    assert_one_line_error(code, err, needle)


def test_plan_below_minimum_is_exit_2(capsys, tiny_models):
    code, _, err = run_cli(capsys, "plan", str(tiny_models[MODEL].path), "--max-memory", "cpu=1KiB")
    assert_one_line_error(code, err, "minimum")
