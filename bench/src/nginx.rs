//! nginx for the lab's programs: found (or installed as Debian's
//! `nginx-light`), and run in the foreground from a configuration written
//! into a directory of the run's own, never the system's.

use std::path::Path;
use std::process::{Command, Stdio};

/// The nginx binary, installed with `apt-get install nginx-light` if it is
/// missing and this process may; `None`, with a loud message saying that
/// `skipped` is skipped, if it cannot be had.
pub fn find(skipped: &str) -> Option<String> {
    let works = |bin: &str| {
        Command::new(bin)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let candidates = || ["nginx", "/usr/sbin/nginx"].into_iter().find(|b| works(b));
    if let Some(b) = candidates() {
        return Some(b.to_string());
    }
    eprintln!("nginx not found: installing Debian's nginx-light (apt-get)");
    let installed = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light",
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match candidates() {
        Some(b) if installed => Some(b.to_string()),
        _ => {
            eprintln!(
                "\n!!! nginx is not available and could not be installed \
                 (apt-get install nginx-light): {skipped} SKIPPED !!!\n"
            );
            None
        }
    }
}

/// The lines every configuration of the lab starts with: its pid file,
/// error log and temporary directories inside `dir` (so that nginx runs
/// as any user, next to a system nginx), in the foreground.
pub fn preamble(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n"
    )
}

/// The temporary directories of the `http` block, inside `dir`.
pub fn temp_paths(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n"
    )
}

/// The command that runs nginx with the configuration `conf` in `dir`
/// (`-p dir -c conf -e dir/error.log`: nothing outside `dir` is read or
/// written, not even the default error log before the file is parsed).
pub fn command(nginx: &str, dir: &Path, conf: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        nginx.to_string(),
        "-p".into(),
        d.to_string(),
        "-c".into(),
        conf.display().to_string(),
        "-e".into(),
        format!("{d}/error.log"),
    ]
}
