//! Whole-folder tests of every validation rule, over plain folders and HF cache snapshots built
//! by `crate::testing`.

use std::{fs, path::Path};

use super::*;
use crate::testing::{self, RepoFiles};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn kinds(report: &Report) -> Vec<(ProblemKind, Severity, String)> {
    report
        .problems
        .iter()
        .map(|p| (p.kind, p.severity, p.file.clone()))
        .collect()
}

fn errors(report: &Report) -> Vec<(ProblemKind, &str)> {
    report.errors().map(|p| (p.kind, p.file.as_str())).collect()
}

fn cache_snapshot(dir: &Path, files: &RepoFiles) -> std::path::PathBuf {
    testing::write_hf_cache(dir, "org/model", COMMIT, Some("main"), files)
}

fn plain(dir: &Path, files: &RepoFiles) -> std::path::PathBuf {
    let root = dir.join("model");
    testing::write_plain(&root, files);
    root
}

/// Table of rules: a repository edit, where it is written, and the errors expected.
#[test]
fn rules_table() {
    use ProblemKind::*;
    type Edit = fn(&mut RepoFiles);
    struct Case {
        name: &'static str,
        files: fn() -> RepoFiles,
        edit: Edit,
        want: &'static [(ProblemKind, &'static str)],
    }
    let st5 = || testing::sharded_safetensors_repo(5, 16);
    let cases: Vec<Case> = vec![
        Case {
            name: "valid sharded safetensors",
            files: st5,
            edit: |_| {},
            want: &[],
        },
        Case {
            name: "pytorch index whose referenced shard is missing",
            files: || testing::sharded_pytorch_repo(3),
            edit: |f| {
                f.remove("pytorch_model-00002-of-00003.bin");
            },
            // The index names the file: reported once, as MISSING_INDEXED_FILE.
            want: &[(MissingIndexedFile, "pytorch_model-00002-of-00003.bin")],
        },
        Case {
            name: "safetensors index with 2 of 5 files missing",
            files: st5,
            edit: |f| {
                f.remove("model-00002-of-00005.safetensors");
                f.remove("model-00004-of-00005.safetensors");
            },
            want: &[
                (MissingIndexedFile, "model-00002-of-00005.safetensors"),
                (MissingIndexedFile, "model-00004-of-00005.safetensors"),
            ],
        },
        Case {
            name: "shard totals that disagree",
            files: || testing::sharded_safetensors_repo(3, 16),
            edit: |f| {
                f.remove("model.safetensors.index.json");
                let shard = f.remove("model-00003-of-00003.safetensors").unwrap();
                f.insert("model-00003-of-00004.safetensors", shard);
            },
            want: &[(ShardTotalMismatch, "model-00003-of-00004.safetensors")],
        },
        Case {
            name: "shard set with a gap and no index",
            files: st5,
            edit: |f| {
                f.remove("model.safetensors.index.json");
                f.remove("model-00003-of-00005.safetensors");
            },
            want: &[(MissingShard, "model-00003-of-00005.safetensors")],
        },
        Case {
            name: "safetensors file cut 1 byte short",
            files: st5,
            edit: |f| {
                let shard = f.0.get_mut("model-00001-of-00005.safetensors").unwrap();
                shard.pop();
            },
            want: &[(TruncatedFile, "model-00001-of-00005.safetensors")],
        },
        Case {
            name: "garbage header",
            files: st5,
            edit: |f| {
                let mut garbage = 12u64.to_le_bytes().to_vec();
                garbage.extend_from_slice(b"{not json!!}");
                f.insert("model-00005-of-00005.safetensors", garbage);
            },
            want: &[(InvalidHeader, "model-00005-of-00005.safetensors")],
        },
        Case {
            name: "index maps tensors to a shard that lacks them",
            files: || testing::sharded_safetensors_repo(2, 16),
            edit: |f| {
                let other = testing::safetensors_file(&[("unrelated".into(), 4)], 9);
                f.insert("model-00002-of-00002.safetensors", other);
            },
            want: &[(InvalidHeader, "model-00002-of-00002.safetensors")],
        },
        Case {
            name: "unreadable index",
            files: st5,
            edit: |f| {
                f.insert(
                    "model.safetensors.index.json",
                    b"{\"weight_map\": {}}".to_vec(),
                )
            },
            want: &[(IndexUnreadable, "model.safetensors.index.json")],
        },
        Case {
            name: "index referencing a path outside the snapshot",
            files: || testing::sharded_safetensors_repo(1, 4),
            edit: |f| {
                let index = br#"{"weight_map":{"layers.1.a":"model-00001-of-00001.safetensors","layers.1.b":"../../../etc/passwd"}}"#;
                f.insert("model.safetensors.index.json", index.to_vec());
            },
            want: &[(UnsafePath, "model.safetensors.index.json")],
        },
        Case {
            name: "no weights",
            files: st5,
            edit: |f| f.0.retain(|k, _| !k.contains("safetensors")),
            want: &[(NoWeights, "")],
        },
        Case {
            name: "config missing",
            files: st5,
            edit: |f| {
                f.remove("config.json");
            },
            want: &[(MissingConfig, "config.json")],
        },
        Case {
            name: "config cut short",
            files: st5,
            edit: |f| f.insert("config.json", b"{\"model_type\": \"lla".to_vec()),
            want: &[(MissingConfig, "config.json")],
        },
        Case {
            name: "tokenizer missing",
            files: st5,
            edit: |f| {
                f.remove("tokenizer.json");
            },
            want: &[(MissingTokenizer, "tokenizer.json")],
        },
        Case {
            name: "gguf with tokenizer metadata needs neither config nor tokenizer.json",
            files: || {
                let mut f = RepoFiles::default();
                f.insert("model.Q8_0.gguf", testing::gguf_file(true));
                f
            },
            edit: |_| {},
            want: &[],
        },
        Case {
            name: "gguf without tokenizer",
            files: || {
                let mut f = RepoFiles::default();
                f.insert("model.Q8_0.gguf", testing::gguf_file(false));
                f
            },
            edit: |_| {},
            want: &[(MissingTokenizer, "tokenizer.json")],
        },
        Case {
            name: "gguf truncated",
            files: || {
                let mut f = RepoFiles::default();
                let mut g = testing::gguf_file(true);
                g.truncate(g.len() - 40);
                f.insert("model.gguf", g);
                f
            },
            edit: |_| {},
            want: &[(TruncatedFile, "model.gguf")],
        },
        Case {
            name: "pytorch shard cut short",
            files: || testing::sharded_pytorch_repo(2),
            edit: |f| {
                let shard = f.0.get_mut("pytorch_model-00001-of-00002.bin").unwrap();
                shard.truncate(shard.len() - 5);
            },
            want: &[(TruncatedFile, "pytorch_model-00001-of-00002.bin")],
        },
        Case {
            name: "other JSON files must parse too",
            files: st5,
            edit: |f| f.insert("generation_config.json", b"{\"eos\": [1,".to_vec()),
            want: &[(TruncatedFile, "generation_config.json")],
        },
    ];

    for case in cases {
        let mut files = (case.files)();
        (case.edit)(&mut files);
        for layout in ["plain", "cache"] {
            let dir = tempfile::tempdir().unwrap();
            let root = if layout == "plain" {
                plain(dir.path(), &files)
            } else {
                cache_snapshot(dir.path(), &files)
            };
            let report = verify(&root, Mode::Quick).unwrap();
            let mut got = errors(&report);
            got.sort();
            let mut want = case.want.to_vec();
            want.sort();
            assert_eq!(
                got, want,
                "{} ({layout}): {:#?}",
                case.name, report.problems
            );
            assert_eq!(report.complete, want.is_empty(), "{}", case.name);
            // Every problem names what was expected and what was found.
            assert!(report.problems.iter().all(|p| !p.detail.is_empty()));
        }
    }
}

