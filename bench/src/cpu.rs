//! CPU affinity of the calling thread (`sched_getaffinity` and
//! `sched_setaffinity`, through `nix`). Processes spawned by a thread
//! inherit its mask.

use std::io;

/// `nix`'s error as an `io::Error` with the same errno.
#[cfg(target_os = "linux")]
fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The CPUs the calling thread may run on, in ascending order.
#[cfg(target_os = "linux")]
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let set = sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_err(errno)?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Restricts the calling thread to `cpus`.
#[cfg(target_os = "linux")]
pub(crate) fn set_cpus(cpus: &[usize]) -> io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(errno)?;
    }
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(errno)
}

/// Affinity is not supported here.
#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Affinity is not supported here.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_cpus(_cpus: &[usize]) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
