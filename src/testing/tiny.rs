//! Tiny random models for fast tests: a few layers of width 64, random weights from a fixed seed,
//! a byte-level BPE tokenizer with ChatML special tokens. The weights come from candle's own
//! model constructors (through a VarMap), so the tensor names are exactly the ones the loader
//! expects for each architecture; their values are then overwritten deterministically.

use std::{collections::BTreeMap, path::Path};

use candle_core::{quantized::gguf_file, DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::{bert, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3};
use serde_json::{json, Value};

use super::pseudo_random_bytes;

/// Token ids of the tiny tokenizer's special tokens (after the 256 byte tokens).
pub const ENDOFTEXT: u32 = 256;
pub const IM_START: u32 = 257;
pub const IM_END: u32 = 258;
/// Embedding rows of the tiny models (more than the tokenizer's 259 tokens, as real models pad).
pub const VOCAB: usize = 272;

/// The ChatML template of SmolLM2 and Qwen.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE tokenizer.json: one token per byte (ids 0..256, the byte-level alphabet in
/// code point order) and the special tokens <|endoftext|>, <|im_start|>, <|im_end|>.
pub fn tokenizer_json() -> Value {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut vocab: BTreeMap<String, u32> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let specials = [
        ("<|endoftext|>", ENDOFTEXT),
        ("<|im_start|>", IM_START),
        ("<|im_end|>", IM_END),
    ];
    for (token, id) in specials {
        vocab.insert(token.to_owned(), id);
    }
    let added: Vec<Value> = specials
        .iter()
        .map(|(token, id)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// Writes tokenizer.json and tokenizer_config.json (ChatML template, BOS/EOS tokens).
pub fn write_tokenizer_files(dir: &Path) {
    std::fs::create_dir_all(dir).expect("model folder");
    let write = |name: &str, value: &Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(value).unwrap())
            .expect("write fixture")
    };
    write("tokenizer.json", &tokenizer_json());
    write(
        "tokenizer_config.json",
        &json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}),
    );
}

/// Architectures [`write_model`] can build.
pub const ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
];

