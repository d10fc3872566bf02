//! File system event handles on inotify (libuv's `test/test-fs-event.c`,
//! and `test-ref.c`'s fs event cases), plus the recursive watch, the ignore
//! predicate and the queue overflow, which libuv does not have on Linux.
//!
//! Each test works in its own directory under the system's temp dir,
//! removed when the test ends; file changes are made before the loop runs
//! or from its callbacks, and the loop runs until the expected callbacks
//! came (never a sleep).
mod util;

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use util::*;
use uvcluster::uv::{FsEventFlags, FsEvents, InotifyOverflow, Loop, RunMode};

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "uvcluster-fs-event-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

type Events = Rc<RefCell<Vec<(String, FsEvents)>>>;

/// A callback that records `(name, events)` and fails on an error.
fn recorder(
    log: &Events,
) -> impl FnMut(
    &mut Loop,
    uvcluster::uv::Handle<uvcluster::uv::FsEvent>,
    Option<&Path>,
    std::io::Result<FsEvents>,
) + 'static {
    let log = log.clone();
    move |_, _, name, ev| {
        let ev = ev.unwrap();
        log.borrow_mut()
            .push((name.unwrap().to_string_lossy().into_owned(), ev));
    }
}

fn has(log: &Events, name: &str, ev: FsEvents) -> bool {
    log.borrow()
        .iter()
        .any(|(n, e)| n == name && e.contains(ev))
}

