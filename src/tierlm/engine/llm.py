"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from tierlm.config import resolve_dtype
from tierlm.engine.generation import RequestOutput, generate_stream
from tierlm.engine.runner import Runner
from tierlm.engine.sampler import SamplingParams
from tierlm.errors import UsageError
from tierlm.memory.store import WeightStore
from tierlm.weights import open_model

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class LLM:
    """A loaded model ready to generate.

    model: a GGUF file or HF directory; None = the embedded SmolLM2-135M-Instruct.
    dtype: "float32" | "bfloat16" | "auto" (fp32 on CPU). threads: torch intra-op threads (None = torch's default).
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto", *,
                 threads: int | None = None, device: str = "cpu", progress: bool | None = None):
        if threads is not None:
            if threads < 1:
                raise UsageError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
            raise UsageError(f"device {device!r} is not available")
        self.dtype = resolve_dtype(dtype)
        self.source = open_model(model)
        self.config = self.source.config
        self.tokenizer = self.source.tokenizer
        self.store = WeightStore.load_resident(self.source, self.dtype, device, progress)
        self.source.close()  # every weight is resident now: unmap the file so its pages leave our RSS
        self.runner = Runner(self.store, self.dtype, device)

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise UsageError("a prompt must be a string or a list of token ids")

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               out: RequestOutput | None = None) -> Iterator[str]:
        """Yield text deltas as they are generated; pass `out` to read token ids and metrics afterwards."""
        text, ids = self._prompt_ids(prompt)
        out = out if out is not None else RequestOutput()
        out.prompt, out.prompt_token_ids = text, ids
        yield from generate_stream(self.runner, self.tokenizer, ids, sampling_params or SamplingParams(), out)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Generate for each prompt (strings or token-id lists). Requests run one after another here;
        batched scheduling arrives with the paged KV cache."""
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        outputs = []
        for prompt in prompts:
            out = RequestOutput()
            for _ in self.stream(prompt, sampling_params, out):
                pass
            outputs.append(out)
        return outputs

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """One conversation -> one output; a list of conversations -> a list of outputs."""
        if messages and isinstance(messages[0], list):
            return [self.chat(m, sampling_params) for m in messages]  # type: ignore[misc]
        ids = self.tokenizer.encode_chat(messages)  # type: ignore[arg-type]
        return self.generate([ids], sampling_params)[0]
