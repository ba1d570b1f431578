//! Converts a llama-architecture GGUF file into a Hugging Face snapshot folder, for tests and
//! benchmarks that need real f32 safetensors weights (no model hub is reachable here):
//! every tensor dequantized to f32, llama.cpp's row permutation of `attn_q` / `attn_k` undone,
//! GGUF names mapped to HF names, written as `shards` safetensors files with an index, plus
//! config.json, generation_config.json, tokenizer.json (built from the GGUF metadata) and
//! tokenizer_config.json (chat template, BOS/EOS tokens).

use std::{collections::HashMap, path::Path};

use anyhow::{anyhow, Context as _};
use candle_core::{quantized::gguf_file, Device, Tensor};
use serde_json::json;

fn meta_u64(content: &gguf_file::Content, key: &str) -> anyhow::Result<u64> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata lacks {key}"))?
        .to_u64()
        .or_else(|_| content.metadata[key].to_u32().map(u64::from))
        .map_err(|e| anyhow!("{key}: {e}"))
}

fn meta_f64(content: &gguf_file::Content, key: &str) -> anyhow::Result<f64> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata lacks {key}"))?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| anyhow!("{key}: {e}"))
}

/// HF name of a GGUF tensor name, and whether its rows need un-permuting (q: heads, k: kv heads).
fn hf_name(name: &str) -> anyhow::Result<(String, Option<bool>)> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Ok((s.to_owned(), None));
    }
    let rest = name
        .strip_prefix("blk.")
        .ok_or_else(|| anyhow!("unexpected tensor {name}"))?;
    let (layer, part) = rest
        .split_once('.')
        .ok_or_else(|| anyhow!("unexpected tensor {name}"))?;
    let (hf, permute) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(true)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(false)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        other => return Err(anyhow!("unexpected tensor part {other} in {name}")),
    };
    Ok((format!("model.layers.{layer}.{hf}"), permute))
}

/// Inverse of llama.cpp's `permute`: (heads, 2, half, in) ← (heads, half, 2, in).
fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = t.dims2()?;
    let half = out / heads / 2;
    t.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))
}

/// Converts `gguf` into `out` unless a previous conversion with the same inputs is there (a
/// stamp file records them); writes into a temporary sibling and renames, so `out` is never
/// half-written. Returns `out`.
pub fn gguf_llama_to_hf_once(
    gguf: &Path,
    out: &Path,
    shards: usize,
) -> anyhow::Result<std::path::PathBuf> {
    let stamp = out.join(".lmx-converted");
    let meta = std::fs::metadata(gguf)?;
    let expected = format!("gguf_llama_to_hf v1; {shards} shards; {} bytes", meta.len());
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == expected) {
        return Ok(out.to_owned());
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    gguf_llama_to_hf(gguf, &tmp, shards)?;
    std::fs::write(tmp.join(".lmx-converted"), expected)?;
    let _ = std::fs::remove_dir_all(out);
    std::fs::rename(&tmp, out)?;
    Ok(out.to_owned())
}

/// See the module docs.
pub fn gguf_llama_to_hf(gguf: &Path, out: &Path, shards: usize) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let content = gguf_file::Content::read(&mut file).context("reading the GGUF header")?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    anyhow::ensure!(
        arch == "llama",
        "only llama GGUF files convert, not {arch:?}"
    );
    let heads = meta_u64(&content, "llama.attention.head_count")? as usize;
    let kv_heads = meta_u64(&content, "llama.attention.head_count_kv")? as usize;

    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in &names {
        let q = content.tensor(&mut file, name, &Device::Cpu)?;
        let t = q.dequantize(&Device::Cpu)?;
        let (hf, permute) = hf_name(name)?;
        let t = match permute {
            Some(true) => unpermute(&t, heads)?,
            Some(false) => unpermute(&t, kv_heads)?,
            None => t,
        };
        tensors.push((hf, t.contiguous()?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tied = !names.iter().any(|n| n == "output.weight");

    std::fs::create_dir_all(out)?;
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * 4).sum();
    let per_shard = total.div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    let mut groups: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = t.elem_count() * 4;
        if size + bytes > per_shard && !groups.last().unwrap().is_empty() && groups.len() < shards {
            groups.push(Vec::new());
            size = 0;
        }
        size += bytes;
        groups.last_mut().unwrap().push((name, t));
    }
    let n = groups.len();
    for (k, group) in groups.into_iter().enumerate() {
        let file_name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let map: HashMap<String, Tensor> = group.into_iter().collect();
        for name in map.keys() {
            weight_map.insert(name.clone(), file_name.clone().into());
        }
        candle_core::safetensors::save(&map, out.join(&file_name))?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;

    let tokenizer = crate::engine::tokenizer_from_gguf(&content)?;
    tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("saving tokenizer.json: {e}"))?;
    let token = |key: &str| -> anyhow::Result<(u64, String)> {
        let id = meta_u64(&content, key)?;
        let text = tokenizer
            .id_to_token(id as u32)
            .ok_or_else(|| anyhow!("{key} {id} not in the vocabulary"))?;
        Ok((id, text))
    };
    let (bos_id, bos) = token("tokenizer.ggml.bos_token_id")?;
    let (eos_id, eos) = token("tokenizer.ggml.eos_token_id")?;
    let vocab = tokenizer.get_vocab_size(true);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta_u64(&content, "llama.embedding_length")?,
        "intermediate_size": meta_u64(&content, "llama.feed_forward_length")?,
        "num_hidden_layers": meta_u64(&content, "llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": meta_f64(&content, "llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": meta_f64(&content, "llama.rope.freq_base")?,
        "max_position_embeddings": meta_u64(&content, "llama.context_length")?,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    });
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_vec_pretty(&json!({"bos_token_id": bos_id, "eos_token_id": eos_id}))?,
    )?;
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let tokenizer_config = json!({
        "bos_token": bos, "eos_token": eos, "chat_template": template,
        "model_max_length": meta_u64(&content, "llama.context_length")?,
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, half, in).swapaxes(1, 2).reshape(out, in)
        let (heads, head_dim, inp) = (3, 4, 2);
        let w = Tensor::arange(0f32, (heads * head_dim * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * head_dim, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, head_dim / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((heads * head_dim, inp))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
