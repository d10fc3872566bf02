//! `uvcluster run --watch PATH`: development's reload on save, done as the
//! primary's own work, on its own loop.
//!
//! One [`FsEvent`] handle per watched path (libuv's `uv_fs_event_t` on the
//! loop's one inotify fd; a directory is watched recursively, its ignored
//! subdirectories neither walked nor watched), one debounce timer, and a
//! **rolling reload** through [`Supervisor::reload`] once the changes stop
//! for the debounce time: each worker is replaced by a new one, the old one
//! drained only once its replacement is ready. If the new code fails to
//! start (a syntax error, a crash before `listen`), the reload fails closed:
//! the old workers keep serving and the supervisor's log line says why
//! (`reload failed: the replacement for slot 0 exited with code 1 before
//! it was ready ...`). Fixing the file triggers the next reload.
//!
//! A change during a reload queues exactly one more reload, started when
//! the running one ends; reloads never interleave. This is what PM2's
//! `--watch` and the common `fs.watch` + `cluster.fork` recipe do not do:
//! they restart every instance at once, so a broken save takes the
//! service down, and PM2 runs one file watcher per instance.
//!
//! A watched *file* is watched through its directory (non-recursively, that
//! file's name only): editors that save by writing a new file and renaming
//! it over the old one (vim, many IDEs) replace the inode a direct watch
//! would follow, and the next save would go unseen. libuv's `uv_fs_event`
//! and Node's `fs.watch` on a file have that problem; `nodemon` and
//! `chokidar` watch the directory as we do.
//!
//! Three things keep a watch from reloading itself forever when the app,
//! or the primary, writes into the watched tree (issue 14):
//!
//! - `*.log` is one of the [`DEFAULT_IGNORES`];
//! - the primary's own stdout and stderr, when they are regular files
//!   (`uvcluster run --watch . > out.txt 2>&1`), are never a change: they
//!   are recognised by device and inode, whatever their name;
//! - the **self-trigger guard**: a reload triggered only by paths that
//!   were also changed while the previous reload (or the first start)
//!   ran, i.e. written by the starting workers, counts; after 2 such
//!   reloads in a row those paths are no longer watched, with one warning
//!   naming them and suggesting `--ignore GLOB`. An edit of any other file
//!   still reloads. nodemon watches only `.js`, `.mjs`, `.cjs` and `.json`
//!   by default and PM2 has `ignore_watch`; neither stops a loop by itself.
//!
//! With `--watch` a pool whose every slot errored (a crash loop after a
//! broken save) does not exit ([`Supervisor::hold_when_errored`]): the
//! watcher says `all workers errored; waiting for a change to start again
//! (watching PATH)`, keeps the primary alive (its watch handles are
//! referenced while it waits), and the next change starts the errored
//! slots afresh, as nodemon's "app crashed - waiting for file changes
//! before starting...".

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use uvcluster::supervisor::{LifecycleEvent, Supervisor, WorkerState};
use uvcluster::uv::{FsEvent, FsEventFlags, Handle, Loop, Timer};

use crate::events;
use crate::values::show_duration;

/// The ignore patterns that always apply: version control, dependencies
/// and build output, which change in bulk and are never the app's source
/// (nodemon ignores `.git` and `node_modules` the same way), and log files,
/// which the app itself writes (a reload would write them again).
pub const DEFAULT_IGNORES: &[&str] = &[".git", "node_modules", "target", "*.log"];

/// How many reloads in a row triggered only by what the previous one (or
/// the first start) wrote are made before those paths stop being watched.
pub const SELF_TRIGGERED_RELOADS: u32 = 2;

/// The quiet time after the last change before a reload starts: long
/// enough for an editor's save (write, rename, chmod) or a `git checkout`
/// to finish, short enough to feel immediate (nodemon waits 200 ms,
/// webpack's watcher 300 ms).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(300);

/// What `--watch`, `--ignore` and `--watch-debounce` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// The watched paths, files or directories, as given.
    pub paths: Vec<PathBuf>,
    /// The user's ignore patterns, added to [`DEFAULT_IGNORES`].
    pub ignore: Vec<String>,
    /// The quiet time after the last change before the reload.
    pub debounce: Duration,
}

/// Checks one `--ignore` pattern; the error is the option parser's message.
pub fn check_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("should be a glob pattern, such as *.log or dist/**. Received \"\"".into());
    }
    glob(pattern).map(|_| ()).map_err(|e| {
        format!("should be a glob pattern, such as *.log or dist/** ({e}). Received {pattern:?}")
    })
}

