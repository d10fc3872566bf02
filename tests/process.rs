//! Child processes: spawn, exit status, kill, stdio placement, reaping
//! (libuv's `test/test-spawn.c`).
mod util;

use std::cell::RefCell;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;

use nix::libc;
use util::*;
use uvcluster::uv::{Handle, Loop, Pipe, ProcessOptions, Signum, SpawnError, Stdio};

/// The errno of a failed spawn, from the [`SpawnError`] it carries.
fn spawn_errno(e: &std::io::Error) -> Option<i32> {
    SpawnError::of(e)
        .unwrap_or_else(|| panic!("not a spawn error: {e:?}"))
        .raw_os_error()
}

/// Reads `pipe` to EOF into the returned buffer, then closes it.
fn collect(lp: &mut Loop, pipe: Handle<Pipe>) -> Rc<RefCell<Vec<u8>>> {
    let out = Rc::new(RefCell::new(Vec::new()));
    let o = out.clone();
    lp.read_start(pipe, move |lp, p, data| match data {
        Ok(d) if !d.is_empty() => o.borrow_mut().extend_from_slice(d),
        _ => lp.close(p, |_| {}).unwrap(),
    })
    .unwrap();
    out
}

/// An exit callback that records `(status, signal)` and closes the handle.
fn record_exit(
    exits: &Rc<RefCell<Vec<(i64, i32)>>>,
) -> impl FnOnce(&mut Loop, Handle<uvcluster::uv::Process>, i64, Option<Signum>) + 'static {
    let e = exits.clone();
    move |lp, p, status, sig| {
        assert!(!lp.is_active(p), "a reaped process is inactive");
        e.borrow_mut().push((status, sig.map_or(0, Signum::as_raw)));
        lp.close(p, |_| {}).unwrap();
    }
}

fn string(buf: &Rc<RefCell<Vec<u8>>>) -> String {
    String::from_utf8(buf.borrow().clone()).unwrap()
}

