//! `uvcluster run --watch`: a change to a watched file reloads the pool
//! worker by worker while requests keep succeeding; ignored paths reload
//! nothing; new code that fails to start fails the reload closed (the old
//! workers keep answering, one log line says why) and the fix reloads; a
//! burst of writes is one reload; a change during a reload queues exactly
//! one more, never interleaved. Real binary, real Node workers and the
//! `cluster_hello` example as a Rust worker; every wait is on the binary's
//! own log lines with a deadline, never a sleep.

// The library's test helpers (the examples, `require_node`).
#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::collections::HashSet;
use std::path::Path;

use ops_util::{Load, Running, TempDir, finish, free_port, get_ok as get, ready_pids, uvcluster};

/// The clients of a load.
const CLIENTS: usize = 2;

/// A Node HTTP app answering `PID VERSION`, listening after `delay_ms`.
fn node_app(version: u32, delay_ms: u64) -> String {
    format!(
        "const http = require('http');\n\
         const VERSION = {version};\n\
         const server = http.createServer((req, res) => {{\n\
         \x20 res.setHeader('connection', 'close');\n\
         \x20 res.end(`${{process.pid}} ${{VERSION}}`);\n\
         }});\n\
         setTimeout(() => server.listen(+process.env.PORT), {delay_ms});\n"
    )
}

/// `uvcluster run -w 2 ARGS -- COMMAND`, `PORT` set; waits until both
/// workers are ready.
fn start(port: u16, args: &[&str], command: &[&str]) -> Running {
    start_with_config(port, Path::new("/dev/null"), args, command)
}

/// [`start`] with the configuration file `config`.
fn start_with_config(port: u16, config: &Path, args: &[&str], command: &[&str]) -> Running {
    let mut c = uvcluster();
    c.args(["run", "--config"])
        .arg(config)
        .args(["-w", "2"])
        .args(args)
        .arg("--")
        .args(command)
        .env("PORT", port.to_string());
    let mut run = Running::spawn(c);
    for _ in 0..2 {
        run.expect(") ready (after ");
    }
    run
}

/// [`start`] with `--watch PATH --watch-debounce DEBOUNCE EXTRA`.
fn watching(port: u16, path: &str, debounce: &str, extra: &[&str], command: &[&str]) -> Running {
    let mut args = vec!["--watch", path, "--watch-debounce", debounce];
    args.extend_from_slice(extra);
    start(port, &args, command)
}

/// What a load that failed no request saw.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    bodies: HashSet<String>,
}

/// A bounded closed-loop load of [`CLIENTS`] clients, one request per
/// connection, until [`stop_load`] stops it.
fn start_load(port: u16) -> Load {
    Load::start(port, CLIENTS, usize::MAX)
}

/// Stops `load`: what it saw. Asserts that no request failed.
fn stop_load(load: Load) -> Seen {
    let (ok, failures, bodies) = load.finish_with_bodies();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    Seen { ok, bodies }
}

/// Asks until both workers have answered: their `PID VERSION` bodies.
fn both_answer(port: u16) -> HashSet<String> {
    let mut bodies = HashSet::new();
    for _ in 0..50 {
        bodies.insert(get(port).unwrap());
        if bodies.len() == 2 {
            break;
        }
    }
    assert_eq!(bodies.len(), 2, "round-robin over both workers: {bodies:?}");
    bodies
}

fn node() -> String {
    util::require_node();
    "node".into()
}

