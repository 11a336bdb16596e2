"""From a model, a dtype, a budget and a bandwidth profile to the planner's input (pure: no I/O), and the
default context under a budget (choose_context)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierlm.config import ModelConfig, attention_dtype
from tierlm.memory.budget import MemoryBudget
from tierlm.offload.calibrate import Profile
from tierlm.memory.directio import ALIGN, align_up
from tierlm.offload.estimate import activation_bytes
from tierlm.offload.estimate import kv_bytes as kv_bytes_fn
from tierlm.errors import BudgetError
from tierlm.kvcache.pool import block_nbytes
from tierlm.memory.ledger import MemoryLedger, Reservation
from tierlm.offload.planner import Placement, PlanInput, plan
from tierlm.offload.units import EMBED, HEAD, layer_unit, unit_nbytes
from tierlm.memory.workspace import plan_workspace
from tierlm import native
from tierlm.model import native_layer
from tierlm.model import registry
from tierlm.quant import kernels
from tierlm.quant.scheme import QuantScheme

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory whatever the prompt
BUDGET_CONTEXT_CAP = 4096  # the longest default context under a budget
MIN_DEFAULT_CONTEXT = 512  # the default context under a budget is at least this (when it fits at all)
CONTEXT_COST = 0.10  # a longer default context may cost at most this much predicted decode time


def default_context(cfg: ModelConfig, budget: MemoryBudget, max_context: int | None) -> int:
    """Positions served: `max_context`, else the model's (at most BUDGET_CONTEXT_CAP under a budget)."""
    cap = min(cfg.max_position_embeddings, BUDGET_CONTEXT_CAP) if budget.limited else cfg.max_position_embeddings
    return min(max_context or cap, cfg.max_position_embeddings)


