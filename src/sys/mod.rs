//! OS-specific code: the only layer with `unsafe` and raw fds.
//!
//! Everything here returns `OwnedFd`s created CLOEXEC and non-blocking
//! (except where a function's docs say otherwise), and every `unsafe` block
//! carries a `SAFETY:` comment naming the invariant it relies on.
#![allow(unsafe_code)]

pub(crate) mod env;
pub(crate) mod fd;
pub(crate) mod inotify;
pub(crate) mod listen_fds;
pub(crate) mod notify;
pub(crate) mod process;
pub(crate) mod scm_rights;
pub(crate) mod signal;
