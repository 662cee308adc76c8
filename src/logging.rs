//! Logging: the daemon's own diagnostics on standard error.
//!
//! Consumes: severities and formatted text from every stage.
//! Produces: one line per event on stderr, `smtp-after-popd: SEVERITY: text`,
//! which journald or a terminal picks up. Under systemd (stderr connected to
//! the journal, as `JOURNAL_STREAM` says) each line starts with the
//! sd-daemon priority prefix (`<6>` for info), so the journal records the
//! right priority. With `--log-format json`, one JSON object per line
//! (`{"time":"2026-11-26T06:01:02.345Z","level":"info","message":"..."}`)
//! for log shippers.
//! Trusts: nothing in the text. Whatever came from the network must pass
//! through [`escape`] before it is formatted into a log line, so that a
//! datagram cannot forge log lines of its own (newlines, terminal escapes).
//!
//! Severities mean one thing each, as in Postfix: `warning` for bad input
//! (reported, work continues), `error` for a failing sink or resource (retried),
//! `fatal` for bad configuration (the process exits), `info` for decisions.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How serious a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail useful when debugging a setup: every datagram's fate.
    Debug = 0,
    /// Decisions: grants, renewals, expiries, map rebuilds, start-up.
    Info = 1,
    /// Bad input or a refused login: reported, work continues.
    Warning = 2,
    /// A failing sink or resource: retried.
    Error = 3,
    /// Bad configuration: the process exits.
    Fatal = 4,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
            Level::Fatal => "fatal",
        }
    }
}

impl Level {
    /// The syslog priority of the level, for the sd-daemon prefix.
    fn priority(self) -> u8 {
        match self {
            Level::Debug => 7,
            Level::Info => 6,
            Level::Warning => 4,
            Level::Error => 3,
            Level::Fatal => 2,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `smtp-after-popd: info: text`, with the sd-daemon priority prefix
    /// when stderr is the journal.
    Text,
    /// One JSON object per line: time (UTC, RFC 3339), level, message.
    Json,
}

static MIN_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
/// 0: text, 1: JSON.
static FORMAT: AtomicU8 = AtomicU8::new(0);
/// 0: unknown yet, 1: stderr is the journal, 2: it is not.
static JOURNAL: AtomicU8 = AtomicU8::new(0);

/// Sets how lines are written.
pub fn set_format(format: Format) {
    FORMAT.store(
        match format {
            Format::Text => 0,
            Format::Json => 1,
        },
        Ordering::Relaxed,
    );
}

/// Whether stderr is connected to the journal: `JOURNAL_STREAM` names the
/// device and inode of the stream systemd connected, and stderr still is
/// that stream.
fn stderr_is_journal() -> bool {
    match JOURNAL.load(Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let yes = std::env::var("JOURNAL_STREAM").ok().is_some_and(|v| {
        let Some((dev, ino)) = v.split_once(':') else {
            return false;
        };
        // SAFETY: fstat on the process's stderr into a zeroed buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(2, &mut st) } == 0)
            && dev.parse::<u64>().is_ok_and(|d| d == st.st_dev as u64)
            && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino as u64)
    });
    JOURNAL.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
    yes
}

/// Sets the least severe level that is printed.
pub fn set_level(level: Level) {
    MIN_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether a line of this level would be printed.
pub fn enabled(level: Level) -> bool {
    level as u8 >= MIN_LEVEL.load(Ordering::Relaxed)
}

/// Prints one log line. Use the `log_*!` macros rather than calling this.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let mut line = String::with_capacity(128);
    if FORMAT.load(Ordering::Relaxed) == 1 {
        let message = args.to_string();
        let _ = write!(
            line,
            "{{\"time\":\"{}\",\"level\":\"{}\",\"message\":\"",
            Rfc3339(std::time::SystemTime::now()),
            level.label()
        );
        json_escape_into(&mut line, &message);
        line.push_str("\"}");
    } else {
        if stderr_is_journal() {
            let _ = write!(line, "<{}>", level.priority());
        }
        let _ = write!(line, "smtp-after-popd: {}: {}", level.label(), args);
    }
    line.push('\n');
    // One write call per line keeps lines whole when several threads log.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Appends `s` to `out` as the inside of a JSON string.
pub fn json_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// A time as RFC 3339 UTC with milliseconds: `2026-11-26T06:01:02.345Z`.
pub struct Rfc3339(pub std::time::SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = d.as_secs();
        let (y, m, day) = civil_from_days((secs / 86400) as i64);
        let s = secs % 86400;
        write!(
            f,
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            s / 3600,
            s / 60 % 60,
            s % 60,
            d.subsec_millis()
        )
    }
}

/// Year, month and day of a day number counted from 1970-01-01 (Howard
/// Hinnant's civil-from-days algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Logs at info level.
#[macro_export]
macro_rules! log_info { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Info, format_args!($($t)*)) } }
/// Logs at debug level.
#[macro_export]
macro_rules! log_debug { ($($t:tt)*) => { if $crate::logging::enabled($crate::logging::Level::Debug) { $crate::logging::write($crate::logging::Level::Debug, format_args!($($t)*)) } } }
/// Logs at warning level.
#[macro_export]
macro_rules! log_warning { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Warning, format_args!($($t)*)) } }
/// Logs at error level.
#[macro_export]
macro_rules! log_error { ($($t:tt)*) => { $crate::logging::write($crate::logging::Level::Error, format_args!($($t)*)) } }