def kv_pool_bytes(cfg: ModelConfig, context: int, storage: torch.dtype, block_size: int) -> int:
    """The paged KV pool for one sequence of `context` tokens: whole blocks, stored as `storage`."""
    return -(-context // block_size) * block_nbytes(cfg, block_size, storage)


@dataclass(frozen=True)
class ContextOption:
    context: int
    kv_bytes: int
    placement: Placement | None  # None: does not fit the budget


def context_candidates(cfg: ModelConfig) -> list[int]:
    """128, 256, ... up to the model's context (capped at BUDGET_CONTEXT_CAP)."""
    top = min(cfg.max_position_embeddings, BUDGET_CONTEXT_CAP)
    out, c = [], 128
    while c < top:
        out.append(c)
        c *= 2
    return out + [top]


def choose_context(cfg: ModelConfig, build: Callable[[int], PlanInput]) -> tuple[int, PlanInput, list[ContextOption]]:
    """The default context under a budget, traded against resident weights with the planner's cost model.

    Rule: every KV byte reserved is a byte of weights that streams instead, so the context is not fixed.
    Start from the shortest candidate ≥ MIN_DEFAULT_CONTEXT that fits (else the fastest that fits: a budget
    that tight has no context to spare for speed, e.g. a ring deep enough for the disk), then take
    the longest candidate whose predicted s/token is within CONTEXT_COST (10%) of that start's. Pure."""
    options = []
    for c in context_candidates(cfg):
        inp = build(c)
        try:
            options.append(ContextOption(c, inp.kv_bytes, plan(inp)))
        except BudgetError:
            options.append(ContextOption(c, inp.kv_bytes, None))
    fits = [o for o in options if o.placement is not None]
    if not fits:
        plan(build(options[0].context))  # raises the BudgetError that says what the minimum is
    fastest = min(fits, key=lambda o: o.placement.token_s)
    base = next((o for o in fits if o.context >= MIN_DEFAULT_CONTEXT), fastest)
    best = max((o for o in fits if o.context >= base.context
                and o.placement.token_s <= base.placement.token_s * (1 + CONTEXT_COST)), key=lambda o: o.context)
    return best.context, build(best.context), options


def dequant_bytes(cfg: ModelConfig, rows: int, quant: QuantScheme, cuda: bool = False) -> int:
    """The dequantising fallback's transient for a step of `rows` (quant/kernels.fallback_linear): the fp32
    activations of the widest matrix input, one dense weight piece (R = piece / 4K rows), its unpacked codes and
    its fp32 product [rows, R] (the output itself is a kernel output, counted in activation_bytes). On CUDA every
    quantised matmul takes the fallback (no fused kernel there yet), decode included."""
    if not quant.enabled or (rows < kernels.PREFILL_ROWS and not cuda):
        return 0
    widest_in = max(cfg.hidden_size, cfg.intermediate_size, cfg.q_size)
    piece = kernels.DEQUANT_PIECE_BYTES
    return rows * widest_in * 4 + piece * 3 // 2 + rows * piece // min(cfg.hidden_size, widest_in)


def plan_input(cfg: ModelConfig, dtype: torch.dtype, budget: MemoryBudget, max_context: int, profile: Profile,
               cuda: bool, ring_depth: int | None = None, quant: QuantScheme = QuantScheme(),
               kv_bytes: int | None = None, kv_host_bytes: int = 0) -> PlanInput:
    """Unit sizes are the stored (packed, under `quant`) bytes: what sits in RAM and what moves per token.
    kv_bytes: the KV pool (default: one sequence of max_context tokens in the attention dtype);
    kv_host_bytes: a host-RAM KV tier, counted against the cpu budget on a CPU-only machine."""
    item = torch.finfo(dtype).bits // 8
    kv_dtype, rows = attention_dtype(dtype, cuda), min(PREFILL_CHUNK, max_context)
    scratch = native_layer.scratch_bytes(cfg, rows, quant.enabled)  # the native layer step's (shares the arena)
    acts = activation_bytes(cfg, rows, 1, item)
    rope_tables = 2 * max_context * cfg.head_dim * (item + (4 if scratch else 0))  # cos + sin [max_context, hd] (+fp32)
    row_buffer = align_up(cfg.hidden_size * item) + ALIGN  # on-demand embedding rows
    prefix = "cuda:" if cuda else ""
    return PlanInput(
        num_layers=cfg.num_layers,
        layer_bytes=unit_nbytes(cfg, layer_unit(0), dtype, quant),
        head_bytes=unit_nbytes(cfg, HEAD, dtype, quant),
        embed_bytes=0 if cfg.tie_word_embeddings else unit_nbytes(cfg, EMBED, dtype, quant),
        kv_bytes=kv_bytes_fn(cfg, max_context, 1, kv_dtype.itemsize) if kv_bytes is None else kv_bytes,
        # kernel outputs (estimated) + the workspace arena the runner reserves (planned exactly) + one layer's
        # K/V gathered from the paged pool for attention (a transient of max_context tokens). The native layer
        # step reads the pool in place and dequantises nothing; on the integer-dot kernels it allocates nothing
        # beyond the residual stream and the logits (its buffers are the workspace's).
        activation_bytes=plan_workspace(registry.for_config(cfg).workspace_buffers(cfg, rows, dtype, kv_dtype, scratch)).nbytes + (
            (acts.hidden + acts.logits if native.available() else acts.total) if scratch  # torch's matmul outputs
            else acts.total + dequant_bytes(cfg, rows, quant, cuda) + kv_bytes_fn(cfg, max_context, 1, kv_dtype.itemsize)
            // cfg.num_layers),
        fixed_bytes=cfg.hidden_size * item + rope_tables + row_buffer + (0 if cuda else kv_host_bytes),
        cuda=cuda,
        cpu_budget=budget.cpu,
        device_budget=budget.device if cuda else None,
        disk_gbps=profile.disk_read_gbps,
        disk_curve=tuple((int(b), float(g)) for b, g in profile.disk_curve),
        h2d_gbps=(profile.h2d_gbps or 20.0) if cuda else None,
        compute_gbps=profile.gemv_gbps.get(prefix + (quant.kind if quant.enabled else str(dtype).removeprefix("torch.")),
                                           10.0),
        layer_overhead_s=profile.layer_overhead_s,
        ring_depth=ring_depth,
    )


def budget_plan_input(cfg: ModelConfig, dtype: torch.dtype, budget: MemoryBudget, max_context: int | None,
                      profile: Profile, cuda: bool, ring_depth: int | None, quant: QuantScheme,
                      kv_storage: torch.dtype, block_size: int, kv_pool: int | None = None,
                      kv_host: int = 0) -> tuple[int, PlanInput, list[ContextOption]]:
    """(context, planner input, the context options weighed) for a run under `budget`. Every KV byte the run
    may hold is inside the budget: the pool (explicit `kv_pool`, or one sequence of the context in the KV
    format that will be stored, `kv_storage`) and the host KV tier. Without an explicit context or pool the
    context follows from the budget (choose_context)."""
    def build(context: int) -> PlanInput:
        pool = kv_pool if kv_pool is not None else kv_pool_bytes(cfg, context, kv_storage, block_size)
        return plan_input(cfg, dtype, budget, context, profile, cuda=cuda, ring_depth=ring_depth, quant=quant,
                          kv_bytes=pool, kv_host_bytes=kv_host)
    if max_context is not None or kv_pool is not None:
        context = default_context(cfg, budget, max_context)
        return context, build(context), []
    return choose_context(cfg, build)


def reserve_placement(ledger: MemoryLedger, inp: PlanInput, p: Placement, kv_host_bytes: int = 0
                      ) -> dict[str, Reservation]:
    """The placement as the ledger's first reservations, made before anything is allocated (BudgetError if
    they do not fit): owner -> Reservation. The owners resize them to what they really allocate."""
    tier = "cuda" if inp.cuda else "cpu"
    ring = p.ring_depth * p.slot_bytes
    host_kv = 0 if inp.cuda else kv_host_bytes  # on a CPU the host KV tier is inside fixed_bytes
    weights = p.device_bytes - ring - inp.kv_bytes - inp.activation_bytes - host_kv
    out = {"weights": ledger.reserve("weights", tier, weights), "ring": ledger.reserve("ring", tier, ring),
           "kv_pool": ledger.reserve("kv_pool", tier, inp.kv_bytes),
           "activations": ledger.reserve("activations", tier, inp.activation_bytes),
           "kv_host": ledger.reserve("kv_host", "cpu", kv_host_bytes)}
    if inp.cuda:
        out["staging"] = ledger.reserve("staging", "cpu", p.host_bytes)
    return out
