//! The control socket: the running primary listens on a Unix socket, from
//! its own loop, for newline-delimited JSON requests (status, reload,
//! scale, restart, stop, send), one reply line each. gunicorn 25's
//! `gunicorn.ctl` and HAProxy's stats socket are the models;
//! docs/control.md is the protocol's manual and `ctl.rs` its client.
//!
//! The socket is an operator's door, never a way to disturb the service:
//! a request line is at most [`MAX_LINE`] bytes, a client that sends
//! nothing for the idle timeout is closed, at most [`MAX_CLIENTS`] are
//! served at once, a client that does not read its replies is dropped
//! once [`MAX_QUEUED`] bytes wait for it, and each of these gets an error
//! line saying why before its connection is closed. Dispatch runs on the
//! same loop, and a request costs no more than a status row per worker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use uvcluster::serde_json::{self, Value, json};
use uvcluster::uv::{Handle, Loop, Pipe, Timer};

use crate::events;
use crate::ops::Ops;

/// The longest request line, newline excluded (64 KiB).
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; one more gets an error line and is closed.
pub const MAX_CLIENTS: usize = 16;
/// Reply bytes that may wait for a client that does not read them.
pub const MAX_QUEUED: usize = 1 << 20;
/// How long a client may stay silent (between requests, or before its
/// first) before it is closed, unless `--control-timeout` says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `--name`.
pub const DEFAULT_NAME: &str = "uvcluster";

/// Where the control socket is, or that there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPath {
    /// `--control none`.
    Off,
    /// A path given with `--control`: used as given.
    Given(PathBuf),
    /// The default for a name (`--name`, else `uvcluster-<pid>`, see
    /// [`ControlPath::resolve`]), in the runtime directory.
    Default(PathBuf),
}

impl ControlPath {
    /// Resolves `--control` (`Some(None)` for `none`) and `--name`.
    ///
    /// Without `--control`, the socket is `DIR/NAME.sock`, `DIR` being
    /// [`runtime_dir`] and `NAME` the `--name`; without a name it is
    /// `uvcluster-PID`, so that unnamed primaries never contend for one
    /// path and `uvcluster ctl` finds the only one running.
    pub fn resolve(
        control: Option<Option<PathBuf>>,
        name: Option<&str>,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> ControlPath {
        match control {
            Some(None) => ControlPath::Off,
            Some(Some(p)) => ControlPath::Given(p),
            None => {
                let name = name
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{DEFAULT_NAME}-{}", std::process::id()));
                ControlPath::Default(runtime_dir(env).join(format!("{name}.sock")))
            }
        }
    }

    /// The path, unless off.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ControlPath::Off => None,
            ControlPath::Given(p) | ControlPath::Default(p) => Some(p),
        }
    }
}

/// The directory of default control sockets, for this process's user
/// (see [`runtime_dir_for`]).
pub fn runtime_dir(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    runtime_dir_for(env, nix::unistd::getuid().as_raw())
}

/// The directory of default control sockets of user `uid`, the same for
/// `uvcluster run` and `uvcluster ctl`: `$XDG_RUNTIME_DIR/uvcluster` (the
/// per-user runtime directory that `pam_systemd` provides, and where a
/// `systemd --user` unit's `RuntimeDirectory=uvcluster` is); else, for
/// root, `/run/uvcluster` (`/run` is root's runtime directory, where a
/// system unit's `RuntimeDirectory=uvcluster` is, outside the unit's
/// `PrivateTmp=`); else `/tmp/uvcluster-UID` (the temporary directory of
/// `$TMPDIR`). `run` creates it mode 0700 and refuses it unless it is
/// the user's and closed to others.
pub fn runtime_dir_for(env: impl Fn(&str) -> Option<std::ffi::OsString>, uid: u32) -> PathBuf {
    match env("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("uvcluster"),
        None if uid == 0 => PathBuf::from("/run/uvcluster"),
        None => std::env::temp_dir().join(format!("uvcluster-{uid}")),
    }
}

