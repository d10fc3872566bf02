//! The shipped unit files (`docs/uvcluster.socket`, `docs/uvcluster.service`)
//! under a real systemd manager: a private `systemd --user` in a private
//! mount namespace (`unshare -m`, with a tmpfs on `/run/systemd` holding
//! `/run/systemd/system`, which makes "booted with systemd" true there
//! only), in a cgroup of the test's own (so that the manager, which runs as
//! root, moves no process but its own), driven with `systemctl --user`.
//!
//! Two managers: the machine's (Debian 12: systemd 252) runs the units'
//! commented `Type=notify` + `ExecReload=` variant, and systemd 254 from
//! Debian's bookworm-backports (downloaded once into the target directory,
//! checked against pinned SHA-256 sums, unpacked with `dpkg -x`, never
//! installed) runs the shipped `Type=notify-reload`. Each run checks socket
//! activation (a connection made before the service exists is served), that
//! the service is `active` only once every worker listens (`READY=1`) with
//! the worker count in `StatusText`, that `uvcluster ctl status` run as a
//! shell of the manager's user runs it reaches the primary (its control
//! socket in the unit's `RuntimeDirectory=`, removed with the service),
//! a `systemctl reload` that the manager
//! sees (a `reload*` state, then `running`) with no request failing, the
//! watchdog pings, and a graceful `systemctl stop` under `KillMode=mixed`
//! (a request in progress when the stop begins is answered, the primary
//! exits 0), after which the socket still listens and starts the service
//! again, and `STOPPING=1` as the manager sees it. Each manager runs the
//! units once with `cluster_hello` workers and once with Node workers,
//! whose first reload worker waits for SIGUSR2 (`HOLD_WORKER=5`), holding
//! the reload open so that the `reloading` state, and `systemctl reload`
//! waiting for `READY=1`, are seen without a race. A last test shows why
//! the unit says `KillMode=mixed`: with `control-group` the same request in
//! progress is cut.
//!
//! The unit files are rewritten only where they must be: the port (a free
//! one instead of 8000), `ExecStart`'s paths (this build's binaries), the
//! `HOLD_WORKER` variable for Node workers, and, for systemd 252, the
//! variant lines the service file names. Each
//! substitution must match exactly once, so a change to the shipped files
//! fails here.
//!
//! Where `unshare`, `nsenter`, cgroups, the manager or the download are not
//! available (not root, a container without them, no network), each test
//! prints a loud `*** SKIP ... ***` line and passes without checking
//! (docs/TESTING.md).

#[path = "../../tests/util/mod.rs"]
mod util;

mod ops_util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ops_util::{LIMIT, Load, TempDir, free_port, get};

/// Prints the loud SKIP line of docs/TESTING.md.
fn skip(test: &str, why: &str) {
    eprintln!("\n*** SKIP {test}: {why} ***\n");
}

/// Which manager runs the units, and with which variant of the service.
#[derive(Clone)]
struct Systemd {
    /// The manager binary (`systemd`, run with `--user`).
    manager: PathBuf,
    /// Its `systemctl`.
    systemctl: PathBuf,
    /// Its `systemd-analyze`.
    analyze: PathBuf,
    /// `LD_LIBRARY_PATH` for an unpacked (not installed) systemd.
    libs: Option<PathBuf>,
    /// Major version (252, 254, ...).
    version: u32,
}

impl Systemd {
    /// The machine's own systemd.
    fn host() -> Result<Systemd, String> {
        let manager = PathBuf::from("/lib/systemd/systemd");
        if !manager.exists() {
            return Err(
                "/lib/systemd/systemd is not installed (apt-get install -y systemd)".into(),
            );
        }
        let s = Systemd {
            manager,
            systemctl: PathBuf::from("systemctl"),
            analyze: PathBuf::from("systemd-analyze"),
            libs: None,
            version: 0,
        };
        s.with_version()
    }

