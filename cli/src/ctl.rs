//! `uvcluster ctl`: the control socket's client (docs/control.md). One
//! request, one reply line; prints it for a person (a table for
//! `status`) or as the reply's JSON (`--json`).
//!
//! Exit status: 0 when the primary answered `ok`; 1 when it refused the
//! request, a reload failed closed, or no primary could be reached; 2 for
//! a usage error.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use uvcluster::serde_json::{self, Value as Json, json};

use crate::control::{self, ControlPath};

/// `uvcluster ctl`'s usage line.
pub const USAGE: &str = "usage: uvcluster ctl [--control PATH | --name NAME] [--json] \
                         status | reload | scale N | restart ID | stop | send JSON";

/// `uvcluster ctl --help`.
pub const HELP: &str = "\
usage: uvcluster ctl [--control PATH | --name NAME] [--json] COMMAND

Talks to a running `uvcluster run` over its control socket.

Commands:
  status         one row per worker: id, pid, state, uptime, restarts, open
                 and handed-over connections, resident memory, CPU%
  reload         rolling reload; waits for it, exits 1 if it failed closed
  scale N        run N workers
  restart ID     replace worker ID gracefully
  stop           graceful stop (as SIGTERM)
  send JSON      send a message to every worker (process.on('message'))

Options:
      --control PATH   the socket (as given to `run --control`)
      --name NAME      the socket of `run --name NAME`
      --json           print the primary's reply as JSON
  -h, --help           this text

Without --control or --name: the only primary answering in the runtime
directory ($XDG_RUNTIME_DIR/uvcluster, else /run/uvcluster for root,
else /tmp/uvcluster-UID).
Exit status: 0 ok, 1 refused or failed (a reload that failed closed), 2 usage.
See docs/control.md.
";

/// How `ctl send` is used, for its errors.
const SEND_EXAMPLE: &str = r#"uvcluster ctl send '{"cmd":"flush"}'"#;

/// How long a reply other than a reload's may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    control: Option<PathBuf>,
    name: Option<String>,
    json: bool,
    request: Json,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("uvcluster ctl: {msg}\n{USAGE}");
    ExitCode::from(2)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("uvcluster ctl: {msg}");
    ExitCode::FAILURE
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Option<Args>, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut a = Args {
        control: None,
        name: None,
        json: false,
        request: Json::Null,
    };
    let mut words: Vec<String> = Vec::new();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("json") => a.json = true,
            Long("control") => {
                let v = p.value().map_err(|_| "--control needs a path")?;
                a.control = Some(PathBuf::from(v));
            }
            Long("name") => {
                let v = p.value().map_err(|_| "--name needs a value")?;
                let v = v.into_string().map_err(|v| format!("--name {v:?}"))?;
                a.name = Some(control::name(&v).map_err(|m| format!("--name {m}"))?);
            }
            // Options may come after the command (`status --json`); a
            // message starting with `-` follows `--` (`send -- -1`).
            Value(v) => words.push(v.into_string().map_err(|v| format!("{v:?} is not UTF-8"))?),
            other => {
                return Err(format!(
                    "unknown option '{}' (uvcluster ctl --help lists the options)",
                    crate::options::show_arg(&other)
                ));
            }
        }
    }
    let n = |w: Option<&String>, what: &str| -> Result<u64, String> {
        w.and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("{} takes {what}", words[0]))
    };
    a.request = match words.first().map(String::as_str) {
        None => return Err("no command given".into()),
        Some(c @ ("status" | "reload" | "stop")) if words.len() == 1 => json!({"command": c}),
        Some("scale") if words.len() == 2 => {
            json!({"command": "scale", "workers": n(words.get(1), "a worker count")?})
        }
        Some("restart") if words.len() == 2 => {
            json!({"command": "restart", "worker": n(words.get(1), "a worker id")?})
        }
        Some("send") if words.len() == 2 => {
            let m: Json = serde_json::from_str(&words[1])
                .map_err(|e| format!("ctl send needs a JSON message ({e}), e.g. {SEND_EXAMPLE}"))?;
            json!({"command": "send", "message": m})
        }
        Some("send") if words.len() == 1 => {
            return Err(format!(
                "ctl send needs a JSON message, e.g. {SEND_EXAMPLE}"
            ));
        }
        Some(c @ ("status" | "reload" | "stop" | "scale" | "restart" | "send")) => {
            return Err(format!("wrong arguments for {c}: {}", words[1..].join(" ")));
        }
        Some(c) => return Err(format!("unknown command {c:?}")),
    };
    Ok(Some(a))
}

