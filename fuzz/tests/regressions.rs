//! Replays every seed (`seeds/TARGET/`) and every saved crash (`regressions/TARGET/`)
//! through the target's checks, on stable Rust and without libFuzzer:
//!
//! ```sh
//! cargo test --manifest-path fuzz/Cargo.toml --no-default-features
//! ```
//!
//! One test per target; a failing one lists every input that panicked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn replay(name: &str) {
    let (_, check) = ztp_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failed = Vec::new();
    let mut count = 0;
    for kind in ["seeds", "regressions"] {
        let dir = root.join(kind).join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !n.starts_with('.') && n != "README.md"
            })
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            count += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: {msg}", file.display()));
            }
        }
    }
    eprintln!("{name}: {count} inputs replayed, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{name}: {} of {count} inputs fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn every_target_is_tested_here() {
    let here = include_str!("regressions.rs");
    for (name, _) in ztp_fuzz::TARGETS {
        assert!(here.contains(&format!("fn {name}()")), "no test for {name}");
    }
}

#[test]
fn snapshot_yaml() {
    replay("snapshot_yaml");
}

#[test]
fn snapshot_proto() {
    replay("snapshot_proto");
}

#[test]
fn framed() {
    replay("framed");
}

#[test]
fn sni() {
    replay("sni");
}

#[test]
fn identity() {
    replay("identity");
}

#[test]
fn rest_bodies() {
    replay("rest_bodies");
}

#[test]
fn keyless_frame() {
    replay("keyless_frame");
}