fn glob(pattern: &str) -> Result<Glob, globset::Error> {
    // `*` stays within one component, as in .gitignore; `**` crosses them.
    GlobBuilder::new(pattern.trim_start_matches('/').trim_end_matches('/'))
        .literal_separator(true)
        .build()
}

/// The ignore rules, gitignore's two kinds: a pattern without a `/`
/// (`.git`, `*.log`, `build/`) matches any one component of a path, at any
/// depth; a pattern with a leading or inner one (`/tmp`, `dist/**`,
/// `src/gen`) matches the path relative to the watched directory, or any
/// of its leading parts (so `src/gen` leaves out everything below it too).
#[derive(Debug, Clone)]
pub struct Ignore {
    names: GlobSet,
    paths: GlobSet,
    shown: Vec<String>,
}

impl Ignore {
    /// The defaults and `extra`.
    ///
    /// # Errors
    ///
    /// A pattern that is not a glob (the option parser checked them with
    /// [`check_glob`] already).
    pub fn new(extra: &[String]) -> Result<Ignore, globset::Error> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        let mut shown = Vec::new();
        for p in DEFAULT_IGNORES
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
        {
            // gitignore's rule: a leading `/` or a `/` inside anchors the
            // pattern to the watched directory; a trailing one does not.
            if p.starts_with('/') || p.trim_end_matches('/').contains('/') {
                paths.add(glob(p)?);
            } else {
                names.add(glob(p)?);
            }
            shown.push(p.to_string());
        }
        Ok(Ignore {
            names: names.build()?,
            paths: paths.build()?,
            shown,
        })
    }

    /// Whether `rel`, a path relative to a watched directory, is left out.
    pub fn is_ignored(&self, rel: &Path) -> bool {
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else { continue };
            if self.names.is_match(Path::new(name)) {
                return true;
            }
            prefix.push(name);
            if self.paths.is_match(&prefix) {
                return true;
            }
        }
        false
    }
}

/// A file by device and inode: the primary's own output.
type FileId = (u64, u64);

/// The primary's stdout and stderr, when they are regular files: their
/// ids and their paths (for the log line).
fn own_outputs() -> Vec<(FileId, PathBuf)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(FileId, PathBuf)> = Vec::new();
    let fds = [
        io::stdout().as_fd().try_clone_to_owned(),
        io::stderr().as_fd().try_clone_to_owned(),
    ];
    for (n, fd) in fds.into_iter().enumerate() {
        let Ok(fd) = fd else { continue };
        let Ok(meta) = std::fs::File::from(fd).metadata() else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if meta.is_file() && !out.iter().any(|(i, _)| *i == id) {
            let path = std::fs::read_link(format!("/proc/self/fd/{}", n + 1))
                .unwrap_or_else(|_| PathBuf::from(if n == 0 { "stdout" } else { "stderr" }));
            out.push((id, path));
        }
    }
    out
}

/// The watcher's state, shared by its callbacks.
struct State {
    sup: Supervisor,
    handles: Vec<Handle<FsEvent>>,
    timer: Handle<Timer>,
    debounce: Duration,
    /// The watched paths, as the log shows them.
    shown: String,
    /// The primary's own output files: never a change.
    own: Vec<FileId>,
    /// The first changed path of the current batch, and how many events
    /// came with it.
    changed: Option<PathBuf>,
    events: usize,
    /// Every path of the current batch.
    batch: BTreeSet<PathBuf>,
    /// The paths changed while the last reload (or the first start) ran,
    /// or within the debounce time after it ended.
    epoch: HashSet<PathBuf>,
    /// That reload (or the first start) is still running.
    epoch_open: bool,
    /// When it ended (the loop's time, ms).
    epoch_end: Option<u64>,
    /// Reloads in a row triggered only by paths of the previous epoch.
    streak: u32,
    /// Paths no longer watched (the self-trigger guard).
    muted: BTreeSet<PathBuf>,
    /// A reload started by the watcher is running.
    reloading: bool,
    /// A change came during that reload: one more reload after it.
    pending: bool,
    /// Every slot errored: the pool waits for a change.
    waiting: bool,
    stopped: bool,
}

