"""The layer runner: walks layers explicitly, taking each layer's weights from the WeightStore.

    for layer i: w = store.acquire(i) -> compute(i) -> store.release(i)

Streamed layers are prefetched by the store's streamer (release(i) starts the load `ring_depth` ahead);
no module fetches weights by itself. Long prompts are prefilled in chunks of `prefill_chunk` tokens (the
scheduler cuts them) so activation memory is bounded whatever the prompt; every run, resident or budgeted,
chunks the same way, so a budgeted run computes exactly what a resident one does.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from tierlm.config import ModelConfig, attention_dtype
from tierlm.errors import ContextLengthError
from tierlm.kvcache.attention import MIN_ROWS
from tierlm.kvcache.step import PagedStep
from tierlm.memory.ledger import MemoryLedger
from tierlm.offload.estimate import activation_bytes
from tierlm.offload.plan_input import PREFILL_CHUNK
from tierlm.offload.weight_store import WeightStore
from tierlm.memory.workspace import Workspace, plan_workspace
from tierlm.model import native_layer, ops, registry
from tierlm import native


# (tokens [B, T], their step, which logits: "last" | "none" | "all", the scorer of "all": (row, logits [B, n, V]))
Group = tuple[torch.Tensor, PagedStep, str, Callable[[int, torch.Tensor], None] | None]


class Runner:
    def __init__(self, store: WeightStore, dtype: torch.dtype, device: torch.device | str = "cpu",
                 prefill_chunk: int = PREFILL_CHUNK, max_context: int | None = None,
                 ledger: MemoryLedger | None = None, exact: bool = False):
        self.store = store
        self.config: ModelConfig = store.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.prefill_chunk = prefill_chunk
        self.kv_dtype = attention_dtype(dtype, self.device.type == "cuda")
        # Positions this runner serves (prompt + generated); the planner reserved KV for this many.
        self.max_context = min(max_context or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.model = registry.for_config(self.config)  # the architecture's file: its forward
        inv_freqs = self.model.rope_inv_freqs(self.config, store.rope_freqs)  # each [hd/2]: the ropes the layers use
        # cos/sin for every position served, per rope: [max_context, hd] each (small: 8192×64×4 B = 2 MiB).
        self.ropes = [tuple(t.to(self.device) for t in ops.rope_tables(f, self.max_context, dtype)) for f in inv_freqs]
        self.cos, self.sin = self.ropes[0]
        self.layer_rope = [self.model.layer_rope(self.config, i) for i in range(self.config.num_layers)]
        scale = self.model.embed_scale(self.config)  # multiplied in the compute dtype, as HF (Gemma: sqrt(H))
        self.embed_scale = None if scale is None else torch.tensor(scale).to(device=self.device, dtype=dtype)
        # Quantised layers on a CPU run as one native call each (model/native_layer.py) when the library is built; it
        # ropes in fp32 from fp32 tables. exact: fp32 activations into the integer-dot kernels' matmuls.
        self.exact = exact
        # GGUF blocks have no fp32-activation kernel: exact runs them through the dequantising fallback.
        self.native = (self.device.type == "cpu" and store.quant.enabled and self.model.NATIVE_LAYER_STEP
                       and native.layer_step_available() and not (exact and store.quant.kind == "ggml"))
        # the native step's fp32 (cos, sin) of each rope (a local layer of Gemma 3 has its own)
        self.rope32 = [ops.rope_tables(f, self.max_context, torch.float32) for f in inv_freqs] if self.native else None
        # Layer intermediates live in one arena planned from their lifetimes (memory/workspace.py), sized for
        # a full prefill chunk; decode steps use its first rows, so they allocate none of these buffers.
        # The arena is the ledger's "workspace" reservation (re-planned wider: resized, within the budget).
        self._reservation = ledger.reserve("workspace", "cuda" if self.device.type == "cuda" else "cpu", 0) \
            if ledger is not None else None
        self._plan_workspace(min(prefill_chunk, self.max_context), check=False)  # the planner counted this one
        # A chunk scored for prompt logprobs projects every position, after its layers ran: its logits (fp32) and
        # their log_softmax take, a slice of rows at a time, the room the planner gave one layer's prefill
        # transients (freed by then), never a [T, V] tensor the budget does not count. At least MIN_ROWS rows:
        # fp32 matmuls of fewer rows round differently.
        acts = activation_bytes(self.config, prefill_chunk, 1, dtype.itemsize)
        self.score_rows = max(MIN_ROWS, (acts.total - acts.logits) // (9 * self.config.vocab_size))

    def _plan_workspace(self, rows: int, check: bool = True) -> None:
        """(Re)plan the arena for steps of up to `rows` token rows (B*T); growing past the budget is refused."""
        native = native_layer.scratch_bytes(self.config, rows) if self.native else 0
        plan = plan_workspace(self.model.workspace_buffers(self.config, rows, self.dtype, self.kv_dtype, native))
        if self._reservation is not None:
            self._reservation.resize(plan.nbytes, check=check)
        self.workspace, self.workspace_rows = Workspace(plan, self.device), rows
        self.scratch = self.workspace.view("native", (native,), torch.uint8) if native else None

    def close(self) -> None:
        """Free the workspace (the store and KV caches have their own release)."""
        self.workspace.release()
        if self._reservation is not None:
            self._reservation.release()

    @torch.inference_mode()
    def forward_groups(self, groups: list[Group]) -> list[torch.Tensor | None]:
        """One engine step: groups of (tokens [B, T], their step, which logits, scorer): see _pass. The steps are
        not finished here: the engine does that once the step succeeded."""
        t0 = time.perf_counter()
        out = self._pass(groups)
        stats = self.store.stats
        stats.forward_s += time.perf_counter() - t0
        stats.forward_passes += 1
        return out

    def _pass(self, groups: list[Group]) -> list[torch.Tensor | None]:
        """One pass over the weights for groups of (tokens [B, T], their step, logits, scorer). logits "last" ->
        [B, V] of the last position, "none" -> None, "all" -> every position's logits handed to scorer(row, [B, n,
        V]) score_rows at a time (and [B, V] of the last position returned). Every layer is acquired once for all
        groups (a streamed layer is read once), and each group runs through it as it would alone, so its rows
        meet the same kernels whatever else is in the pass."""
        rows = max(tok.numel() for tok, _, _, _ in groups)
        if rows > self.workspace_rows:
            self.workspace.release()  # a batch wider than planned: plan once more, larger
            self._plan_workspace(rows)
        xs, rope = [], []
        for tok, step, _, _ in groups:
            pos = step.positions  # [B, T]
            if int(pos.max()) >= self.max_context:
                raise ContextLengthError(f"position {int(pos.max())} is past max_context {self.max_context}")
            rope.append([(cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for cos, sin in self.ropes])  # [B, 1, T, hd]
            x = self.store.embed(tok, self.device)  # [B, T, H]: each group's residual stream, in place
            xs.append(x if self.embed_scale is None else x.mul_(self.embed_scale))
        on_native = [self.native and native_layer.step_supported(step) for _, step, _, _ in groups]  # same every layer
        for i in range(self.config.num_layers):
            w = self.store.acquire(i)
            mats = native_layer.layer_mats(w) if any(on_native) else None  # None: the Python layer
            for x, (_, step, _, _), ropes, on in zip(xs, groups, rope, on_native):
                if mats is not None and on:
                    native_layer.layer_step(self.config, w, mats, x, self.rope32[self.layer_rope[i]], step, i,
                                            self.scratch, self.exact)
                else:
                    cos, sin = ropes[self.layer_rope[i]]
                    self.model.layer_forward(self.config, w, x, cos, sin, step.layer(i), self.workspace, self.exact)
            self.store.release(i)
        out: list[torch.Tensor | None] = [None] * len(groups)
        if all(mode == "none" for _, _, mode, _ in groups):
            # earlier prefill chunks: their KV is what matters, skip the head's matmul. A streamed head was already
            # prefetched in the ring's cyclic order: pass over it, or the stream would restart (drain, re-read).
            self.store.skip_head()
            return out
        lm_head = self.store.acquire_head()
        for k, (x, (_, _, mode, scorer)) in enumerate(zip(xs, groups)):
            if mode == "all":
                for r0 in range(0, x.shape[1], self.score_rows):
                    logits = self.model.head(self.config, self.store.norm, lm_head, x[:, r0:r0 + self.score_rows],
                                        self.workspace, self.exact)  # [B, n, V]
                    scorer(r0, logits)
                out[k] = logits[:, -1]
            elif mode == "last":  # only the last position feeds sampling: skip the [T, V] head matmul
                logits = self.model.head(self.config, self.store.norm, lm_head, x[:, -1:], self.workspace, self.exact)
                out[k] = logits[:, -1]  # [B, V]
        self.store.release_head()
        return out
