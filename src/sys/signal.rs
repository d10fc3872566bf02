//! Process-wide signal handling (libuv's `src/unix/signal.c`).
//!
//! A signal disposition belongs to the whole process, while signal handles
//! belong to loops, and several loops may live in one process (one per
//! thread). So there is one handler for every watched signal number, and it
//! does nothing but write one byte (the signal number) to the self-pipe of
//! every loop that watches that signal. Each loop reads its pipe from its
//! poll phase and runs its own callbacks.
//!
//! The handler must be async-signal-safe: it takes no lock and allocates
//! nothing. It reads a static table of atomics, [`SLOTS`], one entry per
//! loop: the write end of that loop's pipe and a bit mask of the signals
//! the loop watches. Registration (which slot a loop owns, how many watchers
//! each signal has, which disposition is installed) is guarded by a `Mutex`
//! that the handler never touches.
//!
//! A loop's slot is released in [`LoopPipe`]'s `Drop`: the slot is cleared,
//! then the pipe is closed only once no handler is running
//! ([`IN_HANDLER`] is 0), so a handler never writes to an fd number that
//! has been closed and perhaps reused.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;

/// One more than the highest signal number (`_NSIG` on Linux: 1 to 64).
pub(crate) const NSIG: i32 = 65;

/// How many loops of one process can hold signal watchers at once.
const MAX_LOOPS: usize = 128;

/// The part of a loop's registration the handler reads.
struct Slot {
    /// The write end of the loop's self-pipe, or -1.
    fd: AtomicI32,
    /// Bit `n - 1` is set while the loop watches signal `n`.
    mask: AtomicU64,
}

static SLOTS: [Slot; MAX_LOOPS] = [const {
    Slot {
        fd: AtomicI32::new(-1),
        mask: AtomicU64::new(0),
    }
}; MAX_LOOPS];

/// How many handler invocations are running right now, in any thread.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// What is installed for one signal number.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// `SIG_DFL`: nobody watches the signal (or we never touched it).
    Default,
    /// Our handler, kept after each delivery.
    Handler,
    /// Our handler with `SA_RESETHAND`: every watcher is one-shot.
    OneShot,
}

struct Registry {
    used: [bool; MAX_LOOPS],
    /// Started watchers per signal number across all loops, by kind.
    normal: [u32; NSIG as usize],
    oneshot: [u32; NSIG as usize],
    installed: [Disposition; NSIG as usize],
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    used: [false; MAX_LOOPS],
    normal: [0; NSIG as usize],
    oneshot: [0; NSIG as usize],
    installed: [Disposition::Default; NSIG as usize],
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // The registry's invariants hold between statements, so a panic while
    // it was held leaves it usable.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn bit(signum: i32) -> u64 {
    1u64 << (signum - 1)
}

/// Whether `signum` is a signal number this module can watch (1 to 64).
pub(crate) fn valid_signum(signum: i32) -> bool {
    (1..NSIG).contains(&signum)
}

/// The process-wide handler: one byte per watching loop, nothing else.
extern "C" fn on_signal(signum: libc::c_int) {
    let saved = Errno::last_raw();
    IN_HANDLER.fetch_add(1, SeqCst);
    if valid_signum(signum) {
        let b = bit(signum);
        let byte = signum as u8;
        for slot in &SLOTS {
            if slot.mask.load(SeqCst) & b == 0 {
                continue;
            }
            let fd = slot.fd.load(SeqCst);
            if fd < 0 {
                continue;
            }
            loop {
                // SAFETY: write(2) is async-signal-safe and `byte` is a valid
                // one-byte buffer. `fd` is still open: LoopPipe's Drop clears
                // the slot and then waits for IN_HANDLER (incremented above,
                // before the load) to reach 0 before closing it. The pipe is
                // non-blocking, so a full pipe drops the byte instead of
                // blocking the handler.
                let r = unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
                if r < 0 && Errno::last_raw() == libc::EINTR {
                    continue;
                }
                break;
            }
        }
    }
    IN_HANDLER.fetch_sub(1, SeqCst);
    Errno::set_raw(saved);
}

