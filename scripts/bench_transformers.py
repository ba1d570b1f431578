#!/usr/bin/env python3
"""The transformers side of `cargo bench --bench inference`: loads an HF snapshot folder in f32
on CPU, runs the given prompt token ids, and greedily decodes N tokens with the KV cache.
Prints one JSON object: prefill seconds, decode tokens per second, time to first token.

Usage: bench_transformers.py MODEL_DIR PROMPT_IDS_JSON NEW_TOKENS RUNS
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, prompt_ids, new_tokens, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids])
    results = []
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first run warms up
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            past = out.past_key_values
            token = out.logits[0, -1].argmax().view(1, 1)
            first = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[0, -1].argmax().view(1, 1)
            end = time.perf_counter()
            results.append({"ttft": first - start, "decode_tps": (new_tokens - 1) / (end - first)})
    results = results[1:]
    results.sort(key=lambda r: r["ttft"])
    ttft = results[len(results) // 2]["ttft"]
    results.sort(key=lambda r: r["decode_tps"])
    tps = results[len(results) // 2]["decode_tps"]
    print(json.dumps({"ttft_s": ttft, "prompt_tps": len(prompt_ids) / ttft, "decode_tps": tps,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