#[test]
fn missing_indexed_files_are_counted_in_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = testing::sharded_safetensors_repo(5, 8);
    files.remove("model-00002-of-00005.safetensors");
    files.remove("model-00004-of-00005.safetensors");
    let report = verify(&cache_snapshot(dir.path(), &files), Mode::Quick).unwrap();
    assert!(
        report
            .summary
            .contains("2 of 5 files referenced by model.safetensors.index.json are missing"),
        "{}",
        report.summary
    );
    let truncated = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::MissingIndexedFile)
        .unwrap();
    assert!(
        truncated.detail.contains("maps 2 tensors"),
        "{}",
        truncated.detail
    );
}

#[test]
fn truncation_detail_names_expected_and_actual_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = testing::sharded_safetensors_repo(1, 8);
    let shard = files.0.get_mut("model-00001-of-00001.safetensors").unwrap();
    let full = shard.len();
    shard.pop();
    let report = verify(&plain(dir.path(), &files), Mode::Quick).unwrap();
    let p = &report.problems[0];
    assert_eq!(p.kind, ProblemKind::TruncatedFile);
    assert!(
        p.detail.contains(&format!("expected {full} bytes")),
        "{}",
        p.detail
    );
    assert!(
        p.detail.contains(&format!("found {}", full - 1)),
        "{}",
        p.detail
    );
}

