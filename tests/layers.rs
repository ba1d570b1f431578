//! The layering README promises, enforced: reads every file of src/ and fails on a module that
//! names a module above it (`crate::x`, `use crate::{x, ..}`, `lmx::x`) or a third-party crate
//! its layer must not know. Inline `#[cfg(test)]` modules and `tests.rs` files may reach further.
//!
//! The rules, top to bottom (a module may use the ones listed for it, never one above):
//!   main, lib   composition root: anything
//!   cli         pb, manager, snapshot, engine, config, telemetry (never api or server)
//!   server      api, error, manager, engine, snapshot, pb, config, telemetry
//!   api         error, manager, engine, snapshot, pb
//!   error       manager, engine, snapshot, pb
//!   manager     snapshot, engine (no tonic, prost, clap)
//!   engine      snapshot (no tonic, prost, clap, reqwest, hf_hub)
//!   snapshot    nothing (no tonic, prost, clap, reqwest, hf_hub, candle_transformers)
//!   config      manager, engine, snapshot (builds their settings from flags)
//!   telemetry   config
//! Anyone may use the neutral leaves util and secret; testing is for tests and benches.

use std::{collections::BTreeSet, path::Path};

const NEUTRAL: &[&str] = &["util", "secret"];

fn allowed(module: &str) -> Option<&'static [&'static str]> {
    Some(match module {
        "main" | "lib" | "testing" => return None,
        "cli" => &["pb", "manager", "snapshot", "engine", "config", "telemetry"],
        "server" => &[
            "api",
            "error",
            "manager",
            "engine",
            "snapshot",
            "pb",
            "config",
            "telemetry",
        ],
        "api" => &["error", "manager", "engine", "snapshot", "pb"],
        "error" => &["manager", "engine", "snapshot", "pb"],
        "manager" => &["snapshot", "engine"],
        "engine" => &["snapshot"],
        "config" => &["manager", "engine", "snapshot"],
        "telemetry" => &["config"],
        _ => &[],
    })
}

fn forbidden_crates(module: &str) -> &'static [&'static str] {
    match module {
        "manager" => &["tonic", "prost", "clap"],
        "engine" => &["tonic", "prost", "clap", "reqwest", "hf_hub"],
        "snapshot" => &[
            "tonic",
            "prost",
            "clap",
            "reqwest",
            "hf_hub",
            "candle_transformers",
        ],
        _ => &[],
    }
}

/// Identifiers that follow `prefix` in `text` (`crate::` → `x` of `crate::x`).
fn names_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = (usize, &'a str)> + 'a {
    text.match_indices(prefix).filter_map(move |(at, _)| {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            return None;
        }
        let rest = &text[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .unwrap_or(rest.len());
        (end > 0).then(|| (at, &rest[..end]))
    })
}

/// Top-level modules a `use crate::{a::b, c, ..}` group names.
fn grouped(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for prefix in ["crate::{", "lmx::{"] {
        for (at, _) in text.match_indices(prefix) {
            let mut depth = 1;
            let mut item = String::new();
            for c in text[at + prefix.len()..].chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    let name: String = item
                        .trim_start()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.push((at, name));
                    }
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else if depth == 1 {
                    item.push(c);
                }
            }
        }
    }
    out
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(src: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    for entry in walkdir::WalkDir::new(src).into_iter().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests.rs") {
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let text = match text.find("#[cfg(test)]") {
            Some(cut) => &text[..cut],
            None => &text[..],
        };
        let text = without_comments(text);
        let line = |at: usize| text[..at].matches('\n').count() + 1;
        let mut seen = BTreeSet::new();
        let named = names_after(&text, "crate::")
            .chain(names_after(&text, "lmx::"))
            .map(|(at, n)| (at, n.to_owned()))
            .chain(grouped(&text));
        if let Some(allowed) = allowed(&module) {
            for (at, other) in named {
                if other == module
                    || NEUTRAL.contains(&other.as_str())
                    || allowed.contains(&other.as_str())
                {
                    continue;
                }
                if seen.insert((line(at), other.clone())) {
                    bad.push(format!(
                        "{}:{}: {module} -> {other}",
                        rel.display(),
                        line(at)
                    ));
                }
            }
        }
        for krate in forbidden_crates(&module) {
            let needle = format!("{krate}::");
            let uses = text.match_indices(&needle).filter(|(at, _)| {
                let before = text[..*at].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            for (at, _) in uses {
                bad.push(format!(
                    "{}:{}: {module} names {krate}",
                    rel.display(),
                    line(at)
                ));
            }
        }
    }
    bad
}

#[test]
fn no_module_names_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = check(&src);
    assert!(bad.is_empty(), "upward edges:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_upward_edges() {
    let dir = tempfile::tempdir().unwrap();
    let write = |p: &str, text: &str| {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "manager/x.rs",
        "use crate::config::Secret;\nuse tonic::Status;\n",
    );
    write(
        "config.rs",
        "use crate::{\n    cli::Args,\n    engine::Limits,\n};\n",
    );
    write(
        "snapshot/y.rs",
        "// crate::engine in a comment\nfn f() {}\n#[cfg(test)]\nmod t { use crate::engine; }\n",
    );
    write(
        "api/z.rs",
        "fn f() { crate::util::error_chain(); crate::error::x(); }\n",
    );
    let mut bad = check(dir.path());
    bad.sort();
    assert_eq!(
        bad,
        [
            "config.rs:1: config -> cli",
            "manager/x.rs:1: manager -> config",
            "manager/x.rs:2: manager names tonic",
        ],
        "{bad:#?}"
    );
}