/// `--name`: letters, digits, `.`, `_` and `-` (it becomes a file name).
pub fn name(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "takes 1 to 64 letters, digits, '.', '_' or '-' (not first '.'). Received {v:?}"
        ))
    }
}

/// `--control`: a path, or `none`.
pub fn path_or_none(v: &str) -> Result<Option<PathBuf>, String> {
    match v {
        "none" => Ok(None),
        "" => Err("takes a socket path, or none. Received \"\"".into()),
        p => Ok(Some(PathBuf::from(p))),
    }
}

/// A request, as a JSON object (`{"command":"scale","workers":4}`) or as
/// its words (`scale 4`).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// One row per worker.
    Status,
    /// A rolling reload; the reply comes when it ends.
    Reload,
    /// Set the worker count.
    Scale {
        /// The new count, 1 to [`MAX_WORKERS`](uvcluster::supervisor::MAX_WORKERS).
        workers: usize,
    },
    /// Replace one worker gracefully.
    Restart {
        /// Its cluster id.
        worker: u32,
    },
    /// A graceful stop (as SIGTERM).
    Stop,
    /// Send a user message to every worker.
    Send {
        /// The message (any JSON value).
        message: Value,
    },
}

/// A request line that is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// The commands, as an error reply lists them.
const COMMANDS: &str = "status, reload, scale N, restart ID, stop, send JSON";

/// `"workers"` of a scale, in words for a person (no Rust type names).
fn workers_range() -> String {
    format!(
        "a whole number from 1 to {}",
        uvcluster::supervisor::MAX_WORKERS
    )
}

/// A worker count from `scale`'s argument.
fn workers_of(v: Option<u64>) -> Option<usize> {
    v.filter(|n| (1..=uvcluster::supervisor::MAX_WORKERS as u64).contains(n))
        .map(|n| n as usize)
}

/// Parses one request line (without its newline). The errors are in a
/// user's words: JSON names (`"workers"`), never Rust's (`usize`).
///
/// # Errors
///
/// [`BadRequest`] saying what is wrong and what is expected.
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(line)
        .map_err(|_| BadRequest("the request is not UTF-8".into()))?
        .trim();
    if text.starts_with('{') {
        return from_json(text);
    }
    let (word, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let rest = rest.trim();
    let none = |r: Request| {
        if rest.is_empty() {
            Ok(r)
        } else {
            Err(BadRequest(format!(
                "{word} takes no argument. Received {rest:?}"
            )))
        }
    };
    match word {
        "status" => none(Request::Status),
        "reload" => none(Request::Reload),
        "stop" => none(Request::Stop),
        "scale" => workers_of(rest.parse().ok())
            .map(|workers| Request::Scale { workers })
            .ok_or_else(|| {
                BadRequest(format!(
                    "scale takes a worker count, {}. Received {rest:?}",
                    workers_range()
                ))
            }),
        "restart" => rest
            .parse::<u32>()
            .map(|worker| Request::Restart { worker })
            .map_err(|_| {
                BadRequest(format!(
                    "restart takes a worker id, a whole number (the ID column of \
                     status). Received {rest:?}"
                ))
            }),
        "send" if rest.is_empty() => Err(BadRequest(
            "send needs a JSON message, e.g. send {\"cmd\":\"flush\"}".into(),
        )),
        "send" => serde_json::from_str(rest)
            .map(|message| Request::Send { message })
            .map_err(|e| BadRequest(format!("send takes a JSON value: {e}"))),
        "" => Err(BadRequest(format!(
            "an empty line is not a request; the commands are {COMMANDS}"
        ))),
        _ => Err(BadRequest(format!(
            "unknown command {word:?}; the commands are {COMMANDS}"
        ))),
    }
}

