"""Command line: `tierlm generate | chat | serve | info | plan | bench | eval-ppl | calibrate | synth`. Every user error is one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from tierlm.engine.args import (add_budget_args, add_cli_args, add_kv_args, add_quant_args,
                                positive_int as _positive_int)
from tierlm.errors import TierlmError, UsageError, is_storage_error
from tierlm.serve.args import REQUEST_MEMORY, ServeArgs

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error over several lines; we want one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=default_temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--stats", action="store_true", help="print timing to stderr after generating")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tierlm", description="Run language models larger than your memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout")
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (the default when "
                   "the model has one; a fallback ChatML template otherwise)")
    g.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    g.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    add_cli_args(g)
    _sampling_args(g, default_temperature=0.0)

    c = sub.add_parser("chat", help="interactive chat with history")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--session", default=None, metavar="NAME",
                   help="keep the conversation and its KV cache on disk under NAME; resume it next time")
    c.add_argument("--session-dir", default=None, help="where sessions live (default ~/.cache/tierlm/sessions)")
    add_cli_args(c)
    _sampling_args(c, default_temperature=0.7)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, models, metrics)")
    add_cli_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $TIERLM_API_KEY)")
    s.add_argument("--protect-metrics", action="store_true",
                   help="/metrics needs the API key too (default: open, as vLLM's)")
    s.add_argument("--max-queue", type=_positive_int, default=256, help="waiting requests before 429 (default 256)")
    s.add_argument("--request-memory", default=REQUEST_MEMORY, metavar="SIZE",
                   help=f"memory for the request bodies being read and parsed, planned within --max-memory; "
                        f"past it: 503 (default {REQUEST_MEMORY})")
    s.add_argument("--max-body-bytes", type=_positive_int, default=None,
                   help="largest request body (default: room for a prompt of the whole context, >= 1 MiB); 413 past it")
    s.add_argument("--body-timeout", type=float, default=ServeArgs.body_timeout,
                   help="seconds a client has to send a request's body (408 after; default 30)")
    s.add_argument("--header-timeout", type=float, default=ServeArgs.header_timeout,
                   help="seconds a connection has to send a request's headers (closed after; default 10)")
    s.add_argument("--max-connections", type=_positive_int, default=ServeArgs.max_connections,
                   help="open connections before new requests get 503 (default 1024)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file's name)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM (default 30)")
    s.add_argument("--tenant", action="append", default=[], metavar="KEY=NAME[:running=N,queued=N,kv_blocks=N]",
                   help="an API key for a tenant with quotas (repeatable; over quota: queued, then 429)")
    s.add_argument("--replicas", type=_positive_int, default=1,
                   help="engine replicas behind the one endpoint, on Ray Serve (default 1: one process, no Ray)")
    s.add_argument("--routing", default="prefix", choices=["prefix", "random"],
                   help="with --replicas > 1: prefix (a prompt's leading blocks keep their replica, load bounded; "
                        "default) or random")

    t = sub.add_parser("memory-timeline", help="draw a --memory-trace file: reserved bytes by owner over time")
    t.add_argument("trace", help="the JSON written by --memory-trace")
    t.add_argument("-o", "--out", default="memory-timeline.png", help="PNG to write")

    i = sub.add_parser("info", help="architecture, parameter count and memory table")
    i.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: embedded)")
    i.add_argument("--context", type=_positive_int, default=None, help="context for the totals (default: model's, ≤8192)")
    i.add_argument("--batch", type=_positive_int, default=1)
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="KV/activation dtype")

    n = sub.add_parser("plan", help="where each layer would live under a budget, and the predicted speed")
    n.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: embedded)")
    add_quant_args(n)
    n.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    n.add_argument("--plot", default=None, metavar="PNG", help="also draw the plan (needs matplotlib)")
    add_budget_args(n)
    add_kv_args(n)

    b = sub.add_parser("bench", help="time prefill and decode; compare with the planner's prediction")
    b.add_argument("--prompt-tokens", type=_positive_int, default=32)
    b.add_argument("--tokens", type=_positive_int, default=16, help="tokens to decode")
    b.add_argument("--warmup", type=int, default=1, help="decode steps not counted (default 1)")
    add_cli_args(b)

    e = sub.add_parser("eval-ppl", help="sliding-window perplexity of a text, one row per weight scheme")
    e.add_argument("--model", default=None, help="GGUF file or HF directory (default: embedded SmolLM2-135M)")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--quant", default="auto", help="comma list of auto (what generate runs: the file's own "
                   "quantisation), none, int8, int4[-gN], int8-gN (e.g. none,auto,int4); the first is the "
                   "reference for the deltas")
    e.add_argument("--scheme", default="sliding", choices=["sliding", "llama.cpp"],
                   help="sliding: windows of --window advancing by --stride; llama.cpp: as llama-perplexity -c "
                        "WINDOW (non-overlapping windows, the second half of each scored)")
    e.add_argument("--window", type=_positive_int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=_positive_int, default=256, help="tokens between windows (default 256)")
    e.add_argument("--max-tokens", type=_positive_int, default=None, help="score only the first N tokens")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: float32, bf16 activations for quantised rows)")
    e.add_argument("--threads", type=_positive_int, default=None)
    e.add_argument("--kv-dtype", default="auto", help="comma list of auto, bfloat16, int8: KV formats to score "
                   "(e.g. auto,int8)")
    e.add_argument("--kernels", default="int8", help="comma list of int8, exact: quantised-matmul numerics to score "
                   "(native kernels; e.g. exact,int8)")

    y = sub.add_parser("synth", help="write a random-weight model (HF dir or GGUF) at a real model's shapes")
    y.add_argument("out", help="output directory (--format hf) or .gguf file (--format gguf)")
    y.add_argument("--preset", required=True, help="smollm2-135m, tinyllama-1.1b, llama-7b, llama-13b, ...")
    y.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: safetensors directory (default); gguf: one file for llama.cpp and tierlm alike, "
                        "with SmolLM2's tokenizer, so a 49152-token vocabulary whatever the preset's")
    y.add_argument("--quant", default=None, choices=["q4_0", "q4_1", "q5_0", "q8_0"],
                   help="GGML type of every 2-D weight with --format gguf (default q4_1; norms stay F32)")
    y.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype with --format hf (default bfloat16)")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--shard-size", default="2GiB", help="largest safetensors shard (default 2GiB)")
    y.add_argument("--force", action="store_true", help="replace OUT if it exists")

    k = sub.add_parser("calibrate", help="measure disk, RAM, GEMV (and CUDA H2D) bandwidth; save a profile")
    k.add_argument("--dir", default=".", help="directory on the disk to measure (use your --offload-dir)")
    k.add_argument("--size", default="1GiB", help="scratch file size for the disk test")
    k.add_argument("--queue-depth", type=_positive_int, default=None,
                   help="measure only this many concurrent 8 MiB reads (default: the curve over 1-64 MiB in flight, "
                        "from which the planner sizes ring and I/O threads)")
    k.add_argument("--profile", default=None, help="where to save (default ~/.cache/tierlm/profile.json)")
    k.add_argument("--force", action="store_true", help="re-measure even if a profile is saved")
    return parser


def _sampling(args: argparse.Namespace):
    from tierlm import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def _load(args: argparse.Namespace):
    from tierlm import LLM
    from tierlm.engine.args import EngineArgs

    return LLM.from_args(EngineArgs.from_cli(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from tierlm import RequestOutput

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _sampling(args)
    llm = _load(args)
    # An instruct model answers a question only inside its chat template, so it is applied by default when
    # the model ships one (as llama.cpp's CLI and Ollama do); --raw completes the text as it is.
    chat = args.chat or (not args.raw and llm.tokenizer.chat_template is not None)
    ids = llm.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt
    out = RequestOutput()
    for delta in llm.stream(ids, params, out):
        if not args.no_stream:
            print(delta, end="", flush=True)
    print(out.text if args.no_stream else "", flush=True)
    if not out.token_ids:
        why = "the model ended its answer at once (end-of-sequence)" if out.finish_reason == "stop" \
            else f"finish reason {out.finish_reason}"
        print(f"tierlm: no text generated: {why}" + ("" if chat else "; try without --raw for an instruct model"),
              file=sys.stderr)
    if args.stats:
        print(llm.stats_text(out), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tierlm.chat_repl import run_chat
    from tierlm.session import session_dir

    session = session_dir(args.session, args.session_dir) if args.session else None
    return run_chat(_load(args), _sampling(args), args.system, stats=args.stats, session=session)


def cmd_serve(args: argparse.Namespace) -> int:
    from tierlm.engine.args import EngineArgs
    from tierlm.serve.server import check_api_key, serve

    engine_args = EngineArgs.from_cli(args)
    serve_args = ServeArgs(args.host, args.port, args.api_key, args.max_queue, args.served_model_name,
                           args.drain_timeout, tuple(args.tenant), args.protect_metrics, args.max_body_bytes,
                           args.body_timeout, args.header_timeout, args.max_connections)
    check_api_key(serve_args)
    if args.replicas == 1:
        return serve(engine_args, serve_args)
    try:
        from tierlm.serve.cluster import serve_replicas
    except ImportError as e:
        if (e.name or "").partition(".")[0] != "ray":
            raise
        raise UsageError(f"--replicas needs Ray Serve ({e}): pip install 'tierlm[ray]'") from None
    return serve_replicas(engine_args, serve_args, args.replicas, args.routing)


def cmd_memory_timeline(args: argparse.Namespace) -> int:
    from tierlm.memory.trace import plot_timeline

    plot_timeline(args.trace, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tierlm.info import describe
    from tierlm.weights import open_model

    source = open_model(args.model)
    context = args.context or min(source.config.max_position_embeddings, 8192)
    print(describe(source, context, args.batch, 4 if args.dtype == "float32" else 2))
    return 0


def _profile_note(path: str | None, calibrated: bool) -> str:
    from tierlm.offload.calibrate import default_profile_path

    if calibrated:
        return f"measured ({path or default_profile_path()})"
    return "built-in defaults, uncalibrated: run `tierlm calibrate --dir OFFLOAD_DIR` for real predictions"


def cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tierlm.config import parse_size, resolve_dtype
    from tierlm.engine.args import kv_storage_dtype
    from tierlm.memory.budget import MemoryBudget
    from tierlm.offload.calibrate import load_profile_or_default
    from tierlm.offload.planner import plan
    from tierlm.memory.ledger import MemoryLedger
    from tierlm.offload.plan_input import budget_plan_input, default_context, plan_input, reserve_placement
    import torch

    from tierlm.plan_report import describe_context_options, describe_kv_int8, describe_plan, plot_plan
    from tierlm.quant import QuantScheme
    from tierlm.weights import open_model

    source = open_model(args.model)
    cfg = source.config
    budget = MemoryBudget.parse(args.max_memory)
    quant = QuantScheme.resolve(args.quant, args.group_size, source.storage_types(),
                                 source.head_storage_type(), source.ggml_tensors())
    dtype = resolve_dtype(args.dtype, quant.bf16_activations)
    profile, calibrated = load_profile_or_default(args.profile)
    cuda = args.device.startswith("cuda")
    kv_pool = parse_size(args.kv_memory) if args.kv_memory is not None else None
    options = []
    if budget.limited:
        ctx, inp, options = budget_plan_input(cfg, dtype, budget, args.max_context, profile, cuda, args.ring_depth,
                                              quant, kv_storage_dtype(args.kv_dtype, dtype, cuda), args.block_size,
                                              kv_pool)
    else:
        ctx = default_context(cfg, budget, args.max_context)
        inp = plan_input(cfg, dtype, budget, ctx, profile, cuda=cuda, ring_depth=args.ring_depth, quant=quant,
                         kv_bytes=kv_pool)
    placement = plan(inp)
    weights = str(dtype).removeprefix("torch.") + (f", weights {quant}" if quant.enabled else "")
    print(describe_plan(cfg, weights, budget, inp, placement,
                        _profile_note(args.profile, calibrated), ctx))
    ledger = MemoryLedger({"cpu": budget.cpu, "cuda": budget.device})
    reserve_placement(ledger, inp, placement)  # what a run would reserve first, before loading a byte
    print("\n" + ledger.describe().replace("reserved now", "first reservations of a run"))
    if options:
        print("\n" + describe_context_options(options, ctx))
        if kv_storage_dtype(args.kv_dtype, dtype, cuda) != torch.int8:  # the other side of the trade: KV's format
            c8, inp8, _ = budget_plan_input(cfg, dtype, budget, None, profile, cuda, args.ring_depth, quant,
                                            torch.int8, args.block_size)
            print(describe_kv_int8(c8, inp8, plan(inp8)))
    if args.plot:
        plot_plan(cfg, inp, placement, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _scheme_label(text: str) -> tuple[str, int | None]:
    """"int4-g64" -> ("int4", 64); "int8" -> ("int8", None)."""
    kind, _, group = text.strip().partition("-g")
    try:
        return kind, int(group) if group else None
    except ValueError:
        raise UsageError(f"bad quant {text!r} (use e.g. int8, int8-g32, int4, int4-g128)") from None


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tierlm import LLM
    from tierlm.eval_ppl import describe, perplexity
    from tierlm.quant import QuantScheme

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read text {args.text}: {e}") from None
    schemes = [q.strip() if q.strip() == "auto" else QuantScheme.parse(*_scheme_label(q))
               for q in args.quant.split(",")]
    kv_dtypes, kernel_kinds = args.kv_dtype.split(","), args.kernels.split(",")
    results, ids = [], None
    for scheme, kv_dtype, kind in [(s, k, n) for s in schemes for k in kv_dtypes for n in kernel_kinds]:
        with LLM(args.model, dtype=args.dtype, threads=args.threads, quant=scheme,
                 max_context=args.window, kv_dtype=kv_dtype, kernels=kind) as llm:
            if ids is None:
                ids = llm.tokenizer.encode(text)[:args.max_tokens]
                if len(ids) < 2:
                    raise UsageError(f"{args.text} has fewer than 2 tokens")
            label = "fp32" if not llm.quant.enabled and llm.dtype.itemsize == 4 else str(llm.quant)
            label = f"auto ({label})" if scheme == "auto" else label
            label += "" if kv_dtype == "auto" else f" kv:{kv_dtype}"
            label += f" kernels:{kind}" if len(kernel_kinds) > 1 else ""
            window = args.window if args.scheme == "llama.cpp" else min(args.window, len(ids))
            results.append(perplexity(llm, ids, window, args.stride, label, scheme=args.scheme))
        print(describe(results[-1:] if len(results) == 1 else results[:1] + results[-1:]), flush=True)
    if len(results) > 2:
        print(describe(results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tierlm.bench import run_bench

    llm = _load(args)
    print(run_bench(llm, args.prompt_tokens, args.tokens, args.warmup, _profile_note(args.profile, llm.profile_calibrated)))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tierlm.config import format_size, parse_size
    from tierlm.synth import synth
    from tierlm.weights import open_model

    if args.format == "gguf" and args.dtype is not None:
        raise UsageError("--dtype is for --format hf (a GGUF synth is stored in --quant)")
    dtype = args.dtype or "bfloat16"
    out = synth(args.preset, Path(args.out), dtype, args.seed, parse_size(args.shard_size), args.force,
                fmt=args.format, quant=args.quant)
    from tierlm.model import registry

    cfg = open_model(out).config
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.glob("*.safetensors"))
    stored = (args.quant or "q4_1") if args.format == "gguf" else dtype
    print(f"wrote {out}: {args.preset}, {registry.param_count(cfg) / 1e9:.2f}B parameters, {stored}, {format_size(size)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tierlm.config import parse_size
    from tierlm.offload import calibrate as cal

    path = Path(args.profile) if args.profile else cal.default_profile_path()
    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    size = parse_size(args.size)
    if size < cal.REQUEST_BYTES:
        raise UsageError(f"--size must be at least 8MiB, got {args.size}")
    profile = None if args.force else cal.load_profile(path)
    if profile is None:
        profile = cal.calibrate(directory, size, args.queue_depth)
        cal.save_profile(profile, path)
        print(f"saved {path}")
    else:
        print(f"profile {path} (saved earlier; --force re-measures)")
    print(cal.describe_profile(profile))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "synth": cmd_synth,
    "memory-timeline": cmd_memory_timeline,
    "calibrate": cmd_calibrate, "plan": cmd_plan, "bench": cmd_bench, "eval-ppl": cmd_eval_ppl,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except TierlmError as e:
        if debug:
            raise
        print(f"tierlm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        if is_storage_error(e):  # disk full, permission denied, read-only: the machine's state, not a bug
            print(f"tierlm: error: {e.filename or 'storage'}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
        print(f"tierlm: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
