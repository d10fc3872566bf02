//! The value parsers shared by the flags, the environment and the
//! configuration file, so that a value means the same, and a bad one reads
//! the same, wherever it comes from.
//!
//! Each parser returns the message without the name of where the value came
//! from ("takes a whole number above 0. Received \"abc\""); the caller puts
//! the flag, the variable or the file's key in front of it.

use std::time::Duration;

use uvcluster::cluster::{MAX_HANDOFF_WINDOW, SchedulingPolicy};
use uvcluster::supervisor::RestartPolicy;

/// The policies `--policy` takes, as its errors list them.
pub const POLICIES: &str = "rr, none, reuseport or leastconn";
/// The values `--restart` takes, as its errors list them.
pub const RESTARTS: &str = "always, on-failure or never";

/// `"4"` → 4: decimal digits only (no sign, no spaces), above 0.
pub fn positive(v: &str) -> Result<u64, String> {
    v.parse()
        .ok()
        .filter(|n| *n > 0 && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("takes a whole number above 0. Received {v:?}"))
}

/// A positive count, or `off` (`None`).
pub fn positive_or_off(v: &str) -> Result<Option<u64>, String> {
    if v == "off" {
        return Ok(None);
    }
    positive(v)
        .map(Some)
        .map_err(|_| format!("takes a whole number above 0, or off. Received {v:?}"))
}

/// A count from 0 up.
pub fn count(v: &str) -> Result<u64, String> {
    v.parse()
        .ok()
        .filter(|_| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("takes a whole number (0 or more). Received {v:?}"))
}

/// A scheduling policy by `NODE_CLUSTER_SCHED_POLICY`'s names.
pub fn policy(v: &str) -> Result<SchedulingPolicy, String> {
    SchedulingPolicy::parse(v).ok_or_else(|| format!("should be {POLICIES}. Received {v:?}"))
}

/// A restart policy (the supervisor's words; also `on_failure`).
pub fn restart(v: &str) -> Result<RestartPolicy, String> {
    v.parse()
        .map_err(|_| format!("should be {RESTARTS}. Received {v:?}"))
}

/// `true` or `false`.
pub fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("should be true or false. Received {v:?}")),
    }
}

/// A handoff window: 1 to [`MAX_HANDOFF_WINDOW`], as
/// `UVCLUSTER_HANDOFF_WINDOW` takes it.
pub fn handoff_window(v: &str) -> Result<usize, String> {
    v.parse()
        .ok()
        .filter(|n| (1..=MAX_HANDOFF_WINDOW).contains(n) && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            format!("should be a whole number from 1 to {MAX_HANDOFF_WINDOW}. Received {v:?}")
        })
}

const DURATION_HELP: &str = "a duration with its unit, such as 500ms, 30s or 2m";

/// A duration with its unit: `500ms`, `30s`, `2m`, `1h`, or a sum
/// (`1m 30s`), as the `humantime` crate reads them. A bare number is
/// refused: seconds or milliseconds would each surprise someone (PM2 counts
/// milliseconds, gunicorn seconds).
pub fn duration(v: &str) -> Result<Duration, String> {
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!(
            "should be {DURATION_HELP}, above 0. Received {v:?}"
        )),
        Err(_) => Err(format!("should be {DURATION_HELP}. Received {v:?}")),
    }
}

/// A duration, or `off` (`None`).
pub fn duration_or_off(v: &str) -> Result<Option<Duration>, String> {
    if v == "off" {
        return Ok(None);
    }
    duration(v)
        .map(Some)
        .map_err(|_| format!("should be {DURATION_HELP}, or off. Received {v:?}"))
}

/// A size in bytes with an optional binary unit: `512M`, `1G`, `64K`,
/// `1048576` (bytes), also spelled `512MB`, `512MiB` or `512m`; a unit
/// is a power of 1024, as `ps` and `top` count memory. Or `off` (`None`).
pub fn size_or_off(v: &str) -> Result<Option<u64>, String> {
    if v == "off" {
        return Ok(None);
    }
    let bad = || {
        format!(
            "should be a size such as 512M or 1G (units K, M, G, T: powers of 1024), or off. \
             Received {v:?}"
        )
    };
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = v.split_at(digits);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(bad()),
        Some(bytes) => Ok(Some(bytes)),
    }
}

/// A duration as this CLI writes it (`250ms`, `30s`, `2m`, `1m 30s`):
/// humantime's words, without Rust's `Debug` spelling.
pub fn show_duration(d: Duration) -> String {
    // Milliseconds are the finest unit worth reading in a log.
    let ms = Duration::from_millis(d.as_millis() as u64);
    if ms.is_zero() {
        return "0ms".into();
    }
    humantime::format_duration(ms).to_string()
}

/// A size in bytes as this CLI writes it (`512M` when exact, else bytes).
pub fn show_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        for bad in ["30", "", "abc", "-1s", "0s"] {
            let e = duration(bad).unwrap_err();
            assert!(e.contains("such as 500ms, 30s or 2m"), "{bad}: {e}");
            assert!(e.ends_with(&format!("Received {bad:?}")), "{e}");
        }
        assert_eq!(duration_or_off("off"), Ok(None));
        assert!(duration_or_off("x").unwrap_err().contains("or off"));
    }

    #[test]
    fn sizes_are_powers_of_1024() {
        assert_eq!(size_or_off("512M"), Ok(Some(512 << 20)));
        assert_eq!(size_or_off("1G"), Ok(Some(1 << 30)));
        assert_eq!(size_or_off("1gib"), Ok(Some(1 << 30)));
        assert_eq!(size_or_off("64KB"), Ok(Some(64 << 10)));
        assert_eq!(size_or_off("4096"), Ok(Some(4096)));
        assert_eq!(size_or_off("off"), Ok(None));
        for bad in ["", "M", "1.5G", "12X", "0", "-1G", "99999999999T"] {
            let e = size_or_off(bad).unwrap_err();
            assert!(e.contains("such as 512M or 1G"), "{bad}: {e}");
        }
        assert_eq!(show_size(512 << 20), "512M");
        assert_eq!(show_size(1 << 30), "1G");
        assert_eq!(show_size(1000), "1000");
    }

    #[test]
    fn counts_and_words() {
        assert_eq!(positive("3"), Ok(3));
        for bad in ["0", "-1", "2.5", "abc", "", "+3", " 2"] {
            assert_eq!(
                positive(bad).unwrap_err(),
                format!("takes a whole number above 0. Received {bad:?}")
            );
        }
        assert_eq!(count("0"), Ok(0));
        assert!(count("").is_err());
        assert_eq!(positive_or_off("off"), Ok(None));
        assert_eq!(restart("on-failure"), Ok(RestartPolicy::OnFailure));
        assert_eq!(handoff_window("64"), Ok(64));
        assert!(handoff_window("65").unwrap_err().contains("from 1 to 64"));
        assert_eq!(boolean("false"), Ok(false));
        assert!(boolean("yes").is_err());
        assert_eq!(
            restart("sometimes").unwrap_err(),
            "should be always, on-failure or never. Received \"sometimes\""
        );
        assert_eq!(
            policy("robin").unwrap_err(),
            "should be rr, none, reuseport or leastconn. Received \"robin\""
        );
    }

    #[test]
    fn durations_print_without_debug_spelling() {
        assert_eq!(show_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(show_duration(Duration::from_secs(30)), "30s");
        assert_eq!(show_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(show_duration(Duration::from_micros(1_500)), "1ms");
    }
}
