//! The lab's `fs_watch_idle` on a small tree, bounded: the recursive watch
//! is set up, costs well under 1% of a CPU while nothing changes, sees a
//! change deep in the tree, and the tree is removed afterwards.

use std::process::Command;

#[test]
fn fs_watch_idle_small_tree_is_idle_live_and_cleaned_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_fs_watch_idle"))
        .args(["2000", "2", "20"])
        .output()
        .expect("run fs_watch_idle");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{text}"))
            .to_string()
    };
    // 2000 files, 20 per directory: 100 leaves under 4 parents, + the root.
    assert!(line("watch:").contains("105 inotify watches"), "{text}");
    let idle = line("idle:");
    let pct: f64 = idle
        .split(" = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {idle:?}"));
    assert!(pct < 1.0, "{idle}");
    assert!(line("change:").contains("reported"), "{text}");
    let dir = line("tree:");
    let dir = dir
        .split(" under ")
        .nth(1)
        .and_then(|s| s.split(", made").next())
        .unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
