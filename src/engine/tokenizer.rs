//! The tokenizer of a model and what the engine needs to know around it: end-of-sequence ids
//! (several allowed), special tokens, BOS/EOS strings and the chat template.
//!
//! Sources, in a snapshot folder: tokenizer.json, tokenizer_config.json (bos/eos tokens,
//! chat_template), chat_template.jinja / chat_template.json, generation_config.json and
//! config.json (eos_token_id). For GGUF files without a tokenizer.json, the tokenizer is built
//! from the GGUF metadata (see [`super::gguf_tokenizer`]).

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
};

use candle_core::quantized::gguf_file;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::EngineError;

/// A model's tokenizer and its special-token facts.
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    /// Generation stops at any of these.
    pub eos_ids: BTreeSet<u32>,
    /// Ids of special tokens (reported as `special` when generated).
    pub special_ids: HashSet<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The Jinja chat template, when the model has one.
    pub chat_template: Option<String>,
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>, EngineError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::Load(format!("{name} does not parse: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Load(format!("reading {name}: {e}"))),
    }
}

/// A token given as "text" or {"content": "text", ...} (tokenizer_config.json style).
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// An id given as a number or a list of numbers.
fn ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn chat_template_from(config: Option<&Value>, dir: &Path) -> Result<Option<String>, EngineError> {
    if let Ok(text) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Ok(Some(text));
    }
    if let Some(value) = read_json(dir, "chat_template.json")? {
        if let Some(t) = value.get("chat_template").and_then(Value::as_str) {
            return Ok(Some(t.to_owned()));
        }
    }
    Ok(match config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(t)) => Some(t.clone()),
        // A list of named templates: the "default" one, else the first.
        Some(Value::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
            };
            named("default")
                .or_else(|| {
                    list.first()
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                })
                .map(str::to_owned)
        }
        _ => None,
    })
}

fn special_ids(tokenizer: &Tokenizer) -> HashSet<u32> {
    tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, token)| token.special)
        .map(|(id, _)| id)
        .collect()
}

/// Loads the tokenizer of a snapshot folder. `gguf` supplies metadata when the folder holds a
/// GGUF model.
pub fn load(
    dir: &Path,
    model_config: Option<&Value>,
    gguf: Option<&gguf_file::Content>,
) -> Result<TokenizerInfo, EngineError> {
    let tokenizer_config = read_json(dir, "tokenizer_config.json")?;
    let generation_config = read_json(dir, "generation_config.json")?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EngineError::Load(format!("tokenizer.json does not load: {e}")))?
    } else if let Some(content) = gguf {
        super::gguf_tokenizer::build(content)?
    } else {
        return Err(EngineError::Load(
            "no tokenizer: tokenizer.json is missing and the weights are not GGUF".into(),
        ));
    };

    let mut eos_ids = BTreeSet::new();
    eos_ids.extend(ids(generation_config
        .as_ref()
        .and_then(|c| c.get("eos_token_id"))));
    eos_ids.extend(ids(model_config.and_then(|c| c.get("eos_token_id"))));
    let mut bos_token = token_string(tokenizer_config.as_ref().and_then(|c| c.get("bos_token")));
    let mut eos_token = token_string(tokenizer_config.as_ref().and_then(|c| c.get("eos_token")));
    let mut chat_template = chat_template_from(tokenizer_config.as_ref(), dir)?;
    if let Some(content) = gguf {
        let meta_id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        if let Some(id) = meta_id("tokenizer.ggml.eos_token_id") {
            eos_ids.insert(id);
            eos_token = eos_token.or_else(|| tokenizer.id_to_token(id));
        }
        if let Some(id) = meta_id("tokenizer.ggml.bos_token_id") {
            bos_token = bos_token.or_else(|| tokenizer.id_to_token(id));
        }
        if chat_template.is_none() {
            chat_template = content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned();
        }
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        eos_ids.insert(id);
    }
    Ok(TokenizerInfo {
        special_ids: special_ids(&tokenizer),
        tokenizer,
        eos_ids,
        bos_token,
        eos_token,
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny;

    #[test]
    fn eos_ids_are_collected_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        tiny::write_tokenizer_files(dir.path());
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [7, 8]}"#,
        )
        .unwrap();
        let config: Value = serde_json::from_str(r#"{"eos_token_id": 9}"#).unwrap();
        let info = load(dir.path(), Some(&config), None).unwrap();
        let im_end = info.tokenizer.token_to_id("<|im_end|>").unwrap();
        assert_eq!(info.eos_ids, BTreeSet::from([7, 8, 9, im_end]));
        assert_eq!(info.eos_token.as_deref(), Some("<|im_end|>"));
        assert!(info.special_ids.contains(&im_end));
        assert!(info.chat_template.as_deref().unwrap().contains("im_start"));
    }

    #[test]
    fn chat_template_lists_and_files_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let config: Value =
            serde_json::from_str(r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#)
                .unwrap();
        assert_eq!(
            chat_template_from(Some(&config), dir.path())
                .unwrap()
                .as_deref(),
            Some("D")
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(
            chat_template_from(Some(&config), dir.path())
                .unwrap()
                .as_deref(),
            Some("J")
        );
    }
}