/// Editing the Node app reloads it worker by worker: the new pids answer
/// with the new code, the old ones are gone, and not one request of a load
/// running throughout fails.
#[test]
fn watch_edit_reloads_node_workers_with_zero_failed_requests() {
    let node = node();
    let dir = TempDir::new("edit-node");
    dir.write("app.js", &node_app(1, 0));
    let app = dir.join("app.js");
    let port = free_port();
    let watched = dir.0.to_str().unwrap();
    let mut run = watching(port, watched, "100ms", &[], &[&node, app.to_str().unwrap()]);
    assert!(
        run.log.contains(&format!("watching {watched} (")),
        "{}",
        run.log
    );
    let old = both_answer(port);
    assert!(old.iter().all(|b| b.ends_with(" 1")), "{old:?}");
    let load = start_load(port);
    dir.write("app.js", &node_app(2, 0));
    let line = run.expect("uvcluster: watch: ");
    assert!(
        line.contains(&format!("{} changed", app.display())) && line.contains("reloading"),
        "{line}"
    );
    run.expect("reload finished (2 workers replaced");
    let seen = stop_load(load);
    assert!(seen.ok > 0, "the load made requests");
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 2")), "{new:?}");
    let pid = |b: &String| b.split(' ').next().unwrap().to_string();
    let old_pids: HashSet<String> = old.iter().map(pid).collect();
    let new_pids: HashSet<String> = new.iter().map(pid).collect();
    assert!(old_pids.is_disjoint(&new_pids), "{old_pids:?} {new_pids:?}");
    // Every answer during the roll came from an old or a new worker.
    for b in &seen.bodies {
        assert!(old.contains(b) || new.contains(b), "{b} from neither");
    }
    run.stop();
}

/// The same with the `cluster_hello` example as a Rust worker: a change
/// anywhere under the watched directory replaces both worker processes
/// (the pids of the `ready` lines) while every request succeeds.
#[test]
fn watch_edit_reloads_rust_workers_with_zero_failed_requests() {
    let exe = util::example("cluster_hello");
    let dir = TempDir::new("edit-rust");
    dir.write("conf/settings.toml", "greeting = \"hello\"\n");
    let port = free_port();
    let mut run = watching(
        port,
        dir.0.to_str().unwrap(),
        "100ms",
        &[],
        &[exe.to_str().unwrap()],
    );
    let old = ready_pids(&run.log);
    assert_eq!(old.len(), 2, "{}", run.log);
    let load = start_load(port);
    let mark = run.log.len();
    dir.write("conf/settings.toml", "greeting = \"hi\"\n");
    run.expect("settings.toml changed");
    run.expect("reload finished (2 workers replaced");
    let seen = stop_load(load);
    assert!(seen.ok > 0);
    assert_eq!(seen.bodies, HashSet::from(["hello world\n".to_string()]));
    let new = ready_pids(run.since(mark));
    assert_eq!(new.len(), 2, "{}", run.log);
    assert!(old.is_disjoint(&new), "{old:?} {new:?}");
    assert_eq!(get(port).unwrap(), "hello world\n");
    run.stop();
}

/// Changes under the default ignores (`node_modules`, `.git`, `target`,
/// existing or created while running) and under an `--ignore` glob reach
/// nothing: the next watched change is the first one the watcher reports,
/// and the only reload.
#[test]
fn watch_ignores_default_and_given_globs() {
    let node = node();
    let dir = TempDir::new("ignore");
    dir.write("app.js", &node_app(1, 0));
    dir.write("node_modules/dep/index.js", "1");
    dir.write(".git/HEAD", "ref: refs/heads/main\n");
    // Existing directories: creating one would be a change of its own
    // (`build/**` leaves out what is in `build`, not `build`).
    std::fs::create_dir(dir.join("logs")).unwrap();
    std::fs::create_dir(dir.join("build")).unwrap();
    let port = free_port();
    let mut run = watching(
        port,
        dir.0.to_str().unwrap(),
        "100ms",
        &["--ignore", "*.log", "--ignore", "build/**"],
        &[&node, dir.join("app.js").to_str().unwrap()],
    );
    let before = both_answer(port);
    let mark = run.log.len();
    // Every kind of ignored change; the queue keeps inotify's order, so a
    // reported one would come before the trigger below.
    dir.write("node_modules/dep/index.js", "2");
    dir.write("node_modules/new/index.js", "1");
    dir.write(".git/HEAD", "ref: refs/heads/other\n");
    dir.write("target/debug/out", "x");
    dir.write("target/debug/deeper/out", "x");
    dir.write("server.log", "a line\n");
    dir.write("logs/today.log", "a line\n");
    dir.write("build/bundle.js", "x");
    dir.write("trigger.txt", "now");
    let line = run.expect("uvcluster: watch: ");
    assert!(
        line.contains(&format!("{} changed", dir.join("trigger.txt").display())),
        "the first change reported is the trigger: {line}\n{}",
        run.log
    );
    run.expect("reload finished");
    let after = both_answer(port);
    assert!(before.is_disjoint(&after));
    let log = run.stop();
    let since = &log[mark..];
    assert_eq!(since.matches("uvcluster: watch: ").count(), 1, "{since}");
    assert_eq!(since.matches("reload started").count(), 1, "{since}");
}