/// Text from the network, made safe to put in a log line: printable ASCII
/// stays, backslash and double quote are escaped, anything else becomes
/// `\xNN` or `\u{NNNN}`, and the result is cut at 200 characters.
pub struct Escaped<'a>(pub &'a str);

/// Wraps untrusted text for logging; see [`Escaped`].
pub fn escape(s: &str) -> Escaped<'_> {
    Escaped(s)
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LIMIT: usize = 200;
        for (n, c) in self.0.chars().enumerate() {
            if n == LIMIT {
                return f.write_str("...");
            }
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                ' '..='~' => f.write_char(c)?,
                c if (c as u32) < 0x100 => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
        }
        Ok(())
    }
}

/// Lets through at most `burst` events per `period` and counts the rest, so
/// that a flood of bad input cannot flood the log. The first event after a
/// quiet period reports how many were suppressed.
pub struct RateLimit {
    period: Duration,
    burst: u32,
    state: Mutex<RateState>,
}

struct RateState {
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl RateLimit {
    /// A limiter letting `burst` events through each `period`.
    pub const fn new(period: Duration, burst: u32) -> Self {
        RateLimit {
            period,
            burst,
            state: Mutex::new(RateState {
                window_start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Returns `Some(n)` when this event may be logged, `n` being how many
    /// were suppressed before it; `None` when it must be dropped.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let fresh = match st.window_start {
            None => true,
            Some(t) => now.duration_since(t) >= self.period,
        };
        if fresh {
            st.window_start = Some(now);
            st.passed = 0;
        }
        if st.passed < self.burst {
            st.passed += 1;
            let n = st.suppressed;
            st.suppressed = 0;
            Some(n)
        } else {
            st.suppressed += 1;
            None
        }
    }
}

/// Logs a warning through a [`RateLimit`], noting how many were suppressed.
#[macro_export]
macro_rules! log_warning_limited {
    ($limit:expr, $($t:tt)*) => {
        if let Some(n) = $limit.check() {
            if n > 0 {
                $crate::log_warning!("{} (and {} similar warnings suppressed)", format_args!($($t)*), n);
            } else {
                $crate::log_warning!($($t)*);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_control_and_quotes() {
        let s = escape("a\nb\"c\\d\u{1b}[31m\u{e9}").to_string();
        assert_eq!(s, "a\\x0ab\\\"c\\\\d\\x1b[31m\\xe9");
    }

    #[test]
    fn escape_truncates_long_text() {
        let long = "x".repeat(500);
        let s = escape(&long).to_string();
        assert_eq!(s.len(), 203);
        assert!(s.ends_with("..."));
    }

    #[test]
    fn rfc3339_and_json_escaping() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_795_672_862_345);
        assert_eq!(Rfc3339(t).to_string(), "2026-11-26T06:01:02.345Z");
        assert_eq!(
            Rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(951_782_400)).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
        let mut s = String::new();
        json_escape_into(&mut s, "a\"b\\c\nd\u{1}\u{e9}");
        assert_eq!(s, "a\\\"b\\\\c\\nd\\u0001\u{e9}");
    }

    #[test]
    fn rate_limit_counts_suppressed() {
        let rl = RateLimit::new(Duration::from_secs(3600), 2);
        assert_eq!(rl.check(), Some(0));
        assert_eq!(rl.check(), Some(0));
        assert_eq!(rl.check(), None);
        assert_eq!(rl.check(), None);
    }
}