/// The socket to talk to.
fn socket(a: &Args) -> Result<PathBuf, String> {
    if let Some(p) = &a.control {
        return Ok(p.clone());
    }
    let env = |v: &str| std::env::var_os(v);
    if let Some(name) = &a.name {
        let p = ControlPath::resolve(None, Some(name), env);
        return Ok(p.path().map(PathBuf::from).unwrap_or_default());
    }
    let dir = control::runtime_dir(env);
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| format!("no running primary found ({}: {e})", dir.display()))?;
    let mut live: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter(|p| UnixStream::connect(p).is_ok())
        .collect();
    live.sort();
    match live.len() {
        0 => Err(format!("no running primary found in {}", dir.display())),
        1 => Ok(live.remove(0)),
        _ => Err(format!(
            "several primaries are running: {}; pick one with --name or --control",
            live.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `uvcluster ctl ARGS` (the arguments after `ctl`).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let a = match parse(args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(m) => return usage(m),
    };
    let path = match socket(&a) {
        Ok(p) => p,
        Err(m) => return fail(m),
    };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "cannot reach the primary at {}: {e}",
                path.display()
            ));
        }
    };
    let is_reload = a.request["command"] == "reload";
    // A reload's reply comes when the roll ends, however long it takes.
    let _ = s.set_read_timeout((!is_reload).then_some(REPLY_TIMEOUT));
    let mut line = a.request.to_string();
    line.push('\n');
    if let Err(e) = s.write_all(line.as_bytes()) {
        return fail(format!("cannot send the request: {e}"));
    }
    let mut reply = String::new();
    match BufReader::new(&s).read_line(&mut reply) {
        Ok(0) => return fail("the primary closed the connection without a reply"),
        Ok(_) => {}
        Err(e) => return fail(format!("no reply: {e}")),
    }
    let v: Json = match serde_json::from_str(&reply) {
        Ok(v) => v,
        Err(e) => return fail(format!("a reply that is not JSON ({e}): {reply}")),
    };
    let ok = v["ok"] == true;
    if a.json {
        println!("{v}");
    } else if !ok {
        eprintln!(
            "uvcluster ctl: {}",
            v["error"].as_str().unwrap_or("refused")
        );
    } else {
        print!("{}", show(&v));
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// An `ok` reply for a person.
fn show(v: &Json) -> String {
    match v["command"].as_str() {
        Some("status") => table(v),
        // The duration as the log writes it (`1s 218ms`).
        Some("reload") => format!(
            "reload finished: {} replaced in {}\n",
            crate::events::workers(v["replaced"].as_u64().unwrap_or(0) as usize),
            crate::values::show_duration(Duration::from_secs_f64(
                v["duration_seconds"].as_f64().unwrap_or(0.0).max(0.0)
            ))
        ),
        Some("scale") => format!("scaling to {} worker(s)\n", v["workers"]),
        Some("restart") => format!("replacing worker {}\n", v["worker"]),
        Some("stop") => "stopping gracefully\n".into(),
        Some("send") => sent_line(v),
        _ => format!("{v}\n"),
    }
}

fn dash(v: &Json, f: impl Fn(&Json) -> Option<String>) -> String {
    f(v).unwrap_or_else(|| "-".into())
}

/// `status` as a table, one row per worker and empty slot.
fn table(v: &Json) -> String {
    let head = [
        "ID", "PID", "SLOT", "STATE", "UPTIME", "RESTARTS", "OPEN", "HANDED", "RSS", "CPU%",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for w in v["workers"].as_array().into_iter().flatten() {
        let num = |k: &str| dash(&w[k], |x| x.as_u64().map(|n| n.to_string()));
        rows.push(vec![
            num("id"),
            dash(&w["pid"], |x| x.as_i64().map(|n| n.to_string())),
            num("slot"),
            dash(&w["state"], |x| x.as_str().map(str::to_owned)),
            dash(&w["uptime_seconds"], |x| {
                x.as_f64()
                    .map(|s| humantime::format_duration(Duration::from_secs(s as u64)).to_string())
            }),
            num("restarts"),
            num("connections_open"),
            num("connections_handed"),
            dash(&w["rss_bytes"], |x| {
                x.as_u64()
                    .map(|b| format!("{:.1}M", b as f64 / (1 << 20) as f64))
            }),
            dash(&w["cpu_percent"], |x| x.as_f64().map(|p| format!("{p:.1}"))),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `sent to 3 workers (1 draining)`: the pool count, and the draining
/// workers that also got it, if any.
fn sent_line(v: &Json) -> String {
    let n = v["sent"].as_u64().unwrap_or(0);
    let d = v["draining"].as_u64().unwrap_or(0);
    let plural = if n == 1 { "worker" } else { "workers" };
    if d == 0 {
        format!("sent to {n} {plural}\n")
    } else {
        format!("sent to {n} {plural} ({d} draining)\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Option<Args>, String> {
        parse(args.iter().map(OsString::from))
    }

    /// During a `ctl restart`, `ctl send` said `sent to 4 worker(s)` for a
    /// 3-worker pool: the draining worker is counted apart.
    #[test]
    fn send_counts_the_pool_and_draining_apart() {
        let line = |v: Json| sent_line(&v);
        assert_eq!(
            line(json!({"sent": 3, "draining": 1})),
            "sent to 3 workers (1 draining)\n"
        );
        assert_eq!(
            line(json!({"sent": 3, "draining": 0})),
            "sent to 3 workers\n"
        );
        assert_eq!(line(json!({"sent": 1})), "sent to 1 worker\n");
        assert_eq!(
            line(json!({"sent": 0, "draining": 2})),
            "sent to 0 workers (2 draining)\n"
        );
    }

    #[test]
    fn commands() {
        let a = p(&["--control", "/x.sock", "status", "--json"])
            .unwrap()
            .unwrap();
        assert!(a.json);
        assert_eq!(a.request, json!({"command": "status"}));
        let a = p(&["scale", "3"]).unwrap().unwrap();
        assert_eq!(a.request, json!({"command": "scale", "workers": 3}));
        let a = p(&["send", "--", "-1"]).unwrap().unwrap();
        assert_eq!(a.request, json!({"command": "send", "message": -1}));
        assert!(p(&["scale"]).is_err());
        assert!(p(&["scale", "x"]).is_err());
        assert!(p(&["frob"]).is_err());
        assert!(p(&[]).is_err());
        assert!(p(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn status_table() {
        let v = json!({"ok": true, "command": "status", "workers": [
            {"id": 1, "pid": 42, "slot": 0, "state": "ready", "uptime_seconds": 61.0,
             "restarts": 0, "connections_handed": 5, "connections_open": null,
             "rss_bytes": 10485760, "cpu_seconds": 0.5, "cpu_percent": 1.25},
            {"id": null, "pid": null, "slot": 1, "state": "errored", "uptime_seconds": 0.0,
             "restarts": 5, "connections_handed": 0, "connections_open": null,
             "rss_bytes": null, "cpu_seconds": null, "cpu_percent": null}
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ID  PID"), "{t}");
        assert!(
            lines[1].contains("ready") && lines[1].contains("1m 1s"),
            "{t}"
        );
        assert!(
            lines[1].contains("10.0M") && lines[1].contains("1.2"),
            "{t}"
        );
        assert!(lines[2].starts_with("-   -"), "{t}");
    }
}
