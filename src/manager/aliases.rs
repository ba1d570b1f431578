//! Model aliases: short names (`--alias NAME=REFERENCE`, `LoadModel.alias`) that every RPC
//! accepts in place of a model reference. Resolved at the edge of each call, before the name
//! reaches the registry, the cache or the downloads; an alias never shadows a reference,
//! because an alias name has no `/` and every repository id and folder path does.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use super::{models::ModelKey, ManagerError};

/// What an alias names: a model reference and its revision (normalized as [`ModelKey`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub model_id: String,
    pub revision: String,
}

/// The alias table. Cheap to clone; shared by every API.
#[derive(Debug, Clone, Default)]
pub struct Aliases(Arc<RwLock<BTreeMap<String, Target>>>);

/// Checks an alias name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), ManagerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManagerError::InvalidArgument {
            field: "alias",
            message: format!(
                "alias {name:?} is not valid: use 1 to 64 letters, digits, '.', '_' or '-' \
                 (no '/': that would read as a repository id), not starting with '.' or '-'"
            ),
        })
    }
}

/// Splits `NAME=REFERENCE` (`REFERENCE` in the grammar of [`super::reference`]: `org/name`,
/// `org/name@revision`, `org/name:Q4_K_M`, ... or a folder path).
pub fn parse_flag(flag: &str) -> Result<(String, Target), String> {
    let (name, reference) = flag
        .split_once('=')
        .ok_or_else(|| format!("--alias {flag:?}: expected NAME=REFERENCE"))?;
    validate_name(name).map_err(|e| format!("--alias {flag:?}: {e}"))?;
    if reference.is_empty() {
        return Err(format!("--alias {flag:?}: the reference is empty"));
    }
    let (model_id, revision) =
        super::reference::normalize(reference, "").map_err(|e| format!("--alias {flag:?}: {e}"))?;
    Ok((name.to_owned(), target(&model_id, &revision)))
}

fn target(model_id: &str, revision: &str) -> Target {
    let key = ModelKey::new(model_id, revision);
    Target {
        model_id: key.model_id,
        revision: key.revision,
    }
}

impl Aliases {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Target>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Points `name` at `model_id` + `revision` (replacing what it named before).
    pub fn set(&self, name: &str, model_id: &str, revision: &str) -> Result<(), ManagerError> {
        validate_name(name)?;
        let target = target(model_id, revision);
        tracing::info!(alias = %name, model = %target.model_id, revision = %target.revision, "alias set");
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), target);
        Ok(())
    }

    /// The reference a request names: its alias's target, or itself. An alias already names a
    /// revision, so a request may not add one.
    pub fn resolve(
        &self,
        model_id: &str,
        revision: &str,
    ) -> Result<(String, String), ManagerError> {
        match self.read().get(model_id) {
            None => Ok(super::reference::normalize(model_id, revision)?),
            Some(_) if !revision.is_empty() => Err(ManagerError::InvalidArgument {
                field: "revision",
                message: format!(
                    "{model_id} is an alias, which names its revision; leave `revision` empty"
                ),
            }),
            Some(t) => Ok((t.model_id.clone(), t.revision.clone())),
        }
    }

    /// The aliases of `model_id` at `revision` (any of `revisions`, for a snapshot known by
    /// its refs and commit), sorted.
    pub fn names_for(&self, model_id: &str, revisions: &[&str]) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, t)| t.model_id == model_id && revisions.contains(&t.revision.as_str()))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_flags() {
        for good in ["smol", "llama3.2-1b", "a_b", "X"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "org/name", "-x", ".x", "a b", "a:b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let (name, t) = parse_flag("smol=org/model@v1").unwrap();
        assert_eq!(name, "smol");
        assert_eq!(t.model_id, "org/model");
        assert_eq!(t.revision, "v1");
        assert_eq!(parse_flag("smol=org/model").unwrap().1.revision, "main");
        assert_eq!(parse_flag("f=/models/x").unwrap().1.revision, "");
        assert!(parse_flag("smol").is_err());
        assert!(parse_flag("smol=").is_err());
        assert!(parse_flag("a/b=org/model").is_err());
    }

    #[test]
    fn resolves_and_lists() {
        let aliases = Aliases::default();
        aliases.set("smol", "org/model", "").unwrap();
        assert_eq!(
            aliases.resolve("smol", "").unwrap(),
            ("org/model".to_owned(), "main".to_owned())
        );
        assert!(aliases.resolve("smol", "v2").is_err());
        assert_eq!(
            aliases.resolve("org/other", "v2").unwrap(),
            ("org/other".to_owned(), "v2".to_owned())
        );
        assert_eq!(aliases.names_for("org/model", &["main"]), ["smol"]);
        assert!(aliases.names_for("org/model", &["v2"]).is_empty());
    }
}