/// The tiny config.json of an architecture.
pub fn config(arch: &str) -> Value {
    let common = json!({
        "model_type": arch, "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "bos_token_id": IM_START, "eos_token_id": IM_END, "tie_word_embeddings": true,
        "hidden_act": "silu"
    });
    let extra = match arch {
        "mistral" => json!({"sliding_window": 256, "tie_word_embeddings": false}),
        "qwen2" => {
            json!({"sliding_window": 512, "max_window_layers": 2, "use_sliding_window": false})
        }
        "qwen3" => json!({"head_dim": 16, "attention_bias": false, "sliding_window": null,
                          "max_window_layers": 2, "use_sliding_window": false}),
        "phi3" => json!({"tie_word_embeddings": false}),
        "gemma2" => {
            json!({"attention_bias": false, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
                           "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                           "query_pre_attn_scalar": 16, "sliding_window": 256})
        }
        "gemma3_text" => {
            json!({"attention_bias": false, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
                                "final_logit_softcapping": null, "attn_logit_softcapping": null,
                                "query_pre_attn_scalar": 16, "sliding_window": 256, "sliding_window_pattern": 2,
                                "rope_local_base_freq": 10000.0})
        }
        _ => json!({}),
    };
    let mut config = common;
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

/// Runs candle's constructor for `arch` over a VarMap, so the map holds every tensor the loader
/// will ask for, with the right shape.
fn build_varmap(arch: &str, config: &Value) -> candle_core::Result<VarMap> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let parse = |v: &Value| -> candle_core::Result<Value> { Ok(v.clone()) };
    let cfg = parse(config)?;
    let de = |e: serde_json::Error| candle_core::Error::Msg(e.to_string());
    match arch {
        "llama" => {
            let c: llama::LlamaConfig = serde_json::from_value(cfg).map_err(de)?;
            llama::Llama::load(vb, &c.into_config(false))?;
        }
        "mistral" => {
            mistral::Model::new(&serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "qwen2" => {
            qwen2::ModelForCausalLM::new(&serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "qwen3" => {
            qwen3::ModelForCausalLM::new(&serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "phi3" => {
            phi3::Model::new(&serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "gemma2" => {
            gemma2::Model::new(false, &serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "gemma3_text" => {
            gemma3::Model::new(false, &serde_json::from_value(cfg).map_err(de)?, vb)?;
        }
        "bert" => {
            bert::BertModel::load(vb, &serde_json::from_value(cfg).map_err(de)?)?;
        }
        other => candle_core::bail!("no tiny builder for {other}"),
    }
    Ok(varmap)
}

/// Replaces every variable with deterministic values: norms near 1, the rest small.
fn fill_deterministic(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let noise: Vec<f32> = pseudo_random_bytes(seed.wrapping_add(i as u64 * 7919), n)
            .into_iter()
            .map(|b| (b as f32 / 255.0 - 0.5) * 0.4)
            .collect();
        let is_norm = name.contains("norm") || name.contains("LayerNorm");
        let values: Vec<f32> = if is_norm && name.ends_with("weight") {
            noise.iter().map(|x| 1.0 + x * 0.1).collect()
        } else {
            noise
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    Ok(())
}

/// Writes a tiny random model of `arch` into `dir`: config.json, model.safetensors,
/// generation_config.json and the tokenizer files.
pub fn write_model(dir: &Path, arch: &str, seed: u64) {
    write_model_with(dir, arch, seed, |_| {});
}

/// [`write_model`] with a last edit of config.json.
pub fn write_model_with(dir: &Path, arch: &str, seed: u64, edit: impl FnOnce(&mut Value)) {
    let mut config = config(arch);
    let varmap = filled_varmap(dir, arch, &config, seed);
    edit(&mut config);
    save_model(dir, &varmap, &config);
}

/// A random model of `arch` in a real model's shape, for benchmarks: `overrides` replace fields
/// of the tiny config.json before the weights are built (hidden size, layers, heads, vocabulary
/// …). The embedding rows (and output rows, when untied) of the end-of-sequence tokens are
/// zeroed: their logits are then exactly 0, far below the largest of the other random logits, so
/// greedy decoding never ends a stream before its `max_tokens`. Token ids past the tokenizer's
/// 259 decode to nothing, as a real model's padding rows do.
pub fn write_shaped_model(dir: &Path, arch: &str, seed: u64, overrides: &Value) {
    let mut config = config(arch);
    for (k, v) in overrides.as_object().expect("overrides: a JSON object") {
        config[k] = v.clone();
    }
    let varmap = filled_varmap(dir, arch, &config, seed);
    {
        let data = varmap.data().lock().expect("varmap lock");
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let Some(var) = data.get(name) else { continue };
            let mut rows = var.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            for eos in [ENDOFTEXT, IM_END] {
                rows[eos as usize].fill(0.0);
            }
            let shape = var.shape().clone();
            let flat: Vec<f32> = rows.into_iter().flatten().collect();
            var.set(&Tensor::from_vec(flat, shape, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    save_model(dir, &varmap, &config);
}

/// Creates `dir` and the weights of `config`, filled from `seed`.
fn filled_varmap(dir: &Path, arch: &str, config: &Value, seed: u64) -> VarMap {
    std::fs::create_dir_all(dir).expect("model folder");
    let varmap = build_varmap(arch, config).expect("build the model");
    fill_deterministic(&varmap, seed).expect("fill the weights");
    varmap
}

/// Writes model.safetensors, config.json, generation_config.json and the tokenizer files.
fn save_model(dir: &Path, varmap: &VarMap, config: &Value) {
    varmap
        .save(dir.join("model.safetensors"))
        .expect("save the weights");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec(&json!({"eos_token_id": [IM_END, ENDOFTEXT]})).unwrap(),
    )
    .unwrap();
    write_tokenizer_files(dir);
}

/// Writes a tiny random BERT embedding model (mean pooling) into `dir`.
pub fn write_bert(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("1_Pooling")).expect("model folder");
    let config = json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "max_position_embeddings": 64, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0
    });
    let varmap = build_varmap("bert", &config).expect("build tiny bert");
    fill_deterministic(&varmap, seed).expect("fill tiny bert");
    varmap
        .save(dir.join("model.safetensors"))
        .expect("save tiny bert");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        br#"{"pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    write_tokenizer_files(dir);
}

/// The tokenizer metadata of a SentencePiece GGUF as llama.cpp writes it (`tokenizer.ggml.model`
/// = "llama", tokens, scores, token types, BOS/EOS/UNK ids, no merges), from the vocabulary in
/// tests/data/spm_vocab.json that scripts/record_spm_reference.py trained. For `gemma3` pieces of
/// two or more "▁" are stored as spaces and `add_bos_token` is set, as Gemma files have them.
pub fn spm_tokenizer_metadata(arch: &str) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/spm_vocab.json");
    let vocab: Value =
        serde_json::from_slice(&std::fs::read(path).expect("read spm_vocab.json")).unwrap();
    let list = |key: &str| vocab[key].as_array().expect("vocabulary array").clone();
    let tokens = list("tokens").into_iter().map(|t| {
        let t = t.as_str().unwrap().to_owned();
        let n = t.chars().count();
        if arch == "gemma3" && n >= 2 && t.chars().all(|c| c == '\u{2581}') {
            V::String(" ".repeat(n))
        } else {
            V::String(t)
        }
    });
    let id = |key: &str| V::U32(vocab[key].as_u64().unwrap() as u32);
    let mut metadata = vec![
        ("general.architecture".to_owned(), V::String(arch.into())),
        ("tokenizer.ggml.model".to_owned(), V::String("llama".into())),
        (
            "tokenizer.ggml.tokens".to_owned(),
            V::Array(tokens.collect()),
        ),
        (
            "tokenizer.ggml.scores".to_owned(),
            V::Array(
                list("scores")
                    .iter()
                    .map(|s| V::F32(s.as_f64().unwrap() as f32))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            V::Array(
                list("token_types")
                    .iter()
                    .map(|t| V::I32(t.as_i64().unwrap() as i32))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".to_owned(), id("bos")),
        ("tokenizer.ggml.eos_token_id".to_owned(), id("eos")),
        ("tokenizer.ggml.unknown_token_id".to_owned(), id("unk")),
    ];
    if arch == "gemma3" {
        metadata.push(("tokenizer.ggml.add_bos_token".to_owned(), V::Bool(true)));
    }
    metadata
}

/// A Llama 2 style chat template, for GGUF files.
pub const INST_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}";

/// A tiny random quantized (Q8_0) llama GGUF with the SentencePiece tokenizer of
/// [`spm_tokenizer_metadata`] and [`INST_TEMPLATE`], and no tokenizer.json needed.
pub fn spm_llama_gguf(seed: u64) -> Vec<u8> {
    spm_llama_gguf_with(seed, candle_core::quantized::GgmlDType::Q8_0)
}

/// [`spm_llama_gguf`] with its matrices stored as `matrices` (Q8_0, F16, Q4_1, …).
pub fn spm_llama_gguf_with(seed: u64, matrices: candle_core::quantized::GgmlDType) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use gguf_file::Value as V;
    let mut metadata = spm_tokenizer_metadata("llama");
    let vocab = match metadata.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        Some((_, V::Array(tokens))) => tokens.len(),
        _ => unreachable!("the metadata lists the tokens"),
    };
    let (hidden, ffn, layers, heads) = (64usize, 128usize, 2u32, 4u32);
    metadata.extend([
        ("llama.context_length".to_owned(), V::U32(512)),
        ("llama.embedding_length".to_owned(), V::U32(hidden as u32)),
        ("llama.feed_forward_length".to_owned(), V::U32(ffn as u32)),
        ("llama.block_count".to_owned(), V::U32(layers)),
        ("llama.attention.head_count".to_owned(), V::U32(heads)),
        (
            "llama.attention.head_count_kv".to_owned(),
            V::U32(heads / 2),
        ),
        (
            "llama.rope.dimension_count".to_owned(),
            V::U32(hidden as u32 / heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_owned(),
            V::F32(1e-5),
        ),
        (
            "tokenizer.chat_template".to_owned(),
            V::String(INST_TEMPLATE.into()),
        ),
    ]);
    let kv = hidden / 2;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, hidden]),
        ("output_norm.weight".into(), vec![hidden]),
        ("output.weight".into(), vec![vocab, hidden]),
    ];
    for l in 0..layers {
        for (name, shape) in [
            ("attn_q", vec![hidden, hidden]),
            ("attn_k", vec![kv, hidden]),
            ("attn_v", vec![kv, hidden]),
            ("attn_output", vec![hidden, hidden]),
            ("ffn_gate", vec![ffn, hidden]),
            ("ffn_up", vec![ffn, hidden]),
            ("ffn_down", vec![hidden, ffn]),
            ("attn_norm", vec![hidden]),
            ("ffn_norm", vec![hidden]),
        ] {
            shapes.push((format!("blk.{l}.{name}.weight"), shape));
        }
    }
    let tensors: Vec<(String, QTensor)> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let norm = name.contains("norm");
            let values: Vec<f32> = pseudo_random_bytes(seed.wrapping_add(i as u64 * 7919), n)
                .into_iter()
                .map(|b| (b as f32 / 255.0 - 0.5) * 0.4)
                .map(|x| if norm { 1.0 + x * 0.25 } else { x })
                .collect();
            let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("tiny tensor");
            // Norms stay f32, as llama.cpp keeps 1-D tensors.
            let dtype = if norm { GgmlDType::F32 } else { matrices };
            (
                name,
                QTensor::quantize(&t, dtype).expect("quantize tiny tensor"),
            )
        })
        .collect();
    let meta: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qt: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &qt).expect("write tiny GGUF");
    out.into_inner()
}

/// GGUF name of a tiny HF tensor for `arch` (qwen3 or phi3, neither of which llama.cpp permutes).
fn gguf_tensor_name(name: &str) -> Option<String> {
    let simple = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_owned());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

/// The tiny model of [`write_model`] for `arch` (`qwen3` or `phi3`) as an F32 GGUF file with the
/// tensor names and metadata llama.cpp writes: the same weights, so a greedy run gives the same
/// ids as the safetensors snapshot. No tokenizer metadata: put [`write_tokenizer_files`] beside it.
pub fn gguf_of_tiny(arch: &str, seed: u64) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use gguf_file::Value as V;
    let config = config(arch);
    let varmap = build_varmap(arch, &config).expect("build tiny model");
    fill_deterministic(&varmap, seed).expect("fill tiny weights");
    let c = |key: &str| V::U32(config[key].as_u64().expect("tiny config value") as u32);
    let heads = config["num_attention_heads"].as_u64().unwrap() as u32;
    let head_dim = config
        .get("head_dim")
        .and_then(Value::as_u64)
        .map_or(64 / heads, |d| d as u32);
    let mut metadata = vec![
        ("general.architecture".to_owned(), V::String(arch.into())),
        // f32 activations in candle's quantized qwen3 (it defaults to f16).
        ("general.dtype".to_owned(), V::U32(0)),
        (
            format!("{arch}.context_length"),
            c("max_position_embeddings"),
        ),
        (format!("{arch}.embedding_length"), c("hidden_size")),
        (
            format!("{arch}.feed_forward_length"),
            c("intermediate_size"),
        ),
        (format!("{arch}.block_count"), c("num_hidden_layers")),
        (
            format!("{arch}.attention.head_count"),
            c("num_attention_heads"),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            c("num_key_value_heads"),
        ),
        (format!("{arch}.attention.key_length"), V::U32(head_dim)),
        (format!("{arch}.attention.value_length"), V::U32(head_dim)),
        (format!("{arch}.rope.dimension_count"), V::U32(head_dim)),
        (format!("{arch}.rope.freq_base"), V::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-5),
        ),
        (
            "tokenizer.chat_template".to_owned(),
            V::String(CHATML_TEMPLATE.into()),
        ),
    ];
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let data = varmap.data().lock().expect("varmap lock");
    let mut tensors: Vec<(String, QTensor)> = data
        .iter()
        .map(|(name, var)| {
            let gguf = gguf_tensor_name(name)
                .unwrap_or_else(|| panic!("no GGUF name for tiny tensor {name}"));
            let qt = QTensor::quantize(var.as_tensor(), GgmlDType::F32).expect("tiny tensor");
            (gguf, qt)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let qt: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &qt).expect("write tiny GGUF");
    out.into_inner()
}
