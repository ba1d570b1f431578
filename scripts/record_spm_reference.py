#!/usr/bin/env python3
"""Record how Hugging Face transformers tokenizes with a SentencePiece vocabulary read from
GGUF metadata, so the tests in `src/engine/gguf_tokenizer.rs` can check that lmx builds the same tokenizer.

What it does
------------
1. Trains a small SentencePiece BPE model (the `sentencepiece` library, one thread, fixed
   corpus below) with byte fallback, whitespace-only pieces, split digits, two control
   symbols ("[INST]", "[/INST]") and one user-defined symbol ("<think>"), and writes its
   pieces, scores and llama.cpp token types to tests/data/spm_vocab.json.
2. Writes two metadata-only GGUF files from that vocabulary with the `gguf` package, as
   llama.cpp's converter lays them out (tokenizer.ggml.model = "llama", no merges):
     * "llama": general.architecture = llama, no add_bos_token / add_space_prefix keys
       (llama.cpp's defaults: BOS added, a space prefixed);
     * "gemma3": general.architecture = gemma3, add_bos_token = true, and pieces made only
       of two or more "\u2581" stored as real spaces, as Gemma files store them.
3. Loads each with transformers (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) and
   records, for the sample texts below, the ids without and with special tokens and the
   decoded text of the former, in tests/data/spm_reference.json. For the llama layout it
   also records the `sentencepiece` library's own ids and prints how many agree.

How to run
----------
    /tmp/refvenv/bin/python -m pip install sentencepiece gguf transformers tokenizers
    /tmp/refvenv/bin/python scripts/record_spm_reference.py [--out-dir tests/data]

Offline, CPU only, a few seconds. The versions used are recorded inside the JSON.
"""

import argparse
import io
import json
import os
import pathlib
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Hello world! Hello there, world. Say hello to the world of tokenizers.
A tokenizer turns text into pieces, and pieces into numbers the model reads.
Language models read tokens; they write tokens; the server streams them back.
The capital of France is Paris. The capital of Italy is Rome. Paris is lovely in spring.
What is 2+2? It is 4. What is 10 times 12? It is 120. Numbers like 3.14159 and 2026 appear.
Café au lait, déjà vu, naïve façade, résumé: French words keep their accents.
def greet(name):
    return "Hello, " + name
for i in range(10):
    print(i * i)
class Model:
    def __init__(self):
        self.layers = []
        self.weights = {}
    def forward(self, x):
        return x
Indentation matters in Python code, so    runs   of    spaces   appear    too.
She sells sea shells by the sea shore; the shells she sells are sea shells, for sure.
Peter Piper picked a peck of pickled peppers. How many pickled peppers did Peter pick?
Streaming responses arrive token by token, and the client prints them as they come.
Download the snapshot, verify every shard, then load the weights into the engine.
"""

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and two trailing  ",
    "def greet(name):\n    return name\n",
    "Numbers 12345 and 3.14159",
    "Café déjà vu — naïve façade",
    "日本語のテキスト 🙂",
    "[INST] What is 2+2? [/INST]",
    "<think>reasoning</think> the answer",
    "",
    "zzzqqxj unseenword",
    "tab\tand\nnewline",
    "Paris[INST]Rome",
]

# llama.cpp's token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


def train() -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        character_coverage=0.995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        control_symbols=["[INST]", "[/INST]"],
        user_defined_symbols=["<think>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def vocabulary(sp: spm.SentencePieceProcessor) -> dict:
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            kind = UNKNOWN
        elif sp.is_control(i):
            kind = CONTROL
        elif sp.is_byte(i):
            kind = BYTE
        elif sp.is_unused(i):
            kind = UNUSED
        elif piece == "<think>":
            kind = USER_DEFINED
        else:
            kind = NORMAL
        tokens.append(piece)
        scores.append(float(sp.get_score(i)))
        types.append(kind)
    return {"tokens": tokens, "scores": scores, "token_types": types, "unk": 0, "bos": 1, "eos": 2}


def write_gguf(path: pathlib.Path, arch: str, vocab: dict) -> None:
    tokens = vocab["tokens"]
    if arch == "gemma3":
        tokens = [" " * len(t) if len(t) >= 2 and set(t) == {SPACE} else t for t in tokens]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["token_types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    if arch == "gemma3":
        writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def record(tokenizer) -> list:
    cases = []
    for text in SAMPLES:
        plain = tokenizer.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": plain,
                "ids_with_special": tokenizer.encode(text, add_special_tokens=True),
                "decoded": tokenizer.decode(plain, skip_special_tokens=False),
            }
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="tests/data")
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)

    sp = train()
    vocab = vocabulary(sp)
    (out / "spm_vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")

    reference = {
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "sentencepiece": spm.__version__,
            "gguf": getattr(gguf, "__version__", "unknown"),
        },
        "layouts": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "gemma3"):
            path = pathlib.Path(tmp) / f"{arch}.gguf"
            write_gguf(path, arch, vocab)
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            cases = record(tokenizer)
            if arch == "llama":
                agree = 0
                for case in cases:
                    case["sentencepiece_ids"] = sp.encode(case["text"])
                    agree += case["sentencepiece_ids"] == case["ids"]
                print(f"llama layout: sentencepiece agrees with transformers on {agree}/{len(cases)} samples")
            reference["layouts"][arch] = cases
            print(f"{arch}: {len(cases)} samples recorded")
    (out / "spm_reference.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
