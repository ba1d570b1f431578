//! Model references: the one grammar that names a model, parsed here and nowhere else. The API's
//! `model_id` (every RPC), `--load`, `--alias` targets and the CLI's model arguments all go
//! through [`normalize`] or [`split`].
//!
//! ```text
//! reference = folder | repo [ "/" file ] [ "@" revision ] [ ":" quant ]
//! folder    = an absolute path on the server ("/models/x"), taken as it is
//! repo      = "org/name" | "name"
//! file      = a GGUF file of the repository ("org/name/sub/model-Q8_0.gguf"): the path after
//!             org/name, ending in ".gguf" (needs the org/name form)
//! revision  = a branch, tag or commit ("main", "v1.0", "refs/pr/1", a 40-hex sha)
//! quant     = a GGUF quantization type, case-insensitive ("Q4_K_M", "q8_0", "F16")
//! ```
//!
//! Examples: `org/name`, `org/name@v1`, `org/name:Q4_K_M`, `org/name@v1:Q4_K_M`,
//! `org/name/model-Q8_0.gguf@v1`. A file and a quant together are refused. `:` cannot occur in a
//! repository id or in a git ref name, so the quant after the revision is unambiguous.
//!
//! The canonical form of a reference, [`Reference::model_id`], is the repository plus its
//! selector with the quant upper-cased (`org/name:Q4_K_M`, `org/name/file.gguf`); the revision
//! travels beside it, as everywhere else.

use super::cache::{self, CacheError};

/// Which GGUF file of a repository a reference names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A quantization type, upper case (`Q4_K_M`).
    Quant(String),
    /// A file path inside the repository (`model-Q8_0.gguf`).
    File(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Quant(q) => write!(f, ":{q}"),
            Self::File(path) => write!(f, "/{path}"),
        }
    }
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The repository id, or the folder path.
    pub repo: String,
    /// The revision the reference names; None when it names none.
    pub revision: Option<String>,
    pub selector: Option<Selector>,
}

