//! A `tokenizers` tokenizer built from GGUF metadata, for GGUF files that come without a
//! tokenizer.json, with the special tokens marked by `token_type`:
//! - byte-level BPE (`tokenizer.ggml.model` = "gpt2") from `tokens` and `merges`, with the
//!   pre-tokenizer named by `tokenizer.ggml.pre`;
//! - SentencePiece BPE (`tokenizer.ggml.model` = "llama": Llama 2, TinyLlama, Mistral, Gemma)
//!   from `tokens` and `scores`: the merges are recovered from the vocabulary (every split of a
//!   piece into two known pieces, ranked by the piece's score; for Gemma by its position), with
//!   byte fallback, and Metaspace / "▁" handling as Hugging Face's converters do.
//!
//! Other tokenizer models are refused with a message saying what to add.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::{
    decoders::{
        byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse,
        sequence::Sequence as DecoderSequence, strip::Strip,
    },
    models::bpe::{Merges, Vocab, BPE},
    normalizers::replace::Replace,
    normalizers::unicode::NFC,
    pre_tokenizers::metaspace::{Metaspace, PrependScheme},
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

use std::collections::{HashMap, HashSet};

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
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let mut tokenizer = match model {
        "gpt2" => byte_level(content, &tokens)?,
        "llama" => sentencepiece(content, tokens.clone())?,
        other => {
            return Err(unsupported(format!(
                "building a tokenizer from GGUF metadata supports \"gpt2\" (byte-level BPE) and \"llama\" \
                 (SentencePiece BPE), not tokenizer.ggml.model {other:?}"
            )))
        }
    };
    add_special_tokens(content, &tokens, &mut tokenizer)?;
    Ok(tokenizer)
}

fn load_err(what: &str) -> impl Fn(tokenizers::Error) -> EngineError + '_ {
    move |e| EngineError::Load(format!("{what}: {e}"))
}

fn byte_level(content: &Content, tokens: &[String]) -> Result<Tokenizer, EngineError> {
    let merges = strings(content, "tokenizer.ggml.merges")?;
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
        .map_err(load_err("building the BPE model from GGUF"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(load_err("tokenizer normalizer"))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    match bos_template(content, tokens, false)? {
        Some(template) => {
            tokenizer.with_post_processor(Some(template));
        }
        None => {
            tokenizer.with_post_processor(Some(ByteLevelProcessor::new(false, false, true)));
        }
    }
    Ok(tokenizer)
}

fn token_types(content: &Content, count: usize) -> Vec<i32> {
    match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; count],
    }
}

/// Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
/// tokens, so a text like "<|im_start|>" is one token, not pieces.
fn add_special_tokens(
    content: &Content,
    tokens: &[String],
    tokenizer: &mut Tokenizer,
) -> Result<(), EngineError> {
    let types = token_types(content, tokens.len());
    let of_type = |wanted: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == wanted)
            .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
            .collect()
    };
    tokenizer
        .add_special_tokens(of_type(TOKEN_TYPE_CONTROL, true))
        .map_err(load_err("adding GGUF special tokens"))?;
    tokenizer
        .add_tokens(of_type(TOKEN_TYPE_USER_DEFINED, false))
        .map_err(load_err("adding GGUF user tokens"))?;
    Ok(())
}

/// A BOS-adding post-processor when the file asks for one (`default` when it does not say).
fn bos_template(
    content: &Content,
    tokens: &[String],
    default: bool,
) -> Result<Option<TemplateProcessing>, EngineError> {
    let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => default,
    };
    let Some(bos) = meta_u32(content, "tokenizer.ggml.bos_token_id").filter(|_| add_bos) else {
        return Ok(None);
    };
    let bos_token = tokens.get(bos as usize).cloned().unwrap_or_default();
    let template = TemplateProcessing::builder()
        .try_single(format!("{bos_token} $A:0"))
        .and_then(|t| t.try_pair(format!("{bos_token} $A:0 $B:1")))
        .map_err(|e| EngineError::Load(format!("BOS template: {e}")))?
        .special_tokens(vec![(bos_token, bos)])
        .build()
        .map_err(|e| EngineError::Load(format!("BOS template: {e}")))?;
    Ok(Some(template))
}

