"""One set of engine arguments for the three front ends: `LLM(...)` keywords, CLI flags, `tierlm serve`.

EngineArgs is the only place an argument is named, defaulted and checked; the CLI flags are derived from it
(add_cli_args / from_cli) so `generate`, `chat`, `bench` and `serve` accept exactly what `LLM` does.
check() runs before any file is opened or thread started: a bad value costs nothing.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from tierlm.config import attention_dtype, parse_size
from tierlm.errors import UsageError
from tierlm.kvcache.block_mac import BlockSeal
from tierlm.kvcache.paged import DEFAULT_BLOCK_SIZE
from tierlm.memory.budget import MemoryBudget
from tierlm.offload.plan_input import PREFILL_CHUNK
from tierlm.quant import QuantScheme

_KV_STORES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
KV_DTYPES = ("auto", *_KV_STORES)
KERNELS = ("int8", "exact")  # EngineArgs.kernels


def kv_storage_dtype(kv_dtype: str, dtype: torch.dtype, cuda: bool) -> torch.dtype:
    """What the KV pool stores for the user's kv_dtype ("auto": the attention dtype)."""
    if kv_dtype not in KV_DTYPES:
        raise UsageError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return attention_dtype(dtype, cuda) if kv_dtype == "auto" else _KV_STORES[kv_dtype]


