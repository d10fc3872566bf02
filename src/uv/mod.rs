//! The event loop and its handles: libuv's model on mio.
//!
//! A [`Loop`] owns every handle; a handle is a typed id ([`Handle<K>`]) and
//! every operation is a `Loop` method named after its libuv function:
//! `timer_start` is `uv_timer_start`, `read_start` is `uv_read_start`,
//! `close` is `uv_close`. The loop is single-threaded and not `Send`.
//!
//! | Handle | Create | Start / use | libuv |
//! | --- | --- | --- | --- |
//! | [`Timer`] | [`Loop::timer_init`] | [`Loop::timer_start`], [`Loop::timer_again`] | `uv_timer_t` |
//! | [`Idle`], [`Prepare`], [`Check`] | [`Loop::idle_init`], ... | [`Loop::idle_start`], [`Loop::prepare_start`], [`Loop::check_start`] | `uv_idle_t`, ... |
//! | [`Tcp`] | [`Loop::tcp_init`] | [`Loop::tcp_bind`], [`Loop::tcp_listen`], [`Loop::tcp_connect`], [`Loop::tcp_open`] | `uv_tcp_t` |
//! | [`Pipe`] | [`Loop::pipe_init`], [`Loop::pipe_pair`] | [`Loop::pipe_bind`], [`Loop::pipe_listen`], [`Loop::pipe_connect`], [`Loop::write2`], [`Loop::pipe_accept_pending`] | `uv_pipe_t` |
//! | streams ([`StreamType`]) | | [`Loop::read_start`], [`Loop::write`], [`Loop::try_write`], [`Loop::shutdown`] | `uv_stream_t` |
//! | [`Udp`] | [`Loop::udp_init`] | [`Loop::udp_bind`], [`Loop::udp_recv_start`], [`Loop::udp_send`] | `uv_udp_t` |
//! | [`Signal`] | [`Loop::signal_init`] | [`Loop::signal_start`], [`Loop::signal_start_oneshot`] (with a [`Signum`]) | `uv_signal_t` |
//! | [`Process`] | [`Loop::spawn`] | [`Loop::process_kill`] | `uv_process_t` |
//! | [`Async`] | [`Loop::async_init`] | [`AsyncSender::send`] from any thread ([`Loop::async_sender`]), [`Loop::async_send`] | `uv_async_t` |
//! | [`Poll`] | [`Loop::poll_init`] (a borrowed fd, never owned) | [`Loop::poll_start`] with [`PollEvents`], [`Loop::poll_stop`] | `uv_poll_t` |
//! | [`FsEvent`] | [`Loop::fs_event_init`] | [`Loop::fs_event_start`] with [`FsEventFlags`] (recursive, ignore), [`Loop::fs_event_stop`] | `uv_fs_event_t` |
//!
//! # Ids, sockets and streams
//!
//! Every handle is a typed id. Where a value may be any socket, it is a
//! [`Socket`] (a fd received over IPC, [`Loop::socket_open`]); a
//! connection is a [`Stream`]. Both convert from the typed ids, and every
//! operation all handles share ([`Loop::close`], [`Loop::close_if_open`],
//! [`Loop::is_closing`], [`Loop::ref_handle`], ...) takes a typed id, a
//! `Socket`, a `Stream` or an [`AnyHandle`] ([`HandleId`]).
//!
//! Arguments are typed at the edge: timeouts are [`Duration`]s (rounded up
//! to the loop's whole milliseconds), signals are [`Signum`]s, and fds that
//! a handle takes over are [`OwnedFd`]s; an fd known only by its number
//! becomes one through [`take_env_fd`] (an fd a parent placed and named in
//! an environment variable) or, as a copy, [`dup_fd_number`].
//!
//! [`Duration`]: std::time::Duration
//! [`OwnedFd`]: std::os::fd::OwnedFd
//!
//! # One iteration
//!
//! [`Loop::run`] follows libuv 1.45 and later (`uv_run` in
//! `src/unix/core.c`). In [`RunMode::Default`] due timers run once before
//! the first iteration. Each iteration then runs: pending callbacks
//! (deferred connect, write and shutdown callbacks); idle; prepare; poll for
//! I/O, blocking until the next timer only in `Default` mode, or in `Once`
//! mode when nothing was pending and no idle watcher was active, and never
//! while a close or a deferred callback is waiting; signals, after the
//! other events of the poll (async callbacks and file system events run
//! where their fd's event falls in the batch); pending callbacks again, up to 8 passes; check;
//! close callbacks; then the time is refreshed and due timers run.
//! [`RunMode::Once`] and [`RunMode::NoWait`] stop after one iteration;
//! [`Loop::stop`] ends `run` after the current one.
//!
//! # Readiness
//!
//! mio is edge-triggered where libuv's epoll is level-triggered. Each socket
//! remembers that it is readable or writable until an operation hits
//! `WouldBlock`; a handle that stops early on purpose (at most 32 reads or
//! 32 accepts per event) goes on a still-ready list that the next poll
//! services without blocking. Sockets are registered lazily, once, for read
//! and write interest, so writes never cost an `epoll_ctl`.
//!
//! # Handle life cycle
//!
//! A handle is created by an `*_init` call (`timer_init`, `tcp_init`, ...),
//! which returns a typed id such as [`Handle<Timer>`]. It becomes *active*
//! when started (a timer armed, a stream reading or listening, a process
//! running) and *inactive* when stopped. An active handle that is
//! *referenced* (the default; see [`Loop::unref_handle`]) keeps
//! [`Loop::run`] going. Outstanding requests (writes, connects, shutdowns)
//! keep the loop alive too, and cannot be unreferenced.
//!
//! [`Loop::close`] ends a handle: it stops at once and releases its fd, its
//! outstanding requests are cancelled, and its close callback runs in the
//! closing phase of the current iteration, after all other callbacks. Then
//! the id is stale: every later use returns an error wrapping
//! [`StaleHandle`]. Every handle must be closed; dropping the id does not
//! close anything.
//!
//! # Callbacks
//!
//! Every callback receives `&mut Loop` and its handle's id. Callbacks never
//! run inside the API call that registered them, only from a loop phase. If
//! a call that takes a callback returns `Err`, the callback is dropped and
//! never runs (libuv's rule).

mod r#async;
mod callback;
mod context;
mod errno;
mod event_loop;
mod fs_event;
mod handle;
mod id_hasher;
mod listen_fds;
mod loop_watcher;
mod pipe;
mod poll;
mod process;
mod signal;
mod signum;
mod stream;
mod tcp;
mod timer;
mod udp;

pub use r#async::AsyncSender;
pub use callback::{CallbackSlot, Taken};
pub use context::{Id, Ids};
pub use errno::Errno;
pub use event_loop::{Loop, RunMode};
pub use fs_event::{FsEventFlags, FsEvents, InotifyOverflow, WatchLimit};
pub use handle::{
    AnyHandle, Async, Check, FsEvent, Handle, HandleId, HandleType, Idle, NotAStream, Pipe, Poll,
    Prepare, Process, Signal, Socket, StaleHandle, Stream, Tcp, Timer, Udp,
};
pub(crate) use id_hasher::IdMap;
pub use listen_fds::{ListenAddress, ListenFd, ListenFdsError};
pub use pipe::{PendingType, dup_fd_number, take_env_fd, take_env_var};
pub use poll::PollEvents;
pub use process::{ExitCb, ProcessOptions, SpawnError, Stdio, disable_stdio_inheritance, kill};
pub use signum::{BadSignal, Signum};
pub use stream::{OnEmfile, StreamId, StreamType};
pub use tcp::BindFlags;