/// A request as a JSON object: `"command"` and that command's fields.
fn from_json(text: &str) -> Result<Request, BadRequest> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| BadRequest(format!("the request is not valid JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(BadRequest(format!(
            "a request is a JSON object with \"command\", or its words ({COMMANDS})"
        )));
    };
    let command = match m.remove("command") {
        Some(Value::String(c)) => c,
        None => {
            return Err(BadRequest(
                "a request needs \"command\": status, reload, scale, restart, stop or send".into(),
            ));
        }
        Some(other) => {
            return Err(BadRequest(format!(
                "\"command\" must be a string: status, reload, scale, restart, stop or \
                 send. Received {other}"
            )));
        }
    };
    let needs = |m: &mut serde_json::Map<String, Value>, field: &str, what: &str| {
        m.remove(field)
            .ok_or_else(|| BadRequest(format!("a {command} request needs \"{field}\", {what}")))
    };
    let (request, fields) = match command.as_str() {
        "status" => (Request::Status, ""),
        "reload" => (Request::Reload, ""),
        "stop" => (Request::Stop, ""),
        "scale" => {
            let w = needs(&mut m, "workers", &workers_range())?;
            let workers = workers_of(w.as_u64()).ok_or_else(|| {
                BadRequest(format!(
                    "\"workers\" must be {}. Received {w}",
                    workers_range()
                ))
            })?;
            (Request::Scale { workers }, "\"workers\"")
        }
        "restart" => {
            let what = "a worker id, a whole number (the id of a status row)";
            let w = needs(&mut m, "worker", what)?;
            let worker = w
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| BadRequest(format!("\"worker\" must be {what}. Received {w}")))?;
            (Request::Restart { worker }, "\"worker\"")
        }
        "send" => {
            let message = needs(&mut m, "message", "the JSON value to send")?;
            (Request::Send { message }, "\"message\"")
        }
        other => {
            return Err(BadRequest(format!(
                "unknown command {other:?}; the commands are status, reload, scale, \
                 restart, stop and send"
            )));
        }
    };
    if let Some(field) = m.keys().next() {
        let takes = if fields.is_empty() {
            "no field but \"command\"".to_owned()
        } else {
            format!("\"command\" and {fields}")
        };
        return Err(BadRequest(format!(
            "a {command} request takes {takes}. Received {field:?}"
        )));
    }
    Ok(request)
}

struct Client {
    buf: Vec<u8>,
    timer: Handle<Timer>,
    /// A reload is running for it: later lines wait, the idle timer is
    /// off.
    busy: bool,
    /// Closed after its last reply is written.
    closing: bool,
}

struct Inner {
    ops: Ops,
    listener: Option<Handle<Pipe>>,
    clients: HashMap<Handle<Pipe>, Client>,
    idle: Duration,
}

/// The control socket's server. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    inner: Rc<RefCell<Inner>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// Makes ready the path for a new socket: creates the default directory
/// (0700), refuses a path a live primary answers on, and takes over a
/// stale socket (nobody listens: unlinked).
fn claim(path: &ControlPath) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let p = path
        .path()
        .ok_or_else(|| io::Error::other("no control socket"))?
        .to_path_buf();
    if let (ControlPath::Default(_), Some(dir)) = (path, p.parent()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let m = std::fs::metadata(dir)?;
        if m.uid() != nix::unistd::getuid().as_raw() || m.permissions().mode() & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory of this user closed to others (mode 0700); \
                     give --control a path",
                    dir.display()
                ),
            ));
        }
    }
    match std::fs::symlink_metadata(&p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(p),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not touching it",
                p.display()
            ),
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(&p) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another primary is running: its control socket {} answers \
                     (stop it, or give this one another --name or --control)",
                    p.display()
                ),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(&p)?;
                log::warn!(
                    target: events::TARGET,
                    "control socket {}: left by a primary that is gone; taken over",
                    p.display()
                );
                Ok(p)
            }
            Err(e) => Err(e),
        },
    }
}

/// `e` with the path in front (`/run/x.sock: No such file or directory
/// (os error 2)`), unless its message names the path already.
fn naming(p: &Path, e: io::Error) -> io::Error {
    let shown = p.display().to_string();
    if e.to_string().contains(&shown) {
        e
    } else {
        io::Error::new(e.kind(), format!("{shown}: {e}"))
    }
}

