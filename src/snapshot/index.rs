//! Index files (`model.safetensors.index.json`, `pytorch_model.bin.index.json`, any
//! `*.index.json` beside the weights): they must parse, carry a non-empty `weight_map`, reference
//! only safe relative paths, and every file they reference must be present.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path},
};

use super::{
    report::{Problem, ProblemKind},
    tree::Tree,
};

/// Index files larger than this are not read (real ones are well under 1 MiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// A parsed index: referenced file → tensors mapped to it.
#[derive(Debug, Clone)]
pub(crate) struct Index {
    /// The index file's name.
    pub name: String,
    /// Referenced file (relative to the snapshot) → tensor names.
    pub files: BTreeMap<String, Vec<String>>,
}

/// Checks every index file at the top of the snapshot. Returns the indexes that parsed; pushes
/// problems and summary notes.
pub(crate) fn check(
    tree: &Tree,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) -> Vec<Index> {
    let mut indexes = Vec::new();
    for (name, entry) in tree.top_level() {
        if !name.ends_with(".index.json") {
            continue;
        }
        let bytes = match read_bounded(&entry.path, entry.size) {
            Ok(bytes) => bytes,
            Err(detail) => {
                problems.push(Problem::error(ProblemKind::IndexUnreadable, name, detail));
                continue;
            }
        };
        match parse(&bytes) {
            Ok(weight_map) => {
                let index = resolve(tree, name, weight_map, problems, notes);
                indexes.push(index);
            }
            Err(detail) => {
                problems.push(Problem::error(ProblemKind::IndexUnreadable, name, detail))
            }
        }
    }
    indexes
}

fn read_bounded(path: &Path, size: u64) -> Result<Vec<u8>, String> {
    if size > MAX_INDEX_BYTES {
        return Err(format!(
            "the index has {size} bytes, more than the {MAX_INDEX_BYTES}-byte limit for index files"
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read the index: {e}"))
}

/// Parses index bytes into tensor → file. Any malformed input is an error message, never a panic.
pub(crate) fn parse(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(map) = value.get("weight_map") else {
        return Err("no \"weight_map\" object".to_owned());
    };
    let Some(map) = map.as_object() else {
        return Err(format!(
            "\"weight_map\" is not an object but {}",
            json_kind(map)
        ));
    };
    if map.is_empty() {
        return Err("\"weight_map\" is empty: it maps no tensor to a file".to_owned());
    }
    let mut out = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(format!(
                "\"weight_map\" maps tensor {tensor:?} to {} instead of a file name",
                json_kind(file)
            ));
        };
        out.insert(tensor.clone(), file.to_owned());
    }
    Ok(out)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Why a referenced name is unsafe, if it is: absolute, `..`, or anything but plain components.
pub(crate) fn unsafe_reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name.starts_with('/') || name.starts_with('\\') || Path::new(name).is_absolute() {
        return Some("is an absolute path");
    }
    if name.contains('\\') || name.contains('\0') {
        return Some("contains a backslash or NUL character");
    }
    for component in Path::new(name).components() {
        match component {
            Component::Normal(_) => {}
            Component::ParentDir => return Some("contains \"..\""),
            _ => return Some("is not a plain relative path"),
        }
    }
    None
}

fn resolve(
    tree: &Tree,
    name: &str,
    weight_map: BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) -> Index {
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in weight_map {
        files.entry(file).or_default().push(tensor);
    }
    let mut missing = BTreeSet::new();
    let mut safe = BTreeMap::new();
    for (file, tensors) in files {
        if let Some(reason) = unsafe_reason(&file) {
            problems.push(Problem::error(
                ProblemKind::UnsafePath,
                name,
                format!("the index references {file:?}, which {reason}"),
            ));
            continue;
        }
        if !tree.files.contains_key(&file) {
            // A broken or unsafe link was already reported for this path: count it, once.
            let reported = tree.problems.iter().any(|p| p.file == file);
            missing.insert(file.clone());
            if reported {
                safe.insert(file, tensors);
                continue;
            }
            problems.push(Problem::error(
                ProblemKind::MissingIndexedFile,
                &file,
                format!(
                    "{name} maps {} to this file (e.g. {}), but it is missing",
                    plural_tensors(tensors.len()),
                    tensors[0]
                ),
            ));
        }
        safe.insert(file, tensors);
    }
    if !missing.is_empty() {
        notes.push(format!(
            "{} of {} files referenced by {name} are missing",
            missing.len(),
            safe.len()
        ));
    }
    Index {
        name: name.to_owned(),
        files: safe,
    }
}

fn plural_tensors(n: usize) -> String {
    if n == 1 {
        "1 tensor".to_owned()
    } else {
        format!("{n} tensors")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_malformed_indexes_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("{", "not valid JSON"),
            ("[]", "no \"weight_map\""),
            (r#"{"weight_map": []}"#, "is not an object but an array"),
            (r#"{"weight_map": {}}"#, "is empty"),
            (
                r#"{"weight_map": {"a": 3}}"#,
                "to a number instead of a file name",
            ),
        ];
        for (input, want) in cases {
            let err = parse(input.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{input}: {err}");
        }
        let ok = parse(br#"{"metadata":{},"weight_map":{"a":"x.safetensors"}}"#).unwrap();
        assert_eq!(ok["a"], "x.safetensors");
    }

    #[test]
    fn unsafe_names_are_recognised() {
        let cases = [
            ("model-00001-of-00002.safetensors", None),
            ("sub/model.safetensors", None),
            ("/etc/passwd", Some("is an absolute path")),
            ("../other/model.safetensors", Some("contains \"..\"")),
            ("a/../../b", Some("contains \"..\"")),
            ("a\\b", Some("contains a backslash or NUL character")),
            ("", Some("is empty")),
        ];
        for (name, want) in cases {
            assert_eq!(unsafe_reason(name), want, "{name}");
        }
    }
}
