//! Shard sets: files named `<prefix>-<K>-of-<N>.<ext>` (any prefix, any zero padding; ext
//! safetensors, bin or gguf). Within a set every member must declare the same total N, every
//! index must lie in 1..=N, and every index from 1 to N must be present. Holds with or without an
//! index file.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
};

use regex::Regex;

use super::report::{Problem, ProblemKind};

static SHARD_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?P<prefix>.+)-(?P<index>[0-9]{1,12})-of-(?P<total>[0-9]{1,12})\.(?P<ext>safetensors|bin|gguf)$")
        .expect("static regex")
});

/// One member of a shard set, parsed from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardName {
    /// Folder part of the path, with a trailing '/', or empty.
    pub dir: String,
    pub prefix: String,
    pub index: u64,
    pub total: u64,
    pub ext: String,
    pub index_width: usize,
    pub total_width: usize,
}

impl ShardName {
    /// Parses `path` (relative, '/' separated); None when it is not a shard name.
    pub fn parse(path: &str) -> Option<Self> {
        let (dir, name) = match path.rfind('/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => ("", path),
        };
        let caps = SHARD_NAME.captures(name)?;
        Some(Self {
            dir: dir.to_owned(),
            prefix: caps["prefix"].to_owned(),
            index: caps["index"].parse().ok()?,
            total: caps["total"].parse().ok()?,
            ext: caps["ext"].to_owned(),
            index_width: caps["index"].len(),
            total_width: caps["total"].len(),
        })
    }

    /// The name of member `index` of a set of `total`, in this member's padding.
    fn sibling(&self, index: u64, total: u64) -> String {
        format!(
            "{}{}-{:0iw$}-of-{:0tw$}.{}",
            self.dir,
            self.prefix,
            index,
            total,
            self.ext,
            iw = self.index_width,
            tw = self.total_width
        )
    }

    fn pattern(&self) -> String {
        format!("{}{}-*-of-*.{}", self.dir, self.prefix, self.ext)
    }
}

/// Checks every shard set among `paths`.
pub(crate) fn check<'a>(paths: impl IntoIterator<Item = &'a String>) -> Vec<Problem> {
    let mut sets: BTreeMap<(String, String, String), Vec<(String, ShardName)>> = BTreeMap::new();
    for path in paths {
        if let Some(shard) = ShardName::parse(path) {
            let key = (shard.dir.clone(), shard.prefix.clone(), shard.ext.clone());
            sets.entry(key).or_default().push((path.clone(), shard));
        }
    }
    let mut problems = Vec::new();
    for members in sets.values() {
        check_set(members, &mut problems);
    }
    problems
}

