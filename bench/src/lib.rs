//! The uvcluster benchmark lab: what measures the library and compares it
//! with Node, libuv, tokio and mio, kept out of the library so that none of
//! it (the load generator, `plotters`, `httparse`, CPU affinity) reaches a
//! library user.
//!
//! * [`loadgen`]: a closed-loop HTTP/1.1 load generator on uvcluster's own
//!   loop, and [`loadgen::CpuSplit`], which keeps it off the servers' CPUs.
//!   The dispatch bench (`benches/dispatch.rs`) and the programs below use
//!   it.
//! * Programs (`src/bin`): `compare` (Node's cluster and every dispatch
//!   mode of ours under the same load, in one run), `startup` (start to
//!   first served request, and memory), `uv_bench` (the loop on libuv's
//!   benchmark workloads), `ipc_bench` (IPC round trips against Node's),
//!   `loadgen` (the load generator on any HTTP server).
//! * What they compare with, kept in this package: `reference/node-baseline`
//!   (Node's cluster hello world, the server `compare` and `startup` run),
//!   `reference/libuv-bench` (libuv C programs, and the same workloads on
//!   tokio and bare mio), `node/ipc_bench.js`.
//!
//! `BENCHMARKS.md` at the repository root has the commands and the figures.

use std::path::{Path, PathBuf};
use std::process::Command;

mod cpu;
pub mod loadgen;

/// This package's directory: `reference/`, `node/` and `scripts/` are in it.
pub fn lab_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Node's reference cluster (`reference/node-baseline/server.js`): a
/// hello-world HTTP cluster with `WORKERS`, `PORT` and
/// `NODE_CLUSTER_SCHED_POLICY`, which prints `ready` and, on SIGUSR2, each
/// worker's connection count as one JSON line.
pub fn node_baseline() -> PathBuf {
    lab_dir().join("reference/node-baseline/server.js")
}

/// The `cluster_hello` example, the server that `compare` and `startup`
/// measure: the path in `CLUSTER_HELLO` if set, otherwise the example
/// built now by the cargo that runs this program (`CARGO`, or `cargo`), in
/// this program's own profile.
///
/// # Errors
///
/// A message saying what failed, when the build does.
pub fn cluster_hello() -> Result<PathBuf, String> {
    built(
        "CLUSTER_HELLO",
        &["-p", "uvcluster", "--example", "cluster_hello"],
        Path::new("examples/cluster_hello"),
    )
}

/// The `uvcluster` command (the CLI package), which `reload_proof` runs
/// Node apps under: the path in `UVCLUSTER_BIN` if set, otherwise the
/// binary built now as [`cluster_hello`] builds the example.
///
/// # Errors
///
/// A message saying what failed, when the build does.
pub fn uvcluster_cli() -> Result<PathBuf, String> {
    built(
        "UVCLUSTER_BIN",
        &["-p", "uvcluster-cli", "--bin", "uvcluster"],
        Path::new("uvcluster"),
    )
}

/// The program the environment variable `var` names, or the one `cargo
/// build <args>` builds in this program's profile, at `rel` under this
/// program's `<target>/<profile>/`.
fn built(var: &str, args: &[&str], rel: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = !cfg!(debug_assertions);
    let mut build = Command::new(cargo);
    build.arg("build").args(args);
    if release {
        build.arg("--release");
    }
    let what = args.join(" ");
    let status = build
        .current_dir(lab_dir())
        .status()
        .map_err(|e| format!("cannot run cargo to build {what}: {e}"))?;
    if !status.success() {
        return Err(format!("building {what} failed: {status}"));
    }
    // This program is `<target>/<profile>/<name>`.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(exe.with_file_name(rel))
}
