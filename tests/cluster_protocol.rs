//! The cluster protocol at the primary's edge, with Node's loose rules: a
//! worker that speaks the protocol by hand (this binary re-executed, on a
//! real channel) sends a `queryServer` with its port as a string, which
//! Node's primary binds, and one whose fields do not parse, which must
//! still be answered so that the worker is not left waiting.

mod util;

use std::cell::RefCell;
use std::ffi::OsString;
use std::rc::Rc;

use serde_json::{Map, Value, json};
use util::*;
use uvcluster::cluster::protocol::{ActKind, ProtocolError};
use uvcluster::cluster::{ClusterError, Primary, SchedulingPolicy, Settings};
use uvcluster::ipc::{Channel, ChannelOptions};
use uvcluster::uv::{Loop, RunMode};

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// The hand-written worker: `online`, two `queryServer`s, then the two
/// replies (with the seq each answers) back to the primary as a user
/// message, `close` for the server it got, and a disconnect.
#[test]
fn helper_hand_written_worker() {
    if !is_helper("helper_hand_written_worker") {
        return;
    }
    let mut lp = Loop::new().unwrap();
    let ch = Channel::from_env(&mut lp, ChannelOptions::default())
        .unwrap()
        .expect("started with a channel");
    ch.send_cluster(&mut lp, fields(json!({"act":"online"})), None, None)
        .unwrap();
    let queries = [
        // Node binds what `Int32Value` makes of a string port.
        json!({"act":"queryServer","index":0,"data":null,"address":"127.0.0.1",
               "port":"0","addressType":4}),
        // No port is `true`: malformed, and answered all the same.
        json!({"act":"queryServer","index":1,"data":null,"address":"127.0.0.1",
               "port":true,"addressType":4}),
    ];
    let replies: Rc<RefCell<Vec<Value>>> = Rc::default();
    for q in queries {
        let r = replies.clone();
        let seq = ch.send_cluster(
            &mut lp,
            fields(q),
            None,
            Some(Box::new(move |lp, ch, reply, handle| {
                assert!(handle.is_none(), "round-robin and errors come without one");
                r.borrow_mut().push(reply);
                if r.borrow().len() < 2 {
                    return;
                }
                let replies = std::mem::take(&mut *r.borrow_mut());
                ch.send(lp, &json!({ "replies": replies }), None).unwrap();
                let key = replies[0]["key"].clone();
                let close = fields(json!({"act":"close","key":key}));
                ch.send_cluster(lp, close, None, None).unwrap();
                ch.disconnect(lp);
            })),
        );
        seq.unwrap();
    }
    lp.run(RunMode::Default).unwrap();
    assert_loop_empty(&lp);
}

#[test]
fn a_string_port_is_bound_and_a_malformed_query_is_answered_einval() {
    let mut lp = Loop::new().unwrap();
    let p = Primary::new(&mut lp);
    let name = "helper_hand_written_worker";
    let args = [name, "--exact", "--nocapture", "--test-threads=1"];
    p.setup_primary(
        &mut lp,
        Settings {
            exec_path: Some(std::env::current_exe().unwrap().into_os_string()),
            args: Some(args.map(OsString::from).to_vec()),
            env: Some(vec![("UVCLUSTER_TEST_HELPER".into(), name.into())]),
            scheduling_policy: Some(SchedulingPolicy::RoundRobin),
            silent: Some(true),
            ..Settings::default()
        },
    );
    let errors: Rc<RefCell<Vec<ProtocolError>>> = Rc::default();
    let e = errors.clone();
    p.on_error(&mut lp, move |_, _, err| match err {
        ClusterError::Protocol(pe) => e.borrow_mut().push(pe.clone()),
        other => panic!("unexpected error: {other}"),
    });
    let got: Rc<RefCell<Vec<Value>>> = Rc::default();
    let g = got.clone();
    p.on_message(&mut lp, move |_, _, msg, _| g.borrow_mut().push(msg));
    let w = p.fork(&mut lp, vec![]).unwrap();
    run_with_deadline(&mut lp, 20_000);
    assert_eq!(
        w.exit_status(&lp),
        Some((Some(0), None)),
        "the helper passed"
    );
    let got = got.borrow();
    assert_eq!(got.len(), 1, "{got:?}");
    let replies = got[0]["replies"].as_array().unwrap();
    // The string port: a round-robin listener on a real port.
    let bound = &replies[0];
    assert_eq!(bound["errno"], Value::Null, "{bound}");
    assert_eq!(bound["key"], "127.0.0.1:0:4:undefined:0");
    assert_eq!(bound["sockname"]["address"], "127.0.0.1");
    assert!(bound["sockname"]["port"].as_u64().unwrap() > 0, "{bound}");
    // The malformed one: EINVAL, with Node's key of what was sent.
    let refused = &replies[1];
    assert_eq!(refused["errno"], -22, "{refused}");
    assert_eq!(refused["key"], "127.0.0.1:true:4:undefined:1");
    let errors = errors.borrow();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(
            &errors[0],
            ProtocolError::Malformed {
                kind: ActKind::QueryServer,
                ..
            }
        ),
        "{errors:?}"
    );
    assert!(p.workers(&lp).is_empty());
    assert_loop_empty(&lp);
}