/// test-fs-event.c `fs_event_watch_file`: two files, the second watched;
/// a write to the first is not reported, a write to the second is, as a
/// CHANGE named after the file; stop and close from the callback.
#[test]
fn fs_event_watch_file() {
    let dir = TempDir::new("watch_file");
    fs::write(dir.join("file1"), b"").unwrap();
    fs::write(dir.join("file2"), b"").unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let called = Counter::new();
    let closed = Counter::new();
    let (c, cl) = (called.clone(), closed.clone());
    lp.fs_event_start(
        h,
        dir.join("file2"),
        FsEventFlags::new(),
        move |lp, h, name, ev| {
            c.hit();
            assert_eq!(ev.unwrap(), FsEvents::CHANGE);
            assert_eq!(name, Some(Path::new("file2")));
            lp.fs_event_stop(h).unwrap();
            let cl = cl.clone();
            lp.close(h, move |_| cl.hit()).unwrap();
        },
    )
    .unwrap();
    fs::write(dir.join("file1"), b"foo").unwrap();
    fs::write(dir.join("file2"), b"bar").unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!((called.get(), closed.get()), (1, 1));
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_watch_dir`: files created and removed in a
/// watched directory are reported by name, as RENAME; a rename is two
/// RENAME events, one per name; a write is a CHANGE.
#[test]
fn fs_event_watch_dir_add_remove_rename() {
    let dir = TempDir::new("watch_dir");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let log: Events = Default::default();
    lp.fs_event_start(h, dir.path(), FsEventFlags::new(), recorder(&log))
        .unwrap();
    fs::write(dir.join("file1"), b"").unwrap();
    fs::write(dir.join("file2"), b"").unwrap();
    fs::remove_file(dir.join("file2")).unwrap();
    fs::rename(dir.join("file1"), dir.join("file3")).unwrap();
    fs::write(dir.join("file3"), b"data").unwrap();
    run_until(&mut lp, 5000, |_| has(&log, "file3", FsEvents::CHANGE));
    for (name, ev) in [
        ("file1", FsEvents::RENAME), // created
        ("file2", FsEvents::RENAME), // created, then removed
        ("file1", FsEvents::RENAME), // renamed from
        ("file3", FsEvents::RENAME), // renamed to
    ] {
        assert!(has(&log, name, ev), "{name} {ev:?} in {:?}", log.borrow());
    }
    let n2 = log.borrow().iter().filter(|(n, _)| n == "file2").count();
    assert_eq!(n2, 2, "file2: created and deleted");
    // Nothing about files outside the directory.
    assert!(log.borrow().iter().all(|(n, _)| !n.contains('/')));
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_watch_delete_dir`: deleting the watched
/// directory is reported under the directory's own name.
#[test]
fn fs_event_watch_delete_dir() {
    let parent = TempDir::new("delete_dir");
    let dir = parent.join("watch_del_dir");
    fs::create_dir(&dir).unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let log: Events = Default::default();
    lp.fs_event_start(h, &dir, FsEventFlags::new(), recorder(&log))
        .unwrap();
    fs::remove_dir(&dir).unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&log, "watch_del_dir", FsEvents::RENAME)
    });
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_close_in_callback`: five files created; the
/// third callback closes the handle; no callback after that.
#[test]
fn fs_event_close_in_callback() {
    let dir = TempDir::new("close_in_cb");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let called = Counter::new();
    let closed = Counter::new();
    let (c, cl) = (called.clone(), closed.clone());
    lp.fs_event_start(h, dir.path(), FsEventFlags::new(), move |lp, h, _, ev| {
        ev.unwrap();
        assert!(c.get() < 3, "a callback after close");
        c.hit();
        if c.get() == 3 {
            let cl = cl.clone();
            lp.close(h, move |_| cl.hit()).unwrap();
        }
    })
    .unwrap();
    for i in 0..5 {
        fs::write(dir.join(&format!("file{i}")), b"").unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!((called.get(), closed.get()), (3, 1));
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_stop_in_cb`: the first callback stops the
/// handle; events already read are not delivered; the loop ends.
#[test]
fn fs_event_stop_in_cb() {
    let dir = TempDir::new("stop_in_cb");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let called = Counter::new();
    let c = called.clone();
    lp.fs_event_start(h, dir.path(), FsEventFlags::new(), move |lp, h, _, _| {
        c.hit();
        lp.fs_event_stop(h).unwrap();
    })
    .unwrap();
    for i in 0..3 {
        fs::write(dir.join(&format!("f{i}")), b"x").unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_eq!(called.get(), 1);
    assert!(!lp.is_active(h));
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_start_and_close`, `fs_event_watch_file_twice`
/// and libuv's rules: a started handle cannot start again (`EINVAL`); stop
/// twice is fine; a stopped handle can start again; two handles on the
/// same file both get its events, and stopping one leaves the other
/// working (they share one inotify watch).
#[test]
fn fs_event_start_twice_stop_twice_and_two_handles_on_one_file() {
    let dir = TempDir::new("twice");
    let file = dir.join("file");
    fs::write(&file, b"").unwrap();
    let mut lp = Loop::new().unwrap();
    let a = lp.fs_event_init();
    let b = lp.fs_event_init();
    let (la, lb): (Events, Events) = Default::default();
    lp.fs_event_start(a, &file, FsEventFlags::new(), recorder(&la))
        .unwrap();
    let e = lp
        .fs_event_start(a, &file, FsEventFlags::new(), |_, _, _, _| {
            panic!("dropped")
        })
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL));
    lp.fs_event_start(b, &file, FsEventFlags::new(), recorder(&lb))
        .unwrap();

    fs::write(&file, b"1").unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&la, "file", FsEvents::CHANGE) && has(&lb, "file", FsEvents::CHANGE)
    });
    lp.fs_event_stop(a).unwrap();
    lp.fs_event_stop(a).unwrap();
    la.borrow_mut().clear();
    lb.borrow_mut().clear();
    fs::write(&file, b"2").unwrap();
    run_until(&mut lp, 5000, |_| has(&lb, "file", FsEvents::CHANGE));
    assert!(la.borrow().is_empty(), "stopped");

    // A stopped handle starts again.
    lp.fs_event_start(a, &file, FsEventFlags::new(), recorder(&la))
        .unwrap();
    fs::write(&file, b"3").unwrap();
    run_until(&mut lp, 5000, |_| has(&la, "file", FsEvents::CHANGE));
    lp.close(a, |_| {}).unwrap();
    lp.close(b, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_watch_invalid_path`: a missing path is
/// `ENOENT`, the handle stays inactive and the callback is dropped.
#[test]
fn fs_event_watch_invalid_path() {
    let dir = TempDir::new("invalid");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let token = Rc::new(());
    let t = token.clone();
    let e = lp
        .fs_event_start(
            h,
            dir.join("nonexistent"),
            FsEventFlags::new(),
            move |_, _, _, _| {
                let _ = &t;
            },
        )
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::ENOENT));
    assert!(!lp.is_active(h));
    assert_eq!(Rc::strong_count(&token), 1, "the callback was dropped");
    assert_eq!(lp.fs_event_getpath(h).unwrap(), None);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// test-fs-event.c `fs_event_getpath`: no path before start or after stop;
/// the path as given while started.
#[test]
fn fs_event_getpath() {
    let dir = TempDir::new("getpath");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    assert_eq!(lp.fs_event_getpath(h).unwrap(), None);
    lp.fs_event_start(h, dir.path(), FsEventFlags::new(), |_, _, _, _| {})
        .unwrap();
    assert_eq!(lp.fs_event_getpath(h).unwrap().as_deref(), Some(dir.path()));
    lp.fs_event_stop(h).unwrap();
    assert_eq!(lp.fs_event_getpath(h).unwrap(), None);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert!(lp.fs_event_getpath(h).is_err(), "stale id");
    assert_loop_empty(&lp);
}

/// test-ref.c `fs_event_ref` and test-fs-event.c
/// `fs_event_close_with_pending_event`: an unreferenced started handle
/// does not keep the loop alive; referenced again, it does; closed with an
/// event pending, its callback never runs.
#[test]
fn fs_event_ref_unref_and_close_with_pending_event() {
    let dir = TempDir::new("ref");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    lp.fs_event_start(h, dir.path(), FsEventFlags::new(), |_, _, _, _| {
        panic!("closed with the event pending")
    })
    .unwrap();
    assert!(lp.alive());
    lp.unref_handle(h).unwrap();
    assert!(!lp.alive());
    assert!(!lp.run(RunMode::Default).unwrap(), "returns at once");
    lp.ref_handle(h).unwrap();
    assert!(lp.alive());
    fs::write(dir.join("pending"), b"").unwrap();
    lp.close(h, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// Recursive: every directory of the tree is watched; events deep in it
/// are named by their path relative to the root; a directory made later
/// is watched, and what was created in it before its watch was in place is
/// reported too; a directory moved within the tree is followed under its
/// new name; ignored directories are neither watched nor reported.
#[test]
fn fs_event_recursive_names_new_dirs_moves_and_ignores() {
    let dir = TempDir::new("recursive");
    fs::create_dir_all(dir.join("a/b/c")).unwrap();
    fs::create_dir_all(dir.join(".git/objects")).unwrap();
    fs::create_dir_all(dir.join("node_modules/x")).unwrap();
    fs::write(dir.join("a/b/c/deep.txt"), b"").unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let log: Events = Default::default();
    let flags = FsEventFlags::new().recursive(true).ignore(|p: &Path| {
        p.components()
            .any(|c| matches!(c.as_os_str().to_str(), Some(".git" | "node_modules")))
    });
    lp.fs_event_start(h, dir.path(), flags, recorder(&log))
        .unwrap();
    assert_eq!(
        lp.fs_event_watch_count(h).unwrap(),
        4,
        "root, a, a/b, a/b/c"
    );

    fs::write(dir.join("a/b/c/deep.txt"), b"changed").unwrap();
    fs::write(dir.join(".git/objects/obj"), b"").unwrap();
    fs::write(dir.join("node_modules/x/index.js"), b"").unwrap();
    fs::write(dir.join(".git/HEAD"), b"").unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&log, "a/b/c/deep.txt", FsEvents::CHANGE)
    });

    // A new tree, made at once: its inner entries appear before the loop
    // can watch them.
    fs::create_dir_all(dir.join("new/inner")).unwrap();
    fs::write(dir.join("new/inner/made-early.txt"), b"").unwrap();
    run_until(&mut lp, 5000, |_| has(&log, "new", FsEvents::RENAME));
    run_until(&mut lp, 5000, |_| {
        has(&log, "new/inner/made-early.txt", FsEvents::RENAME)
    });
    assert_eq!(lp.fs_event_watch_count(h).unwrap(), 6, "+ new, new/inner");
    // Now watched: a later write is a CHANGE under its full name.
    fs::write(dir.join("new/inner/made-early.txt"), b"more").unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&log, "new/inner/made-early.txt", FsEvents::CHANGE)
    });

    // Move a directory within the tree, then write in it.
    fs::rename(dir.join("a/b"), dir.join("moved")).unwrap();
    run_until(&mut lp, 5000, |_| has(&log, "moved", FsEvents::RENAME));
    fs::write(dir.join("moved/c/after-move.txt"), b"").unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&log, "moved/c/after-move.txt", FsEvents::RENAME)
    });
    assert!(has(&log, "a/b", FsEvents::RENAME), "moved from");

    // Remove a directory: its watches go.
    fs::remove_dir_all(dir.join("new")).unwrap();
    run_until(&mut lp, 5000, |_| {
        has(&log, "new", FsEvents::RENAME) && new_created_and_removed(&log)
    });
    lp.run(RunMode::NoWait).unwrap();
    assert_eq!(
        lp.fs_event_watch_count(h).unwrap(),
        4,
        "root, a, moved, moved/c"
    );

    let seen = log.borrow();
    assert!(
        seen.iter()
            .all(|(n, _)| !n.contains(".git") && !n.contains("node_modules")),
        "ignored paths reported: {seen:?}"
    );
    drop(seen);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

