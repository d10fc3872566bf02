//! Child processes: spawn, exit status, kill, stdio placement, reaping
//! (libuv's `test/test-spawn.c`).
mod util;

use std::cell::RefCell;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;

use nix::libc;
use util::*;
use uvcluster::uv::{Handle, Loop, Pipe, ProcessOptions, Stdio};

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
) -> impl FnOnce(&mut Loop, Handle<uvcluster::uv::Process>, i64, i32) + 'static {
    let e = exits.clone();
    move |lp, p, status, sig| {
        assert!(!lp.is_active(p), "a reaped process is inactive");
        e.borrow_mut().push((status, sig));
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
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(Rc::strong_count(&token), 1, "the callback was dropped");
    // Not executable: EACCES.
    let err = lp.spawn(ProcessOptions::new("/etc/passwd")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
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
                    e.borrow_mut().push((status, sig));
                    assert!(lp.process_exited(p).unwrap());
                    // Once reaped, the pid may be someone else's: ESRCH.
                    let err = lp.process_kill(p, libc::SIGTERM).unwrap_err();
                    assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
                    a.hit();
                    lp.close(p, |_| {}).unwrap();
                }),
        )
        .unwrap();
    // Signal 0 checks that the child can be signalled.
    lp.process_kill(p, 0).unwrap();
    lp.process_kill(p, libc::SIGTERM).unwrap();
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
    let err = lp.process_kill(p, -1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    let err = uvcluster::uv::kill(lp.process_pid(p).unwrap(), 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    lp.process_kill(p, libc::SIGKILL).unwrap();
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
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPERM));
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
    lp.process_kill(p, libc::SIGKILL).unwrap();
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
    uvcluster::uv::kill(pid, libc::SIGKILL).unwrap();
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
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
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