@dataclass
class EngineArgs:
    """See LLM's docstring for what each argument does."""
    model: str | Path | None = None
    dtype: str | torch.dtype = "auto"
    threads: int | None = None
    device: str = "cpu"
    progress: bool | None = None
    max_memory: str | dict | MemoryBudget | None = None
    offload_dir: str | Path | None = None
    max_context: int | None = None
    ring_depth: int | None = None
    profile: str | Path | None = None
    quant: str | QuantScheme = "auto"
    group_size: int | None = None
    # quantised matmuls on the native kernels: "int8" activations quantised per 32 columns (integer dot products,
    # as llama.cpp), or "exact" fp32 activations (W4A32; slower). Without the native library: torch's W4A16.
    kernels: str = "int8"
    kv_memory: str | int | None = None
    kv_dtype: str = "auto"
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True
    kv_host_memory: str | int = 0
    kv_offload_dir: str | Path | None = None
    kv_compress: str = "none"
    kv_disk_size: str | int = "4GiB"  # the disk KV tier's capacity (least recently used blocks deleted past it)
    # a KV tier shared by replicas and machines, below host and disk: "redis://HOST:PORT/DB" (kvcache/remote_tier.py)
    kv_remote: str | None = None
    kv_remote_namespace: str = "tierlm"  # key prefix: deployments sharing one Redis keep their blocks apart
    # the replicas' shared secret: each block in the remote tier carries an HMAC over its key and value, checked
    # before use (kvcache/block_mac.py); None: the tier trusts anyone who can write to the Redis. Not in repr.
    kv_remote_secret: str | None = field(default=None, repr=False)
    migrate: bool = False  # move memory between resident layers and KV at run time (offload/migration.py)
    # host memory held for the request bodies a server is reading and parsing (serve/guard.py: the ledger's
    # "requests" reservation, planned within max_memory like the KV tiers); 0 for the Python API and the CLI
    request_memory: str | int = 0
    kv_host_log: str | Path | None = None  # one line per host-tier allocation/free, for benchmarks/soak.py's replay
    memory_trace: str | Path | None = None  # write the memory ledger's events here (Chrome trace JSON) on close
    max_num_seqs: int = 64  # requests running at once (decoded together)
    # tokens per engine step: every running decode + whole prefill chunks (512 tokens at most each). 768 holds
    # one full chunk, a decode for each of 64 sequences and a short prompt or two beside them; it bounds how
    # long a running stream waits for its next token behind long prompts. Measured on the 2-core CPU
    # (benchmarks/serve.py, embedded model, 700-word prompts at 2 req/s): 576, 768 and 1280 gave the same
    # throughput (17.3-17.6 tok/s out) and inter-token latency (82-84 ms p50): prefill-bound, the budget moot.
    max_num_batched_tokens: int = 768
    # chat message content is text (a typed "<|im_start|>system" cannot open a turn); True: its special-token
    # strings are control tokens again, for callers that write their own turns (weights/chat_text.py)
    allow_special_tokens_in_content: bool = False

    def check(self) -> None:
        """Every check that needs no file: UsageError with one line saying what is wrong."""
        for name in ("threads", "ring_depth", "group_size"):
            if (v := getattr(self, name)) is not None and v < 1:
                raise UsageError(f"{name} must be >= 1, got {v}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < PREFILL_CHUNK + self.max_num_seqs:
            raise UsageError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must hold one prefill chunk "
                             f"({PREFILL_CHUNK}) and a decode for each of max_num_seqs ({self.max_num_seqs})")
        if self.device != "cpu" and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise UsageError(f"device {self.device!r} is not available")
        if self.max_context is not None and self.max_context < 2:
            raise UsageError(f"max_context must be >= 2, got {self.max_context}")
        QuantScheme.check(self.quant, self.group_size)
        if self.kernels not in KERNELS:
            raise UsageError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        kv_storage_dtype(self.kv_dtype, torch.float32, False)
        if self.kv_compress not in ("none", "zstd"):
            raise UsageError(f"kv_compress must be none or zstd, got {self.kv_compress!r}")
        if self.kv_memory is not None:
            parse_size(self.kv_memory)
        parse_size(self.request_memory)
        parse_size(self.kv_host_memory)
        parse_size(self.kv_disk_size)
        if self.kv_remote is not None:
            check_remote_url(self.kv_remote)
        if not self.kv_remote_namespace or any(c in self.kv_remote_namespace for c in " :{}"):
            raise UsageError(f"kv_remote_namespace must be a non-empty word without spaces, ':' or braces, "
                             f"got {self.kv_remote_namespace!r}")
        if self.kv_remote_secret is not None:  # refused even unused: an empty secret is a mistake, never "no MAC"
            BlockSeal(self.kv_remote_secret)
        budget = MemoryBudget.parse(self.max_memory)
        if self.migrate and (not budget.limited or self.offload_dir is None or self.device != "cpu"):
            raise UsageError("migrate needs max_memory and offload_dir (--max-memory, --offload-dir) and runs on a CPU")
        if budget.device is not None and not self.device.startswith("cuda"):
            raise UsageError(f"max_memory names {budget.device_name} but the device is {self.device}")

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        """From the flags add_cli_args defined (any other attributes of `ns` are ignored). The remote tier's
        secret: --kv-remote-secret, else $TIERLM_KV_REMOTE_SECRET (read here only: LLM(...) never reads it)."""
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        if "kv_remote_secret" in values and values["kv_remote_secret"] is None:
            values["kv_remote_secret"] = os.environ.get(SECRET_ENV)
        if hasattr(ns, "no_prefix_cache"):
            values["enable_prefix_caching"] = not ns.no_prefix_cache
        return cls(**values)


REMOTE_SCHEMES = ("redis://", "rediss://", "unix://")
SECRET_ENV = "TIERLM_KV_REMOTE_SECRET"


def check_remote_url(url: str) -> None:
    """kv_remote must name a Redis server: redis://[user:password@]host:port/db, rediss://..., unix://path."""
    if not isinstance(url, str) or not url.startswith(REMOTE_SCHEMES):
        raise UsageError(f"kv_remote must be a redis:// (or rediss://, unix://) URL, got {url!r}")
    from urllib.parse import urlparse
    try:
        u = urlparse(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
        db = u.path.strip("/")
    except ValueError as e:
        raise UsageError(f"kv_remote {url!r}: {e}") from None
    if u.scheme != "unix" and (not u.hostname or (db and not db.isdigit())):
        raise UsageError(f"kv_remote {url!r}: expected redis://HOST:PORT/DB")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="memory budget, e.g. cpu=1GiB or cuda:0=4GiB,cpu=16GiB (default: no limit)")
    p.add_argument("--offload-dir", default=None, help="where layers that do not fit are stored for streaming")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="longest prompt + output (default: the model's; 4096 at most under a budget)")
    p.add_argument("--ring-depth", type=positive_int, default=None, help="streaming ring slots (default: planned)")
    p.add_argument("--profile", default=None, help="bandwidth profile (default: the one `tierlm calibrate` saved)")