impl Control {
    /// Listens on `path` (mode 0600) for requests on `ops`; a client
    /// silent for `idle` is closed.
    ///
    /// # Errors
    ///
    /// `AddrInUse` when a live primary answers on the path; the errors of
    /// creating the directory, binding and listening.
    pub fn start(
        lp: &mut Loop,
        ops: Ops,
        path: &ControlPath,
        idle: Duration,
    ) -> io::Result<Control> {
        use std::os::unix::fs::PermissionsExt;
        let named = path.path().map(Path::to_path_buf).unwrap_or_default();
        let p = claim(path).map_err(|e| naming(&named, e))?;
        let h = lp.pipe_init(false);
        let ctl = Control {
            inner: Rc::new(RefCell::new(Inner {
                ops,
                listener: None,
                clients: HashMap::new(),
                idle,
            })),
        };
        let res = lp.pipe_bind(h, &p).and_then(|()| {
            // Before listen: nobody can connect in between.
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
        });
        let res = res.and_then(|()| {
            let me = ctl.clone();
            lp.pipe_listen(h, 64, move |lp, _, r| match r {
                Ok(c) => me.accept(lp, c),
                Err(e) => log::warn!(target: events::TARGET, "control socket: {e}"),
            })
        });
        if let Err(e) = res {
            lp.close_if_open(h);
            return Err(naming(&p, e));
        }
        // The socket must not keep the primary alive once the workers are
        // gone.
        lp.unref_handle(h)?;
        ctl.inner.borrow_mut().listener = Some(h);
        log::info!(target: events::TARGET, "control socket {}", p.display());
        Ok(ctl)
    }

    /// Closes the socket (its path is unlinked) and every client.
    pub fn close(&self, lp: &mut Loop) {
        let (listener, clients) = {
            let mut i = self.inner.borrow_mut();
            (i.listener.take(), std::mem::take(&mut i.clients))
        };
        if let Some(h) = listener {
            lp.close_if_open(h);
        }
        for (h, c) in clients {
            lp.close_if_open(c.timer);
            lp.close_if_open(h);
        }
    }

    fn accept(&self, lp: &mut Loop, c: Handle<Pipe>) {
        let (full, idle) = {
            let i = self.inner.borrow();
            (i.clients.len() >= MAX_CLIENTS, i.idle)
        };
        if full || self.inner.borrow().listener.is_none() {
            let e = error(format!(
                "too many control clients (at most {MAX_CLIENTS} at once); try again"
            ));
            let r = lp.write(c, &[e.as_bytes()], |lp, c, _| {
                lp.close_if_open(c);
            });
            if r.is_err() {
                lp.close_if_open(c);
            }
            return;
        }
        let timer = lp.timer_init();
        let _ = lp.unref_handle(timer);
        self.inner.borrow_mut().clients.insert(
            c,
            Client {
                buf: Vec::new(),
                timer,
                busy: false,
                closing: false,
            },
        );
        self.arm(lp, c, idle);
        let me = self.clone();
        let r = lp.read_start(c, move |lp, c, r| match r {
            Ok([]) | Err(_) => me.drop_client(lp, c),
            Ok(data) => me.received(lp, c, data),
        });
        if r.is_err() {
            self.drop_client(lp, c);
        }
    }

    fn arm(&self, lp: &mut Loop, c: Handle<Pipe>, idle: Duration) {
        let Some(timer) = self.inner.borrow().clients.get(&c).map(|cl| cl.timer) else {
            return;
        };
        let me = self.clone();
        let _ = lp.timer_start(timer, idle, Duration::ZERO, move |lp, _| {
            let idle = crate::values::show_duration(me.inner.borrow().idle);
            me.fail_and_close(lp, c, format!("idle for {idle} without a request: closing"));
        });
    }

    fn drop_client(&self, lp: &mut Loop, c: Handle<Pipe>) {
        let cl = self.inner.borrow_mut().clients.remove(&c);
        if let Some(cl) = cl {
            lp.close_if_open(cl.timer);
        }
        lp.close_if_open(c);
    }