/// A save that breaks the app (a syntax error) fails the reload closed:
/// the replacement dies before it listens, one log line names why, the old
/// workers keep answering (no request fails) with the old code. Fixing the
/// file reloads, and the new code answers.
#[test]
fn watch_broken_code_fails_closed_and_the_fix_reloads() {
    let node = node();
    let dir = TempDir::new("broken");
    dir.write("app.js", &node_app(1, 0));
    let port = free_port();
    let mut run = watching(
        port,
        dir.join("app.js").to_str().unwrap(),
        "100ms",
        &[],
        &[&node, dir.join("app.js").to_str().unwrap()],
    );
    let old = both_answer(port);
    let load = start_load(port);
    dir.write("app.js", "const = ;\n");
    let failed = run.expect("reload failed: ");
    assert!(
        failed.contains("exited with code 1 before it was ready")
            && failed.contains("the old workers keep serving"),
        "{failed}"
    );
    assert_eq!(run.log.matches("reload failed").count(), 1, "{}", run.log);
    let seen = stop_load(load);
    assert!(seen.ok > 0);
    assert_eq!(seen.bodies, old, "only the old workers answered");
    assert_eq!(both_answer(port), old, "the old workers still serve");

    let load = start_load(port);
    dir.write("app.js", &node_app(3, 0));
    run.expect("reload finished (2 workers replaced");
    stop_load(load);
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 3")), "{new:?}");
    assert!(old.is_disjoint(&new));
    run.stop();
}

/// 50 files written in a burst are one batch and one reload: the watch
/// line counts at least 50 events, no second reload is queued or started
/// before a later, separate change.
#[test]
fn watch_burst_of_50_writes_is_one_reload() {
    let node = node();
    let dir = TempDir::new("burst");
    dir.write("app.js", &node_app(1, 0));
    std::fs::create_dir(dir.join("data")).unwrap();
    let port = free_port();
    let mut run = watching(
        port,
        dir.0.to_str().unwrap(),
        "500ms",
        &[],
        &[&node, dir.join("app.js").to_str().unwrap()],
    );
    let mark = run.log.len();
    for i in 0..50 {
        dir.write(&format!("data/{i}.json"), &format!("{{\"n\":{i}}}"));
    }
    let line = run.expect("uvcluster: watch: ");
    let events: usize = line
        .rsplit_once(" (")
        .and_then(|(_, n)| n.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("an event count: {line}"));
    assert!(events >= 50, "{line}");
    run.expect("reload finished");
    dir.write("later.txt", "x");
    run.expect("later.txt changed");
    run.expect("reload finished");
    let since = run.since(mark).to_string();
    run.stop();
    assert_eq!(since.matches("reload started").count(), 2, "{since}");
    assert_eq!(since.matches("uvcluster: watch: ").count(), 2, "{since}");
    assert!(!since.contains("reload queued"), "{since}");
}

