"""From a model, a dtype, a budget and a bandwidth profile to the planner's input (pure: no I/O)."""
from __future__ import annotations

import torch

from tierlm.config import ModelConfig, attention_dtype
from tierlm.memory.budget import MemoryBudget
from tierlm.memory.calibrate import Profile
from tierlm.memory.directio import ALIGN, align_up
from tierlm.memory.estimate import activation_bytes, kv_bytes
from tierlm.memory.planner import PlanInput
from tierlm.memory.units import EMBED, HEAD, layer_unit, unit_nbytes
from tierlm.memory.workspace import plan_workspace
from tierlm.model.llama import workspace_buffers
from tierlm.quant.scheme import QuantScheme

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory whatever the prompt
BUDGET_CONTEXT_CAP = 4096  # default context under a budget: the KV cache is reserved for all of it


def default_context(cfg: ModelConfig, budget: MemoryBudget, max_context: int | None) -> int:
    """Positions served: `max_context`, else the model's (at most BUDGET_CONTEXT_CAP under a budget)."""
    cap = min(cfg.max_position_embeddings, BUDGET_CONTEXT_CAP) if budget.limited else cfg.max_position_embeddings
    return min(max_context or cap, cfg.max_position_embeddings)


def plan_input(cfg: ModelConfig, dtype: torch.dtype, budget: MemoryBudget, max_context: int, profile: Profile,
               cuda: bool, ring_depth: int | None = None, quant: QuantScheme = QuantScheme()) -> PlanInput:
    """Unit sizes are the stored (packed, under `quant`) bytes: what sits in RAM and what moves per token."""
    item = torch.finfo(dtype).bits // 8
    kv_dtype, rows = attention_dtype(dtype, cuda), min(PREFILL_CHUNK, max_context)
    rope_tables = 2 * max_context * cfg.head_dim * item  # cos + sin [max_context, hd]
    row_buffer = align_up(cfg.hidden_size * item) + ALIGN  # on-demand embedding rows
    prefix = "cuda:" if cuda else ""
    return PlanInput(
        num_layers=cfg.num_layers,
        layer_bytes=unit_nbytes(cfg, layer_unit(0), dtype, quant),
        head_bytes=unit_nbytes(cfg, HEAD, dtype, quant),
        embed_bytes=0 if cfg.tie_word_embeddings else unit_nbytes(cfg, EMBED, dtype, quant),
        kv_bytes=kv_bytes(cfg, max_context, 1, kv_dtype.itemsize),
        # kernel outputs (estimated) + the workspace arena the runner reserves (planned exactly)
        activation_bytes=activation_bytes(cfg, rows, 1, item).total + plan_workspace(
            workspace_buffers(cfg, rows, dtype, kv_dtype)).nbytes,
        fixed_bytes=cfg.hidden_size * item + rope_tables + row_buffer,
        cuda=cuda,
        cpu_budget=budget.cpu,
        device_budget=budget.device if cuda else None,
        disk_gbps=profile.disk_read_gbps,
        h2d_gbps=(profile.h2d_gbps or 20.0) if cuda else None,
        compute_gbps=profile.gemv_gbps.get(prefix + (quant.kind if quant.enabled else str(dtype).removeprefix("torch.")),
                                           10.0),
        layer_overhead_s=profile.layer_overhead_s,
        ring_depth=ring_depth,
    )