/// The running watch: its handles live in the primary's loop, unreferenced
/// (they never keep the primary alive on their own). Cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    state: Rc<RefCell<State>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.borrow();
        f.debug_struct("Watcher")
            .field("handles", &s.handles.len())
            .field("reloading", &s.reloading)
            .field("pending", &s.pending)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Starts one watch per path and logs what is watched.
    ///
    /// # Errors
    ///
    /// A path that cannot be watched (missing, unreadable, the inotify
    /// watch limit), the error naming the path; nothing is left watched.
    pub fn start(lp: &mut Loop, sup: &Supervisor, opts: &WatchOptions) -> io::Result<Watcher> {
        let ignore = Rc::new(
            Ignore::new(&opts.ignore)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
        );
        let timer = lp.timer_init();
        let _ = lp.unref_handle(timer);
        let shown: Vec<String> = opts.paths.iter().map(|p| p.display().to_string()).collect();
        let own = own_outputs();
        let w = Watcher {
            state: Rc::new(RefCell::new(State {
                sup: *sup,
                handles: Vec::new(),
                timer,
                debounce: opts.debounce,
                shown: shown.join(", "),
                own: own.iter().map(|(id, _)| *id).collect(),
                changed: None,
                events: 0,
                batch: BTreeSet::new(),
                epoch: HashSet::new(),
                // The first start is the first epoch: what the starting
                // workers write is theirs.
                epoch_open: true,
                epoch_end: None,
                streak: 0,
                muted: BTreeSet::new(),
                reloading: false,
                pending: false,
                waiting: false,
                stopped: false,
            })),
        };
        let mut dirs = 0;
        for path in &opts.paths {
            match w.watch(lp, path, &ignore) {
                Ok(n) => dirs += n,
                Err(e) => {
                    w.stop(lp);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("--watch {}: {e}", path.display()),
                    ));
                }
            }
        }
        let mut ignoring = ignore.shown.join(", ");
        for (_, path) in &own {
            let _ = write!(ignoring, ", {} (this process's output)", path.display());
        }
        log::info!(
            target: events::TARGET,
            "watching {} ({dirs} director{} watched; ignoring {ignoring}); a change reloads worker \
             by worker {} after the last one",
            shown.join(", "),
            if dirs == 1 { "y" } else { "ies" },
            show_duration(opts.debounce),
        );
        Ok(w)
    }

    /// Watches one path; returns the number of inotify watches it took.
    fn watch(&self, lp: &mut Loop, path: &Path, ignore: &Rc<Ignore>) -> io::Result<usize> {
        let meta = std::fs::metadata(path)?;
        let (root, flags) = if meta.is_dir() {
            let ig = ignore.clone();
            (
                path.to_path_buf(),
                FsEventFlags::new()
                    .recursive(true)
                    .ignore(move |rel: &Path| ig.is_ignored(rel)),
            )
        } else {
            // A file: its directory, that one name (see the module docs).
            let name = path
                .file_name()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?
                .to_os_string();
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (
                dir,
                FsEventFlags::new().ignore(move |rel: &Path| rel.as_os_str() != name),
            )
        };
        let h = lp.fs_event_init();
        let me = Rc::downgrade(&self.state);
        let shown_root = root.clone();
        let started = lp.fs_event_start(h, &root, flags, move |lp, _, name, ev| {
            let Some(state) = me.upgrade() else { return };
            let w = Watcher { state };
            match ev {
                Ok(_) => w.changed(lp, shown_root.join(name.unwrap_or(Path::new("")))),
                Err(e) => {
                    // Events were lost (queue overflow) or a new directory
                    // could not be watched: say so; a lost event may have
                    // been a change, so reload as for one.
                    log::warn!(target: events::TARGET, "watch {}: {e}", shown_root.display());
                    w.changed(lp, shown_root.clone());
                }
            }
        });
        if let Err(e) = started {
            lp.close_if_open(h);
            return Err(e);
        }
        let _ = lp.unref_handle(h);
        let n = lp.fs_event_watch_count(h).unwrap_or(0);
        self.state.borrow_mut().handles.push(h);
        Ok(n)
    }

    /// A change: (re)arm the debounce timer.
    fn changed(&self, lp: &mut Loop, path: PathBuf) {
        let now = lp.now();
        let (timer, debounce) = {
            let mut s = self.state.borrow_mut();
            if s.stopped || s.muted.contains(&path) || is_own(&s.own, &path) {
                return;
            }
            s.events += 1;
            let recent = s.epoch_open
                || s.epoch_end
                    .is_some_and(|end| now <= end + s.debounce.as_millis() as u64);
            if recent {
                s.epoch.insert(path.clone());
            }
            s.batch.insert(path.clone());
            if s.changed.is_none() {
                s.changed = Some(path);
            }
            (s.timer, s.debounce)
        };
        let me = Rc::downgrade(&self.state);
        let r = lp.timer_start(timer, debounce, Duration::ZERO, move |lp, _| {
            if let Some(state) = me.upgrade() {
                Watcher { state }.settled(lp);
            }
        });
        if let Err(e) = r {
            log::error!(target: events::TARGET, "watch: cannot arm the debounce timer: {e}");
        }
    }

    /// The changes stopped for the debounce time: reload, or queue one
    /// reload after the running one.
    fn settled(&self, lp: &mut Loop) {
        let what = {
            let mut s = self.state.borrow_mut();
            if s.stopped {
                return;
            }
            let what = describe(s.changed.take(), std::mem::take(&mut s.events));
            if s.batch.is_empty() {
                // Its paths were taken by a reload already, or muted since.
                return;
            }
            if s.reloading {
                let first = !std::mem::replace(&mut s.pending, true);
                drop(s);
                if first {
                    log::info!(
                        target: events::TARGET,
                        "watch: {what} during a reload: one more reload queued after it"
                    );
                }
                return;
            }
            what
        };
        self.reload(lp, &what);
    }

    fn reload(&self, lp: &mut Loop, what: &str) {
        let (sup, waiting) = {
            let mut s = self.state.borrow_mut();
            // The batch and its description go together: a change after
            // this starts the next one.
            let batch = std::mem::take(&mut s.batch);
            s.changed = None;
            s.events = 0;
            // The self-trigger guard (see the module docs).
            let own = !batch.is_empty() && batch.iter().all(|p| s.epoch.contains(p));
            s.streak = if own { s.streak + 1 } else { 0 };
            if own && s.streak > SELF_TRIGGERED_RELOADS {
                s.streak = 0;
                let names: Vec<String> = batch.iter().map(|p| p.display().to_string()).collect();
                s.muted.extend(batch);
                drop(s);
                log::warn!(
                    target: events::TARGET,
                    "watch: {} changed again while the workers started, {SELF_TRIGGERED_RELOADS} \
                     reloads in a row: the app writes {} itself; no longer watching {} (leave \
                     such files out with --ignore GLOB, e.g. --ignore '*.txt' or --ignore 'data/**')",
                    names.join(", "),
                    if names.len() == 1 { "it" } else { "them" },
                    if names.len() == 1 { "it" } else { "them" },
                );
                return;
            }
            s.epoch.clear();
            s.epoch_open = true;
            s.epoch_end = None;
            s.reloading = true;
            (s.sup, s.waiting)
        };
        if waiting {
            log::info!(target: events::TARGET, "watch: {what}: starting the workers again");
        } else {
            log::info!(target: events::TARGET, "watch: {what}: reloading worker by worker");
        }
        let me = Rc::downgrade(&self.state);
        // The outcome is logged by the supervisor's own event (`reload
        // finished`, or `reload failed: WHY; the old workers keep
        // serving`): one line, not two. A reload starts errored slots
        // afresh.
        sup.reload(lp, move |lp, _result| {
            let Some(state) = me.upgrade() else { return };
            let now = lp.now();
            let again = {
                let mut s = state.borrow_mut();
                s.reloading = false;
                s.epoch_open = false;
                s.epoch_end = Some(now);
                !s.stopped && std::mem::take(&mut s.pending)
            };
            if again {
                Watcher { state }.reload(lp, "changes during the last reload");
            }
        });
    }

    /// Every slot errored: say so once and keep the primary alive (the
    /// watch handles referenced) until a change starts them again.
    fn wait_for_change(&self, lp: &mut Loop) {
        let (handles, shown) = {
            let mut s = self.state.borrow_mut();
            if s.stopped || s.waiting {
                return;
            }
            s.waiting = true;
            (s.handles.clone(), s.shown.clone())
        };
        for h in handles {
            let _ = lp.ref_handle(h);
        }
        log::error!(
            target: events::TARGET,
            "all workers errored; waiting for a change to start again (watching {shown})"
        );
    }

    /// A worker runs again: the watch no longer keeps the primary alive.
    fn resumed(&self, lp: &mut Loop) {
        let handles = {
            let mut s = self.state.borrow_mut();
            if !std::mem::take(&mut s.waiting) {
                return;
            }
            s.handles.clone()
        };
        for h in handles {
            let _ = lp.unref_handle(h);
        }
    }

    /// Feeds the watcher the supervisor's events: a stop ends the watch
    /// (its handles closed), so that no change reloads a stopping pool.
    ///
    /// An `errored` slot that leaves no slot serving makes the watch wait
    /// for a change (the supervisor holds the pool:
    /// [`Supervisor::hold_when_errored`]); a fork ends the wait. The end of
    /// the first start (every slot ready) closes its epoch for the
    /// self-trigger guard.
    pub fn on_event(&self, lp: &mut Loop, e: &LifecycleEvent) {
        match e {
            LifecycleEvent::Stopping { .. } | LifecycleEvent::Exiting { .. } => self.stop(lp),
            LifecycleEvent::Errored { .. } => {
                let sup = self.state.borrow().sup;
                let st = sup.status(lp);
                if !st.is_empty() && st.iter().all(|r| r.state == WorkerState::Errored) {
                    self.wait_for_change(lp);
                }
            }
            LifecycleEvent::Forked { .. } => self.resumed(lp),
            LifecycleEvent::Ready { .. } => {
                let (sup, first) = {
                    let s = self.state.borrow();
                    (s.sup, s.epoch_open && !s.reloading)
                };
                if first && sup.status(lp).iter().all(|r| r.state == WorkerState::Ready) {
                    let now = lp.now();
                    let mut s = self.state.borrow_mut();
                    s.epoch_open = false;
                    s.epoch_end = Some(now);
                }
            }
            _ => {}
        }
    }

    /// Closes every handle of the watch. Idempotent.
    pub fn stop(&self, lp: &mut Loop) {
        let (handles, timer) = {
            let mut s = self.state.borrow_mut();
            if s.stopped {
                return;
            }
            s.stopped = true;
            s.pending = false;
            (std::mem::take(&mut s.handles), s.timer)
        };
        for h in handles {
            lp.close_if_open(h);
        }
        lp.close_if_open(timer);
    }
}