    /// Writes an error line, then closes the client once it is written.
    fn fail_and_close(&self, lp: &mut Loop, c: Handle<Pipe>, msg: String) {
        let timer = {
            let mut i = self.inner.borrow_mut();
            let Some(cl) = i.clients.get_mut(&c) else {
                return;
            };
            cl.closing = true;
            cl.buf = Vec::new();
            cl.timer
        };
        lp.close_if_open(timer);
        let _ = lp.read_stop(c);
        let line = error(msg);
        let me = self.clone();
        if lp
            .write(c, &[line.as_bytes()], move |lp, c, _| me.drop_client(lp, c))
            .is_err()
        {
            self.drop_client(lp, c);
        }
    }

    fn received(&self, lp: &mut Loop, c: Handle<Pipe>, data: &[u8]) {
        let idle = {
            let mut i = self.inner.borrow_mut();
            let idle = i.idle;
            let Some(cl) = i.clients.get_mut(&c) else {
                return;
            };
            if cl.closing {
                return;
            }
            cl.buf.extend_from_slice(data);
            idle
        };
        self.arm(lp, c, idle);
        self.process(lp, c);
    }

    /// Serves the complete lines buffered for `c`, one at a time (a
    /// reload holds the next ones until its reply).
    fn process(&self, lp: &mut Loop, c: Handle<Pipe>) {
        loop {
            let line = {
                let mut i = self.inner.borrow_mut();
                let Some(cl) = i.clients.get_mut(&c) else {
                    return;
                };
                if cl.busy || cl.closing {
                    return;
                }
                match cl.buf.iter().position(|&b| b == b'\n') {
                    Some(n) if n <= MAX_LINE => {
                        let mut line: Vec<u8> = cl.buf.drain(..=n).collect();
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        Some(line)
                    }
                    None if cl.buf.len() <= MAX_LINE => return,
                    // A line longer than the limit, ended or not.
                    _ => None,
                }
            };
            let Some(line) = line else {
                self.fail_and_close(
                    lp,
                    c,
                    format!("request line longer than {MAX_LINE} bytes: closing"),
                );
                return;
            };
            // An empty line gets its error reply too (parse_request):
            // a client waiting for a reply to it must not wait forever.
            match parse_request(&line) {
                Ok(r) => self.serve(lp, c, r),
                Err(BadRequest(m)) => self.reply(lp, c, &error_value(m)),
            }
        }
    }

    fn reply(&self, lp: &mut Loop, c: Handle<Pipe>, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        if lp.write_queue_size(c) + line.len() > MAX_QUEUED {
            log::warn!(
                target: events::TARGET,
                "control socket: a client does not read its replies; dropped"
            );
            self.drop_client(lp, c);
            return;
        }
        if lp.write(c, &[line.as_bytes()], |_, _, _| {}).is_err() {
            self.drop_client(lp, c);
        }
    }

