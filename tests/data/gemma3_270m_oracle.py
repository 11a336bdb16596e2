"""Writes tests/data/gemma3_270m_oracle.json: HF transformers' greedy tokens and last-position top logits on the
real Gemma 3 270M Q4_K_M file (fp32, every matrix dequantised by transformers' GGUF loader), for
tests/test_parity_archs.py. Two prompts: a short one, and one of 609 tokens, past the local layers' window (512).

    python tests/data/gemma3_270m_oracle.py tests/data/gemma3_270m_oracle.json   (~2.5 GiB, about a minute)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fetch_real import FILES  # noqa: E402

REAL = next(f for f in FILES if f.name == "gemma-3-270m-q4_k_m")
TEXT = ("Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms and cities, "
        "and carry sand that builds deltas. The Nile, the Amazon and the Yangtze are among the longest. ")
PROMPTS = {"short": "The capital of France is", "long": TEXT * 14 + "The longest river in Africa is"}


def main(out_path: str) -> None:
    d, f = str(REAL.path.parent), REAL.path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = {"oracle": f"transformers {transformers.__version__} AutoModelForCausalLM.from_pretrained(gguf_file=...) "
                     "fp32, greedy; prompts tokenized by AutoTokenizer on the same GGUF",
           "sha256": REAL.sha256, "prompts": {}}
    for name, text in PROMPTS.items():
        ids = tok(text).input_ids
        with torch.no_grad():
            last = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            gen = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
        top = last.topk(20)
        out["prompts"][name] = {"text": text, "ids": ids, "greedy": gen[0, len(ids):].tolist(),
                                "top_ids": top.indices.tolist(), "top_logits": [round(v, 6) for v in top.values.tolist()]}
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
