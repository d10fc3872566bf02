//! How a worker process ends when the cluster ends it: Node's
//! `process.exit(0)` by default (`lib/internal/cluster/child.js`: a channel
//! lost without a disconnect, `worker.destroy()`), or what the embedder
//! set with `Worker::on_exit_request`, after which the worker's loop ends
//! by itself. Both sides are real: a Rust primary and this binary
//! re-executed as the worker.

mod util;

use std::ffi::OsString;

use util::*;
use uvcluster::cluster::{self, ExitRequest, Primary, SchedulingPolicy, Settings};
use uvcluster::uv::{Loop, RunMode};

/// The helper's exit code when its loop ended and nothing ended the
/// process before: the library did not exit, and no handler was set.
const FELL_THROUGH: i32 = 3;

/// The helper's exit code after its own handler ran for `why`.
fn handled(why: ExitRequest) -> i64 {
    match why {
        ExitRequest::ChannelLost => 41,
        ExitRequest::Destroyed => 42,
    }
}

/// The worker: `ACTION=destroy` kills itself (`destroy()`) once online;
/// `ACTION=wait` waits for the primary to close the channel. With
/// `HANDLER=custom` it sets the worker's exit-request handler, with
/// `HANDLER=loop` the loop's exit handler (`cluster::set_exit_handler`);
/// either records why and lets the loop end, and the process then exits
/// with [`handled`] (plus 10 for the loop's handler).
#[test]
fn helper_exit_request() {
    if !is_helper("helper_exit_request") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let w = cluster::setup_worker(&mut lp).unwrap().expect("a worker");
    let why = std::rc::Rc::new(std::cell::Cell::new(None));
    if std::env::var("HANDLER").as_deref() == Ok("custom") {
        let why = why.clone();
        w.on_exit_request(&mut lp, move |lp, w, reason| {
            assert!(!w.is_connected(lp), "the channel is closed by then");
            assert!(why.replace(Some(reason)).is_none(), "asked once");
        });
    }
    let by_loop = std::rc::Rc::new(std::cell::Cell::new(false));
    if std::env::var("HANDLER").as_deref() == Ok("loop") {
        let (why, by_loop) = (why.clone(), by_loop.clone());
        cluster::set_exit_handler(
            &mut lp,
            Some(Box::new(move |lp: &mut Loop, w, reason| {
                assert!(!w.is_connected(lp), "the channel is closed by then");
                assert!(why.replace(Some(reason)).is_none(), "asked once");
                by_loop.set(true);
            })),
        );
    }
    if std::env::var("ACTION").as_deref() == Ok("destroy") {
        w.kill(&mut lp, None).unwrap();
    }
    lp.run(RunMode::Default).unwrap();
    // Nothing of the cluster is left to keep the loop alive.
    assert_loop_empty(&lp);
    let code = why.get().map_or(FELL_THROUGH as i64, handled);
    std::process::exit(code as i32 + if by_loop.get() { 10 } else { 0 });
}

/// Forks the helper with `action` and `handler`, and returns its exit
/// code. On `online`, an `ACTION=wait` worker's channel is closed by the
/// primary without a `disconnect` message, as when a primary dies.
fn run_worker(action: &str, handler: &str) -> Option<i64> {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new(&mut lp);
    let args = [
        "helper_exit_request",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ];
    let vars = [
        ("UVCLUSTER_TEST_HELPER", "helper_exit_request"),
        ("ACTION", action),
        ("HANDLER", handler),
    ];
    p.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some(std::env::current_exe().unwrap().into_os_string()),
            args: Some(args.map(OsString::from).to_vec()),
            env: Some(vars.map(|(k, v)| (k.into(), v.into())).to_vec()),
            scheduling_policy: Some(SchedulingPolicy::RoundRobin),
            silent: Some(true),
            ..Settings::default()
        },
    );
    p.on_error(&mut lp, |_, _, e| panic!("{e}"));
    let close_channel = action == "wait";
    p.on_online(&mut lp, move |lp, w| {
        if close_channel {
            w.channel(lp).expect("a channel").disconnect(lp);
        }
    });
    let exits = Counter::new();
    let e = exits.clone();
    p.on_exit(&mut lp, move |_, _, _, signal| {
        assert_eq!(signal, None);
        e.hit();
    });
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(exits.get(), 1);
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
    w.exit_status(&lp).and_then(|(code, _)| code)
}

#[test]
fn a_worker_whose_channel_is_lost_exits_0_by_default() {
    assert_eq!(run_worker("wait", "default"), Some(0));
}

#[test]
fn a_destroyed_worker_exits_0_by_default() {
    assert_eq!(run_worker("destroy", "default"), Some(0));
}

#[test]
fn an_exit_request_handler_replaces_the_exit_when_the_channel_is_lost() {
    let code = run_worker("wait", "custom");
    assert_eq!(code, Some(handled(ExitRequest::ChannelLost)));
}

#[test]
fn an_exit_request_handler_replaces_the_exit_of_a_destroyed_worker() {
    let code = run_worker("destroy", "custom");
    assert_eq!(code, Some(handled(ExitRequest::Destroyed)));
}

/// The loop's exit handler (`cluster::set_exit_handler`) replaces Node's
/// `process.exit(0)` for a lost channel when the worker sets none.
#[test]
fn the_loops_exit_handler_replaces_the_exit_when_the_channel_is_lost() {
    let code = run_worker("wait", "loop");
    assert_eq!(code, Some(handled(ExitRequest::ChannelLost) + 10));
}

/// ... and for a destroyed worker.
#[test]
fn the_loops_exit_handler_replaces_the_exit_of_a_destroyed_worker() {
    let code = run_worker("destroy", "loop");
    assert_eq!(code, Some(handled(ExitRequest::Destroyed) + 10));
}
