//! `uvcluster run [OPTIONS] -- COMMAND [ARGS...]`: runs a pool of workers,
//! copies of any program that speaks Node's cluster protocol (a Node app,
//! or a Rust one built on this crate), under a Rust primary.
//!
//! The options come from the command line, `uvcluster.toml` and the
//! environment (`options.rs`), each value checked by one parser
//! (`values.rs`); the log has one line per lifecycle event (`events.rs`);
//! `run.rs` runs the pool. docs/cli.md is the user's manual: the options
//! table, the configuration file, the signals and the exit status.
//!
//! Exit status: 0 after a clean stop; 1 when the service failed; 2 for a
//! usage error; 128+N after an immediate stop by signal N.

mod control;
mod ctl;
mod events;
mod help;
mod metrics;
mod ops;
mod options;
mod run;
mod systemd;
mod values;
mod watch;

use std::process::ExitCode;

use options::{Request, Usage};

/// The exit status of a usage error (bad flag, value, variable or file), as
/// getopt-style tools and clap use it.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    events::init();
    if std::env::args_os().nth(1).is_some_and(|a| a == "ctl") {
        return ctl::main(std::env::args_os().skip(2));
    }
    let request = options::parse(std::env::args_os().skip(1), |var| std::env::var_os(var));
    let opts = match request {
        Ok(Request::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Request::Version) => {
            println!("uvcluster {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Request::Run(opts)) => *opts,
        Err(Usage(msg)) => {
            eprintln!("uvcluster: {msg}\n{}", help::USAGE);
            return ExitCode::from(USAGE_ERROR);
        }
    };
    match run::run(opts) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        // Printed whatever RUST_LOG says: the command failed to start.
        Err(run::StartError::CannotRun(e)) => {
            eprintln!("uvcluster: {e}");
            ExitCode::FAILURE
        }
        Err(run::StartError::Io(e)) => {
            eprintln!("uvcluster: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