/// A change during a reload queues one reload, started after the running
/// one finished (never interleaved); a second change during it adds none.
#[test]
fn watch_change_during_a_reload_queues_one_more() {
    let node = node();
    let dir = TempDir::new("queued");
    // Each worker takes 700 ms to listen, so a reload of two lasts > 1 s.
    dir.write("app.js", &node_app(1, 700));
    let port = free_port();
    let mut run = watching(
        port,
        dir.0.to_str().unwrap(),
        "100ms",
        &[],
        &[&node, dir.join("app.js").to_str().unwrap()],
    );
    let mark = run.log.len();
    let load = start_load(port);
    dir.write("app.js", &node_app(2, 700));
    run.expect("reload started");
    dir.write("one.txt", "x");
    run.expect("during a reload: one more reload queued after it");
    dir.write("two.txt", "x");
    run.expect("reload finished");
    let second = run.expect("uvcluster: watch: ");
    assert!(
        second.contains("changes during the last reload"),
        "{second}"
    );
    run.expect("reload finished");
    stop_load(load);
    let since = run.since(mark).to_string();
    let log = run.stop();
    // started, finished, started, finished: in that order, two of each.
    let order: Vec<&str> = since
        .lines()
        .filter_map(|l| {
            if l.contains("reload started") {
                Some("started")
            } else if l.contains("reload finished") {
                Some("finished")
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        order,
        ["started", "finished", "started", "finished"],
        "{log}"
    );
    assert_eq!(
        since.matches("reload queued after it").count(),
        1,
        "{since}"
    );
}

/// `watch`, `ignore` and `watch-debounce` from `uvcluster.toml`: the
/// file's ignore applies, its watched directory reloads.
#[test]
fn watch_from_the_configuration_file() {
    let node = node();
    let dir = TempDir::new("config");
    dir.write("app/app.js", &node_app(1, 0));
    std::fs::create_dir(dir.join("app/cache")).unwrap();
    let conf = dir.join("uvcluster.toml");
    std::fs::write(
        &conf,
        format!(
            "watch = [{:?}]\nignore = [\"cache\"]\nwatch-debounce = \"100ms\"\n",
            dir.join("app").display().to_string()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut run = start_with_config(
        port,
        &conf,
        &[],
        &[&node, dir.join("app/app.js").to_str().unwrap()],
    );
    assert!(
        run.log
            .contains(&format!("watching {} (", dir.join("app").display()))
            && run
                .log
                .contains("ignoring .git, node_modules, target, *.log, cache)"),
        "{}",
        run.log
    );
    let old = both_answer(port);
    dir.write("app/cache/entry", "x");
    dir.write("app/app.js", &node_app(2, 0));
    let line = run.expect("uvcluster: watch: ");
    assert!(line.contains("app.js changed"), "{line}");
    run.expect("reload finished (2 workers replaced");
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 2")), "{new:?}");
    assert!(old.is_disjoint(&new));
    run.stop();
}

/// A watched path that does not exist is a start failure naming it
/// (exit 1), before any worker is forked.
#[test]
fn watch_missing_path_fails_the_start() {
    let dir = TempDir::new("missing");
    let missing = dir.join("nope");
    let mut c = uvcluster();
    c.args(["run", "--config", "/dev/null", "-w", "1", "--watch"])
        .arg(&missing)
        .args(["--", "true"]);
    let (code, _, err) = finish(c);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("--watch {}: ", missing.display())) && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("forked"), "{err}");
}

/// [`node_app`] that first appends a line to `rel` (relative to its own
/// directory), as an app writing a counter or a cache at start does, and
/// exits 1 on `GET /exit`.
fn writing_app(version: u32, rel: &str) -> String {
    format!(
        "require('fs').appendFileSync(require('path').join(__dirname, {rel:?}), 'up\\n');\n\
         const http = require('http');\n\
         const VERSION = {version};\n\
         http.createServer((req, res) => {{\n\
         \x20 if (req.url === '/exit') process.exit(1);\n\
         \x20 res.setHeader('connection', 'close');\n\
         \x20 res.end(`${{process.pid}} ${{VERSION}}`);\n\
         }}).listen(+process.env.PORT);\n"
    )
}

/// Issue 14: an app that writes into the watched tree at every start
/// (`data/visits.txt`, not a default ignore) reloaded the pool forever.
/// Now at most 2 reloads happen, one warning names the file and suggests
/// `--ignore`, and the file is no longer watched; an edit of the app still
/// reloads (once), and the workers' next writes trigger nothing: the next
/// change reported is a later trigger.
#[test]
fn watch_app_writing_into_the_watched_tree_reloads_at_most_twice_then_warns() {
    let node = node();
    let dir = TempDir::new("self-trigger");
    std::fs::create_dir(dir.join("data")).unwrap();
    dir.write("app.js", &writing_app(1, "data/visits.txt"));
    let port = free_port();
    let mut run = watching(
        port,
        dir.0.to_str().unwrap(),
        "100ms",
        &[],
        &[&node, dir.join("app.js").to_str().unwrap()],
    );
    let warn = run.expect("no longer watching");
    let visits = dir.join("data/visits.txt");
    assert!(
        warn.contains("WARN")
            && warn.contains(&format!("{} changed again", visits.display()))
            && warn.contains("2 reloads in a row")
            && warn.contains("--ignore GLOB"),
        "{warn}"
    );
    let reloads = run.log.matches("reload started").count();
    assert!((1..=2).contains(&reloads), "{}", run.log);
    let mark = run.log.len();
    // An edit of the app still reloads.
    dir.write("app.js", &writing_app(2, "data/visits.txt"));
    let line = run.expect("uvcluster: watch: ");
    assert!(
        line.contains(&format!("{} changed", dir.join("app.js").display())),
        "{line}\n{}",
        run.log
    );
    run.expect("reload finished (2 workers replaced");
    let new = both_answer(port);
    assert!(new.iter().all(|b| b.ends_with(" 2")), "{new:?}");
    // The new workers wrote visits.txt again: not a change any more. The
    // queue keeps inotify's order, so a reported one would come first.
    dir.write("trigger.txt", "now");
    let line = run.expect("uvcluster: watch: ");
    assert!(line.contains("trigger.txt changed"), "{line}\n{}", run.log);
    run.expect("reload finished");
    let since = run.since(mark).to_string();
    let log = run.stop();
    assert_eq!(since.matches("reload started").count(), 2, "{since}");
    assert_eq!(log.matches("no longer watching").count(), 1, "{log}");
    assert!(
        std::fs::read_to_string(&visits).unwrap().lines().count() >= 6,
        "every start wrote its line"
    );
}

/// Issue 14: `uvcluster run --watch DIR ... > DIR/out.txt 2>&1` reloaded
/// on every line the primary or a worker logged, and an app appending to
/// `DIR/logs/app.log` at start reloaded forever. The primary's own output
/// file is never a change (the `watching` line names it), `*.log` is a
/// default ignore: the first change reported is the app's edit, the only
/// reload with a later trigger.
#[test]
fn watch_never_reacts_to_the_primarys_own_output_file() {
    let node = node();
    let dir = TempDir::new("own-output");
    // The first repro too: the app appends to `logs/app.log` at
    // every start (a default ignore now).
    std::fs::create_dir(dir.join("logs")).unwrap();
    dir.write("app.js", &writing_app(1, "logs/app.log"));
    let out = dir.join("out.txt");
    let port = free_port();
    let file = std::fs::File::create(&out).unwrap();
    let mut c = ops_util::uvcluster();
    c.args(["run", "--config", "/dev/null", "-w", "2", "--watch"])
        .arg(&dir.0)
        .args(["--watch-debounce", "100ms", "--", &node])
        .arg(dir.join("app.js"))
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let mut child = Reap(Some(c.spawn().unwrap()));
    let log = || std::fs::read_to_string(&out).unwrap_or_default();
    let wait_for = |what: &str, n: usize| {
        ops_util::eventually_seen(&format!("{n} x {what:?} in {}", out.display()), || {
            let l = log();
            (l.matches(what).count() >= n, l)
        })
    };
    wait_for(") ready (after ", 2);
    let before = both_answer(port);
    dir.write("app.js", &writing_app(2, "logs/app.log"));
    wait_for("reload finished (2 workers replaced", 1);
    let after = both_answer(port);
    assert!(after.iter().all(|b| b.ends_with(" 2")), "{after:?}");
    assert!(before.is_disjoint(&after));
    dir.write("trigger.txt", "now");
    wait_for("reload finished (2 workers replaced", 2);
    let child = child.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = ops_util::wait_output(child).status;
    let log = log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("{} (this process's output)", out.display())),
        "{log}"
    );
    let watch: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("uvcluster: watch: "))
        .collect();
    assert_eq!(watch.len(), 2, "{log}");
    assert!(watch[0].contains("app.js changed"), "{log}");
    assert!(watch[1].contains("trigger.txt changed"), "{log}");
    assert_eq!(log.matches("reload started").count(), 2, "{log}");
    let starts = std::fs::read_to_string(dir.join("logs/app.log")).unwrap();
    assert!(starts.lines().count() >= 6, "every start wrote its line");
}

