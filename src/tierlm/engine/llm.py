"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

import weakref
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import torch

from tierlm.config import format_size, parse_size, resolve_dtype
from tierlm.engine.args import EngineArgs, kv_storage_dtype
from tierlm.engine.engine import Engine
from tierlm.engine.output import RequestOutput, check_request
from tierlm.engine.quota import Quota
from tierlm.engine.request import RequestUpdate
from tierlm.engine.runner import Runner
from tierlm.engine.sampler import SamplingParams
from tierlm.errors import UsageError
from tierlm.kvcache.paged import PagedKV
from tierlm.kvcache.remote_tier import RemoteTier, reserved_bytes
from tierlm.kvcache.persist import save_prefix_cache
from tierlm.kvcache.pool import block_nbytes
from tierlm.kvcache.stats import KVStats
from tierlm.memory import allocator
from tierlm.memory.budget import MemoryBudget
from tierlm.offload.calibrate import load_profile_or_default
from tierlm.offload.planner import Placement, plan
from tierlm.memory.ledger import MemoryLedger, Reservation
from tierlm.offload.migration import Migrator
from tierlm.offload.plan_input import (ContextOption, budget_plan_input, default_context, kv_pool_bytes, plan_input,
                                    reserve_placement)
from tierlm.offload.stats import describe_stats
from tierlm.memory.trace import write_trace
from tierlm.offload.weight_store import WeightStore
from tierlm.offload.tier import Tier
from tierlm.quant import QuantScheme, int4, intdot, kernels
from tierlm.weights import open_model
from tierlm.weights.fingerprint import content_fingerprint

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class LLM:
    """A loaded model ready to generate.

    model: a GGUF file or HF directory; None = the embedded SmolLM2-135M-Instruct.
    dtype: "float32" | "bfloat16" | "auto" (fp32 on CPU). threads: torch intra-op threads (None = torch's default).
    max_memory: {"cpu": "1GiB"} or {"cuda:0": "4GiB", "cpu": "16GiB"} (or "cpu=1GiB,..."): what weights,
        ring buffers, KV cache and activations may use; the rest streams from `offload_dir`.
    max_context: longest prompt + output served (default: the model's; under a budget it follows from the
        budget: the longest context, up to 4096, whose KV costs ≤10% predicted decode speed against 512 tokens'
        — offload/plan_input.choose_context). kv_memory, kv_host_memory and the KV format count against max_memory.
    profile: bandwidth profile path for the planner (default: the one `tierlm calibrate` saved).
    quant: "auto" | "none" | "int8" | "int4" weight-only quantisation (group_size: 32/64/128; int8 default per
        channel, int4 default 32). GGUF Q4_0/Q4_1 (Q8_0) blocks become int4 (int8) g=32 without loss. "auto" (the
        default) runs a quantised GGUF in its own quantisation (QuantScheme.resolve), anything else dense.
    kernels: "int8" (default) | "exact": with the native kernels (tierlm/native, built at install), quantised
        matmuls take activations quantised to int8 per 32 columns (integer dot products, as llama.cpp), or fp32.
    kv_memory: the paged KV pool, e.g. "2GiB" (default: one sequence of max_context tokens, or what the
        planner reserved under max_memory). kv_dtype: "auto" (the attention dtype), "float32", "bfloat16" or
        "int8" (per token & head scales): what the pool stores; attention reads it back in its own dtype.
        block_size: tokens per KV block. enable_prefix_caching: reuse the KV of shared prompt prefixes.
        kv_host_memory: a host-RAM KV tier for cached blocks evicted from the pool (default 0: on a CPU the pool is
        RAM already); kv_offload_dir: a disk KV tier below it (default OFFLOAD_DIR/kv when offload_dir is given);
        kv_compress: "none" or "zstd" for blocks on disk. kv_remote: "redis://HOST:PORT/DB", a KV tier shared by
        replicas below host and disk (kvcache/remote_tier.py; keys under kv_remote_namespace); kv_remote_secret:
        the replicas' shared secret, blocks without its HMAC over key and value are refused (None: trust the Redis).
    max_num_seqs, max_num_batched_tokens: the engine loop's limits per step (engine/args.py).
    allow_special_tokens_in_content: chat message content is plain text by default (a typed "<|im_start|>" is
        text, so a message cannot fake a turn); True makes its special-token strings control tokens (trusted
        callers). A string prompt is raw text either way: its special-token strings are control tokens.
    Every keyword is a field of EngineArgs (LLM.from_args takes one), the same as the CLI's and the server's.
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto", **kwargs):
        self._init(EngineArgs(model=model, dtype=dtype, **kwargs))

    @classmethod
    def from_args(cls, args: EngineArgs, quotas: dict[str, Quota] | None = None) -> "LLM":
        """The CLI's and the server's way in: the same arguments as the keywords. quotas: tenant -> Quota for
        the engine's admissions (the server's --tenant, serve/server.tenant_quotas)."""
        llm = cls.__new__(cls)
        llm._init(args, quotas)
        return llm

    def _init(self, a: EngineArgs, quotas: dict[str, Quota] | None = None) -> None:
        a.check()  # NOTE: every argument is checked before a file is opened or a thread started
        self.args = a
        if a.threads is not None:
            torch.set_num_threads(a.threads)
        allocator.return_freed_memory_promptly()  # freed transients must leave RSS for budgets to hold
        cuda = a.device.startswith("cuda")
        kv_pool = parse_size(a.kv_memory) if a.kv_memory is not None else None
        kv_host = parse_size(a.kv_host_memory)
        self.budget = MemoryBudget.parse(a.max_memory)
        self.source = open_model(a.model)
        self.quant = QuantScheme.resolve(a.quant, a.group_size, self.source.storage_types(),
                                          self.source.head_storage_type(), self.source.ggml_tensors())
        self.dtype = resolve_dtype(a.dtype, self.quant.bf16_activations)
        self.config = self.source.config
        self.tokenizer = self.source.tokenizer
        kv_storage = kv_storage_dtype(a.kv_dtype, self.dtype, cuda)
        self.profile, self.profile_calibrated = load_profile_or_default(a.profile)
        self.plan: Placement | None = None
        self.planned_kv_bytes: int | None = None
        self.context_options: list[ContextOption] = []
        self.memory = MemoryLedger({"cpu": self.budget.cpu, "cuda": self.budget.device})
        if a.memory_trace is not None:
            self.memory.tracing = True
            # written at close(), or when the process exits without one (the CLI's commands)
            self._trace_writer = weakref.finalize(self, write_trace, self.memory.events, a.memory_trace)
        held: dict[str, Reservation] = {}
        # the remote KV tier's buffers (host RAM) are planned like the host KV tier's
        remote_bytes = reserved_bytes(block_nbytes(self.config, a.block_size, kv_storage)) if a.kv_remote else 0
        self.request_bytes = parse_size(a.request_memory)  # a server's request bodies (serve/guard.py), likewise
        if not self.budget.limited:
            self.max_context = default_context(self.config, self.budget, a.max_context)
            self.store = WeightStore.load_resident(self.source, self.dtype, a.device, a.progress, self.quant)
        else:
            self.max_context, inp, self.context_options = budget_plan_input(
                self.config, self.dtype, self.budget, a.max_context, self.profile, cuda, a.ring_depth, self.quant,
                kv_storage, a.block_size, kv_pool, kv_host + remote_bytes + self.request_bytes)
            self.plan = plan(inp)
            self.planned_kv_bytes = inp.kv_bytes
            held = reserve_placement(self.memory, inp, self.plan, kv_host)  # before a byte is loaded
            if self.plan.ring_depth and a.offload_dir is None:
                raise UsageError(f"the budget {self.budget} leaves {self.plan.count(Tier.DISK)} layers off memory: "
                                 "pass offload_dir (--offload-dir) for the offload store")
            self.store = WeightStore.load_planned(self.source, self.dtype, a.device, self.plan,
                                                  Path(a.offload_dir) if a.offload_dir else None, a.progress,
                                                  io_threads=self.plan.io_threads, quant=self.quant,
                                                  migratable=a.migrate)
        allocator.trim()  # loading's transients are freed: hand their heap pages back
        self.runner = Runner(self.store, self.dtype, a.device, max_context=self.max_context, ledger=self.memory,
                             exact=a.kernels == "exact")
        kv_dir = a.kv_offload_dir if a.kv_offload_dir is not None else \
            Path(a.offload_dir) / "kv" if a.offload_dir is not None else None
        self.kv = self._make_kv(kv_pool, kv_storage, a.block_size, a.enable_prefix_caching, kv_host,
                                Path(kv_dir) if kv_dir is not None else None, a.kv_compress, parse_size(a.kv_disk_size),
                                a.kv_host_log, self._movable() if a.migrate else 0)
        self._reservations = self._record(held, kv_host)
        migrator = Migrator(self.store, self.kv, inp, self.plan, self._reservations, self.memory) if a.migrate else None
        self.engine = Engine(self.runner, self.tokenizer, self.kv, a.max_num_seqs, a.max_num_batched_tokens,
                             self.memory, migrator=migrator, quotas=quotas)

    def _record(self, held: dict[str, Reservation], kv_host: int) -> dict[str, Reservation]:
        """The ledger holds what each owner really allocated: the planned reservations resized to it (or made
        now, without a budget). "activations" keeps the planner's estimate of one step's transients beyond the
        workspace arena (kernel outputs, the K/V gather, the dequantising fallback: not pooled, not counted
        as they come and go)."""
        tier = "cuda" if self.runner.device.type == "cuda" else "cpu"
        actual = {"weights": sum(self.store.nbytes_by_tier().values()), "ring": self.store.ring_nbytes,
                  "kv_pool": self.kv.nbytes, "kv_host": kv_host}
        inp = plan_input(self.config, self.dtype, self.budget, self.max_context, self.profile,
                         cuda=tier == "cuda", quant=self.quant)
        actual["activations"] = max(inp.activation_bytes - self.runner.workspace.nbytes, 0)
        if self.kv.tiers.disk_dir is not None:
            actual["kv_disk"] = self.kv.tiers.disk_capacity or 0
        if self.kv.tiers.remote is not None:  # one write batch + one fetch batch
            actual["kv_remote"] = reserved_bytes(self.kv.pool.block_bytes)
        if self.request_bytes:
            actual["requests"] = self.request_bytes
        for owner, n in actual.items():
            if owner in held:
                held[owner].resize(n, check=False)
            else:
                where = {"kv_host": "cpu", "kv_remote": "cpu", "requests": "cpu", "kv_disk": "disk"}.get(owner, tier)
                held[owner] = self.memory.reserve(owner, where, n, check=False)
        return held

    def _movable(self) -> int:
        """Bytes the KV pool may grow by when memory migrates: resident weights, and the budget the plan left."""
        headroom = max(0, (self.budget.cpu or 0) - self.plan.device_bytes) if self.plan is not None else 0
        return self.store.nbytes_by_tier()[Tier.DEVICE] + headroom

    def _make_kv(self, kv_pool: int | None, storage: torch.dtype, block_size: int, caching: bool,
                 host_bytes: int, disk_dir: Path | None, codec: str, disk_capacity: int,
                 host_log: str | Path | None = None, movable: int = 0) -> PagedKV:
        per_block = block_nbytes(self.config, block_size, storage)
        if kv_pool is not None:
            pool = kv_pool
        elif self.planned_kv_bytes is not None:
            pool = self.planned_kv_bytes  # what the planner reserved for the KV cache under max_memory
        else:
            pool = kv_pool_bytes(self.config, self.max_context, storage, block_size)  # one sequence of max_context
        if pool < per_block:
            raise UsageError(f"kv_memory {format_size(pool)} is below one KV block ({format_size(per_block)})")
        # the salt keeps cached prefixes of different weights or KV formats apart (sessions saved on disk too)
        salt = self.kv_salt(storage, block_size)
        remote = None
        if self.args.kv_remote is not None:
            remote = RemoteTier(self.args.kv_remote, self.args.kv_remote_namespace,
                                str(storage).removeprefix("torch."), salt, codec, per_block, self.args.kv_remote_secret)
        return PagedKV(self.config, pool // per_block, block_size, dtype=self.runner.kv_dtype,
                       device=self.runner.device, storage=storage, caching=caching, salt=salt, host_bytes=host_bytes,
                       disk_dir=disk_dir, codec=codec, disk_gbps=self.profile.disk_read_gbps,
                       disk_capacity=disk_capacity,
                       host_log=Path(host_log) if host_log else None,
                       capacity=(pool + movable) // per_block,  # `movable`: weight bytes that may become KV
                       remote=remote)

    def kv_salt(self, storage: torch.dtype, block_size: int) -> bytes:
        """What a cached KV block's keys mean, so cached prefixes of different weights, KV formats or numerics
        never meet (in saved sessions, the disk tier and a Redis shared by replicas): the model's content
        fingerprint (the same model in two places shares keys), how its weights are computed (dtype, quant
        scheme, int4 layout), the KV format *resolved* on this hardware and the block size, the numerics."""
        fingerprint = content_fingerprint(self.source.content_files(), self.args.progress)
        layout = int4.layout_tag() if self.quant.enabled else ""
        return (f"{fingerprint}|{self.dtype}|{self.quant}|{layout}|kv={storage}|bs={block_size}"
                f"|{self.runner.device.type}|numerics{kernels.NUMERICS_VERSION}"
                f"|{intdot.numerics_tag(self.runner.exact)}").encode()

    def save_prefix_cache(self, directory: str | Path) -> int:
        """Write every cached KV block (pool, host and disk tiers) to `directory`, skipping blocks already
        there (incremental); returns the blocks written. Files are checksummed and written atomically."""
        return save_prefix_cache(self.kv, Path(directory))

    def load_prefix_cache(self, directory: str | Path) -> int:
        """Make the blocks saved in `directory` restorable on a prefix hit (read lazily, verified on read);
        returns the blocks found. Refused when they were saved by another model or KV format."""
        return self.kv.tiers.add_dir(Path(directory))

    def stats_text(self, out: RequestOutput) -> str:
        """Two lines about one request: timing, then traffic per tier, I/O wait, overlap η, bandwidth, peak RSS."""
        m = out.metrics
        calibrated = self.profile.disk_read_gbps if self.profile_calibrated else None
        return (f"[{m.prompt_tokens} prompt tokens, {len(out.token_ids)} generated ({out.finish_reason}); "
                f"TTFT {m.ttft_s * 1000:.0f} ms, decode {m.decode_tok_s:.1f} tok/s]\n"
                + describe_stats(m.tiers, m.tiers.forward_passes, calibrated) + "\n" + self.kv.stats().describe()
                + "\n" + self.memory.describe())

    def kv_stats(self) -> KVStats:
        """The paged KV cache now: blocks used / cached / free, prefix hit rate, evictions, preemptions, waste."""
        return self.kv.stats()

    def close(self) -> None:
        """Stop the streamer's I/O threads and free its ring (also done when the process exits)."""
        self.store.close()
        self.runner.close()
        self.kv.release()
        for r in self._reservations.values():
            r.release()
        if self.args.memory_trace is not None:
            self._trace_writer()  # once: a finalizer runs at most once

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise UsageError("a prompt must be a string or a list of token ids")

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               out: RequestOutput | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated; pass `out` to read token ids and metrics afterwards. The
        engine steps in this thread; leaving the loop early aborts the request (its KV blocks are freed)."""
        text, ids = self._prompt_ids(prompt)
        out = out if out is not None else RequestOutput()
        out.prompt = text
        pending: deque[RequestUpdate] = deque()
        req = self.engine.add_request(ids, sampling_params or SamplingParams(), pending.append, out=out)
        done = False
        try:
            while not done:
                if not pending:
                    self.engine.step()  # an exception in the step fails the request and comes out here
                    continue
                u = pending.popleft()
                done = u.finished
                if u.text:
                    yield u.text
        finally:
            if not done:  # the caller stopped reading, or an exception: its blocks are freed now
                self.engine.cancel([req.id])

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for each prompt (strings or token-id lists), together on the engine loop: decodes batched,
        prompts prefilled in chunks beside them, admitted while KV blocks last; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        parsed = [self._prompt_ids(p) for p in prompts]
        outs = []
        for text, ids in parsed:  # every prompt is checked before any is queued
            check_request(self.config, self.max_context, self.kv, ids, params)
        ids_of = []
        for text, ids in parsed:
            out = RequestOutput(prompt=text)
            ids_of.append(self.engine.add_request(ids, params, out=out).id)
            outs.append(out)
        try:
            self.engine.run()
        except BaseException:
            self.engine.cancel(ids_of)  # Ctrl-C or a failed step: nothing of this call stays queued
            raise
        return outs

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """The logits of every prompt position, [T, V] fp32 (position p scores token p + 1), through the engine
        (one scoring request: the whole prompt prefilled, chunk by chunk). For comparisons with other
        implementations; prompt_logprobs is the serving way to score a prompt."""
        _, ids = self._prompt_ids(prompt)
        req = self.engine.add_request(ids, SamplingParams(max_tokens=0, prompt_logprobs=0), keep_logits=True)
        try:
            self.engine.run()
        except BaseException:
            self.engine.cancel([req.id])
            raise
        return torch.cat(req.logits)  # [T, V]

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """One conversation -> one output; a list of conversations -> a list of outputs (run together)."""
        if messages and isinstance(messages[0], list):
            return self.generate([self.encode_chat(m) for m in messages], sampling_params)  # type: ignore[arg-type]
        return self.generate([self.encode_chat(messages)], sampling_params)[0]  # type: ignore[arg-type]

    def encode_chat(self, messages: Messages) -> list[int]:
        """The prompt ids of a conversation as chat(), the server and the chat REPL see them: the chat template
        rendered, message content as text unless allow_special_tokens_in_content."""
        return self.tokenizer.encode_chat(messages, self.args.allow_special_tokens_in_content)