/// Whether `path` is one of the primary's own output files.
fn is_own(own: &[FileId], path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    !own.is_empty() && std::fs::metadata(path).is_ok_and(|m| own.contains(&(m.dev(), m.ino())))
}

/// `src/app.js changed`, `src/app.js and 3 more changes`.
fn describe(first: Option<PathBuf>, events: usize) -> String {
    let mut s = match first {
        Some(p) => format!("{} changed", p.display()),
        None => "a change".to_string(),
    };
    if events > 1 {
        let _ = write!(s, " ({} events)", events);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(extra: &[&str]) -> Ignore {
        Ignore::new(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn defaults_leave_out_vcs_dependencies_and_build_output_at_any_depth() {
        let i = ig(&[]);
        for p in [
            ".git",
            ".git/HEAD",
            "node_modules",
            "a/node_modules/x/y.js",
            "target/debug",
            "app.log",
            "logs/today.log",
        ] {
            assert!(i.is_ignored(Path::new(p)), "{p}");
        }
        for p in ["app.js", "src/lib.rs", "targets/x", "src/.gitignore"] {
            assert!(!i.is_ignored(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn a_name_pattern_matches_any_component_and_a_path_pattern_the_relative_path() {
        let i = ig(&["*.log", "dist/**", "src/gen"]);
        assert!(i.is_ignored(Path::new("out.log")));
        assert!(i.is_ignored(Path::new("a/b/out.log")));
        assert!(!i.is_ignored(Path::new("out.log.js")));
        assert!(i.is_ignored(Path::new("dist/a.js")));
        assert!(i.is_ignored(Path::new("dist/x/a.js")));
        assert!(!i.is_ignored(Path::new("src/dist.js")));
        assert!(i.is_ignored(Path::new("src/gen")));
        assert!(i.is_ignored(Path::new("src/gen/x.rs")));
        assert!(!i.is_ignored(Path::new("a/src/gen/x.rs")));
        // `*` stays within a component.
        let i = ig(&["src/*.tmp"]);
        assert!(i.is_ignored(Path::new("src/a.tmp")));
        assert!(!i.is_ignored(Path::new("src/a/b.tmp")));
        // A leading `/` anchors; a trailing one does not.
        assert!(ig(&["/tmp"]).is_ignored(Path::new("tmp/x")));
        assert!(!ig(&["/tmp"]).is_ignored(Path::new("x/tmp")));
        assert!(ig(&["build/"]).is_ignored(Path::new("x/build/y")));
    }

    #[test]
    fn bad_globs_are_refused_with_the_pattern() {
        let e = check_glob("[abc").unwrap_err();
        assert!(e.contains("Received \"[abc\""), "{e}");
        assert!(check_glob("").is_err());
        assert!(check_glob("**/*.rs").is_ok());
    }

    #[test]
    fn a_batch_is_described_by_its_first_path_and_its_count() {
        assert_eq!(
            describe(Some(PathBuf::from("src/app.js")), 1),
            "src/app.js changed"
        );
        assert_eq!(
            describe(Some(PathBuf::from("app.js")), 50),
            "app.js changed (50 events)"
        );
    }
}