/// A child killed if the test ends first.
struct Reap(Option<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Issue 14: with `--watch`, a broken save, then a crash of the old
/// worker: its restarts run the broken code until the slot is errored.
/// The primary used to exit 1 and the fix brought nothing back. Now it
/// says it waits, stays up (`/readyz` 503, the control socket answers),
/// and the fix starts the slot again: a 200 with the new code.
#[test]
fn watch_all_workers_errored_waits_for_the_fix_and_serves_again() {
    let node = node();
    let dir = TempDir::new("errored");
    dir.write("app.js", &writing_app(1, "starts.txt"));
    let app = dir.join("app.js");
    let port = free_port();
    let metrics = free_port();
    let sock = dir.join("ctl.sock");
    let mut c = uvcluster();
    c.args(["run", "--config", "/dev/null", "-w", "1", "--watch"])
        .arg(&app)
        .args(["--watch-debounce", "100ms", "--backoff-initial", "10ms"])
        .args(["--metrics", &format!("127.0.0.1:{metrics}"), "--control"])
        .arg(&sock)
        .args(["--", &node])
        .arg(&app)
        .env("PORT", port.to_string());
    let mut run = Running::spawn(c);
    run.expect(") ready (after ");
    assert!(get(port).unwrap().ends_with(" 1"));
    dir.write("app.js", "oops (\n");
    run.expect("reload failed: ");
    // The old worker crashes: its restarts run the broken code.
    let _ = ops_util::get(port, "/exit");
    run.expect("slot 0 errored: ");
    let waiting = run.expect("all workers errored; waiting for a change to start again");
    assert!(
        waiting.contains(&format!("(watching {})", app.display())),
        "{waiting}"
    );
    assert!(run.running(), "{}", run.log);
    let (code, _) = ops_util::get(metrics, "/readyz").unwrap();
    assert_eq!(code, 503);
    let st = ops_util::status(&sock);
    assert!(st.to_string().contains("errored"), "{st}");
    dir.write("app.js", &writing_app(2, "starts.txt"));
    run.expect("reload finished (1 worker replaced");
    let body = get(port).unwrap();
    assert!(body.ends_with(" 2"), "{body}");
    assert_eq!(ops_util::get(metrics, "/readyz").unwrap().0, 200);
    let log = run.stop();
    assert_eq!(log.matches("all workers errored").count(), 1, "{log}");
    assert!(!log.contains("exiting with code 1"), "{log}");
}
