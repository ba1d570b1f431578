//! A `tokenizers` tokenizer built from GGUF metadata, for GGUF files that come without a
//! tokenizer.json: byte-level BPE (`tokenizer.ggml.model` = "gpt2") from `tokens` and `merges`,
//! with the pre-tokenizer named by `tokenizer.ggml.pre` and the special tokens marked by
//! `token_type`. Other tokenizer models are refused with a message saying what to add.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{Merges, Vocab, BPE},
    normalizers::unicode::NFC,
    pre_tokenizers::{
        byte_level::ByteLevel,
        digits::Digits,
        sequence::Sequence,
        split::{Split, SplitPattern},
        PreTokenizerWrapper,
    },
    processors::{byte_level::ByteLevel as ByteLevelProcessor, template::TemplateProcessing},
    AddedToken, SplitDelimiterBehavior, Tokenizer,
};

use super::EngineError;

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Qwen2's pre-tokenizer split pattern (as in its tokenizer.json).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn unsupported(what: String) -> EngineError {
    EngineError::Load(format!(
        "{what}; put the model's tokenizer.json next to the GGUF file"
    ))
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>, EngineError> {
    let Some(Value::Array(items)) = content.metadata.get(key) else {
        return Err(unsupported(format!("the GGUF metadata has no {key} array")));
    };
    items
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()
        .map_err(|e| EngineError::Load(format!("GGUF {key}: {e}")))
}

fn meta_str<'a>(content: &'a Content, key: &str) -> Option<&'a str> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

fn meta_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper, EngineError> {
    let split = Split::new(
        SplitPattern::Regex(pattern.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| EngineError::Load(format!("pre-tokenizer pattern: {e}")))?;
    Ok(split.into())
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, EngineError> {
    Ok(match pre {
        "gpt2" | "default" | "" => ByteLevel::new(false, true, true).into(),
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "qwen2" => Sequence::new(vec![
            split(QWEN2_PATTERN)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        "llama-bpe" | "llama3" => Sequence::new(vec![
            split(LLAMA3_PATTERN)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        other => {
            return Err(unsupported(format!(
                "the GGUF pre-tokenizer {other:?} is not supported"
            )))
        }
    })
}

/// Builds the tokenizer described by a GGUF file's metadata.
pub fn build(content: &Content) -> Result<Tokenizer, EngineError> {
    let model = meta_str(content, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(unsupported(format!(
            "building a tokenizer from GGUF metadata supports byte-level BPE (tokenizer.ggml.model \"gpt2\"), not {model:?}"
        )));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges = strings(content, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| EngineError::Load(format!("GGUF merge {m:?} is not \"a b\"")))
        })
        .collect::<Result<_, _>>()?;
    let pre = meta_str(content, "tokenizer.ggml.pre").unwrap_or("default");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| EngineError::Load(format!("building the BPE model from GGUF: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| EngineError::Load(format!("tokenizer normalizer: {e}")))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let add_bos = matches!(
        content.metadata.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    match (add_bos, meta_u32(content, "tokenizer.ggml.bos_token_id")) {
        (true, Some(bos)) => {
            let bos_token = tokens.get(bos as usize).cloned().unwrap_or_default();
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos_token} $A:0"))
                .and_then(|t| t.try_pair(format!("{bos_token} $A:0 $B:1")))
                .map_err(|e| EngineError::Load(format!("BOS template: {e}")))?
                .special_tokens(vec![(bos_token, bos)])
                .build()
                .map_err(|e| EngineError::Load(format!("BOS template: {e}")))?;
            tokenizer.with_post_processor(Some(template));
        }
        _ => {
            tokenizer.with_post_processor(Some(ByteLevelProcessor::new(false, false, true)));
        }
    }

    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_USER_DEFINED)
        .map(|(token, _)| AddedToken::from(token.clone(), false))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| EngineError::Load(format!("adding GGUF special tokens: {e}")))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| EngineError::Load(format!("adding GGUF user tokens: {e}")))?;
    Ok(tokenizer)
}