#[test]
fn valid_sharded_snapshot_passes_quick_and_full() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(4, 1000);
    let root = cache_snapshot(dir.path(), &files);
    let quick = is_snapshot_complete(&root).unwrap();
    assert!(quick.problems.is_empty(), "{:?}", quick.problems);
    assert_eq!(quick.format, Some(WeightFormat::Safetensors));
    assert_eq!(quick.architecture.as_deref(), Some("llama"));
    assert_eq!(quick.files_checked, 7);
    let full = verify(&root, Mode::Full).unwrap();
    assert!(full.complete, "{:?}", full.problems);
    assert_eq!(full.bytes_hashed, files.size());
}

#[test]
fn dangling_blob_link_is_a_broken_link() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(2, 8);
    let root = cache_snapshot(dir.path(), &files);
    fs::remove_file(testing::blob_of(&root, "model-00002-of-00002.safetensors")).unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert_eq!(
        errors(&report),
        [(ProblemKind::BrokenLink, "model-00002-of-00002.safetensors")],
        "{:#?}",
        report.problems
    );
    assert!(report.problems[0].detail.contains("is missing"));
}

#[test]
fn links_leaving_the_cache_are_unsafe_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(1, 8);
    let root = cache_snapshot(dir.path(), &files);
    let outside = dir
        .path()
        .parent()
        .unwrap()
        .join(format!("lmx-outside-{}", std::process::id()));
    fs::write(&outside, b"secret").unwrap();
    let link = root.join("tokenizer.json");
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let report = verify(&root, Mode::Full).unwrap();
    fs::remove_file(&outside).unwrap();
    let unsafe_paths: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::UnsafePath)
        .collect();
    assert_eq!(unsafe_paths.len(), 1, "{:#?}", report.problems);
    assert_eq!(unsafe_paths[0].file, "tokenizer.json");
}

#[test]
fn symlink_loops_are_problems_not_hangs() {
    // Cache layout: a link that points at itself.
    let dir = tempfile::tempdir().unwrap();
    let root = cache_snapshot(dir.path(), &testing::sharded_safetensors_repo(1, 8));
    std::os::unix::fs::symlink("loop.json", root.join("loop.json")).unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::BrokenLink && p.file == "loop.json"),
        "{:#?}",
        report.problems
    );

    // Plain folder: a directory link back to its ancestor, and a self link.
    let dir = tempfile::tempdir().unwrap();
    let root = plain(dir.path(), &testing::sharded_safetensors_repo(1, 8));
    fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink(&root, root.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("self.json", root.join("self.json")).unwrap();
    let report = verify(&root, Mode::Full).unwrap();
    let broken: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::BrokenLink)
        .map(|p| p.file.as_str())
        .collect();
    assert_eq!(broken, ["self.json", "sub/up"], "{:#?}", report.problems);
}