#[test]
fn spawn_fails() {
    let mut lp = Loop::new().unwrap();
    let token = Rc::new(());
    let t = token.clone();
    let err = lp
        .spawn(
            ProcessOptions::new("/nonexistent/uvcluster-no-such-file").on_exit(
                move |_, _, _, _| {
                    let _ = &t;
                    panic!("exit callback of a failed spawn");
                },
            ),
        )
        .unwrap_err();
    assert_eq!(spawn_errno(&err), Some(libc::ENOENT));
    assert_eq!(Rc::strong_count(&token), 1, "the callback was dropped");
    // Not executable: EACCES.
    let err = lp.spawn(ProcessOptions::new("/etc/passwd")).unwrap_err();
    assert_eq!(spawn_errno(&err), Some(libc::EACCES));
    assert_eq!(lp.handle_count(), 0);
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_exit_code() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let p = lp
        .spawn(
            ProcessOptions::new("sh")
                .args(["-c", "exit 42"])
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
    assert!(lp.is_active(p));
    assert!(lp.process_pid(p).unwrap() > 0);
    // The internal SIGCHLD watcher is not visible.
    let mut seen = Vec::new();
    lp.walk(|h| seen.push(h));
    assert_eq!(seen, vec![uvcluster::uv::AnyHandle::Process(p)]);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(*exits.borrow(), vec![(42, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_and_kill() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let after = Counter::new();
    let e = exits.clone();
    let a = after.clone();
    let p = lp
        .spawn(
            ProcessOptions::new("sleep")
                .arg("100")
                .on_exit(move |lp, p, status, sig| {
                    e.borrow_mut().push((status, sig.map_or(0, Signum::as_raw)));
                    assert!(lp.process_exited(p).unwrap());
                    // Once reaped, the pid may be someone else's: ESRCH.
                    let err = lp.process_kill(p, Signum::SIGTERM).unwrap_err();
                    assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
                    a.hit();
                    lp.close(p, |_| {}).unwrap();
                }),
        )
        .unwrap();
    // No signal (libuv's 0) checks that the child can be signalled.
    lp.process_kill(p, None).unwrap();
    lp.process_kill(p, Signum::SIGTERM).unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(*exits.borrow(), vec![(0, libc::SIGTERM)]);
    assert_eq!(after.get(), 1);
    assert_loop_empty(&lp);
}

#[test]
fn kill_invalid_signum() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let p = lp
        .spawn(
            ProcessOptions::new("sleep")
                .arg("100")
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
    // Numbers that are no signal are refused where they become a Signum.
    let einval = std::io::Error::from_raw_os_error(libc::EINVAL).kind();
    let err = std::io::Error::from(Signum::try_from(-1).unwrap_err());
    assert_eq!(err.kind(), einval);
    let err = std::io::Error::from(Signum::try_from(4096).unwrap_err());
    assert_eq!(err.kind(), einval);
    lp.process_kill(p, Signum::SIGKILL).unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(*exits.borrow(), vec![(0, libc::SIGKILL)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_stdout() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let out = lp.pipe_init(false);
    lp.spawn(
        ProcessOptions::new("echo")
            .arg("hello world")
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(string(&buf), "hello world\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_stdin() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let input = lp.pipe_init(false);
    let out = lp.pipe_init(false);
    lp.spawn(
        ProcessOptions::new("cat")
            .stdio(0, Stdio::Pipe(input))
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    let wrote = Counter::new();
    let w = wrote.clone();
    lp.write(input, &[b"hello ", b"world"], move |lp, h, r| {
        r.unwrap();
        w.hit();
        lp.shutdown(h, |lp, h, r| {
            r.unwrap();
            lp.close(h, |_| {}).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(wrote.get(), 1);
    assert_eq!(string(&buf), "hello world");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_env() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let out = lp.pipe_init(false);
    lp.spawn(
        ProcessOptions::new("/usr/bin/env")
            .env([("FOO", "bar"), ("UVCLUSTER", "1 2 3")])
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(string(&buf), "FOO=bar\nUVCLUSTER=1 2 3\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_cwd() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let dir = std::env::temp_dir().canonicalize().unwrap();
    let out = lp.pipe_init(false);
    lp.spawn(
        ProcessOptions::new("pwd")
            .arg("-P")
            .cwd(&dir)
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(string(&buf).trim_end(), dir.to_str().unwrap());
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_detached() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let out = lp.pipe_init(false);
    // Field 6 of /proc/self/stat is the session id; `cut` is the child.
    let p = lp
        .spawn(
            ProcessOptions::new("cut")
                .args(["-d", " ", "-f", "6", "/proc/self/stat"])
                .detached(true)
                .stdio(1, Stdio::Pipe(out))
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
    let pid = lp.process_pid(p).unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    let sid: i32 = string(&buf).trim().parse().unwrap();
    assert_eq!(sid, pid, "a detached child leads its own session");
    assert_ne!(sid, nix::unistd::getsid(None).unwrap().as_raw());
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_ipc_at_fd3() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let ipc = lp.pipe_init(true);
    lp.spawn(
        ProcessOptions::new("sh")
            .args(["-c", "printf '{\"cmd\":\"online\"}\\n' >&3"])
            .stdio(3, Stdio::Ipc(ipc))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    assert!(lp.pipe_is_ipc(ipc));
    let buf = collect(&mut lp, ipc);
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(string(&buf), "{\"cmd\":\"online\"}\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_ipc_needs_ipc_pipe() {
    let mut lp = Loop::new().unwrap();
    let plain = lp.pipe_init(false);
    let err = lp
        .spawn(ProcessOptions::new("true").stdio(3, Stdio::Ipc(plain)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // A pipe that already has a socket cannot take another one.
    let (a, b) = lp.pipe_pair(false).unwrap();
    let err = lp
        .spawn(ProcessOptions::new("true").stdio(1, Stdio::Pipe(a)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    for h in [plain, a, b] {
        lp.close(h, |_| {}).unwrap();
    }
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_inherit_fd_at_3() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    lp.spawn(
        ProcessOptions::new("sh")
            .args(["-c", "echo via-fd >&3"])
            .stdio(3, Stdio::Fd(theirs.as_fd()))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    drop(theirs);
    run_with_deadline(&mut lp, 10_000);
    let mut s = String::new();
    ours.read_to_string(&mut s).unwrap();
    assert_eq!(s, "via-fd\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

/// `Inherit` at any number gives the child our fd of that number, even a
/// CLOEXEC one; an inherited number we do not have is simply not open.
#[test]
fn spawn_inherit_same_number() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let n = w.as_raw_fd();
    let script = format!("echo inherited >/proc/self/fd/{n}; [ ! -e /proc/self/fd/900 ]");
    lp.spawn(
        ProcessOptions::new("sh")
            .args(["-c", &script])
            .stdio(n, Stdio::Inherit)
            .stdio(900, Stdio::Inherit)
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    drop(w);
    run_with_deadline(&mut lp, 10_000);
    let mut s = String::new();
    std::fs::File::from(r).read_to_string(&mut s).unwrap();
    assert_eq!(s, "inherited\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

/// `uid`/`gid`: as root the child runs as `nobody`; otherwise setuid is
/// refused and the spawn fails synchronously.
#[test]
fn spawn_setuid_setgid() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let out = lp.pipe_init(false);
    let r = lp.spawn(
        ProcessOptions::new("sh")
            .args(["-c", "echo $(id -u) $(id -g)"])
            .uid(65534)
            .gid(65534)
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    );
    if nix::unistd::geteuid().is_root() {
        r.unwrap();
        let buf = collect(&mut lp, out);
        run_with_deadline(&mut lp, 10_000);
        assert_eq!(string(&buf), "65534 65534\n");
        assert_eq!(*exits.borrow(), vec![(0, 0)]);
    } else {
        assert_eq!(spawn_errno(&r.unwrap_err()), Some(libc::EPERM));
        lp.close(out, |_| {}).unwrap();
        run_with_deadline(&mut lp, 5000);
    }
    assert_loop_empty(&lp);
}

/// Two sources whose numbers are each other's targets: placing them one
/// after the other naively would overwrite the second source.
#[test]
fn spawn_fd_swap() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let (n1, n2) = (w1.as_raw_fd(), w2.as_raw_fd());
    let script = format!("echo one >/proc/self/fd/{n2}; echo two >/proc/self/fd/{n1}");
    lp.spawn(
        ProcessOptions::new("sh")
            .args(["-c", &script])
            .stdio(n2, Stdio::Fd(w1.as_fd()))
            .stdio(n1, Stdio::Fd(w2.as_fd()))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    drop((w1, w2));
    run_with_deadline(&mut lp, 10_000);
    let read = |fd: OwnedFd| {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    };
    assert_eq!(read(r1), "one\n");
    assert_eq!(read(r2), "two\n");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_auto_unref() {
    let mut lp = Loop::new().unwrap();
    let p = lp.spawn(ProcessOptions::new("true")).unwrap();
    assert!(lp.is_active(p));
    // No exit callback: the loop ends once the child is reaped.
    run_with_deadline(&mut lp, 10_000);
    assert!(!lp.is_active(p));
    assert!(!lp.is_closing(p));
    assert!(lp.process_exited(p).unwrap());
    lp.close(p, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_unref_does_not_keep_loop_alive() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let p = lp
        .spawn(
            ProcessOptions::new("sleep")
                .arg("100")
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
    lp.unref_handle(p).unwrap();
    assert!(!lp.alive());
    lp.ref_handle(p).unwrap();
    lp.process_kill(p, Signum::SIGKILL).unwrap();
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(*exits.borrow(), vec![(0, libc::SIGKILL)]);
    assert_loop_empty(&lp);
}

#[test]
fn process_close_before_exit_no_callback() {
    let mut lp = Loop::new().unwrap();
    let closed = Counter::new();
    let p = lp
        .spawn(
            ProcessOptions::new("sleep")
                .arg("100")
                .on_exit(|_, _, _, _| panic!("exit callback after close")),
        )
        .unwrap();
    let pid = lp.process_pid(p).unwrap();
    let c = closed.clone();
    lp.close(p, move |_| c.hit()).unwrap();
    uvcluster::uv::kill(pid, Signum::SIGKILL).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_eq!(closed.get(), 1);
    assert_loop_empty(&lp);
    // The loop no longer reaps it; do it here so no zombie is left.
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
    assert!(matches!(st, nix::sys::wait::WaitStatus::Signaled(..)));
}

/// libuv's spawn_exercise_sigchld_issue: failed spawns around a real one
/// produce exactly one exit callback.
#[test]
fn spawn_failures_interleaved_one_exit() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    for i in 0..100 {
        if i == 50 {
            lp.spawn(
                ProcessOptions::new("sh")
                    .args(["-c", "exit 7"])
                    .on_exit(record_exit(&exits)),
            )
            .unwrap();
        }
        let err = lp
            .spawn(
                ProcessOptions::new("/nonexistent/uvcluster-no-such-file")
                    .on_exit(|_, _, _, _| panic!("exit callback of a failed spawn")),
            )
            .unwrap_err();
        assert_eq!(spawn_errno(&err), Some(libc::ENOENT));
    }
    run_with_deadline(&mut lp, 10_000);
    assert_eq!(*exits.borrow(), vec![(7, 0)]);
    assert_loop_empty(&lp);
}

#[test]
fn spawn_many_children() {
    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    for i in 0..20 {
        lp.spawn(
            ProcessOptions::new("sh")
                .args(["-c", &format!("exit {i}")])
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
    }
    run_with_deadline(&mut lp, 20_000);
    let mut got = exits.borrow().clone();
    got.sort();
    assert_eq!(got, (0..20).map(|i| (i, 0)).collect::<Vec<_>>());
    assert_loop_empty(&lp);
}

/// Each loop reaps only its own children, and SIGCHLD reaches every loop.
#[test]
fn spawn_on_several_loops() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut lp = Loop::new().unwrap();
                let exits = Rc::new(RefCell::new(Vec::new()));
                for _ in 0..3 {
                    lp.spawn(
                        ProcessOptions::new("sh")
                            .args(["-c", &format!("exit {}", 10 + t)])
                            .on_exit(record_exit(&exits)),
                    )
                    .unwrap();
                }
                run_with_deadline(&mut lp, 20_000);
                assert_eq!(*exits.borrow(), vec![(10 + t as i64, 0); 3]);
                assert_loop_empty(&lp);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// The child starts with an empty signal mask and default dispositions,
/// even when the parent blocks and ignores signals. The parent side runs
/// in a helper started with SIGUSR2 and SIGTERM ignored (a shell `trap ''`
/// survives `exec`), so no test thread's signal state is touched.
#[test]
fn spawn_resets_signal_mask_and_dispositions() {
    const NAME: &str = "spawn_resets_signal_mask_and_dispositions";
    if !is_helper(NAME) {
        let helper = helper_command(NAME);
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", "trap '' USR2 TERM; exec \"$0\" \"$@\""])
            .arg(helper.get_program())
            .args(helper.get_args());
        for (k, v) in helper.get_envs() {
            sh.env(k, v.unwrap());
        }
        let out = sh.output().unwrap();
        assert!(
            out.status.success(),
            "helper failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let status_mask = |text: &str, key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in status"));
        u64::from_str_radix(line[key.len()..].trim(), 16).unwrap()
    };
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let usr2 = 1u64 << (libc::SIGUSR2 - 1);
    assert_ne!(
        status_mask(&ours, "SigIgn:") & usr2,
        0,
        "helper ignores SIGUSR2"
    );
    let mut block = SigSet::empty();
    block.add(Signal::SIGTERM);
    block.add(Signal::SIGUSR1);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&block), None).unwrap();

    let mut lp = Loop::new().unwrap();
    let exits = Rc::new(RefCell::new(Vec::new()));
    let out = lp.pipe_init(false);
    lp.spawn(
        ProcessOptions::new("cat")
            .arg("/proc/self/status")
            .stdio(1, Stdio::Pipe(out))
            .on_exit(record_exit(&exits)),
    )
    .unwrap();
    let buf = collect(&mut lp, out);
    run_with_deadline(&mut lp, 10_000);
    let text = string(&buf);
    assert_eq!(status_mask(&text, "SigBlk:"), 0, "child mask:\n{text}");
    assert_eq!(status_mask(&text, "SigIgn:"), 0, "child ignores:\n{text}");
    assert_eq!(*exits.borrow(), vec![(0, 0)]);
    assert_loop_empty(&lp);
}

/// Spawning with pipes and closing everything leaves no fd behind.
#[test]
fn spawn_no_fd_leak() {
    isolated("spawn_no_fd_leak", || {
        let before = open_fds();
        let mut lp = Loop::new().unwrap();
        let exits = Rc::new(RefCell::new(Vec::new()));
        for _ in 0..5 {
            let out = lp.pipe_init(false);
            let ipc = lp.pipe_init(true);
            lp.spawn(
                ProcessOptions::new("sh")
                    .args(["-c", "echo out; echo ipc >&3"])
                    .stdio(1, Stdio::Pipe(out))
                    .stdio(3, Stdio::Ipc(ipc))
                    .on_exit(record_exit(&exits)),
            )
            .unwrap();
            collect(&mut lp, out);
            collect(&mut lp, ipc);
            let _ = lp.spawn(ProcessOptions::new("/nonexistent/uvcluster-no-such-file"));
        }
        run_with_deadline(&mut lp, 20_000);
        assert_eq!(*exits.borrow(), vec![(0, 0); 5]);
        assert_loop_empty(&lp);
        drop(lp);
        assert_eq!(open_fds(), before, "fds leaked");
    });
}

// ---- Only the fds a spawn places on purpose cross `exec` (issue 10, part 2) ----

/// This process's open fds, by number, with what each links to
/// (`socket:[inode]`, `pipe:[inode]`, a path), without the directory fd
/// that listing them opens.
fn own_fds() -> std::collections::BTreeMap<i32, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        let n: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        if let Ok(t) = std::fs::read_link(e.path()) {
            out.insert(n, t.to_string_lossy().into_owned());
        }
    }
    out.retain(|_, t| !(t.starts_with("/proc/") && t.ends_with("/fd")));
    out
}

/// What fd number `fd` links to in this process.
fn link_of(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Whether fd number `fd` of this process has `FD_CLOEXEC`, from the
/// `flags` line of `/proc/self/fdinfo` (octal; `O_CLOEXEC` is 0o2000000).
fn is_cloexec(fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    u64::from_str_radix(flags, 8).unwrap() & libc::O_CLOEXEC as u64 != 0
}

/// Fds that this process holds without `FD_CLOEXEC`, as a process holds
/// fds it inherited, or that C code opened without `O_CLOEXEC`: a
/// listening TCP socket, both ends of a pipe, and a copy of the socket at
/// 100 or above made with plain `F_DUPFD`. The copy is a bare number that
/// stays open until the process exits: only use this in an
/// [`isolated`] test.
struct Strays {
    _owned: Vec<OwnedFd>,
    nums: Vec<i32>,
}

impl Strays {
    fn new() -> Strays {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let listener: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
        let (r, w) = nix::unistd::pipe().unwrap();
        let owned = vec![listener, r, w];
        for fd in &owned {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        }
        let high = fcntl(&owned[0], FcntlArg::F_DUPFD(100)).unwrap();
        let mut nums: Vec<i32> = owned.iter().map(|f| f.as_raw_fd()).collect();
        nums.push(high);
        for &n in &nums {
            assert!(!is_cloexec(n), "stray fd {n} is inheritable");
        }
        Strays {
            _owned: owned,
            nums,
        }
    }

    /// Asserts that a child's fds (by number, with their links) hold
    /// none of them.
    fn assert_none_in(&self, child: &std::collections::BTreeMap<i32, String>) {
        for &n in &self.nums {
            let link = link_of(n);
            assert!(
                !child.values().any(|l| *l == link),
                "stray fd {n} ({link}) reached the child: {child:?}"
            );
        }
    }
}

const FD_REPORT: &str = "helper_fd_report";

/// The child of the tests below: lists its fds before it opens any, then
/// reports them over its IPC channel if it has one (`ipc::fork`,
/// `Primary::fork`), otherwise on stdout as one `FDS {...}` line.
#[test]
fn helper_fd_report() {
    if !is_helper(FD_REPORT) {
        return;
    }
    let fds = own_fds();
    let report = serde_json::json!({
        "fds": fds.iter().map(|(n, l)| (n.to_string(), serde_json::Value::from(l.as_str()))).collect::<serde_json::Map<_, _>>()
    });
    let mut lp = Loop::new().unwrap();
    match uvcluster::ipc::Channel::from_env(&mut lp, Default::default()).unwrap() {
        Some(ch) => {
            ch.send(&mut lp, &report, None).unwrap();
            ch.disconnect(&mut lp);
            run_with_deadline(&mut lp, 10_000);
        }
        // libtest may have begun the line with the test's name.
        None => println!("\nFDS {report}"),
    }
}

/// Parses a report of [`helper_fd_report`].
fn parse_report(v: &serde_json::Value) -> std::collections::BTreeMap<i32, String> {
    v["fds"]
        .as_object()
        .unwrap_or_else(|| panic!("not a report: {v}"))
        .iter()
        .map(|(n, l)| (n.parse().unwrap(), l.as_str().unwrap().to_owned()))
        .collect()
}

fn numbers(fds: &std::collections::BTreeMap<i32, String>) -> Vec<i32> {
    fds.keys().copied().collect()
}

/// `Loop::spawn` passes the fds it places (stdio, a socket placed at 5
/// and one at 200, a stray inherited on purpose at its own number) and
/// nothing else: no stray below, between or above them reaches the child.
#[test]
fn spawn_passes_only_the_fds_it_places() {
    isolated("spawn_passes_only_the_fds_it_places", || {
        let strays = Strays::new();
        // Like a socket from systemd's LISTEN_FDS: inheritable, and passed
        // on on purpose at its own number.
        let kept: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
        nix::fcntl::fcntl(
            &kept,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let kept_n = kept.as_raw_fd();
        assert!(kept_n > 5 && kept_n < 100, "{kept_n}");
        let (five, _five_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (two_hundred, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut lp = Loop::new().unwrap();
        let exits = Rc::new(RefCell::new(Vec::new()));
        let out = lp.pipe_init(false);
        lp.spawn(
            ProcessOptions::new(std::env::current_exe().unwrap())
                .args([FD_REPORT, "--exact", "--nocapture", "--test-threads=1"])
                .env([("UVCLUSTER_TEST_HELPER", FD_REPORT)])
                .stdio(1, Stdio::Pipe(out))
                .stdio(2, Stdio::Inherit)
                .stdio(4, Stdio::Ignore)
                .stdio(5, Stdio::Fd(five.as_fd()))
                .stdio(kept_n, Stdio::Inherit)
                .stdio(200, Stdio::Fd(two_hundred.as_fd()))
                .on_exit(record_exit(&exits)),
        )
        .unwrap();
        let buf = collect(&mut lp, out);
        run_with_deadline(&mut lp, 20_000);
        assert_eq!(*exits.borrow(), vec![(0, 0)]);
        let text = string(&buf);
        let line = text
            .lines()
            .find_map(|l| l.split_once("FDS ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no report in {text}"));
        let child = parse_report(&serde_json::from_str(line).unwrap());
        let mut want = vec![0, 1, 2, 5, kept_n, 200];
        want.sort();
        want.dedup();
        assert_eq!(numbers(&child), want, "{child:?}");
        assert_eq!(child[&5], link_of(five.as_raw_fd()));
        assert_eq!(child[&200], link_of(two_hundred.as_raw_fd()));
        assert_eq!(child[&kept_n], link_of(kept_n));
        strays.assert_none_in(&child);
        // The parent's strays are untouched: still open, still inheritable.
        for &n in &strays.nums {
            assert!(!is_cloexec(n), "spawn changed our fd {n}");
        }
        assert_loop_empty(&lp);
    });
}

/// The arguments that run this test binary as [`helper_fd_report`].
const FD_REPORT_ARGS: [&str; 4] = [FD_REPORT, "--exact", "--nocapture", "--test-threads=1"];

/// `ipc::fork` (Node's `child_process.fork`): the child has its stdio and
/// the channel at 3, and none of our strays.
#[test]
fn fork_passes_only_stdio_and_the_channel() {
    isolated("fork_passes_only_stdio_and_the_channel", || {
        use uvcluster::ipc::{ForkOptions, fork};
        let strays = Strays::new();
        let mut lp = Loop::new().unwrap();
        let exits = Rc::new(RefCell::new(Vec::new()));
        let mut opts = ForkOptions::exec(std::env::current_exe().unwrap());
        opts.process.args = FD_REPORT_ARGS.iter().map(Into::into).collect();
        opts.env = vec![("UVCLUSTER_TEST_HELPER".into(), FD_REPORT.into())];
        opts.process.on_exit = Some(Box::new(record_exit(&exits)));
        let forked = fork(&mut lp, opts).unwrap();
        let reports = Rc::new(RefCell::new(Vec::new()));
        let r = reports.clone();
        forked
            .channel
            .on_message(&mut lp, move |_, _, v, _| r.borrow_mut().push(v));
        run_with_deadline(&mut lp, 20_000);
        assert_eq!(*exits.borrow(), vec![(0, 0)]);
        assert_eq!(reports.borrow().len(), 1);
        let child = parse_report(&reports.borrow()[0]);
        assert_eq!(numbers(&child), vec![0, 1, 2, 3], "{child:?}");
        assert!(child[&3].starts_with("socket:"), "{child:?}");
        strays.assert_none_in(&child);
        assert_loop_empty(&lp);
    });
}

/// `Primary::fork` (Node's `cluster.fork`): the worker has its stdio and
/// the channel at 3. Strays the process held before `setup_primary` are
/// marked CLOEXEC there, as Node's start-up marks them; strays opened
/// later are kept out by the spawn itself.
#[test]
fn primary_fork_passes_only_stdio_and_the_channel() {
    isolated("primary_fork_passes_only_stdio_and_the_channel", || {
        use uvcluster::cluster::{Primary, Settings};
        let before = Strays::new();
        let mut lp = Loop::new().unwrap();
        let primary = Primary::new(&mut lp);
        primary.setup_primary(
            &mut lp,
            Settings {
                exec_path: Some(std::env::current_exe().unwrap().into()),
                args: Some(FD_REPORT_ARGS.iter().map(Into::into).collect()),
                env: Some(vec![("UVCLUSTER_TEST_HELPER".into(), FD_REPORT.into())]),
                ..Settings::default()
            },
        );
        for &n in &before.nums {
            assert!(is_cloexec(n), "setup_primary marks inherited fd {n}");
        }
        let after = Strays::new();
        let reports = Rc::new(RefCell::new(Vec::new()));
        let r = reports.clone();
        primary.on_message(&mut lp, move |_, _, v, _| r.borrow_mut().push(v));
        let exits = Rc::new(RefCell::new(Vec::new()));
        let e = exits.clone();
        primary.on_exit(&mut lp, move |_, _, code, signal| {
            e.borrow_mut().push((code, signal))
        });
        primary.fork(&mut lp, Vec::new()).unwrap();
        run_with_deadline(&mut lp, 20_000);
        assert_eq!(*exits.borrow(), vec![(Some(0), None)]);
        assert_eq!(reports.borrow().len(), 1);
        let child = parse_report(&reports.borrow()[0]);
        assert_eq!(numbers(&child), vec![0, 1, 2, 3], "{child:?}");
        before.assert_none_in(&child);
        after.assert_none_in(&child);
        // Marked, not closed: the primary can still use them.
        for &n in before.nums.iter().chain(&after.nums) {
            assert!(std::fs::read_link(format!("/proc/self/fd/{n}")).is_ok());
        }
        assert_loop_empty(&lp);
    });
}

/// `disable_stdio_inheritance` (libuv's `uv_disable_stdio_inheritance`)
/// marks every fd above 2 CLOEXEC and leaves 0 to 2 alone, so that even
/// `std::process::Command`, which places nothing above 2, passes on only
/// stdio.
#[test]
fn disable_stdio_inheritance_marks_everything_above_stdio() {
    isolated(
        "disable_stdio_inheritance_marks_everything_above_stdio",
        || {
            let strays = Strays::new();
            let stdio_before: Vec<bool> = (0..3).map(is_cloexec).collect();
            uvcluster::uv::disable_stdio_inheritance();
            let stdio_after: Vec<bool> = (0..3).map(is_cloexec).collect();
            assert_eq!(stdio_before, stdio_after, "fds 0 to 2 are left alone");
            for (&n, link) in own_fds().iter().filter(|(n, _)| **n > 2) {
                assert!(is_cloexec(n), "fd {n} ({link}) is still inheritable");
            }
            // Twice is harmless.
            uvcluster::uv::disable_stdio_inheritance();
            let out = helper_command(FD_REPORT).output().unwrap();
            assert!(out.status.success(), "{out:?}");
            let text = String::from_utf8(out.stdout).unwrap();
            let line = text
                .lines()
                .find_map(|l| l.split_once("FDS ").map(|(_, r)| r))
                .unwrap_or_else(|| panic!("no report in {text}"));
            let child = parse_report(&serde_json::from_str(line).unwrap());
            assert_eq!(numbers(&child), vec![0, 1, 2], "{child:?}");
            strays.assert_none_in(&child);
        },
    );
}

/// Node's message for a program it cannot start, from real `node`.
fn node_spawn_error(file: &str, cwd: Option<&str>) -> String {
    require_node();
    let script = format!(
        "require('child_process').spawn({file:?}, [], {{ cwd: {cwd} }})\
         .on('error', e => console.log(e.message))",
        cwd = cwd.map_or("undefined".to_owned(), |c| format!("{c:?}"))
    );
    let out = std::process::Command::new("node")
        .args(["-e", &script])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A spawn that fails names the program in its message as Node does
/// (`spawn /no/such/cmd ENOENT`), keeps the OS error's kind, and carries
/// the errno; errors in the options are not spawn errors.
#[test]
fn spawn_error_names_the_program() {
    let mut lp = Loop::new().unwrap();
    for (file, cwd, errno) in [
        ("/no/such/cmd", None, libc::ENOENT),
        ("uvcluster-no-such-program-in-path", None, libc::ENOENT),
        ("/etc/passwd", None, libc::EACCES),
        ("sh", Some("/no/such/dir"), libc::ENOENT),
    ] {
        let mut opts = ProcessOptions::new(file);
        if let Some(c) = cwd {
            opts = opts.cwd(c);
        }
        let err = lp.spawn(opts).unwrap_err();
        let node = node_spawn_error(file, cwd);
        assert!(
            node.starts_with(&format!("spawn {file} E")),
            "node says {node:?}"
        );
        assert!(
            err.to_string().starts_with(&node),
            "ours {err:?}, node's {node:?}"
        );
        let os = std::io::Error::from_raw_os_error(errno);
        assert_eq!(err.kind(), os.kind(), "{file}");
        let s = SpawnError::of(&err).unwrap();
        assert_eq!(s.file(), file);
        assert_eq!(s.raw_os_error(), Some(errno));
        assert_eq!(s.os_error().raw_os_error(), Some(errno));
        assert!(
            err.to_string()
                .contains(&format!("({})", nix::errno::Errno::from_raw(errno).desc()))
        );
        assert!(std::error::Error::source(s).is_some());
    }
    // Bad options are not spawn errors.
    let plain = lp.pipe_init(false);
    let err = lp
        .spawn(ProcessOptions::new("true").stdio(3, Stdio::Ipc(plain)))
        .unwrap_err();
    assert!(SpawnError::of(&err).is_none(), "{err:?}");
    lp.close(plain, |_| {}).unwrap();
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

/// `ipc::fork` and `Primary::fork` pass the spawn error on: it names the
/// program, and no worker or handle is left.
#[test]
fn fork_error_names_the_program() {
    use uvcluster::cluster::{Primary, Settings};
    use uvcluster::ipc::{ForkOptions, fork};
    let mut lp = Loop::new().unwrap();
    let err = fork(&mut lp, ForkOptions::exec("/no/such/cmd")).unwrap_err();
    assert!(
        err.to_string().starts_with("spawn /no/such/cmd ENOENT"),
        "{err}"
    );
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(spawn_errno(&err), Some(libc::ENOENT));

    let primary = Primary::new(&mut lp);
    primary.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some("/no/such/cmd".into()),
            ..Settings::default()
        },
    );
    let err = primary.fork(&mut lp, Vec::new()).unwrap_err();
    assert!(
        err.to_string().starts_with("spawn /no/such/cmd ENOENT"),
        "{err}"
    );
    assert_eq!(spawn_errno(&err), Some(libc::ENOENT));
    assert!(primary.workers(&lp).is_empty());
    run_with_deadline(&mut lp, 5000);
    assert_loop_empty(&lp);
}

const WORKER_CLOEXEC: &str = "helper_worker_cloexec";

/// The worker of the test below: after `setup_worker`, reports which of its
/// fds above 2 a child of its own would still inherit.
#[test]
fn helper_worker_cloexec() {
    if !is_helper(WORKER_CLOEXEC) {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = uvcluster::cluster::setup_worker(&mut lp).unwrap().unwrap();
    let inheritable: Vec<i32> = own_fds()
        .keys()
        .copied()
        .filter(|&n| n > 2 && !is_cloexec(n))
        .collect();
    w.send(
        &mut lp,
        &serde_json::json!({ "inheritable": inheritable }),
        None,
    )
    .unwrap();
    w.disconnect(&mut lp);
    run_with_deadline(&mut lp, 10_000);
}

/// A Rust worker does what a Node worker's start-up does: `setup_worker`
/// marks the fds it inherited above 2 (here an extra stdio pipe at fd 4)
/// `FD_CLOEXEC`, so the worker's own children do not get them.
#[test]
fn setup_worker_disables_stdio_inheritance() {
    use uvcluster::cluster::{Primary, Settings};
    use uvcluster::ipc::ForkStdio;
    let mut lp = Loop::new().unwrap();
    let primary = Primary::new(&mut lp);
    primary.setup_primary(
        &mut lp,
        Settings {
            stdio: Some(vec![
                ForkStdio::Inherit,
                ForkStdio::Inherit,
                ForkStdio::Inherit,
                ForkStdio::Ipc,
                ForkStdio::Pipe,
            ]),
            ..helper_settings(WORKER_CLOEXEC)
        },
    );
    let reports = Rc::new(RefCell::new(Vec::new()));
    let r = reports.clone();
    primary.on_message(&mut lp, move |_, _, v, _| r.borrow_mut().push(v));
    let exits = Rc::new(RefCell::new(Vec::new()));
    let e = exits.clone();
    primary.on_exit(&mut lp, move |_, _, code, signal| {
        e.borrow_mut().push((code, signal))
    });
    let w = primary.fork(&mut lp, Vec::new()).unwrap();
    // The primary's end of the extra pipe is not read: close it once the
    // worker is gone so the loop can end.
    let extra = w.stdio(&lp, 4);
    run_with_deadline(&mut lp, 20_000);
    if let Some(p) = extra {
        let _ = lp.close(p, |_| {});
        run_with_deadline(&mut lp, 5_000);
    }
    assert_eq!(*exits.borrow(), vec![(Some(0), None)]);
    assert_eq!(
        *reports.borrow(),
        vec![serde_json::json!({ "inheritable": [] })]
    );
}
