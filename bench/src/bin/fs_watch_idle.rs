//! The cost of a recursive `FsEvent` watch over a large tree that does not
//! change: how long the watch takes to set up, how many inotify watches it
//! holds, and the CPU the loop's process uses while it waits (issue 14:
//! "a watch over 50,000 files stays under 1% CPU").
//!
//! `cargo run --release -p uvcluster-bench --bin fs_watch_idle -- [files=50000] [seconds=10] [per_dir=100]`
//!
//! It makes a tree of `files` empty files in a new directory under the
//! system's temp dir (`per_dir` files per directory, 25 directories per parent,
//! plus a `.git` and a `node_modules` directory that the watch ignores),
//! starts one recursive watch on it, runs the loop for `seconds` with
//! nothing but a timer that ends it, and reads the process's CPU time
//! (`getrusage(RUSAGE_SELF)`, user + system) before and after. Then it
//! changes one deep file and times the callback, to show the watch is
//! live, and removes the tree (on an error too: a guard removes it as the
//! error returns from `main`; a signal that kills the process leaves it).

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use uvcluster::uv::{FsEventFlags, Loop, RunMode};

/// The tree, removed on drop.
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn cpu_seconds() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// Makes `files` files, `per_dir` per leaf directory, 25 leaves per
/// parent. Returns the number of directories made and one deep file.
fn make_tree(root: &Path, files: usize, per_dir: usize) -> std::io::Result<(usize, PathBuf)> {
    let mut dirs = 0;
    let mut last = root.to_path_buf();
    let leaves = files.div_ceil(per_dir);
    for leaf in 0..leaves {
        let dir = root
            .join(format!("pkg{:03}", leaf / 25))
            .join(format!("mod{:02}", leaf % 25));
        fs::create_dir_all(&dir)?;
        dirs += if leaf % 25 == 0 { 2 } else { 1 };
        for f in 0..per_dir.min(files - leaf * per_dir) {
            last = dir.join(format!("file{f:03}.rs"));
            fs::File::create(&last)?;
        }
    }
    // Ignored by the watch: never walked, never watched.
    for ignored in [".git/objects/ab", "node_modules/dep/lib"] {
        fs::create_dir_all(root.join(ignored))?;
        fs::write(root.join(ignored).join("x"), b"")?;
    }
    Ok((dirs, last))
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let files: usize = args.next().map_or(50_000, |a| a.parse().expect("files"));
    let seconds: u64 = args.next().map_or(10, |a| a.parse().expect("seconds"));
    let per_dir: usize = args.next().map_or(100, |a| a.parse().expect("per_dir"));
    assert!(per_dir > 0, "per_dir must be positive");
    assert!(files <= 1_000_000, "at most 1,000,000 files");
    assert!(seconds <= 600, "at most 600 s");

    let tree =
        Tree(std::env::temp_dir().join(format!("uvcluster-fs-watch-idle-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tree.0);
    fs::create_dir_all(&tree.0)?;
    let t = Instant::now();
    let (dirs, deep) = make_tree(&tree.0, files, per_dir)?;
    println!(
        "tree: {files} files in {dirs} directories (+ ignored .git, node_modules) under {}, made in {:.2} s",
        tree.0.display(),
        t.elapsed().as_secs_f64()
    );

    let mut lp = Loop::new()?;
    let h = lp.fs_event_init();
    let seen = Rc::new(Cell::new(None::<Instant>));
    let s = seen.clone();
    let flags = FsEventFlags::new().recursive(true).ignore(|p: &Path| {
        p.components().any(|c| {
            matches!(
                c.as_os_str().to_str(),
                Some(".git" | "node_modules" | "target")
            )
        })
    });
    let t = Instant::now();
    lp.fs_event_start(h, &tree.0, flags, move |lp, _, name, ev| {
        ev.expect("fs event");
        if s.get().is_none() {
            s.set(Some(Instant::now()));
            println!("event: {}", name.unwrap().display());
            lp.stop();
        }
    })?;
    let setup = t.elapsed();
    let watches = lp.fs_event_watch_count(h)?;
    println!(
        "watch: recursive, {watches} inotify watches, set up in {:.1} ms",
        setup.as_secs_f64() * 1e3
    );

    // Idle: the loop blocks in epoll_wait until the timer ends it.
    let timer = lp.timer_init();
    lp.update_time();
    lp.timer_start(
        timer,
        Duration::from_secs(seconds),
        Duration::ZERO,
        |lp, _| lp.stop(),
    )?;
    let (c0, w0) = (cpu_seconds(), Instant::now());
    lp.run(RunMode::Default)?;
    let (cpu, wall) = (cpu_seconds() - c0, w0.elapsed().as_secs_f64());
    assert!(
        seen.get().is_none(),
        "an event while the tree did not change"
    );
    println!(
        "idle: {wall:.2} s wall, {:.3} ms CPU (user + system) = {:.4} % of one CPU",
        cpu * 1e3,
        cpu / wall * 100.0
    );

    // Live: a change deep in the tree reaches the callback.
    let t = Instant::now();
    fs::write(&deep, b"changed")?;
    lp.update_time();
    lp.timer_start(timer, Duration::from_secs(5), Duration::ZERO, |lp, _| {
        lp.stop()
    })?;
    lp.run(RunMode::Default)?;
    match seen.get() {
        Some(at) => println!(
            "change: reported {:.2} ms after the write",
            (at - t).as_secs_f64() * 1e3
        ),
        None => println!("change: NOT reported within 5 s"),
    }
    lp.close(timer, |_| {})?;
    lp.close(h, |_| {})?;
    lp.run(RunMode::Default)?;
    let t = Instant::now();
    drop(tree);
    println!(
        "cleanup: tree removed in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
