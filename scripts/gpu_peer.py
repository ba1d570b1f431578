#!/usr/bin/env python3
"""The peer of benches/gpu.rs: PyTorch + transformers on the same safetensors, on the GPU.

Reads the request the bench writes (JSON: model folder, prompt token ids, stream counts, new
tokens, dtype, rounds). For each stream count N: one static batch of the first N prompts
(all of one length, so no padding), greedy, exactly `tokens` new tokens (min_new_tokens), timed
with the GPU synchronised. Prints one JSON line per N: decode tok/s of the batch
(N * (tokens - 1) / (time of `tokens` new tokens - time of 1)) and TTFT (the time of 1 new
token). Medians over the rounds, after one warm-up; the counts take turns in rotated rounds,
as the bench's do.
"""
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def timed(model, ids, new_tokens):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - start


def main():
    req = json.load(open(sys.argv[1]))
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[req["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=dtype).to("cuda").eval()
    counts, tokens, rounds = req["counts"], req["tokens"], req["rounds"]
    prompts = torch.tensor(req["prompts"], dtype=torch.long, device="cuda")
    print(
        f"gpu_peer: torch {torch.__version__}, {torch.cuda.get_device_name()}, {req['dtype']}",
        file=sys.stderr,
    )
    results = {n: ([], []) for n in counts}
    with torch.inference_mode():
        for rnd in range(rounds + 1):
            for k in range(len(counts)):
                n = counts[(k + rnd) % len(counts)]
                ids = prompts[:n]
                first = timed(model, ids, 1)
                full = timed(model, ids, tokens)
                if rnd > 0:
                    results[n][0].append(n * (tokens - 1) / (full - first))
                    results[n][1].append(first * 1e3)
    for n in counts:
        tps, ttft = results[n]
        print(json.dumps({"n": n, "decode_tps": statistics.median(tps),
                          "ttft_ms": statistics.median(ttft)}))


if __name__ == "__main__":
    main()
