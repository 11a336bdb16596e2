"""The activation workspace: interval-colouring plan invariants, and a decode step that creates no tensors
of its own besides the outputs of torch's matmul/attention kernels (which have no out= form)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tierlm import LLM, SamplingParams
from tierlm.errors import UsageError
from tierlm.memory.workspace import ALIGN, BufferSpec, Workspace, plan_workspace
from tierlm.model import llama, ops
from tierlm.weights import open_model


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@pytest.mark.parametrize("seed", range(40))
def test_plan_never_overlaps_live_buffers(seed):
    rng = random.Random(seed)
    bufs = []
    for i in range(rng.randint(1, 25)):
        first = rng.randint(0, 20)
        bufs.append(BufferSpec(f"b{i}", rng.randint(1, 5000), first, first + rng.randint(0, 6)))
    plan = plan_workspace(bufs)
    for a in bufs:
        oa = plan.offsets[a.name]
        assert oa % ALIGN == 0 and oa + a.nbytes <= plan.nbytes
        for b in bufs:
            if a is not b and a.overlaps(b):
                ob = plan.offsets[b.name]
                assert oa + a.nbytes <= ob or ob + b.nbytes <= oa, (a, b, oa, ob)
    # bounds: no worse than one allocation per buffer; no better than the bytes live at the busiest op
    busiest = max(sum(_aligned(b.nbytes) for b in bufs if b.first <= op <= b.last) for op in range(30))
    assert busiest <= plan.nbytes <= sum(_aligned(b.nbytes) for b in bufs)


def test_disjoint_lifetimes_share_bytes():
    plan = plan_workspace([BufferSpec("a", 1000, 0, 1), BufferSpec("b", 600, 2, 3), BufferSpec("c", 100, 1, 2)])
    assert plan.offsets["a"] == plan.offsets["b"] == 0  # a dies before b is born
    assert plan.offsets["c"] >= _aligned(1000)  # c lives with both
    assert plan.nbytes == _aligned(1000) + _aligned(100) < plan.naive_nbytes
    with pytest.raises(ValueError, match="duplicate"):
        plan_workspace([BufferSpec("a", 1, 0, 0), BufferSpec("a", 1, 1, 1)])


def test_layer_plan_reuses_memory_across_the_step(tiny_models):
    cfg = open_model(tiny_models["qwen2"].path).config
    plan = plan_workspace(llama.workspace_buffers(cfg, 512, torch.bfloat16, torch.float32))
    assert plan.offsets["h_attn"] == plan.offsets["h_ffn"] or plan.offsets["attn_x32"] == plan.offsets["ffn_x32"]
    assert plan.nbytes < plan.naive_nbytes


def test_workspace_views_are_checked():
    ws = Workspace(plan_workspace([BufferSpec("a", 64, 0, 0)]))
    assert ws.view("a", (4, 4), torch.float32).shape == (4, 4)
    with pytest.raises(ValueError, match="holds 64 B"):
        ws.view("a", (5, 4), torch.float32)
    ws.release()
    assert ws.nbytes == 0
    with pytest.raises(UsageError, match="after release"):
        ws.view("a", (1,), torch.float32)


def test_norm_and_rope_match_the_hf_formulas_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g)  # [B, T, H]
    w = torch.randn(64, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # HF LlamaRMSNorm, fp32
    out = ops.rms_norm_into(torch.empty_like(x), x, w, 1e-5, torch.empty_like(x), torch.empty_like(x),
                              torch.empty(2, 3, 1))
    assert torch.equal(out, ref)
    q = torch.randn(2, 4, 3, 16, generator=g)  # [B, heads, T, hd]
    cos, sin = ops.rope_tables(torch.rand(8, generator=g), 3, torch.float32)  # [T, hd]
    rotated = torch.cat((-q[..., 8:], q[..., :8]), dim=-1)
    ref = q * cos + rotated * sin  # HF apply_rotary_pos_emb
    assert torch.equal(ops.apply_rope(q, cos, sin, torch.empty_like(q), torch.empty_like(q)), ref)


class FreshTensors(TorchDispatchMode):
    """Counts, by op, outputs whose storage is new (not one of the op's inputs): the tensors an op created."""

    def __init__(self):
        super().__init__()
        self.fresh: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.fresh[func.__name__.split(".")[0]] += 1
        return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_creates_only_kernel_outputs(tiny_models, dtype):
    """Per layer, an engine decode step creates the 4 matmul outputs, the attention output and the paged K/V
    gather (2 index_select); every elementwise intermediate (norms, rope, residual adds, silu*up, dtype casts)
    lives in the workspace. What remains (step bookkeeping: positions, block slots; embedding rows; the head's
    logits; the sample) is a few tensors per step, not per layer. A sliding-window model: its steps attend
    with SDPA (blocked attention, the others' path, makes its own per-group transients)."""
    llm = LLM(tiny_models["mistral_swa"].path, dtype=dtype, progress=False)
    llm.engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    llm.engine.step()  # the prefill and the first token
    with FreshTensors() as mode:
        llm.engine.step()  # one decode step
    llm.engine.run()
    layers = llm.config.num_layers
    per_layer = {"linear": 4, "_weight_int8pack_mm": 4, "_weight_int4pack_mm_for_cpu": 4,
                 "scaled_dot_product_attention": 1, "index_select": 2}
    head = 1  # the head's matmul
    expect = 7 * layers + head
    if llm.runner.kv_dtype != llm.dtype:  # bf16 activations, fp32 KV: K and V are cast as they are stored
        per_layer["to"] = 2
        expect += 2 * layers + 1  # + the logits' cast to fp32
    assert sum(n for op, n in mode.fresh.items() if op in per_layer) == expect, mode.fresh
    elementwise = {"mul", "add", "neg", "cat", "silu", "rms_norm", "to", "_to_copy", "copy"}
    others = sum(n for op, n in mode.fresh.items() if op in elementwise and op not in per_layer)
    assert others <= 4, mode.fresh  # step bookkeeping
    assert sum(n for op, n in mode.fresh.items() if op not in per_layer) <= 16, mode.fresh
    llm.close()
    assert llm.runner.workspace.nbytes == 0
