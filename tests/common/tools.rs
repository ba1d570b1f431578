//! External tools some tests drive (Python's grpcio, grpcurl), installed into a virtual
//! environment by `scripts/test.sh`. Where the environment is missing the test is skipped with a
//! message, unless LMX_REQUIRE_TOOLS=1 (set by scripts/test.sh and so by CI), where it fails.

use std::path::PathBuf;

/// The test virtual environment: LMX_TEST_VENV, else `.venv` in the repository.
pub fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("LMX_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo_root().join(".venv"));
    if dir.join("bin/python").exists() {
        return Some(dir);
    }
    let required = std::env::var("LMX_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LMX_REQUIRE_TOOLS=1 but no test virtualenv at {}; run scripts/test.sh",
        dir.display()
    );
    eprintln!(
        "skipped: no test virtualenv at {} (scripts/test.sh creates it)",
        dir.display()
    );
    None
}