fn new_created_and_removed(log: &Events) -> bool {
    // The removal of `new` is reported after its inner entries'.
    log.borrow().iter().filter(|(n, _)| n == "new").count() >= 2
}

/// IN_Q_OVERFLOW: more events than the kernel queues
/// (`fs.inotify.max_queued_events`) while the loop does not read; the
/// handle gets an error wrapping `InotifyOverflow`, with no file name, and
/// stays started and working.
#[test]
fn fs_event_queue_overflow_is_reported() {
    let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        max <= 1 << 20,
        "max_queued_events {max}: too many files to make"
    );
    let dir = TempDir::new("overflow");
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let overflows = Counter::new();
    let events = Counter::new();
    let (o, e) = (overflows.clone(), events.clone());
    lp.fs_event_start(
        h,
        dir.path(),
        FsEventFlags::new(),
        move |_, _, name, ev| match ev {
            Ok(_) => {
                assert!(name.is_some());
                e.hit();
            }
            Err(err) => {
                assert!(name.is_none());
                assert!(
                    err.get_ref().is_some_and(|x| x.is::<InotifyOverflow>()),
                    "{err}"
                );
                o.hit();
            }
        },
    )
    .unwrap();
    // Distinct names: the kernel merges only identical consecutive events.
    for i in 0..max + 100 {
        fs::File::create(dir.join(&format!("f{i}"))).unwrap();
    }
    run_until(&mut lp, 10_000, |_| overflows.get() > 0);
    assert_eq!(overflows.get(), 1);
    assert!(events.get() <= max, "{} events", events.get());
    assert!(lp.is_active(h), "still started");
    // Still working after the overflow.
    let before = events.get();
    fs::write(dir.join("after"), b"").unwrap();
    run_until(&mut lp, 5000, |_| events.get() > before);
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

