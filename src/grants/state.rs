//! The state file: live grants kept across restarts and crashes
//! (`--state FILE`).
//!
//! Consumes: at start-up, the file an earlier run wrote; then every change
//! of the grant table ([`crate::grants::table::Change`]), as the follow
//! loop ([`crate::grants::follow`]) hands them to the state file's [`Sink`].
//! Produces: the grants of the file still inside their window, back in the
//! table with their original expiry; and the file, kept in step.
//! Trusts: the file is the daemon's own (its directory should be writable
//! by the daemon only), but it is read strictly all the same: a line that
//! does not parse is skipped and logged with the file and line number,
//! never fatal. A restored grant passes the never-grant rules again, and
//! none is given more time than the current `--window`.
//!
//! # Format
//!
//! ```text
//! smtp-after-popd state 1
//! grant 192.0.2.7 1795672862345 dovecot imap unix:/run/smtp-after-popd/syslog.sock mail alice
//! revoke 192.0.2.7
//! ```
//!
//! `grant IP EXPIRES SERVER SERVICE REPORTER HOST USER`, EXPIRES in
//! milliseconds since the Unix epoch (IP is `ADDR/PREFIX` for an IPv6
//! prefix grant, `--ipv6-prefix`); text fields are percent-encoded
//! (anything but printable ASCII, and `%`). Later lines win.
//!
//! # Cost and safety
//!
//! Each change appends one line (written at once, so a SIGKILL loses
//! nothing the kernel has; synced to disk after each batch, off the
//! runtime's threads). A failed write is retried every second by a
//! rewrite, logged once (then once a minute) and its end logged. When the
//! appended lines outnumber twice the live grants (and at least
//! [`MIN_COMPACT`]), the file is rewritten from the table: written to
//! `FILE.tmp`, synced, renamed over `FILE`, so a crash leaves either the
//! old file or the new one, never half of one. A line cut short by a crash
//! lacks its newline and is ignored. The cost per change is bounded:
//! one line, plus its share of the rewrite, which happens once per
//! 2×(live grants) changes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::grants::addr::{AddressPolicy, Cidr};
use crate::grants::follow::{Feed, Live, Reports, Retry, Sink, SinkError};
use crate::grants::table::{Change, Grant, GrantTable, Names};
use crate::recognise::matcher::Service;

/// The first line of a state file.
pub const HEADER: &str = "smtp-after-popd state 1";
/// Grants written per look at the table when the file is rewritten.
const COMPACT_CHUNK: usize = 16_384;
/// Changes waiting for the writer; beyond this the writer rewrites the
/// whole file from the table instead of appending the changes one by one.
const QUEUE: usize = 65_536;
/// Fewest appended lines before a rewrite is considered.
pub const MIN_COMPACT: usize = 4096;

/// One grant as the file holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Expiry, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Server software.
    pub server: String,
    /// Service.
    pub service: Service,
    /// Reporting peer.
    pub reporter: String,
    /// Host name of the record.
    pub host: String,
    /// User name.
    pub user: String,
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The grants, by block (later lines won).
    pub grants: HashMap<Cidr, Entry>,
    /// Lines skipped, with their messages (`FILE, line N: ...`).
    pub bad_lines: Vec<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock expiry of a grant, in ms since the epoch.
fn wall_ms(expires: Instant, now: Instant, now_ms: u64) -> u64 {
    now_ms + expires.saturating_duration_since(now).as_millis() as u64
}

/// Percent-encodes a text field.
fn encode(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('-');
        return;
    }
    for b in s.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' && !(s.len() == 1 && b == b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Decodes a percent-encoded text field.
