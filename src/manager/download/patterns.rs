//! allow_patterns / ignore_patterns with huggingface_hub's semantics (`filter_repo_objects`):
//! fnmatch-style globs where `*` also matches `/`, a pattern ending in `/` matches everything
//! under that folder, a file is kept when it matches an allow pattern (or none are given) and no
//! ignore pattern. A reference's GGUF selector narrows the selection further ([`GgufChoice`]).

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::{manager::reference::Selector, snapshot::gguf::quantization_from_name};

/// Compiled patterns.
#[derive(Debug, Clone)]
pub struct Patterns {
    allow: Option<GlobSet>,
    ignore: Option<GlobSet>,
}

fn compile(
    field: &'static str,
    patterns: &[String],
) -> Result<Option<GlobSet>, (&'static str, String)> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut set = GlobSetBuilder::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let pattern = if pattern.ends_with('/') {
            format!("{pattern}*")
        } else {
            pattern.clone()
        };
        let glob = GlobBuilder::new(&pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| {
                (
                    field,
                    format!("`{field}[{i}]` {pattern:?} is not a valid glob: {e}"),
                )
            })?;
        set.add(glob);
    }
    set.build()
        .map(Some)
        .map_err(|e| (field, format!("`{field}` does not compile: {e}")))
}

impl Patterns {
    /// Compiles the request's patterns; errors name the field and the bad pattern.
    pub fn new(allow: &[String], ignore: &[String]) -> Result<Self, (&'static str, String)> {
        Ok(Self {
            allow: compile("allow_patterns", allow)?,
            ignore: compile("ignore_patterns", ignore)?,
        })
    }

    /// Whether `path` is selected.
    pub fn selects(&self, path: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.is_match(path))
            && !self.ignore.as_ref().is_some_and(|i| i.is_match(path))
    }

    /// Whether any pattern was given.
    pub fn is_filtering(&self) -> bool {
        self.allow.is_some() || self.ignore.is_some()
    }
}

/// Extensions of weight files: what a GGUF selector leaves out unless it names the file.
const WEIGHT_EXTENSIONS: &[&str] = &[
    ".gguf",
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".onnx",
    ".h5",
    ".msgpack",
    ".ot",
    ".tflite",
    ".ckpt",
];

/// A reference's GGUF selector applied to a repository listing: the GGUF file(s) it names plus
/// every top-level file that holds no weights (config.json, tokenizer files, templates, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufChoice(pub Selector);

impl GgufChoice {
    fn names(&self, path: &str) -> bool {
        match &self.0 {
            Selector::File(file) => path == file,
            Selector::Quant(q) => {
                path.ends_with(".gguf")
                    && quantization_from_name(path)
                        .is_some_and(|named| named.eq_ignore_ascii_case(q))
            }
        }
    }

    /// The paths of `paths` to fetch; Err with the repository's GGUF files when the selector
    /// names none of them.
    pub fn select<'a>(&self, paths: &[&'a str]) -> Result<Vec<&'a str>, Vec<&'a str>> {
        if !paths.iter().any(|p| self.names(p)) {
            return Err(paths
                .iter()
                .filter(|p| p.ends_with(".gguf"))
                .copied()
                .collect());
        }
        Ok(paths
            .iter()
            .filter(|p| {
                self.names(p)
                    || (!p.contains('/') && !WEIGHT_EXTENSIONS.iter().any(|ext| p.ends_with(ext)))
            })
            .copied()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gguf_selector_takes_its_file_and_the_metadata() {
        let files = [
            "README.md",
            "config.json",
            "m-Q4_0.gguf",
            "m-Q8_0.gguf",
            "model.safetensors",
            "tokenizer.json",
            "sub/extra.json",
        ];
        let quant = GgufChoice(Selector::Quant("Q4_0".into()));
        assert_eq!(
            quant.select(&files).unwrap(),
            ["README.md", "config.json", "m-Q4_0.gguf", "tokenizer.json"]
        );
        let file = GgufChoice(Selector::File("m-Q8_0.gguf".into()));
        assert!(file.select(&files).unwrap().contains(&"m-Q8_0.gguf"));
        let none = GgufChoice(Selector::Quant("Q9_X".into()));
        assert_eq!(
            none.select(&files).unwrap_err(),
            ["m-Q4_0.gguf", "m-Q8_0.gguf"]
        );
    }

    fn p(allow: &[&str], ignore: &[&str]) -> Patterns {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Patterns::new(&s(allow), &s(ignore)).unwrap()
    }

    #[test]
    fn huggingface_hub_glob_semantics() {
        let files = [
            "config.json",
            "model.safetensors",
            "onnx/model.onnx",
            "tokenizer.json",
            "sub/dir/a.json",
        ];
        let selected = |p: &Patterns| {
            files
                .iter()
                .filter(|f| p.selects(f))
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(selected(&p(&[], &[])), files);
        assert_eq!(
            selected(&p(&["*.json"], &[])),
            ["config.json", "tokenizer.json", "sub/dir/a.json"]
        );
        assert_eq!(
            selected(&p(&[], &["onnx/"])),
            [
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "sub/dir/a.json"
            ]
        );
        assert_eq!(
            selected(&p(&["*.json", "*.safetensors"], &["sub/*"])),
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
        assert_eq!(
            selected(&p(&["model.safetens?rs"], &[])),
            ["model.safetensors"]
        );
    }

    #[test]
    fn bad_patterns_name_the_field() {
        let err = Patterns::new(&["[".into()], &[]).unwrap_err();
        assert_eq!(err.0, "allow_patterns");
        assert!(err.1.contains("`allow_patterns[0]`"), "{}", err.1);
    }
}