fn install(signum: i32, disp: Disposition) -> io::Result<()> {
    // SAFETY: `sigaction` is a plain C struct for which all-zeroes is valid
    // (an empty mask, no flags, SIG_DFL).
    let mut sa: libc::sigaction = unsafe { mem::zeroed() };
    match disp {
        Disposition::Default => sa.sa_sigaction = libc::SIG_DFL,
        Disposition::Handler | Disposition::OneShot => {
            let handler: extern "C" fn(libc::c_int) = on_signal;
            sa.sa_sigaction = handler as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            if disp == Disposition::OneShot {
                sa.sa_flags |= libc::SA_RESETHAND;
            }
            // SAFETY: `sa.sa_mask` is a valid, writable sigset_t.
            unsafe { libc::sigfillset(&mut sa.sa_mask) };
        }
    }
    // SAFETY: `sa` is fully initialised; the handler (when set) is an
    // `extern "C" fn(c_int)` without SA_SIGINFO, as sigaction expects, and
    // it is async-signal-safe. A null old-action pointer is allowed.
    let r = unsafe { libc::sigaction(signum, &sa, std::ptr::null_mut()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Registry {
    /// The disposition signal `signum` needs now, from the watcher counts.
    fn wanted(&self, signum: i32) -> Disposition {
        let s = signum as usize;
        if self.normal[s] > 0 {
            Disposition::Handler
        } else if self.oneshot[s] > 0 {
            Disposition::OneShot
        } else {
            Disposition::Default
        }
    }

    /// Installs what the counts call for. A start re-installs even when
    /// the wanted disposition is unchanged, because a one-shot delivery
    /// resets it to `SIG_DFL` behind our back.
    fn apply(&mut self, signum: i32, force: bool) -> io::Result<()> {
        let want = self.wanted(signum);
        let s = signum as usize;
        if force || want != self.installed[s] {
            install(signum, want)?;
            self.installed[s] = want;
        }
        Ok(())
    }
}

/// A loop's self-pipe and its registration in the process-wide table.
///
/// Dropping it stops every watcher the loop still had, restores `SIG_DFL`
/// for signals nobody else watches, and closes the pipe.
pub(crate) struct LoopPipe {
    read: OwnedFd,
    /// Only owned here: the handler writes to its raw number, from [`SLOTS`].
    _write: OwnedFd,
    slot: usize,
    normal: [u32; NSIG as usize],
    oneshot: [u32; NSIG as usize],
}

impl std::fmt::Debug for LoopPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopPipe")
            .field("read", &self.read)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl LoopPipe {
    /// Creates the pipe (CLOEXEC, non-blocking) and takes a slot.
    ///
    /// Fails with `EMFILE` from `pipe2`, or with `ENOSPC` when
    /// `MAX_LOOPS` loops already hold signal watchers.
    pub(crate) fn new() -> io::Result<LoopPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let mut reg = registry();
        let slot = reg
            .used
            .iter()
            .position(|u| !u)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        reg.used[slot] = true;
        SLOTS[slot].mask.store(0, SeqCst);
        SLOTS[slot].fd.store(write.as_raw_fd(), SeqCst);
        Ok(LoopPipe {
            read,
            _write: write,
            slot,
            normal: [0; NSIG as usize],
            oneshot: [0; NSIG as usize],
        })
    }

    /// The read end, to register with the poller.
    pub(crate) fn read_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Counts one more watcher of `signum` on this loop and installs the
    /// handler. On error nothing has changed.
    pub(crate) fn start(&mut self, signum: i32, oneshot: bool) -> io::Result<()> {
        if !valid_signum(signum) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let s = signum as usize;
        let mut reg = registry();
        // Set the mask bit before installing, so no signal that the new
        // handler catches is missed by this loop.
        SLOTS[self.slot].mask.fetch_or(bit(signum), SeqCst);
        let (mine, all) = if oneshot {
            (&mut self.oneshot, &mut reg.oneshot)
        } else {
            (&mut self.normal, &mut reg.normal)
        };
        mine[s] += 1;
        all[s] += 1;
        if let Err(e) = reg.apply(signum, true) {
            let (mine, all) = if oneshot {
                (&mut self.oneshot, &mut reg.oneshot)
            } else {
                (&mut self.normal, &mut reg.normal)
            };
            mine[s] -= 1;
            all[s] -= 1;
            if self.normal[s] + self.oneshot[s] == 0 {
                SLOTS[self.slot].mask.fetch_and(!bit(signum), SeqCst);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Counts one watcher of `signum` less; the last watcher of the
    /// process restores `SIG_DFL`.
    pub(crate) fn stop(&mut self, signum: i32, oneshot: bool) {
        let s = signum as usize;
        let mut reg = registry();
        let (mine, all) = if oneshot {
            (&mut self.oneshot, &mut reg.oneshot)
        } else {
            (&mut self.normal, &mut reg.normal)
        };
        if mine[s] == 0 {
            return;
        }
        mine[s] -= 1;
        all[s] -= 1;
        if self.normal[s] + self.oneshot[s] == 0 {
            SLOTS[self.slot].mask.fetch_and(!bit(signum), SeqCst);
        }
        // Restoring a disposition we installed ourselves cannot fail.
        let _ = reg.apply(signum, false);
    }

    /// Reads every byte (signal number) waiting in the pipe into `out`.
    pub(crate) fn drain(&self, out: &mut Vec<u8>) {
        let mut buf = [0u8; 256];
        loop {
            match nix::unistd::read(&self.read, &mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }
}

impl Drop for LoopPipe {
    fn drop(&mut self) {
        let mut reg = registry();
        SLOTS[self.slot].mask.store(0, SeqCst);
        SLOTS[self.slot].fd.store(-1, SeqCst);
        for signum in 1..NSIG {
            let s = signum as usize;
            if self.normal[s] + self.oneshot[s] == 0 {
                continue;
            }
            reg.normal[s] -= self.normal[s];
            reg.oneshot[s] -= self.oneshot[s];
            let _ = reg.apply(signum, false);
        }
        // A handler that loaded our fd before it was cleared is still
        // counted in IN_HANDLER; wait for it before closing the pipe. The
        // handler never blocks, so this wait is short.
        while IN_HANDLER.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        reg.used[self.slot] = false;
        // The pipe's fds close when the fields drop, after this.
    }
}
