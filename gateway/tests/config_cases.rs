//! The golden config cases: each folder of `tests/config_cases/` holds a `gateway.toml` and,
//! in `expected.txt`, what `edge-gateway check --config gateway.toml` prints when run inside
//! that folder: the exit status, then each stream that is not empty.
//!
//! `UPDATE_CONFIG_CASES=1 cargo test -p edge-gateway --test config_cases` rewrites every
//! `expected.txt` from what the command prints now; review the diff before committing it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The environment variable that rewrites the expected files instead of comparing them.
const UPDATE: &str = "UPDATE_CONFIG_CASES";

#[test]
fn every_config_case_prints_what_its_expected_file_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config_cases");
    let cases = cases(&root);
    assert!(!cases.is_empty(), "no cases under {}", root.display());
    let update = std::env::var_os(UPDATE).is_some_and(|value| value == "1");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().map_or_else(
            || case.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let before = listing(case);
        let actual = transcript(&check(case));
        // `check` tries the data directory and leaves nothing behind.
        let after = listing(case);
        if after != before {
            failures.push(format!(
                "{name}: check left files behind: {before:?} -> {after:?}"
            ));
        }
        let expected_file = case.join("expected.txt");
        if update {
            if let Err(e) = std::fs::write(&expected_file, &actual) {
                panic!("cannot write {}: {e}", expected_file.display());
            }
            continue;
        }
        match std::fs::read_to_string(&expected_file) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!("{name}:\n{}", diff(&expected, &actual))),
            Err(e) => failures.push(format!("{name}: cannot read expected.txt: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} config cases differ (- expected, + actual; {UPDATE}=1 rewrites the expected \
         files):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The case folders, in name order; each must hold a `gateway.toml`.
fn cases(root: &Path) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) => panic!("cannot list {}: {e}", root.display()),
    };
    let mut cases: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    for case in &cases {
        assert!(
            case.join("gateway.toml").is_file(),
            "{} has no gateway.toml",
            case.display()
        );
    }
    cases
}

/// The names in a case folder, sorted.
fn listing(case: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(case)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Runs `edge-gateway check --config gateway.toml` inside the case folder.
fn check(case: &Path) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["check", "--config", "gateway.toml"])
        .current_dir(case)
        .env_remove("RUST_LOG")
        .output();
    match run {
        Ok(output) => output,
        Err(e) => panic!("cannot run edge-gateway in {}: {e}", case.display()),
    }
}

/// What the command printed, as the expected files hold it:
///
/// ```text
/// exit 2
/// --- stderr
/// gateway.toml:6: mqtt.keepalive: unknown key `keepalive`; did you mean `keep_alive`?
/// ```
fn transcript(output: &Output) -> String {
    let status = match output.status.code() {
        Some(code) => format!("exit {code}\n"),
        None => format!("{}\n", output.status),
    };
    let mut text = status;
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        if bytes.is_empty() {
            continue;
        }
        text.push_str(&format!("--- {stream}\n"));
        text.push_str(&String::from_utf8_lossy(bytes));
        if !bytes.ends_with(b"\n") {
            text.push_str("\n\\ no newline at the end\n");
        }
    }
    text
}

/// A line diff of two texts: ` ` for a line both have, `-` for one only `expected` has, `+`
/// for one only `actual` has (a longest common subsequence; the files are short).
fn diff(expected: &str, actual: &str) -> String {
    let old: Vec<&str> = expected.lines().collect();
    let new: Vec<&str> = actual.lines().collect();
    // common[i][j]: length of the longest common subsequence of old[i..] and new[j..].
    let mut common = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] = if old[i] == new[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            out.push_str(&format!("  {}\n", old[i]));
            i += 1;
            j += 1;
        } else if i < old.len() && (j == new.len() || common[i + 1][j] >= common[i][j + 1]) {
            out.push_str(&format!("- {}\n", old[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", new[j]));
            j += 1;
        }
    }
    out
}