fn check_set(members: &[(String, ShardName)], problems: &mut Vec<Problem>) {
    let pattern = members[0].1.pattern();
    // The set's total: the one most members declare (ties: the largest).
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, shard) in members {
        *votes.entry(shard.total).or_default() += 1;
    }
    let (&total, _) = votes
        .iter()
        .max_by_key(|(total, count)| (**count, **total))
        .expect("a set has members");

    let mut present = BTreeSet::new();
    for (path, shard) in members {
        if shard.total != total {
            problems.push(Problem::error(
                ProblemKind::ShardTotalMismatch,
                path,
                format!(
                    "declares {} shards, but {} of the {} members of {pattern} declare {total}",
                    shard.total,
                    votes[&total],
                    members.len()
                ),
            ));
        }
        if shard.index == 0 || shard.index > shard.total {
            problems.push(Problem::error(
                ProblemKind::ShardTotalMismatch,
                path,
                format!(
                    "shard index {} is outside 1..={} of its own name",
                    shard.index, shard.total
                ),
            ));
        } else if shard.index > total {
            problems.push(Problem::error(
                ProblemKind::ShardTotalMismatch,
                path,
                format!(
                    "shard index {} is above the set's total of {total}",
                    shard.index
                ),
            ));
        }
        present.insert(shard.index);
    }

    // Bound the work on absurd totals: list at most this many missing names.
    const MAX_LISTED: u64 = 1000;
    let missing: Vec<u64> = (1..=total.min(MAX_LISTED))
        .filter(|i| !present.contains(i))
        .collect();
    let present_in_range = present
        .iter()
        .filter(|&&i| (1..=total).contains(&i))
        .count() as u64;
    let missing_count = total - present_in_range;
    if missing_count == 0 {
        return;
    }
    let listed: Vec<String> = missing.iter().take(20).map(u64::to_string).collect();
    let more = if missing_count > listed.len() as u64 {
        ", ..."
    } else {
        ""
    };
    let template = &members[0].1;
    for &index in &missing {
        problems.push(Problem::error(
            ProblemKind::MissingShard,
            template.sibling(index, total),
            format!(
                "shard {index} of {total} is missing ({missing_count} of {total} shards of {pattern} missing: {}{more})",
                listed.join(", ")
            ),
        ));
    }
    if missing_count > missing.len() as u64 {
        problems.push(Problem::error(
            ProblemKind::MissingShard,
            template.sibling(total, total),
            format!("{missing_count} of {total} shards of {pattern} are missing; only the first {MAX_LISTED} indexes were listed"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn kinds(problems: &[Problem]) -> Vec<(ProblemKind, &str)> {
        let mut v: Vec<_> = problems.iter().map(|p| (p.kind, p.file.as_str())).collect();
        v.sort();
        v
    }

    #[test]
    fn parses_any_prefix_and_padding() {
        let s = ShardName::parse("pytorch_model-00002-of-00012.bin").unwrap();
        assert_eq!(
            (s.prefix.as_str(), s.index, s.total, s.ext.as_str()),
            ("pytorch_model", 2, 12, "bin")
        );
        let s = ShardName::parse("sub/my-model-3-of-10.safetensors").unwrap();
        assert_eq!(
            (s.dir.as_str(), s.prefix.as_str(), s.index, s.total),
            ("sub/", "my-model", 3, 10)
        );
        assert_eq!(s.sibling(7, 10), "sub/my-model-7-of-10.safetensors");
        assert!(ShardName::parse("model.safetensors").is_none());
        assert!(ShardName::parse("model-1-of-2.json").is_none());
        assert!(ShardName::parse("-00001-of-00002.safetensors").is_none());
    }

    #[test]
    fn shard_set_rules() {
        struct Case {
            name: &'static str,
            files: &'static [&'static str],
            want: &'static [(ProblemKind, &'static str)],
        }
        use ProblemKind::*;
        let cases = [
            Case {
                name: "complete set",
                files: &[
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors",
                ],
                want: &[],
            },
            Case {
                name: "a gap and no index",
                files: &[
                    "model-00001-of-00004.safetensors",
                    "model-00004-of-00004.safetensors",
                ],
                want: &[
                    (MissingShard, "model-00002-of-00004.safetensors"),
                    (MissingShard, "model-00003-of-00004.safetensors"),
                ],
            },
            Case {
                name: "totals disagree",
                files: &[
                    "model-00001-of-00003.safetensors",
                    "model-00002-of-00003.safetensors",
                    "model-00003-of-00004.safetensors",
                ],
                want: &[(ShardTotalMismatch, "model-00003-of-00004.safetensors")],
            },
            Case {
                name: "index above total",
                files: &["m-1-of-2.bin", "m-2-of-2.bin", "m-3-of-2.bin"],
                want: &[(ShardTotalMismatch, "m-3-of-2.bin")],
            },
            Case {
                name: "index zero",
                files: &["m-0-of-1.gguf", "m-1-of-1.gguf"],
                want: &[(ShardTotalMismatch, "m-0-of-1.gguf")],
            },
            Case {
                name: "separate sets by prefix and extension",
                files: &[
                    "a-1-of-2.safetensors",
                    "a-2-of-2.safetensors",
                    "a-1-of-2.bin",
                    "b-2-of-2.gguf",
                ],
                want: &[
                    (MissingShard, "a-2-of-2.bin"),
                    (MissingShard, "b-1-of-2.gguf"),
                ],
            },
        ];
        for case in cases {
            let problems = check(&names(case.files));
            assert_eq!(kinds(&problems), case.want, "{}: {problems:#?}", case.name);
        }
    }

    #[test]
    fn missing_shard_detail_names_which_and_how_many() {
        let problems = check(&names(&[
            "model-00001-of-00005.safetensors",
            "model-00003-of-00005.safetensors",
            "model-00005-of-00005.safetensors",
        ]));
        assert_eq!(problems.len(), 2);
        assert_eq!(
            problems[0].detail,
            "shard 2 of 5 is missing (2 of 5 shards of model-*-of-*.safetensors missing: 2, 4)"
        );
    }

    #[test]
    fn absurd_totals_are_bounded() {
        let problems = check(&names(&["m-1-of-999999999999.safetensors"]));
        assert_eq!(
            problems.len(),
            1000,
            "999 listed (2..=1000) plus one summary"
        );
        assert!(problems
            .last()
            .unwrap()
            .detail
            .contains("999999999998 of 999999999999"));
    }
}