fn invalid(value: &str, reason: impl Into<String>) -> CacheError {
    CacheError::InvalidModelId {
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a quant selector: 2 to 16 letters, digits and '_', starting with a letter.
fn validate_quant(text: &str, quant: &str) -> Result<String, CacheError> {
    let ok = (2..=16).contains(&quant.len())
        && quant.starts_with(|c: char| c.is_ascii_alphabetic())
        && quant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(quant.to_ascii_uppercase())
    } else {
        Err(invalid(
            text,
            format!(
                "the quant selector {quant:?} (after ':') must be a GGUF quantization type \
                 such as Q4_K_M or Q8_0"
            ),
        ))
    }
}

fn validate_file(text: &str, file: &str) -> Result<(), CacheError> {
    if let Some(reason) = crate::snapshot::unsafe_path_reason(file) {
        return Err(invalid(
            text,
            format!("the file selector {file:?} is not a safe path: {reason}"),
        ));
    }
    if file.split('/').any(str::is_empty) {
        return Err(invalid(
            text,
            format!("the file selector {file:?} has an empty path segment"),
        ));
    }
    Ok(())
}

impl Reference {
    /// Parses `text`; see the module docs. Names the bad part when it fails.
    pub fn parse(text: &str) -> Result<Self, CacheError> {
        if text.starts_with('/') {
            // A folder: validated (and admitted) by the cache.
            return Ok(Self {
                repo: text.to_owned(),
                revision: None,
                selector: None,
            });
        }
        if text.is_empty() {
            return Err(invalid(text, "must not be empty"));
        }
        let (rest, quant) = match text.split_once(':') {
            Some((rest, quant)) => (rest, Some(validate_quant(text, quant)?)),
            None => (text, None),
        };
        let (path, revision) = match rest.split_once('@') {
            Some((path, revision)) => {
                if revision.is_empty() {
                    return Err(CacheError::InvalidRevision {
                        value: revision.to_owned(),
                        reason: format!("the revision after '@' in {text:?} is empty"),
                    });
                }
                cache::validate_revision(revision)?;
                (path, Some(revision.to_owned()))
            }
            None => (rest, None),
        };
        let segments: Vec<&str> = path.split('/').collect();
        let (repo, file) = if segments.len() > 2 {
            let file = segments[2..].join("/");
            if !file.to_ascii_lowercase().ends_with(".gguf") {
                return Err(invalid(
                    text,
                    format!(
                        "{path:?} has more than org/name; a path after org/name selects a GGUF \
                         file and must end in \".gguf\" (given {file:?})"
                    ),
                ));
            }
            validate_file(text, &file)?;
            (segments[..2].join("/"), Some(file))
        } else {
            (path.to_owned(), None)
        };
        cache::validate_repo_id(&repo)?;
        let selector = match (file, quant) {
            (Some(file), Some(quant)) => {
                return Err(invalid(
                    text,
                    format!("give a GGUF file ({file:?}) or a quant (:{quant}), not both"),
                ))
            }
            (Some(file), None) => Some(Selector::File(file)),
            (None, Some(quant)) => Some(Selector::Quant(quant)),
            (None, None) => None,
        };
        Ok(Self {
            repo,
            revision,
            selector,
        })
    }

    /// The canonical model id: the repository (or folder) and its selector, no revision.
    pub fn model_id(&self) -> String {
        match &self.selector {
            Some(s) => format!("{}{s}", self.repo),
            None => self.repo.clone(),
        }
    }
}

/// A request's `model_id` and `revision` in canonical form: a revision written in the reference
/// (`org/name@v1`) moves to the revision, which must then be empty or the same.
pub fn normalize(model_id: &str, revision: &str) -> Result<(String, String), CacheError> {
    let reference = Reference::parse(model_id)?;
    let revision = match reference.revision.as_deref() {
        Some(named) if !revision.is_empty() && revision != named => {
            return Err(CacheError::InvalidRevision {
                value: revision.to_owned(),
                reason: format!(
                    "`model_id` {model_id:?} names revision {named:?}; leave `revision` empty \
                     or give the same"
                ),
            })
        }
        Some(named) => named.to_owned(),
        None => revision.to_owned(),
    };
    Ok((reference.model_id(), revision))
}

/// [`normalize`] for flags and CLI arguments that carry no separate revision: what fails to
/// parse is kept as it is, for the call that uses it to refuse with its own message.
pub fn split(spec: &str) -> (String, String) {
    normalize(spec, "").unwrap_or_else(|_| (spec.to_owned(), String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Option<Selector> {
        Some(Selector::Quant(s.into()))
    }

    #[test]
    fn the_grammar() {
        let table: &[(&str, &str, Option<&str>, Option<Selector>)] = &[
            ("org/name", "org/name", None, None),
            ("name", "name", None, None),
            ("org/name@v1", "org/name", Some("v1"), None),
            ("org/name@refs/pr/1", "org/name", Some("refs/pr/1"), None),
            ("org/name:q4_k_m", "org/name", None, q("Q4_K_M")),
            ("org/name@v1:Q8_0", "org/name", Some("v1"), q("Q8_0")),
            (
                "org/name/model-Q8_0.gguf",
                "org/name",
                None,
                Some(Selector::File("model-Q8_0.gguf".into())),
            ),
            (
                "org/name/sub/m.gguf@main",
                "org/name",
                Some("main"),
                Some(Selector::File("sub/m.gguf".into())),
            ),
            ("/models/x@y:z", "/models/x@y:z", None, None),
        ];
        for (text, repo, revision, selector) in table {
            let r = Reference::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.repo, *repo, "{text}");
            assert_eq!(r.revision.as_deref(), *revision, "{text}");
            assert_eq!(&r.selector, selector, "{text}");
        }
        assert_eq!(
            Reference::parse("org/n:q8_0").unwrap().model_id(),
            "org/n:Q8_0"
        );
    }

    #[test]
    fn bad_references_name_the_bad_part() {
        for (text, part) in [
            ("", "empty"),
            ("org/name:", "quant selector"),
            ("org/name:Q4 K", "quant selector"),
            ("org/name@", "revision"),
            ("org/name@a/../b", "`revision`"),
            ("org/name/file.bin", "must end in \".gguf\""),
            ("org/name/../x.gguf", "file selector"),
            ("org/name/m.gguf:Q8_0", "not both"),
            ("org//name", "model_id"),
        ] {
            let err = Reference::parse(text).unwrap_err().to_string();
            assert!(err.contains(part), "{text}: {err}");
        }
    }

    #[test]
    fn normalize_moves_the_revision_and_refuses_two() {
        assert_eq!(
            normalize("org/m@v1:q4_0", "").unwrap(),
            ("org/m:Q4_0".to_owned(), "v1".to_owned())
        );
        assert_eq!(
            normalize("org/m@v1", "v1").unwrap(),
            ("org/m".to_owned(), "v1".to_owned())
        );
        assert_eq!(
            normalize("org/m", "v2").unwrap(),
            ("org/m".to_owned(), "v2".to_owned())
        );
        let err = normalize("org/m@v1", "v2").unwrap_err();
        assert!(matches!(err, CacheError::InvalidRevision { .. }), "{err}");
        assert_eq!(split("org/m@v1"), ("org/m".to_owned(), "v1".to_owned()));
        assert_eq!(split("/data/m@x"), ("/data/m@x".to_owned(), String::new()));
    }
}