/// Merges implied by a SentencePiece vocabulary: every split of a piece into two known pieces,
/// ranked by `rank` of the piece (higher first; ties: longer left, then longer right piece; then
/// vocabulary order), as Hugging Face's `generate_merges` does. A piece listed twice counts once,
/// at its first place, with the id and rank of its last listing (as a map built from the list).
fn derive_merges(tokens: &[String], rank: &dyn Fn(usize) -> f64) -> Merges {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        last.insert(t.as_str(), i);
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut merges: Vec<(usize, usize, f64)> = Vec::new();
    for piece in tokens {
        if !seen.insert(piece.as_str()) {
            continue;
        }
        let score = rank(last[piece.as_str()]);
        let mut local: Vec<(usize, usize, f64)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*last.get(l)?, *last.get(r)?, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    let len = |id: usize| tokens[id].chars().count();
    // A stable sort, highest first: equal keys keep the order above.
    merges.sort_by(|a, b| {
        (b.2, len(b.0), len(b.1))
            .partial_cmp(&(a.2, len(a.0), len(a.1)))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

const SPACE: char = '\u{2581}';

fn sentencepiece(content: &Content, mut tokens: Vec<String>) -> Result<Tokenizer, EngineError> {
    let arch = meta_str(content, "general.architecture").unwrap_or("");
    let gemma = matches!(arch, "gemma" | "gemma2" | "gemma3");
    if gemma {
        // Gemma stores runs of spaces as real spaces; its pieces spell them "▁" (a whitespace-only
        // token with a space in it is respelled whole, as transformers does).
        for t in &mut tokens {
            if t.contains(' ') && t.chars().all(char::is_whitespace) {
                *t = SPACE.to_string().repeat(t.chars().count());
            }
        }
    }
    let scores: Vec<f64> = match content.metadata.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.to_f32().map(f64::from).unwrap_or(0.0))
            .collect(),
        _ => Vec::new(),
    };
    // Gemma's scores do not follow its merge order; its token order does.
    let merges = if gemma || scores.len() != tokens.len() {
        derive_merges(&tokens, &|i| -(i as f64))
    } else {
        derive_merges(&tokens, &|i| scores[i])
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) =
        meta_u32(content, "tokenizer.ggml.unknown_token_id").and_then(|id| tokens.get(id as usize))
    {
        bpe = bpe.unk_token(unk.clone());
    }
    let bpe = bpe
        .build()
        .map_err(load_err("building the SentencePiece model from GGUF"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space = SPACE.to_string();
    let replace_space = Replace::new(space.as_str(), " ").map_err(load_err("decoder"))?;
    let mut decoders: Vec<tokenizers::DecoderWrapper> = vec![
        replace_space.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if gemma {
        tokenizer
            .with_normalizer(Some(
                Replace::new(" ", space.as_str()).map_err(load_err("normalizer"))?,
            ))
            .map_err(load_err("normalizer"))?;
    } else {
        let prefix = !matches!(
            content.metadata.get("tokenizer.ggml.add_space_prefix"),
            Some(Value::Bool(false))
        );
        let scheme = if prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE, scheme, false)));
        if prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    if let Some(template) = bos_template(content, &tokens, !gemma)? {
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    //! The SentencePiece path against transformers' GGUF tokenizer, recorded by
    //! scripts/record_spm_reference.py from a vocabulary the `sentencepiece` library trained.

    use std::io::Cursor;

    use candle_core::quantized::gguf_file::{self, Content, Value};
    use serde_json::Value as Json;

    fn data(name: &str) -> Json {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        serde_json::from_slice(&std::fs::read(&path).expect("read fixture")).expect("fixture JSON")
    }

    /// The GGUF metadata scripts/record_spm_reference.py writes for `arch`, read back by candle.
    fn spm_gguf(arch: &str) -> Content {
        let metadata = crate::testing::tiny::spm_tokenizer_metadata(arch);
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut bytes = Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &refs, &[]).expect("write GGUF");
        bytes.set_position(0);
        Content::read(&mut bytes).expect("read GGUF")
    }

    fn ids(v: &Json) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    }

    fn check_layout(arch: &str) {
        let tokenizer = super::build(&spm_gguf(arch)).expect("build tokenizer");
        let reference = data("spm_reference.json");
        let cases = reference["layouts"][arch].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let plain = tokenizer.encode(text, false).unwrap();
            assert_eq!(
                plain.get_ids(),
                ids(&case["ids"]),
                "{arch}: ids of {text:?}"
            );
            let special = tokenizer.encode(text, true).unwrap();
            assert_eq!(
                special.get_ids(),
                ids(&case["ids_with_special"]),
                "{arch}: ids with BOS of {text:?}"
            );
            let decoded = tokenizer.decode(plain.get_ids(), false).unwrap();
            assert_eq!(
                decoded,
                case["decoded"].as_str().unwrap(),
                "{arch}: decoding {text:?}"
            );
        }
    }

    #[test]
    fn llama_sentencepiece_gguf_tokenizes_as_transformers_does() {
        check_layout("llama");
    }

    #[test]
    fn gemma_sentencepiece_gguf_tokenizes_as_transformers_does() {
        check_layout("gemma3");
    }

    #[test]
    fn no_space_prefix_when_the_file_says_so() {
        let mut content = spm_gguf("llama");
        content
            .metadata
            .insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false));
        let tokenizer = super::build(&content).unwrap();
        let pieces = tokenizer
            .encode("Hello world", false)
            .unwrap()
            .get_tokens()
            .to_vec();
        assert_eq!(pieces, ["Hello", "\u{2581}world"]);
        assert_eq!(
            tokenizer
                .decode(
                    tokenizer.encode("Hello world", false).unwrap().get_ids(),
                    false
                )
                .unwrap(),
            "Hello world"
        );
    }

    #[test]
    fn unknown_tokenizer_models_are_refused_with_a_hint() {
        let mut content = spm_gguf("llama");
        content
            .metadata
            .insert("tokenizer.ggml.model".into(), Value::String("t5".into()));
        let err = super::build(&content).unwrap_err().to_string();
        assert!(
            err.contains("\"t5\"") && err.contains("tokenizer.json"),
            "{err}"
        );
    }
}