    fn serve(&self, lp: &mut Loop, c: Handle<Pipe>, r: Request) {
        let ops = self.inner.borrow().ops.clone();
        let sup = ops.supervisor();
        match r {
            Request::Status => {
                let rows = ops.rows(lp);
                let (ok, failed) = ops.reloads();
                let v = json!({
                    "ok": true,
                    "command": "status",
                    "pid": std::process::id(),
                    "stopping": ops.stopping(),
                    "ready": ops.ready(lp),
                    "reloads": { "ok": ok, "failed": failed },
                    "workers": rows,
                });
                self.reply(lp, c, &v);
            }
            Request::Reload => {
                let timer = {
                    let mut i = self.inner.borrow_mut();
                    let Some(cl) = i.clients.get_mut(&c) else {
                        return;
                    };
                    cl.busy = true;
                    cl.timer
                };
                let _ = lp.timer_stop(timer);
                let me = self.clone();
                sup.reload(lp, move |lp, r| {
                    let v = match r {
                        Ok(rep) => json!({
                            "ok": true,
                            "command": "reload",
                            "replaced": rep.replaced,
                            // To the millisecond, as the log.
                            "duration_seconds": rep.duration.as_millis() as f64 / 1000.0,
                        }),
                        Err(e @ uvcluster::supervisor::ReloadError::Refused) => json!({
                            "ok": false,
                            "command": "reload",
                            "error": e.to_string(),
                        }),
                        Err(e) => json!({
                            "ok": false,
                            "command": "reload",
                            "error": format!(
                                "reload failed closed: {}; the old workers keep serving",
                                crate::run::reload_failure(&e)
                            ),
                        }),
                    };
                    let idle = {
                        let mut i = me.inner.borrow_mut();
                        let idle = i.idle;
                        let Some(cl) = i.clients.get_mut(&c) else {
                            return;
                        };
                        cl.busy = false;
                        idle
                    };
                    me.reply(lp, c, &v);
                    me.arm(lp, c, idle);
                    me.process(lp, c);
                });
            }
            Request::Scale { workers } => {
                let v = match sup.scale(lp, workers) {
                    Ok(()) => json!({"ok": true, "command": "scale", "workers": workers}),
                    Err(e) => json!({"ok": false, "command": "scale", "error": e.to_string()}),
                };
                self.reply(lp, c, &v);
            }
            Request::Restart { worker } => {
                let v = match sup.restart(lp, worker) {
                    Ok(()) => json!({"ok": true, "command": "restart", "worker": worker}),
                    Err(e) => json!({"ok": false, "command": "restart", "error": e.to_string()}),
                };
                self.reply(lp, c, &v);
            }
            Request::Stop => {
                self.reply(lp, c, &json!({"ok": true, "command": "stop"}));
                log::info!(target: events::TARGET, "control socket: stop requested");
                sup.stop(lp, true);
            }
            Request::Send { message } => {
                let n = sup.send_all(lp, &message);
                let v =
                    json!({"ok": true, "command": "send", "sent": n.pool, "draining": n.draining});
                self.reply(lp, c, &v);
            }
        }
    }
}

fn error_value(msg: String) -> Value {
    json!({"ok": false, "error": msg})
}