    fn with_version(mut self) -> Result<Systemd, String> {
        let out = self
            .command(&self.systemctl)
            .arg("--version")
            .output()
            .map_err(|e| format!("systemctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        self.version = text
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("systemctl --version said {text:?}"))?;
        Ok(self)
    }

    /// `program` with this systemd's libraries.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        if let Some(l) = &self.libs {
            c.env("LD_LIBRARY_PATH", l);
        }
        c
    }

    /// systemd 254 from bookworm-backports, downloaded once into the
    /// target directory and unpacked there.
    fn backports_254() -> Result<Systemd, String> {
        static ONCE: Mutex<()> = Mutex::new(());
        let _one = ONCE.lock().unwrap_or_else(|e| e.into_inner());
        if std::env::consts::ARCH != "x86_64" {
            return Err("the pinned systemd 254 packages are amd64 only".into());
        }
        const VERSION: &str = "254.26-1~bpo12+1";
        // (package, SHA-256 of its .deb)
        const DEBS: [(&str, &str); 2] = [
            (
                "systemd",
                "f55abada0c5c0409f7323e3deecb5d837ecfae75a31524133ac41302d41eff54",
            ),
            (
                "libsystemd-shared",
                "4b1ab8da02aea748cf3fbd75ec6a2734d92ae4e1f287afb33e2025f971a3058a",
            ),
        ];
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("systemd-254.26");
        let root = cache.join("root");
        let done = cache.join("unpacked");
        if !done.exists() {
            std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
            let _ = std::fs::remove_dir_all(&root);
            for (pkg, sum) in DEBS {
                let deb = cache.join(format!("{pkg}.deb"));
                let url = format!(
                    "http://deb.debian.org/debian/pool/main/s/systemd/{pkg}_{}_amd64.deb",
                    VERSION.replace('+', "%2B")
                );
                if sha256(&deb).as_deref() != Some(sum) {
                    let part = cache.join(format!("{pkg}.deb.part"));
                    let out = Command::new("curl")
                        .args(["-sSfL", "--max-time", "120", "-o"])
                        .arg(&part)
                        .arg(&url)
                        .output()
                        .map_err(|e| format!("curl: {e}"))?;
                    if !out.status.success() {
                        return Err(format!(
                            "cannot download {url}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                    std::fs::rename(&part, &deb).map_err(|e| e.to_string())?;
                }
                let got = sha256(&deb);
                assert_eq!(
                    got.as_deref(),
                    Some(sum),
                    "{} does not have the pinned SHA-256",
                    deb.display()
                );
                let out = Command::new("dpkg")
                    .arg("-x")
                    .arg(&deb)
                    .arg(&root)
                    .output()
                    .map_err(|e| format!("dpkg: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "dpkg -x {}: {}",
                        deb.display(),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            std::fs::write(&done, VERSION).map_err(|e| e.to_string())?;
        }
        let s = Systemd {
            manager: root.join("lib/systemd/systemd"),
            systemctl: root.join("bin/systemctl"),
            analyze: root.join("usr/bin/systemd-analyze"),
            libs: Some(root.join("usr/lib/x86_64-linux-gnu/systemd")),
            version: 0,
        }
        .with_version()?;
        assert_eq!(s.version, 254, "the unpacked systemd is not 254");
        Ok(s)
    }
}

/// The SHA-256 of a file (`sha256sum`), if it exists.
fn sha256(f: &Path) -> Option<String> {
    if !f.exists() {
        return None;
    }
    let out = Command::new("sha256sum").arg(f).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// Replaces `from` by `to` in `text`, which must hold `from` exactly once.
fn subst(text: &str, from: &str, to: &str, file: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "docs/{file} no longer holds {from:?} exactly once: update this test with it"
    );
    text.replacen(from, to, 1)
}

/// The worker program the service runs.
enum App {
    /// `cluster_hello` (Rust).
    Hello,
    /// `node tests/node/systemd_worker.js`, with `HOLD_WORKER=5`: the first
    /// worker a reload starts listens only once sent SIGUSR2, which holds
    /// the reload open as long as the test wants.
    Node,
}

/// The shipped units, rewritten for this run: (socket, service).
fn units(sd: &Systemd, port: u16, app: &App) -> (String, String) {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let socket = std::fs::read_to_string(docs.join("uvcluster.socket")).unwrap();
    let socket = subst(
        &socket,
        "\nListenStream=8000\n",
        &format!("\nListenStream=127.0.0.1:{port}\n"),
        "uvcluster.socket",
    );
    let service = std::fs::read_to_string(docs.join("uvcluster.service")).unwrap();
    let f = "uvcluster.service";
    let service = subst(
        &service,
        "\nEnvironment=PORT=8000\n",
        &format!("\nEnvironment=PORT={port}\n"),
        f,
    );
    let worker = match app {
        App::Hello => ops_util::hello().display().to_string(),
        App::Node => {
            let node = Command::new("sh")
                .args(["-c", "command -v node"])
                .output()
                .unwrap();
            format!(
                "{} {}",
                String::from_utf8_lossy(&node.stdout).trim(),
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/node/systemd_worker.js")
                    .display()
            )
        }
    };
    let service = match app {
        App::Hello => service,
        App::Node => subst(
            &service,
            "\nEnvironment=NODE_ENV=production\n",
            "\nEnvironment=NODE_ENV=production\nEnvironment=HOLD_WORKER=5\n",
            f,
        ),
    };
    let mut service = subst(
        &service,
        "\nExecStart=/usr/local/bin/uvcluster run --workers 4 --policy none -- /usr/bin/node /srv/app/server.js\n",
        &format!(
            "\nExecStart={} run --workers 4 --policy none -- {worker}\n",
            ops_util::bin().display()
        ),
        f,
    );
    // The unit's PrivateTmp=yes gives the service an empty /tmp of its
    // own: a checkout (or target directory) under /tmp, as a clean clone
    // in /tmp/ci is, would hide the built binaries, the app and the test's
    // runtime directory from it. Only then is PrivateTmp turned off.
    let under_tmp = |p: &Path| p.starts_with("/tmp");
    if under_tmp(&ops_util::bin())
        || under_tmp(Path::new(env!("CARGO_MANIFEST_DIR")))
        || under_tmp(Path::new(env!("CARGO_TARGET_TMPDIR")))
    {
        service = subst(&service, "\nPrivateTmp=yes\n", "\nPrivateTmp=no\n", f);
    }
    if sd.version < 253 {
        // The variant the file names for systemd 252 and older.
        service = subst(
            &service,
            "\nType=notify-reload\n",
            "\n#Type=notify-reload\n",
            f,
        );
        service = subst(&service, "\n#Type=notify\n", "\nType=notify\n", f);
        service = subst(
            &service,
            "\n#ExecReload=/bin/kill -HUP $MAINPID\n",
            "\nExecReload=/bin/kill -HUP $MAINPID\n",
            f,
        );
    }
    (socket, service)
}

/// A private `systemd --user` and everything it started: killed (through
/// its cgroup, so nothing it forked survives) and its cgroups removed on
/// drop, even when the test fails.
struct Manager {
    sd: Systemd,
    child: Child,
    /// Its `XDG_RUNTIME_DIR`, under `dir`.
    runtime: PathBuf,
    /// The name of its cgroup under each hierarchy's root.
    cgroup: String,
    _dir: TempDir,
}

/// The cgroup hierarchies the manager joins: systemd's named v1 hierarchy
/// and the v2 one (hybrid layout), or the v2 root (unified layout).
const HIERARCHIES: [&str; 3] = [
    "/sys/fs/cgroup/systemd",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup",
];

/// Puts the shell in a cgroup of its own (the manager takes its cgroup as
/// its root; left in the machine's `/init.scope`, it would move every
/// process of the machine), mounts the private `/run/systemd`, and execs
/// the manager.
const START: &str = r#"set -e
cg=$1; manager=$2
for d in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
  if [ -f "$d/cgroup.procs" ]; then mkdir -p "$d/$cg"; echo $$ > "$d/$cg/cgroup.procs"; fi
done
grep -q "^0::/$cg\$" /proc/self/cgroup || { echo "not in a cgroup of its own:"; cat /proc/self/cgroup; exit 1; } >&2
mkdir -p /run/systemd
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mkdir -p /run/systemd/system
exec "$manager" --user
"#;

impl Manager {
    /// Starts it with `units` in its runtime unit directory, and waits for
    /// its private socket. `Err` says why it cannot run here.
    fn start(sd: &Systemd, units: &[(&str, &str)]) -> Result<Manager, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (unshare -m, cgroups)".into());
        }
        for tool in ["unshare", "nsenter"] {
            if Command::new(tool).arg("--version").output().is_err() {
                return Err(format!("`{tool}` is not installed (util-linux)"));
            }
        }
        // Not under /tmp: the service has PrivateTmp=yes, and the notify
        // socket lives in the runtime directory.
        let dir = TempDir(Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "sdmgr-{}-{}",
            std::process::id(),
            uvcluster::uv::Loop::hrtime()
        )));
        let runtime = dir.join("rt");
        let home = dir.join("home");
        let unit_dir = runtime.join("systemd/user");
        std::fs::create_dir_all(&unit_dir).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        for (name, text) in units {
            std::fs::write(unit_dir.join(name), text).unwrap();
        }
        let cgroup = format!(
            "uvcluster-sdmgr-{}-{}",
            std::process::id(),
            uvcluster::uv::Loop::hrtime()
        );
        let mut cmd = sd.command(Path::new("unshare"));
        cmd.args(["-m", "--propagation", "private", "sh", "-c", START, "sh"])
            .arg(&cgroup)
            .arg(&sd.manager)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("HOME", &home)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| format!("unshare: {e}"))?;
        let mut m = Manager {
            sd: sd.clone(),
            child,
            runtime,
            cgroup,
            _dir: dir,
        };
        let private = m.runtime.join("systemd/private");
        let t0 = Instant::now();
        while !private.exists() {
            if let Some(st) = m.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(e) = m.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("the manager ended ({st}): {}", err.trim()));
            }
            assert!(
                t0.elapsed() < LIMIT,
                "the manager made no private socket within {LIMIT:?}"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// `systemctl --user ARGS` in the manager's mount namespace.
    fn systemctl(&self, args: &[&str]) -> Output {
        self.systemctl_command(args).output().unwrap()
    }

    /// The command [`Manager::systemctl`] runs (for another thread).
    fn systemctl_command(&self, args: &[&str]) -> Command {
        let mut c = self.sd.command(Path::new("nsenter"));
        c.args(["-t", &self.child.id().to_string(), "-m", "--"])
            .arg(&self.sd.systemctl)
            .arg("--user")
            .args(args)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null());
        c
    }

    /// `uvcluster ctl ARGS` as a shell of the manager's user runs it: in
    /// the manager's mount namespace, with that user's `HOME`, `PATH` and
    /// `XDG_RUNTIME_DIR` and nothing else of the test's environment (no
    /// `--control`: ctl finds the primary by the default rule alone).
    fn ctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.child.id().to_string(), "-m", "--"])
            .arg(ops_util::bin())
            .arg("ctl")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self._dir.0.join("home"))
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .stdin(Stdio::null());
        c.output().unwrap()
    }

    /// `systemctl --user ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl --user {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -p P,...` of `unit`, as a map.
    fn show(&self, unit: &str, props: &str) -> BTreeMap<String, String> {
        self.ok(&["show", "-p", props, unit])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn prop(&self, unit: &str, p: &str) -> String {
        self.show(unit, p).remove(p).unwrap_or_default()
    }

    /// Polls until `unit`'s property `p` satisfies `cond`; returns every
    /// property of `props` at that moment.
    fn wait_for(
        &self,
        unit: &str,
        props: &str,
        what: &str,
        mut cond: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let t0 = Instant::now();
        loop {
            let s = self.show(unit, props);
            if cond(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < LIMIT,
                "{unit}: not within {LIMIT:?}: {what}; last {s:?}"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// The processes of this manager's cgroup tree (any hierarchy).
    fn cgroup_pids(&self) -> BTreeSet<i32> {
        let mut pids = BTreeSet::new();
        for h in HIERARCHIES {
            let root = Path::new(h).join(&self.cgroup);
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.parse::<i32>().ok()));
                }
                if let Ok(rd) = std::fs::read_dir(&d) {
                    stack.extend(
                        rd.flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
            }
        }
        pids
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // Everything in the cgroup tree (the manager, its services and
        // whatever they forked), until nothing is left.
        let t0 = Instant::now();
        loop {
            let pids = self.cgroup_pids();
            if pids.is_empty() || t0.elapsed() > LIMIT {
                break;
            }
            for p in pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = self.child.try_wait();
            std::thread::park_timeout(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup directories, deepest first.
        for h in HIERARCHIES {
            let root = Path::new(h).join(&self.cgroup);
            if root.exists() {
                let mut dirs = vec![];
                let mut stack = vec![root];
                while let Some(d) = stack.pop() {
                    if let Ok(rd) = std::fs::read_dir(&d) {
                        stack.extend(
                            rd.flatten()
                                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                                .map(|e| e.path()),
                        );
                    }
                    dirs.push(d);
                }
                for d in dirs.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

/// The pids of `pid`'s children (the primary's workers).
fn children(pid: &str) -> BTreeSet<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Whether process `pid` has a handler for SIGUSR2 (`SigCgt` in its
/// status: bit 11 for signal 12).
fn catches_sigusr2(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << 11) != 0)
}

/// A keep-alive connection holding a request in progress.
fn request_in_progress(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    // A first request, answered: a worker holds the connection.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The second one, its header not ended: nothing can answer it yet.
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    s
}

/// The whole run of the shipped units under `sd`'s manager, `app` as the
/// workers.
fn shipped_units(test: &str, sd: Result<Systemd, String>, app: App) {
    let sd = match sd {
        Ok(sd) => sd,
        Err(why) => return skip(test, &why),
    };
    if matches!(app, App::Node) {
        util::require_node();
    }
    let port = free_port();
    let (socket, service) = units(&sd, port, &app);
    verify(&sd, &socket, &service);
    let mgr = match Manager::start(
        &sd,
        &[
            ("uvcluster.socket", &socket),
            ("uvcluster.service", &service),
        ],
    ) {
        Ok(m) => m,
        Err(why) => return skip(test, &format!("no private systemd --user manager: {why}")),
    };
    let svc = "uvcluster.service";
    let state = "ActiveState,SubState,StatusText,MainPID";
    let want_type = if sd.version < 253 {
        "notify"
    } else {
        "notify-reload"
    };
    let s = mgr.show(svc, "Type,KillMode,NotifyAccess,WatchdogUSec,ReloadSignal");
    assert_eq!(s["Type"], want_type, "{s:?}");
    assert_eq!(s["KillMode"], "mixed");
    assert_eq!(s["NotifyAccess"], "main");
    if sd.version >= 253 {
        assert_eq!(s["ReloadSignal"], "1", "SIGHUP is the reload signal");
    }

    // Socket activation: the socket listens, the service does not run.
    mgr.ok(&["start", "uvcluster.socket"]);
    let s = mgr.show("uvcluster.socket", "ActiveState,SubState");
    assert_eq!(
        (&*s["ActiveState"], &*s["SubState"]),
        ("active", "listening")
    );
    let s = mgr.show(svc, state);
    assert_eq!(s["ActiveState"], "inactive", "{s:?}");
    // A connection now queues in the socket's backlog, starts the service,
    // and is served once a worker accepts it.
    let (code, body) = get(port, "/").expect("the first connection is served");
    assert_eq!(code, 200, "{body}");
    match app {
        App::Hello => assert_eq!(body, "hello world\n"),
        // The workers see none of the systemd variables.
        App::Node => assert!(body.contains("\"env\":{}"), "{body}"),
    }
    // Active (READY=1) only once every worker is ready: at the first sight
    // of `active`, the primary has its 4 workers.
    let s = mgr.wait_for(svc, state, "active", |s| s["ActiveState"] != "activating");
    assert_eq!(
        (&*s["ActiveState"], &*s["SubState"]),
        ("active", "running"),
        "{s:?}"
    );
    let primary = s["MainPID"].clone();
    assert_eq!(
        children(&primary).len(),
        4,
        "active before every worker was"
    );
    mgr.wait_for(svc, state, "STATUS=4 workers ready", |s| {
        s["StatusText"] == "4 workers ready"
    });
    // `uvcluster ctl status` from a shell reaches the service: the unit's
    // RuntimeDirectory=uvcluster is where `run` and `ctl` both look (the
    // shipped unit left the socket in its PrivateTmp /tmp, out of reach).
    assert_eq!(mgr.prop(svc, "RuntimeDirectory"), "uvcluster");
    let sock = mgr
        .runtime
        .join("uvcluster")
        .join(format!("uvcluster-{primary}.sock"));
    assert!(sock.exists(), "no control socket at {}", sock.display());
    let out = mgr.ctl(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "uvcluster ctl status: {out:?}\n{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        4,
        "{table}"
    );
    // WatchdogSec=10s: the watchdog is armed (WATCHDOG_USEC reached the
    // primary, which pings every 5 s; checked below).
    assert_eq!(mgr.prop(svc, "WatchdogUSec"), "10s");
    let watchdog0 = mgr.prop(svc, "WatchdogTimestampMonotonic");

    // A reload under load: the manager goes through a reload state and back
    // to running, and no request fails.
    let load = Load::start(port, 2, 100_000);
    ops_util::eventually("the load is served", || load.ok() > 20);
    let old = children(&primary);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let mut show = mgr.systemctl_command(&["show", "-p", "SubState", "--value", svc]);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = show.output().unwrap();
                let sub = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&sub) {
                    seen.push(sub);
                }
            }
        })
    };
    ops_util::eventually("the poller runs", || !seen.lock().unwrap().is_empty());
    let changed0 = mgr.prop(svc, "StateChangeTimestampMonotonic");
    let t0 = Instant::now();
    let reload = {
        let mut c = mgr.systemctl_command(&["reload", svc]);
        std::thread::spawn(move || (c.output().unwrap(), t0.elapsed()))
    };
    let new_workers = |now: &BTreeSet<String>| now.difference(&old).count();
    if matches!(app, App::Node) {
        // The reload is held open by its first new worker: the manager
        // shows it reloading for as long as it lasts.
        let s = mgr.wait_for(svc, state, "reloading", |s| s["ActiveState"] == "reloading");
        assert!(s["SubState"].starts_with("reload"), "{s:?}");
        ops_util::eventually("the held worker", || new_workers(&children(&primary)) == 1);
        let held = children(&primary).difference(&old).next().unwrap().clone();
        let s = mgr.show(svc, state);
        assert_eq!(s["ActiveState"], "reloading", "{s:?}");
        // It says it holds once its SIGUSR2 handler is in place.
        ops_util::eventually("the held worker catches SIGUSR2", || catches_sigusr2(&held));
        if sd.version >= 253 {
            assert!(
                !reload.is_finished(),
                "systemctl reload returned before READY=1"
            );
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(held.parse().unwrap()),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .unwrap();
    }
    let (out, reload_took) = reload.join().unwrap();
    assert!(out.status.success(), "systemctl reload: {out:?}");
    if sd.version >= 253 {
        // notify-reload: `systemctl reload` waited for READY=1, sent at
        // the end of the roll, so the 4 new workers are there already.
        assert_eq!(
            new_workers(&children(&primary)),
            4,
            "systemctl reload returned before the roll ended ({reload_took:?})"
        );
    } else {
        ops_util::eventually("4 new workers", || new_workers(&children(&primary)) == 4);
    }
    mgr.wait_for(svc, state, "running again", |s| s["SubState"] == "running");
    // The old workers are gone; the count is back.
    ops_util::eventually("the old workers are gone", || {
        children(&primary).intersection(&old).count() == 0
    });
    let s = mgr.wait_for(svc, state, "4 workers ready", |s| {
        s["StatusText"].starts_with("4 ")
    });
    assert_eq!(s["MainPID"], primary, "a reload keeps the primary");
    assert_ne!(
        mgr.prop(svc, "StateChangeTimestampMonotonic"),
        changed0,
        "the manager saw no state change"
    );
    let ok_at_reload = load.ok();
    ops_util::eventually("served after the reload", || load.ok() > ok_at_reload + 20);
    stop.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    let seen = seen.lock().unwrap().clone();
    // Held open (Node), the reload state cannot be missed; cluster_hello's
    // reload lasts a few hundred ms, which a poller on a loaded machine may
    // miss: there, the state change timestamp above is the proof.
    if matches!(app, App::Node) {
        assert!(
            seen.iter().any(|s| s.starts_with("reload")),
            "the manager never showed a reload state: {seen:?}"
        );
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("running"),
        "{seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("running"), "{seen:?}");
    eprintln!(
        "{test}: states during the reload {seen:?}, reload took {reload_took:?}, {ok} requests served"
    );

    // The watchdog: WATCHDOG=1 every 5 s reaches the manager.
    let t0 = Instant::now();
    while mgr.prop(svc, "WatchdogTimestampMonotonic") == watchdog0 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no WATCHDOG=1 reached the manager in 15 s"
        );
        std::thread::park_timeout(Duration::from_millis(200));
    }

    // A graceful stop under KillMode=mixed: SIGTERM to the primary only,
    // the workers finish what they hold: a request in progress when the
    // stop begins is answered, and the primary exits 0.
    let mut held = matches!(app, App::Hello).then(|| request_in_progress(port));
    mgr.ok(&["stop", "--no-block", svc]);
    if let Some(c) = held.as_mut() {
        let s = mgr.wait_for(svc, state, "stopping", |s| {
            s["ActiveState"] == "deactivating"
        });
        assert_eq!(s["SubState"], "stop-sigterm", "{s:?}");
        assert_eq!(s["MainPID"], primary, "{s:?}");
        finish_request(c);
    }
    let s = mgr.wait_for(svc, &format!("{state},{EXIT}"), "stopped", |s| {
        s["ActiveState"] == "inactive"
    });
    assert_clean_exit(&s);
    assert!(children(&primary).is_empty());
    // systemd removes the RuntimeDirectory with the service: no stale
    // socket for `ctl` to skip.
    assert!(!sock.exists(), "{} outlived the service", sock.display());

    // The socket outlives the service and starts it again.
    let s = mgr.show("uvcluster.socket", "ActiveState,SubState");
    assert_eq!(s["SubState"], "listening", "{s:?}");
    let (code, _) = get(port, "/").expect("served by a new service");
    assert_eq!(code, 200);
    let s = mgr.wait_for(svc, state, "active again", |s| s["ActiveState"] == "active");
    let primary = s["MainPID"].clone();
    assert_eq!(children(&primary).len(), 4);

    // STOPPING=1 reaches the manager: a SIGTERM to the primary alone (not
    // a stop job) makes the manager show the service stopping while the
    // primary still runs, which only the notification explains.
    let mut held = matches!(app, App::Hello).then(|| request_in_progress(port));
    mgr.ok(&["kill", "--kill-who=main", "--signal=SIGTERM", svc]);
    if let Some(c) = held.as_mut() {
        let s = mgr.wait_for(svc, state, "STOPPING=1", |s| {
            s["ActiveState"] == "deactivating"
        });
        assert_eq!(s["MainPID"], primary, "{s:?}");
        finish_request(c);
    }
    let s = mgr.wait_for(svc, &format!("{state},{EXIT}"), "stopped", |s| {
        s["ActiveState"] == "inactive"
    });
    assert_clean_exit(&s);
    mgr.ok(&["stop", "uvcluster.socket", svc]);
}

/// `systemd-analyze verify` of this systemd passes the units without a
/// word (unknown keys, bad values, a missing program).
fn verify(sd: &Systemd, socket: &str, service: &str) {
    let dir = TempDir::new("sdverify");
    std::fs::write(dir.join("uvcluster.socket"), socket).unwrap();
    std::fs::write(dir.join("uvcluster.service"), service).unwrap();
    let out = sd
        .command(&sd.analyze)
        .args(["verify", "./uvcluster.socket", "./uvcluster.service"])
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd {}: {err}", sd.version);
    assert_eq!(err.trim(), "", "systemd-analyze {} complained", sd.version);
}

/// The properties of how the main process ended.
const EXIT: &str = "Result,ExecMainCode,ExecMainStatus";

/// The primary exited by itself with code 0, and the manager counts it a
/// success.
fn assert_clean_exit(s: &BTreeMap<String, String>) {
    assert_eq!(s["Result"], "success", "{s:?}");
    assert_eq!(s["ExecMainCode"], "1", "exited, not killed: {s:?}");
    assert_eq!(s["ExecMainStatus"], "0", "{s:?}");
}

/// Sends the rest of [`request_in_progress`]'s request: the worker, still
/// there, answers it with `Connection: close` (a stop is under way), then
/// closes the connection (read to EOF).
fn finish_request(c: &mut TcpStream) {
    c.write_all(b"\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
}

/// The machine's systemd (252 on Debian 12) runs the service's commented
/// `Type=notify` + `ExecReload=` variant with `cluster_hello` workers.
#[test]
fn shipped_units_under_the_machines_systemd_manager() {
    shipped_units(
        "shipped_units_under_the_machines_systemd_manager",
        Systemd::host(),
        App::Hello,
    );
}

/// The same with Node workers (`tests/node/systemd_worker.js`), which must
/// see none of the systemd variables.
#[test]
fn shipped_units_under_the_machines_systemd_manager_node_workers() {
    shipped_units(
        "shipped_units_under_the_machines_systemd_manager_node_workers",
        Systemd::host(),
        App::Node,
    );
}

/// systemd 254 (bookworm-backports, unpacked, not installed) runs the
/// service as shipped: `Type=notify-reload`, so the manager sends SIGHUP
/// itself and `systemctl reload` waits for `RELOADING=1` ... `READY=1`.
#[test]
fn shipped_units_under_systemd_254_notify_reload() {
    shipped_units(
        "shipped_units_under_systemd_254_notify_reload",
        Systemd::backports_254(),
        App::Hello,
    );
}

/// The same with Node workers: the reload, held open by its first new
/// worker, shows the manager waiting (`systemctl reload` has not returned)
/// until that worker is ready and the roll sends `READY=1`.
#[test]
fn shipped_units_under_systemd_254_notify_reload_node_workers() {
    shipped_units(
        "shipped_units_under_systemd_254_notify_reload_node_workers",
        Systemd::backports_254(),
        App::Node,
    );
}

/// Why the unit says `KillMode=mixed` (docs/systemd.md), shown with the
/// machine's manager: the same units with the default
/// `KillMode=control-group` let systemd send SIGTERM to every worker with
/// the primary, and a request in progress is cut: the service ends while
/// the request's header is still unfinished, and its connection closes
/// unanswered. (With `mixed`, `shipped_units` sees the same request
/// answered.)
#[test]
fn kill_mode_control_group_would_cut_a_request_in_progress() {
    let test = "kill_mode_control_group_would_cut_a_request_in_progress";
    let sd = match Systemd::host() {
        Ok(sd) => sd,
        Err(why) => return skip(test, &why),
    };
    let port = free_port();
    let (socket, service) = units(&sd, port, &App::Hello);
    let service = subst(
        &service,
        "\nKillMode=mixed\n",
        "\nKillMode=control-group\n",
        "uvcluster.service",
    );
    let mgr = match Manager::start(
        &sd,
        &[
            ("uvcluster.socket", &socket),
            ("uvcluster.service", &service),
        ],
    ) {
        Ok(m) => m,
        Err(why) => return skip(test, &format!("no private systemd --user manager: {why}")),
    };
    let svc = "uvcluster.service";
    let state = "ActiveState,SubState,MainPID";
    mgr.ok(&["start", "uvcluster.socket"]);
    assert_eq!(get(port, "/").expect("served").0, 200);
    let s = mgr.wait_for(svc, state, "active", |s| s["ActiveState"] == "active");
    assert_eq!(mgr.prop(svc, "KillMode"), "control-group");
    assert_eq!(children(&s["MainPID"]).len(), 4);
    let mut held = request_in_progress(port);
    mgr.ok(&["stop", "--no-block", svc]);
    mgr.wait_for(svc, state, "stopped with the request held", |s| {
        s["ActiveState"] == "inactive"
    });
    // The end of the header finds the connection closed: no answer.
    let _ = held.write_all(b"\r\n");
    let mut resp = Vec::new();
    let _ = held.read_to_end(&mut resp);
    assert!(
        resp.is_empty(),
        "answered after all: {}",
        String::from_utf8_lossy(&resp)
    );
    mgr.ok(&["stop", "uvcluster.socket"]);
}