fn decode(s: &str) -> Option<String> {
    if s == "-" {
        return Some(String::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Formats one grant line (with its newline).
fn grant_line(out: &mut String, key: Cidr, expires_ms: u64, g: &Grant) {
    let _ = write!(out, "grant {} {expires_ms} ", key.shown());
    encode(out, &g.server);
    let _ = write!(out, " {} ", g.service);
    encode(out, &g.reporter);
    out.push(' ');
    encode(out, &g.host);
    out.push(' ');
    encode(out, &g.user);
    out.push('\n');
}

fn parse_line(line: &str) -> Result<(Cidr, Option<Entry>), String> {
    let f: Vec<&str> = line.split(' ').collect();
    let ip = |s: &str| match s.parse::<IpAddr>() {
        Ok(a) => Ok(Cidr::host(a)),
        Err(_) => s
            .parse::<Cidr>()
            .ok()
            .filter(|c| c.addr().is_ipv6())
            .ok_or_else(|| format!("\"{}\" is not an IP address", crate::logging::escape(s))),
    };
    match f.as_slice() {
        ["revoke", a] => Ok((ip(a)?, None)),
        ["grant", a, exp, server, service, reporter, host, user] => {
            let expires_ms = exp.parse::<u64>().map_err(|_| {
                format!("expiry \"{}\" is not a number", crate::logging::escape(exp))
            })?;
            let service = Service::from_text(service).ok_or_else(|| {
                format!("unknown service \"{}\"", crate::logging::escape(service))
            })?;
            let text = |s: &str| decode(s).ok_or_else(|| "bad percent-encoding".to_string());
            Ok((
                ip(a)?,
                Some(Entry {
                    expires_ms,
                    server: text(server)?,
                    service,
                    reporter: text(reporter)?,
                    host: text(host)?,
                    user: text(user)?,
                }),
            ))
        }
        _ => Err(
            "expected \"grant IP EXPIRES SERVER SERVICE REPORTER HOST USER\" or \"revoke IP\""
                .into(),
        ),
    }
}

/// Reads a state file. A missing file is an empty state; an unreadable one
/// is an error (the daemon must not start and then overwrite it).
pub fn load(path: &Path) -> Result<Loaded, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => {
            return Err(format!(
                "--state {}: cannot read it: {e}; give the daemon's user read and write access, or remove the file to start without the saved grants",
                path.display()
            ));
        }
    };
    let mut loaded = Loaded::default();
    let mut reader = BufReader::new(file);
    let mut raw = Vec::new();
    let mut n = 0;
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(format!("--state {}: read failed: {e}", path.display()));
            }
        }
        n += 1;
        if raw.last() != Some(&b'\n') {
            // Cut short by a crash while it was being appended.
            loaded.bad_lines.push(format!(
                "{}, line {n}: incomplete last line (cut short by a crash?): ignored",
                path.display()
            ));
            break;
        }
        raw.pop();
        let Ok(line) = std::str::from_utf8(&raw) else {
            loaded
                .bad_lines
                .push(format!("{}, line {n}: not UTF-8: skipped", path.display()));
            continue;
        };
        if n == 1 {
            if line != HEADER {
                return Err(format!(
                    "--state {}, line 1: \"{}\" is not a state file header (\"{HEADER}\"); is this the right file? Move it away to start without saved grants",
                    path.display(),
                    crate::logging::escape(line)
                ));
            }
            continue;
        }
        match parse_line(line) {
            Ok((ip, Some(e))) => {
                loaded.grants.insert(ip, e);
            }
            Ok((ip, None)) => {
                loaded.grants.remove(&ip);
            }
            Err(why) => loaded
                .bad_lines
                .push(format!("{}, line {n}: {why}: skipped", path.display())),
        }
    }
    Ok(loaded)
}

/// Puts the loaded grants still inside their window into `table`. Returns
/// (restored, expired, refused by the never-grant rules or a full table).
pub fn restore(
    loaded: &Loaded,
    table: &GrantTable,
    policy: &AddressPolicy,
    window: Duration,
) -> (usize, usize, usize) {
    let (now, now_ms) = (Instant::now(), now_ms());
    let (mut restored, mut expired, mut refused) = (0, 0, 0);
    let names = Names::default();
    let intern = |s: &str| names.get(s);
    for (key, e) in &loaded.grants {
        if e.expires_ms <= now_ms {
            expired += 1;
            continue;
        }
        let ip = key.addr();
        let ip = match policy.check(ip) {
            Ok(ip) => ip,
            Err(why) => {
                crate::log_info!("state: not restoring {ip}: {why}");
                refused += 1;
                continue;
            }
        };
        let left = Duration::from_millis(e.expires_ms - now_ms).min(window);
        // A prefix grant comes back as wide as the rules in force allow.
        let key = if key.is_host() {
            Cidr::host(ip)
        } else {
            policy.scope(ip).0
        };
        let result = table.grant_block(
            key,
            Grant {
                expires: now + left,
                server: intern(&e.server),
                service: e.service,
                user: e.user.as_str().into(),
                reporter: intern(&e.reporter),
                host: intern(&e.host),
            },
        );
        if result == crate::grants::table::GrantResult::Full {
            crate::log_warning!(
                "state: not restoring {}: the table is full (--max-grants)",
                key.shown()
            );
            refused += 1;
            continue;
        }
        restored += 1;
    }
    (restored, expired, refused)
}