#[test]
fn fifos_and_other_special_files_are_skipped_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let root = plain(dir.path(), &testing::sharded_safetensors_repo(1, 8));
    let status = std::process::Command::new("mkfifo")
        .arg(root.join("model-extra.safetensors"))
        .status()
        .unwrap();
    assert!(status.success());
    let report = verify(&root, Mode::Full).unwrap();
    assert!(report.complete, "{:#?}", report.problems);
}

#[test]
fn unreadable_files_are_problems() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = plain(dir.path(), &testing::sharded_safetensors_repo(1, 8));
    let shard = root.join("model-00001-of-00001.safetensors");
    fs::set_permissions(&shard, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::File::open(&shard).is_ok() {
        eprintln!("skipped: running as root, permissions do not restrict reads");
        return;
    }
    let report = verify(&root, Mode::Quick).unwrap();
    assert_eq!(
        errors(&report),
        [(ProblemKind::Unreadable, "model-00001-of-00001.safetensors")]
    );
}

#[test]
fn leftover_partials_are_errors_unless_the_complete_blob_exists() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(2, 8);
    let root = cache_snapshot(dir.path(), &files);
    let blobs = root.parent().unwrap().parent().unwrap().join("blobs");

    // huggingface_hub's partial of a blob that also exists: a warning.
    let done = testing::blob_of(&root, "model-00001-of-00002.safetensors");
    let done_name = done.file_name().unwrap().to_string_lossy().into_owned();
    fs::write(blobs.join(format!("{done_name}.incomplete")), b"xx").unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert!(report.complete);
    assert_eq!(
        kinds(&report),
        [(
            ProblemKind::IncompleteFilePresent,
            Severity::Warning,
            format!("blobs/{done_name}.incomplete")
        )]
    );

    // A partial whose blob is missing: an error.
    fs::write(blobs.join(format!("{}.incomplete", "e".repeat(64))), b"xx").unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert!(!report.complete);
    assert_eq!(
        errors(&report),
        [(
            ProblemKind::IncompleteFilePresent,
            format!("blobs/{}.incomplete", "e".repeat(64)).as_str()
        )]
    );
}

#[test]
fn lmx_partials_of_another_commit_do_not_spoil_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let root = cache_snapshot(dir.path(), &testing::sharded_safetensors_repo(1, 8));
    let blobs = root.parent().unwrap().parent().unwrap().join("blobs");
    let name = "f".repeat(64);
    fs::write(blobs.join(format!("{name}.lmxpart")), b"part").unwrap();
    let meta = |commit: &str| partial::PartialMeta {
        repo: "org/model".into(),
        commit: commit.into(),
        path: "model.safetensors".into(),
        size: 100,
        sha256: Some(name.clone()),
    };
    let sidecar = blobs.join(format!("{name}.lmxpart.json"));
    fs::write(
        &sidecar,
        serde_json::to_vec(&meta(&"9".repeat(40))).unwrap(),
    )
    .unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert!(report.complete, "{:#?}", report.problems);
    assert_eq!(report.problems[0].severity, Severity::Warning);
    assert!(report.problems[0].detail.contains("another commit"));

    fs::write(&sidecar, serde_json::to_vec(&meta(COMMIT)).unwrap()).unwrap();
    let report = verify(&root, Mode::Quick).unwrap();
    assert!(!report.complete);
    assert!(
        report.problems[0].detail.contains("4 of 100 bytes"),
        "{}",
        report.problems[0].detail
    );
}

