"""The larger-than-memory benchmark's worker side: one engine (llama.cpp or tierlm) loaded in this fresh process,
a warm-up generation, the counted generations, and one `RESULT {json}` line on stdout for the driver
(benchmarks/larger_than_memory.py, which runs this as `larger_than_memory.py --worker ENGINE`)."""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import signal
import time

from _llama_cpp import greedy
from _ltm_engines import ENGINES, EngineSpec, prompt_ids, store_dir


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): a worker never outlives the driver (nor keeps its cgroup busy)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class LlamaCppWorker:
    """llama.cpp through llama-cpp-python (as benchmarks/decode.py drives it): eval() the prompt, then one token
    per eval(), greedy by argmax over the context's logits. mmap on (llama.cpp's default)."""

    def __init__(self, a: argparse.Namespace):
        import llama_cpp
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.context,
                                   use_mmap=True, verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def generate(self, ids: list[int], n: int) -> dict:
        ttft, decode_s, tokens = greedy(self.llm, ids, n)
        return {"ttft_s": ttft, "decode_s": decode_s, "decode_tokens": n - 1, "forward_passes": n,
                "token_ids": tokens, "disk_bytes": None}

    def info(self) -> dict:
        return {"llama_cpp_version": self.version, "n_ctx": self.llm.n_ctx()}


class TierlmWorker:
    def __init__(self, a: argparse.Namespace, spec: EngineSpec):
        from tierlm import LLM
        budget = a.budget if spec.capped else None
        self.llm = LLM(a.model, threads=a.threads, quant=spec.quant, max_context=a.context, progress=False,
                       max_memory={"cpu": budget} if budget else None,
                       offload_dir=store_dir(a.offload_dir, spec.quant, budget) if budget else None,
                       enable_prefix_caching=False)  # every generation prefills, as llama.cpp after reset()
        self.vocab_size = self.llm.config.vocab_size

    def generate(self, ids: list[int], n: int) -> dict:
        from tierlm import SamplingParams
        out = self.llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        m, t = out.metrics, out.metrics.tiers
        return {"ttft_s": m.ttft_s, "decode_s": m.decode_s, "decode_tokens": m.decode_tokens,
                "forward_passes": t.forward_passes, "token_ids": out.token_ids, "disk_bytes": t.disk_bytes,
                "io_busy_s": t.io_busy_s, "io_wait_s": t.io_wait_s, "forward_s": t.forward_s}

    def stream_gbps(self, cycles: int = 2) -> float | None:
        """The streamer alone: every layer and the head acquired and released in decode order, no compute, for
        `cycles` tokens' worth: the rate this engine's own I/O path reads its store now (its disk roofline)."""
        st, p = self.llm.store, self.llm.plan
        if p is None or not p.ring_depth:
            return None
        b0, t = st.stats.disk_bytes, time.perf_counter()
        for _ in range(cycles):
            for i in range(self.llm.config.num_layers):
                st.acquire(i)
                st.release(i)
            st.acquire_head()
            st.release_head()
        return (st.stats.disk_bytes - b0) / (time.perf_counter() - t) / 1e9

    def info(self) -> dict:
        import torch

        from tierlm.offload.tier import Tier
        llm, p = self.llm, self.llm.plan
        d = {"dtype": str(llm.dtype).removeprefix("torch."), "max_context": llm.max_context,
             "profile_calibrated": llm.profile_calibrated, "profile_disk_gbps": llm.profile.disk_read_gbps,
             "io_threads": llm.plan.io_threads if llm.plan else 0, "torch_threads": torch.get_num_threads()}
        if p is not None:
            d |= {"layers_on_disk": p.count(Tier.DISK), "ring_depth": p.ring_depth,
                  "planned_disk_bytes_per_token": p.disk_bytes_per_token, "planned_s_per_token": p.token_s}
        return d


def worker(a: argparse.Namespace) -> None:
    _die_with_parent()
    spec = ENGINES[a.worker]
    t = time.perf_counter()
    engine = LlamaCppWorker(a) if spec.kind == "llama.cpp" else TierlmWorker(a, spec)
    res = {"engine": a.worker, "load_s": time.perf_counter() - t, "info": engine.info(), "gens": []}
    if not a.prepare:
        ids = prompt_ids(engine.vocab_size, a.prompt_tokens)
        if a.warmup_tokens:
            engine.generate(ids, a.warmup_tokens)  # not counted: first-touch allocations, ring fill
        for _ in range(a.gens):
            io, majflt = _proc_read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            g = engine.generate(ids, a.tokens)
            g["proc_read_bytes"] = _proc_read_bytes() - io
            g["majflt"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - majflt
            res["gens"].append(g)
        if isinstance(engine, TierlmWorker):
            res["stream_gbps"] = engine.stream_gbps()
    res |= {"peak_rss": _status_kib("VmHWM"), "rss_anon_end": _status_kib("RssAnon"),
            "rss_file_end": _status_kib("RssFile")}
    print("RESULT " + json.dumps(res), flush=True)