/// The writer of the state file: a [`Sink`] of the follow loop, which
/// appends the table's changes and rewrites the file when it has grown.
pub struct StateWriter {
    feed: Arc<Feed>,
    /// The sequence number of the last change on disk.
    visible: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The state file as the follow loop writes it.
struct StateSink {
    path: PathBuf,
    tmp: PathBuf,
    file: Arc<File>,
    table: Arc<GrantTable>,
    /// Lines appended since the last rewrite.
    appended: usize,
    /// Written whole by [`StateWriter::start`], before the loop began.
    filled: bool,
}

/// Rewrites the whole file from the table, atomically: walked a chunk at
/// a time into the temporary file (never the whole text in memory),
/// synced, renamed over the file; returns the file opened for appending.
fn compact(
    table: &GrantTable,
    path: &Path,
    tmp: &Path,
    now: Instant,
    now_ms: u64,
) -> std::io::Result<File> {
    {
        use std::os::unix::fs::OpenOptionsExt;
        // User names are nobody else's business: owner only.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut text = String::with_capacity(COMPACT_CHUNK * 96);
        text.push_str(HEADER);
        text.push('\n');
        let mut from = Some(0);
        while let Some(at) = from {
            from = table.visit(at, COMPACT_CHUNK, |key, g| {
                grant_line(&mut text, key, wall_ms(g.expires, now, now_ms), g)
            });
            f.write_all(text.as_bytes())?;
            text.clear();
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    }
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    OpenOptions::new().append(true).open(path)
}

fn io_error(e: std::io::Error) -> SinkError {
    SinkError(e.to_string())
}

impl Sink for StateSink {
    fn name(&self) -> String {
        format!("state {}", self.path.display())
    }

    /// Off the runtime's threads: the rewrite waits for the disk.
    async fn refill(&mut self, _live: &[Live]) -> Result<u64, SinkError> {
        let (table, path, tmp) = (self.table.clone(), self.path.clone(), self.tmp.clone());
        let (now, now_ms) = (Instant::now(), now_ms());
        let file = tokio::task::spawn_blocking(move || compact(&table, &path, &tmp, now, now_ms))
            .await
            .map_err(|e| SinkError(e.to_string()))?
            .map_err(io_error)?;
        self.file = Arc::new(file);
        self.appended = 0;
        Ok(1)
    }

    /// Appends a line for each change (synced once for the batch), or
    /// rewrites the file when the lines outnumber the live grants.
    async fn apply(&mut self, changes: &[Change]) -> Result<u64, SinkError> {
        if self.appended + changes.len() > MIN_COMPACT.max(2 * self.table.len()) {
            return self.refill(&[]).await;
        }
        let (now, now_ms) = (Instant::now(), now_ms());
        let mut text = String::with_capacity(changes.len() * 96);
        let mut lines = 0;
        for c in changes {
            match c {
                Change::Grant(ip, g) => {
                    grant_line(&mut text, *ip, wall_ms(g.expires, now, now_ms), g)
                }
                Change::Revoke(key) => {
                    let _ = writeln!(text, "revoke {}", key.shown());
                }
                // Whoever reads the file drops expired grants itself.
                Change::Expire(_) => continue,
            }
            lines += 1;
        }
        if lines == 0 {
            return Ok(0);
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            (&*file).write_all(text.as_bytes())?;
            file.sync_data()
        })
        .await
        .map_err(|e| SinkError(e.to_string()))?
        .map_err(io_error)?;
        self.appended += lines;
        Ok(lines as u64)
    }

    fn reads_table(&self) -> bool {
        true
    }

    fn filled(&mut self) -> bool {
        std::mem::take(&mut self.filled)
    }

    fn retry(&self) -> Retry {
        Retry {
            first: Duration::from_secs(1),
            max: Duration::from_secs(1),
            log_every: Duration::from_secs(60),
        }
    }

    fn failure_line(&self, e: &SinkError, _: Duration, failing_for: Option<Duration>) -> String {
        match failing_for {
            None => format!(
                "{}: cannot write: {e}; grants are kept in memory and the file will be rewritten when writing works again",
                self.name()
            ),
            Some(d) => format!(
                "{}: still cannot write after {} s: {e}",
                self.name(),
                d.as_secs()
            ),
        }
    }

    fn recovered_line(&self, _: Duration) -> String {
        format!("{}: written again", self.name())
    }

    fn refilled_line(&self, _: usize, _: u128) -> Option<String> {
        None
    }
}

impl StateWriter {
    /// Writes the table to `path` now (so the file matches what was
    /// restored), then follows the table so every later change is
    /// recorded. Must be called inside the tokio runtime.
    pub fn start(path: PathBuf, table: Arc<GrantTable>) -> Result<StateWriter, String> {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                format!(
                    "--state {}: cannot open it for writing: {e}; give the daemon's user write access to its directory",
                    path.display()
                )
            })?;
        // Subscribed first: the changes made while the file is written
        // are applied on top of it.
        let feed = Feed::subscribe_coalescing(&table, QUEUE);
        let file = compact(&table, &path, &tmp, Instant::now(), now_ms())
            .map_err(|e| format!("--state {}: cannot write it: {e}", path.display()))?;
        let sink = StateSink {
            path,
            tmp,
            file: Arc::new(file),
            table: table.clone(),
            appended: 0,
            filled: true,
        };
        let (visible_tx, visible) = tokio::sync::watch::channel(0);
        let reports = Reports {
            first_write: None,
            visible: Some(visible_tx),
        };
        let task = tokio::spawn(crate::grants::follow::follow(
            sink,
            table,
            feed.clone(),
            None,
            reports,
        ));
        Ok(StateWriter {
            feed,
            visible,
            task,
        })
    }

    /// Waits, at most `timeout`, until every change made so far is on
    /// disk, then stops the writer; false when they were not by then.
    pub async fn finish(self, timeout: Duration) -> bool {
        let want = self.feed.seq();
        let mut visible = self.visible.clone();
        tokio::time::timeout(timeout, visible.wait_for(|v| *v >= want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// [`StateWriter::finish`], blocking the calling thread: for a thread
    /// outside the runtime, or a multi-threaded runtime's.
    pub fn stop(self, timeout: Duration) -> bool {
        let want = self.feed.seq();
        let deadline = std::time::Instant::now() + timeout;
        while *self.visible.borrow() < want {
            if std::time::Instant::now() >= deadline || self.task.is_finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_follows_the_table_and_rewrites_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let table = Arc::new(GrantTable::new());
        let g = || Grant {
            expires: Instant::now() + Duration::from_secs(600),
            server: "dovecot".into(),
            service: Service::Imap,
            user: "alice".into(),
            reporter: "test".into(),
            host: "mail".into(),
        };
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | i));
        table.grant(ip(0), g());
        let w = StateWriter::start(path.clone(), table.clone()).unwrap();
        // Renewals of ten grants, more than a rewrite waits for: appended,
        // then the file rewritten from the table.
        let renewals = MIN_COMPACT as u32 + 1000;
        for i in 0..renewals {
            table.grant(ip(1 + i % 10), g());
        }
        table.revoke(ip(0));
        assert!(w.finish(Duration::from_secs(10)).await);
        let loaded = load(&path).unwrap();
        assert!(loaded.bad_lines.is_empty(), "{:?}", loaded.bad_lines);
        let mut have: Vec<Cidr> = loaded.grants.keys().copied().collect();
        have.sort_unstable();
        assert_eq!(have, table.blocks().1);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < renewals as usize, "{lines} lines: never rewritten");
    }

    #[test]
    fn fields_round_trip() {
        for s in [
            "alice",
            "",
            "-",
            "a b",
            "100%",
            "x\ny",
            "\u{e9}t\u{e9}",
            "<>,=\"'",
        ] {
            let mut out = String::new();
            encode(&mut out, s);
            assert!(!out.contains([' ', '\n']), "{out}");
            assert_eq!(decode(&out).as_deref(), Some(s), "{out}");
        }
    }

    #[test]
    fn lines_parse_strictly() {
        let g = Grant {
            expires: Instant::now(),
            server: "dovecot".into(),
            service: Service::Imap,
            user: "a b\n".into(),
            reporter: "unix:/run/x".into(),
            host: "mail".into(),
        };
        let mut line = String::new();
        grant_line(
            &mut line,
            Cidr::host("192.0.2.7".parse().unwrap()),
            1234,
            &g,
        );
        let (ip, e) = parse_line(line.trim_end_matches('\n')).unwrap();
        assert_eq!(ip.shown(), "192.0.2.7");
        let e = e.unwrap();
        assert_eq!((e.expires_ms, e.user.as_str()), (1234, "a b\n"));
        // An IPv6 prefix grant keeps its prefix; an IPv4 block is not one.
        let mut line = String::new();
        grant_line(&mut line, "2001:db8:1:2::/64".parse().unwrap(), 1, &g);
        let (key, _) = parse_line(line.trim_end_matches('\n')).unwrap();
        assert_eq!(key.shown(), "2001:db8:1:2::/64");
        assert!(parse_line("grant 192.0.2.0/24 1 dovecot imap r h u").is_err());
        assert!(parse_line("grant 192.0.2.7 x dovecot imap r h u").is_err());
        assert!(parse_line("grant 192.0.2.7 1 dovecot imap r h").is_err());
        assert!(parse_line("revoke nonsense").is_err());
        assert!(parse_line("grant 192.0.2.7 1 dovecot smtp r h u").is_err());
    }
}