#[test]
fn partial_files_in_a_plain_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = testing::sharded_safetensors_repo(1, 8);
    let shard = files.remove("model-00001-of-00001.safetensors").unwrap();
    files.insert(
        "model-00001-of-00001.safetensors.part",
        shard[..10].to_vec(),
    );
    let report = verify(&plain(dir.path(), &files), Mode::Quick).unwrap();
    let got = errors(&report);
    assert!(got.contains(&(
        ProblemKind::IncompleteFilePresent,
        "model-00001-of-00001.safetensors.part"
    )));
    assert!(got.contains(&(
        ProblemKind::MissingIndexedFile,
        "model-00001-of-00001.safetensors"
    )));
}

#[test]
fn full_mode_detects_wrong_bytes_of_the_same_size() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(2, 64);
    let root = cache_snapshot(dir.path(), &files);
    // Flip one byte of tensor data in an LFS blob (sha256 name) and in a small file (git sha1).
    let blob = testing::blob_of(&root, "model-00002-of-00002.safetensors");
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let config = testing::blob_of(&root, "config.json");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("llama", "LLAMA");
    fs::write(&config, text).unwrap();

    assert!(
        verify(&root, Mode::Quick).unwrap().complete,
        "QUICK reads no tensor data"
    );
    let report = verify(&root, Mode::Full).unwrap();
    assert_eq!(
        errors(&report),
        [
            (ProblemKind::ChecksumMismatch, "config.json"),
            (
                ProblemKind::ChecksumMismatch,
                "model-00002-of-00002.safetensors"
            ),
        ]
    );
    assert!(report.problems[0].detail.contains("git blob sha1"));
    assert!(report.problems[1].detail.contains("sha256"));
}

#[test]
fn full_mode_in_a_plain_folder_uses_hashes_recorded_at_download_time() {
    let dir = tempfile::tempdir().unwrap();
    let files = testing::sharded_safetensors_repo(1, 64);
    let root = plain(dir.path(), &files);
    let name = "model-00001-of-00001.safetensors";
    let meta_dir = root.join(".cache/huggingface/download");
    fs::create_dir_all(&meta_dir).unwrap();
    let record = |etag: &str| {
        fs::write(
            meta_dir.join(format!("{name}.metadata")),
            format!("{COMMIT}\n{etag}\n1700000000.0\n"),
        )
        .unwrap()
    };

    record(&testing::etag(name, &files.0[name]));
    let report = verify(&root, Mode::Full).unwrap();
    assert!(report.complete, "{:#?}", report.problems);
    assert_eq!(report.bytes_hashed, files.0[name].len() as u64);

    record(&"0".repeat(64));
    let report = verify(&root, Mode::Full).unwrap();
    assert_eq!(errors(&report), [(ProblemKind::ChecksumMismatch, name)]);
}

#[test]
fn unusable_roots_are_errors_not_reports() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        verify(&dir.path().join("nope"), Mode::Quick),
        Err(SnapshotError::NotFound(_))
    ));
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        verify(&file, Mode::Quick),
        Err(SnapshotError::NotADirectory(_))
    ));
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    match is_snapshot_complete(&empty) {
        Err(SnapshotError::Incomplete(report)) => {
            assert!(report
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::NoWeights))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn reports_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = testing::sharded_safetensors_repo(6, 8);
    for k in [2, 3, 5] {
        files.remove(&format!("model-{k:05}-of-00006.safetensors"));
    }
    files.remove("tokenizer.json");
    let root = cache_snapshot(dir.path(), &files);
    let a = verify(&root, Mode::Full).unwrap();
    let b = verify(&root, Mode::Full).unwrap();
    assert_eq!(a.problems, b.problems);
    assert_eq!(a.summary, b.summary);
    let mut sorted = a.problems.clone();
    sorted.sort_by(|x, y| (&x.file, x.kind, &x.detail).cmp(&(&y.file, y.kind, &y.detail)));
    assert_eq!(sorted, a.problems);
}
