#!/usr/bin/env python3
"""The peers' side of `cargo bench --bench speed` (run by scripts/bench-speed.sh in .venv-bench).

Subcommands, each printing one JSON object on stdout (progress and library chatter go to stderr):

  llama MODEL.gguf PROMPT.json NEW_TOKENS RUNS THREADS
      llama.cpp through llama-cpp-python: greedy generation from the prompt's token ids.
  transformers MODEL_DIR PROMPT.json NEW_TOKENS RUNS THREADS
      transformers + torch in f32 on CPU: greedy decoding with the KV cache.
  llama-batched MODEL.gguf PROMPTS.json NEW_TOKENS RUNS THREADS STREAMS
      llama.cpp's own continuous batching (its C API through llama-cpp-python, as its `batched`
      example and server do): STREAMS sequences, each with its own prompt (PROMPTS.json is a list
      of id lists) and KV sequence id; the prompts go in shared batches of up to 512 tokens, then
      every step decodes one token of every sequence in one llama_decode call. Greedy (argmax of
      each sequence's logits), no end-of-sequence stop.
  f32-gguf SRC.gguf DST.gguf
      Writes DST: every tensor of SRC dequantized to F32, the same names and metadata.

PROMPT.json is {"ids": [...], "text": "..."}: the token ids lmx's tokenizer gave for the text; both
peers run exactly those ids, so every engine sees the same prompt. Each run reports the seconds
from the start of the call to the arrival of every generated token and the token ids; the Rust
side turns them into TTFT and tok/s with one set of definitions for every engine. One warm-up
run precedes the RUNS measured ones. Both peers ignore end-of-sequence tokens (lmx cannot, so the
bench prints every engine's completion token count).
"""

import json
import os
import sys
import time


def _log(message: str) -> None:
    print(f"peers.py: {message}", file=sys.stderr, flush=True)


def _runs(generate_once, runs: int) -> list:
    """One warm-up, then `runs` measured runs of generate_once() -> (token_times, token_ids)."""
    generate_once()
    out = []
    for _ in range(runs):
        times, ids = generate_once()
        out.append({"token_times_s": times, "token_ids": ids})
    return out


def llama(model: str, prompt_file: str, new_tokens: int, runs: int, threads: int) -> dict:
    import llama_cpp

    prompt = json.load(open(prompt_file))
    ids = prompt["ids"]
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=max(512, len(ids) + new_tokens + 8),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    own_ids = llm.tokenize(prompt["text"].encode(), add_bos=False, special=False)

    def once():
        llm.reset()  # no reuse of the previous run's KV cache for the shared prefix
        times, out = [], []
        start = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - start)
            out.append(token)
            if len(out) == new_tokens:
                break
        return times, out

    return {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "threads": threads,
        "prompt_tokens": len(ids),
        "own_tokenizer_agrees": own_ids == ids,
        "runs": _runs(once, runs),
    }


def llama_batched(model: str, prompts_file: str, new_tokens: int, runs: int, threads: int, streams: int) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np

    prompts = json.load(open(prompts_file))[:streams]
    if len(prompts) < streams:
        sys.exit(f"{prompts_file} has {len(prompts)} prompts, not {streams}")
    llama_cpp.llama_backend_init()
    model_p = llama_cpp.llama_model_load_from_file(model.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    longest = max(len(p) for p in prompts) + new_tokens + 8
    params.n_ctx = longest * streams
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = streams
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model_p, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model_p))
    batch = llama_cpp.llama_batch_init(512, 0, streams)

    def decode(entries):
        """entries: (token, pos, seq, wants_logits); returns {seq: argmax} for those wanting logits."""
        out = {}
        for start in range(0, len(entries), 512):
            chunk = entries[start:start + 512]
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                sys.exit("llama_decode failed")
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))
                    out[seq] = int(row.argmax())
        return out

    def once():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        times = [[] for _ in prompts]
        ids = [[] for _ in prompts]
        start = time.perf_counter()
        entries = [
            (token, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, token in enumerate(p)
        ]
        last = decode(entries)
        now = time.perf_counter() - start
        for seq, token in last.items():
            times[seq].append(now)
            ids[seq].append(token)
        for step in range(1, new_tokens):
            last = decode([(ids[s][-1], len(prompts[s]) + step - 1, s, True) for s in range(streams)])
            now = time.perf_counter() - start
            for seq, token in last.items():
                times[seq].append(now)
                ids[seq].append(token)
        return times, ids

    once()
    out = []
    for _ in range(runs):
        times, ids = once()
        out.append({"streams": [{"token_times_s": t, "token_ids": i} for t, i in zip(times, ids)]})
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model_p)
    return {
        "engine": "llama.cpp batched",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "threads": threads,
        "streams": streams,
        "runs": out,
    }


def transformers(model_dir: str, prompt_file: str, new_tokens: int, runs: int, threads: int) -> dict:
    import torch
    import transformers as hf

    torch.set_num_threads(threads)
    prompt = json.load(open(prompt_file))
    ids = prompt["ids"]
    model = hf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(model_dir)
    own_ids = tokenizer(prompt["text"], add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])

    def once():
        times, out = [], []
        with torch.inference_mode():
            start = time.perf_counter()
            result = model(input_ids, use_cache=True)
            while True:
                token = int(result.logits[0, -1].argmax())
                times.append(time.perf_counter() - start)
                out.append(token)
                if len(out) == new_tokens:
                    break
                result = model(torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True)
        return times, out

    return {
        "engine": "transformers",
        "version": f"transformers {hf.__version__} / torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids),
        "own_tokenizer_agrees": own_ids == ids,
        "runs": _runs(once, runs),
    }


def f32_gguf(src: str, dst: str) -> dict:
    """Dequantizes every tensor of `src` to F32 and writes `dst` with the same metadata and names;
    written to a temporary sibling and renamed, so `dst` is never half-written."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = f"{dst}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself; file_type and
        # alignment describe the old file, not this one.
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.ALIGNMENT):
            continue
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return {"tensors": len(reader.tensors), "bytes": os.path.getsize(dst)}


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "llama":
        result = llama(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif command == "transformers":
        result = transformers(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif command == "llama-batched":
        result = llama_batched(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), int(args[5]))
    elif command == "f32-gguf":
        result = f32_gguf(args[0], args[1])
    else:
        sys.exit(f"unknown command {command!r}; see the module docstring")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