/// A watched file deleted: libuv reports `CHANGE` (the link count), then
/// `RENAME` for `IN_DELETE_SELF` and `RENAME` for `IN_IGNORED`, all named
/// after the file; the handle stays active (until stopped) and holds no
/// watch any more.
#[test]
fn fs_event_watch_file_deleted() {
    let dir = TempDir::new("file_deleted");
    let file = dir.join("doomed");
    fs::write(&file, b"").unwrap();
    let mut lp = Loop::new().unwrap();
    let h = lp.fs_event_init();
    let log: Events = Default::default();
    lp.fs_event_start(h, &file, FsEventFlags::new(), recorder(&log))
        .unwrap();
    fs::remove_file(&file).unwrap();
    run_until(&mut lp, 5000, |_| log.borrow().len() == 3);
    lp.run(RunMode::NoWait).unwrap();
    let want: Vec<(String, FsEvents)> = [FsEvents::CHANGE, FsEvents::RENAME, FsEvents::RENAME]
        .into_iter()
        .map(|e| ("doomed".to_string(), e))
        .collect();
    assert_eq!(*log.borrow(), want);
    assert!(lp.is_active(h));
    assert_eq!(lp.fs_event_watch_count(h).unwrap(), 0);
    lp.fs_event_stop(h).unwrap();
    lp.close(h, |_| {}).unwrap();
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}