def add_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="paged KV pool, e.g. 2GiB (default: one sequence of max-context tokens)")
    p.add_argument("--kv-dtype", default="auto", choices=list(KV_DTYPES),
                   help="KV cache format (auto: the attention dtype; int8: per token & head scales)")
    p.add_argument("--block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE,
                   help=f"tokens per KV block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV of shared prompt prefixes")


def add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: float32, or bfloat16 activations with --quant)")
    p.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantisation: int8 (W8A16) or int4 (W4A16); auto (default): a Q4_0/Q4_1/Q8_0 "
                        "GGUF runs in its own quantisation (K-quants: the nearest), other files dense")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="quantisation group along K (int8 default: per output channel; int4 default: 32)")
    p.add_argument("--kernels", default="int8", choices=list(KERNELS),
                   help="quantised matmuls on the native kernels: int8 (default) activations quantised per 32 "
                        "columns for integer dot products, as llama.cpp; exact: fp32 activations (slower)")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Every EngineArgs field as a flag (the model and the engine; sampling flags are the command's)."""
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: embedded SmolLM2-135M)")
    add_quant_args(p)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_budget_args(p)
    add_kv_args(p)
    p.add_argument("--kv-host-memory", default="0", metavar="SIZE", help="host-RAM tier for evicted KV blocks")
    p.add_argument("--kv-offload-dir", default=None, help="disk tier for KV blocks (default OFFLOAD_DIR/kv)")
    p.add_argument("--kv-compress", default="none", choices=["none", "zstd"], help="KV blocks on disk")
    p.add_argument("--kv-disk-size", default=EngineArgs.kv_disk_size, metavar="SIZE",
                   help=f"capacity of the disk KV tier (default {EngineArgs.kv_disk_size}; LRU eviction)")
    p.add_argument("--kv-remote", default=None, metavar="URL",
                   help="a KV tier shared by replicas, below host and disk: redis://HOST:PORT/DB")
    p.add_argument("--kv-remote-namespace", default=EngineArgs.kv_remote_namespace, metavar="NAME",
                   help="key prefix in the shared KV tier (default %(default)s)")
    p.add_argument("--kv-remote-secret", default=None, metavar="SECRET",
                   help=f"a secret every replica shares: blocks in the shared tier carry an HMAC over key and value "
                        f"and others are refused (default: ${SECRET_ENV}; prefer it: a flag shows in `ps`). "
                        f"Without one the tier trusts anyone who can write to the Redis")
    p.add_argument("--migrate", action="store_true",
                   help="under --max-memory: demote resident layers to streamed when requests wait for KV, and "
                        "promote them back when they do not (needs --offload-dir)")
    p.add_argument("--kv-host-log", default=None, metavar="FILE",
                   help="append one line per host KV tier allocation and free (replayed by benchmarks/soak.py)")
    p.add_argument("--memory-trace", default=None, metavar="FILE",
                   help="write every memory reservation, release, eviction as a Chrome/Perfetto trace JSON at exit "
                        "(tierlm memory-timeline FILE draws it)")
    p.add_argument("--max-num-seqs", type=positive_int, default=EngineArgs.max_num_seqs,
                   help=f"requests decoded together (default {EngineArgs.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=EngineArgs.max_num_batched_tokens,
                   help=f"tokens per engine step (default {EngineArgs.max_num_batched_tokens})")
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="for trusted callers: special-token strings in chat messages (<|im_start|>...) are control "
                        "tokens, not text (default: text, so a message cannot fake another turn)")