fn error(msg: String) -> String {
    let mut s = error_value(msg).to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_as_json_or_words() {
        assert_eq!(
            parse_request(br#"{"command":"status"}"#),
            Ok(Request::Status)
        );
        assert_eq!(parse_request(b"status"), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"command":"scale","workers":3}"#),
            Ok(Request::Scale { workers: 3 })
        );
        assert_eq!(parse_request(b"scale 3"), Ok(Request::Scale { workers: 3 }));
        assert_eq!(
            parse_request(b"restart 7"),
            Ok(Request::Restart { worker: 7 })
        );
        assert_eq!(
            parse_request(br#"send {"hits":1}"#),
            Ok(Request::Send {
                message: json!({"hits": 1})
            })
        );
    }

    #[test]
    fn bad_requests_say_why() {
        for (line, want) in [
            (&b"hello"[..], "unknown command \"hello\""),
            (
                b"scale x",
                "scale takes a worker count, a whole number from 1 to 4096. Received \"x\"",
            ),
            (
                b"scale 0",
                "scale takes a worker count, a whole number from 1 to 4096. Received \"0\"",
            ),
            (b"restart x", "restart takes a worker id, a whole number"),
            (b"status now", "status takes no argument"),
            (
                b"{\"command\":\"scale\"}",
                "a scale request needs \"workers\", a whole number from 1 to 4096",
            ),
            (b"{\"command\":\"boom\"}", "unknown command \"boom\""),
            (b"{not json", "the request is not valid JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"send {", "send takes a JSON value"),
            (
                b"send",
                "send needs a JSON message, e.g. send {\"cmd\":\"flush\"}",
            ),
            (
                b"",
                "an empty line is not a request; the commands are status, reload",
            ),
            (b"  ", "an empty line is not a request"),
        ] {
            let e = parse_request(line).unwrap_err();
            assert!(e.0.contains(want), "{line:?}: {}", e.0);
        }
    }

    /// Replies named Rust types (`expected usize`, `expected u32`,
    /// ``missing field `command` ``): they now name the JSON fields and
    /// the values accepted.
    #[test]
    fn bad_json_requests_say_why_in_plain_words() {
        for (line, want) in [
            (
                &br#"{"command":"scale","workers":-1}"#[..],
                "\"workers\" must be a whole number from 1 to 4096. Received -1",
            ),
            (
                br#"{"command":"scale","workers":"two"}"#,
                "\"workers\" must be a whole number from 1 to 4096. Received \"two\"",
            ),
            (
                br#"{"command":"scale","workers":5000}"#,
                "\"workers\" must be a whole number from 1 to 4096. Received 5000",
            ),
            (
                br#"{"command":"restart","worker":4294967296}"#,
                "\"worker\" must be a worker id, a whole number (the id of a status row). Received 4294967296",
            ),
            (
                br#"{"workers":2}"#,
                "a request needs \"command\": status, reload, scale, restart, stop or send",
            ),
            (br#"{"command":7}"#, "\"command\" must be a string"),
            (
                br#"{"command":"status","x":1}"#,
                "a status request takes no field but \"command\". Received \"x\"",
            ),
            (
                br#"{"command":"scale","workers":2,"wrokers":3}"#,
                "a scale request takes \"command\" and \"workers\". Received \"wrokers\"",
            ),
            (br#"{"command":"send"}"#, "a send request needs \"message\""),
        ] {
            let e = parse_request(line).unwrap_err().0;
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
            for rust in ["usize", "u32", "u64", "`", "variant"] {
                assert!(!e.contains(rust), "{}: {e}", String::from_utf8_lossy(line));
            }
        }
    }

    #[test]
    fn names_and_paths() {
        assert!(name("web-1.prod_x").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(path_or_none("none"), Ok(None));
        let env = |v: &str| (v == "XDG_RUNTIME_DIR").then(|| "/run/user/7".into());
        assert_eq!(
            ControlPath::resolve(None, Some("web"), env),
            ControlPath::Default(PathBuf::from("/run/user/7/uvcluster/web.sock"))
        );
        let none = |_: &str| None;
        let p = ControlPath::resolve(None, None, none);
        let want = format!("uvcluster-{}.sock", std::process::id());
        assert!(p.path().unwrap().ends_with(&want), "{p:?}");
        assert_eq!(
            ControlPath::resolve(Some(None), Some("web"), none),
            ControlPath::Off
        );
    }

    /// The shipped unit could not be reached by `uvcluster ctl`: root
    /// without `$XDG_RUNTIME_DIR` used `/tmp/uvcluster-0`, inside the
    /// unit's `PrivateTmp=`. Root now uses `/run/uvcluster` (the unit's
    /// `RuntimeDirectory=uvcluster`); others keep `/tmp/uvcluster-UID`;
    /// `$XDG_RUNTIME_DIR`, when set and not empty, wins for everyone.
    #[test]
    fn default_control_dir_for_root_is_run_uvcluster() {
        let none = |_: &str| None;
        let empty = |_: &str| Some("".into());
        let xdg = |v: &str| (v == "XDG_RUNTIME_DIR").then(|| "/run/user/1000".into());
        assert_eq!(runtime_dir_for(none, 0), PathBuf::from("/run/uvcluster"));
        assert_eq!(runtime_dir_for(empty, 0), PathBuf::from("/run/uvcluster"));
        assert_eq!(
            runtime_dir_for(none, 1000),
            std::env::temp_dir().join("uvcluster-1000")
        );
        assert_eq!(
            runtime_dir_for(xdg, 0),
            PathBuf::from("/run/user/1000/uvcluster")
        );
        assert_eq!(
            runtime_dir_for(xdg, 1000),
            PathBuf::from("/run/user/1000/uvcluster")
        );
    }
}
