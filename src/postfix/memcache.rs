//! The memcached sink (`--memcache inet:HOST:PORT` or `unix:PATH`): the
//! grants written to memcached, which Postfix reads natively
//! (`check_client_access memcache:/etc/postfix/smtp-after-popd-memcache.cf`,
//! memcache_table(5)), so that several relays share one truth.
//!
//! Consumes: the table's changes and refills from [`crate::grants::follow`].
//! Produces: for every key of a live grant ([`crate::grants::addr::postfix_keys`]),
//! `set PREFIX KEY 0 SECONDS-LEFT` with the value `OK`, so that the entry
//! ends on time even if the daemon dies; `delete PREFIX KEY` for a
//! revocation or an expiry. One connection per server, writes pipelined
//! ([`PIPELINE`] commands at a time), each round trip bounded by
//! [`IO_TIMEOUT`].
//! Trusts: the server it was configured with. Whoever can write to that
//! memcached can grant relay access: bind it to loopback or a private
//! network, or use a unix socket only Postfix and the daemon can reach
//! (SECURITY.md).
//!
//! A lost or restarted memcached is refilled with every live grant and
//! the time it has left: after any reconnection, and when `stats` shows
//! another process (`pid`, or the start time `time - uptime`) or a
//! `flush_all` (`cmd_flush`), checked every [`CHECK_EVERY`]. The sink
//! remembers which blocks it has set, so that a refill after a failure
//! also deletes what was revoked meanwhile. Evictions (memcached out of
//! memory) are warned about.
//!
//! The text protocol is written here (a page) rather than taken from a
//! client crate: the async crates seen either send `noreply` sets, which
//! hide failures, or bring a dozen dependencies for one connection's
//! `set`, `delete` and `stats`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::time::Instant;

use crate::grants::addr::{Cidr, postfix_keys};
use crate::grants::follow::{Live, Sink, SinkError};
use crate::grants::table::Change;

/// Commands written before their replies are read.
pub const PIPELINE: usize = 1024;
/// Longest wait for a connection, or for one pipeline's replies.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `stats` is asked whether memcached was restarted or flushed.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// The default key prefix (`--memcache-prefix`).
pub const DEFAULT_PREFIX: &str = "smtp-after-popd:";
/// memcached's longest key.
const MAX_KEY: usize = 250;
/// memcached reads an expiry beyond 30 days as a Unix time.
const MAX_TTL: u64 = 30 * 86400 - 1;

/// Where a memcached listens, in Postfix's notation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// `inet:HOST:PORT` (`inet:[::1]:11211` for IPv6).
    Inet(String, u16),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl Server {
    /// Parses `inet:HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Server, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err("expected unix:/ABSOLUTE/PATH".into());
            }
            return Ok(Server::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("inet:") else {
            return Err("expected inet:HOST:PORT or unix:PATH, as Postfix writes them (e.g. inet:127.0.0.1:11211)".into());
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or("expected inet:HOST:PORT, e.g. inet:127.0.0.1:11211")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port is not a number from 1 to 65535")?;
        if host.is_empty() {
            return Err("expected a host before the port".into());
        }
        Ok(Server::Inet(host.to_string(), port))
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Inet(h, p) if h.contains(':') => write!(f, "inet:[{h}]:{p}"),
            Server::Inet(h, p) => write!(f, "inet:{h}:{p}"),
            Server::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Checks a key prefix: printable ASCII without spaces, short enough for
/// the longest key.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "expected printable ASCII without spaces: memcached keys cannot hold others".into(),
        );
    }
    if prefix.len() > MAX_KEY - 64 {
        return Err(format!("expected at most {} bytes", MAX_KEY - 64));
    }
    Ok(())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// What `stats` says about the server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Identity {
    pid: u64,
    /// `time - uptime`: when it started.
    started: u64,
    /// `cmd_flush`: flush_all commands so far.
    flushes: u64,
    /// `evictions`: items pushed out for lack of memory.
    evictions: u64,
}

/// The memcached sink for one server.
pub struct Memcache {
    server: Server,
    prefix: String,
    conn: Option<Conn>,
    identity: Option<Identity>,
    /// Blocks set and not deleted since.
    written: HashSet<Cidr>,
}

impl Memcache {
    /// A sink for `server`, writing keys that start with `prefix`; it
    /// connects on its first write.
    pub fn new(server: Server, prefix: String) -> Memcache {
        Memcache {
            server,
            prefix,
            conn: None,
            identity: None,
            written: HashSet::new(),
        }
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let io: Box<dyn Stream> = match &self.server {
            Server::Inet(h, p) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), *p))
                    .await
                    .map_err(|e| SinkError(format!("cannot connect: {e}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Server::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| SinkError(format!("cannot connect: {e}")))?,
            ),
        };
        Ok(BufStream::with_capacity(64 * 1024, 64 * 1024, io))
    }

    /// The connection, made first if need be; whoever takes it puts it
    /// back only after a complete exchange.
    async fn take_conn(&mut self) -> Result<Conn, SinkError> {
        match self.conn.take() {
            Some(c) => Ok(c),
            None => tokio::time::timeout(IO_TIMEOUT, self.connect())
                .await
                .unwrap_or_else(|_| Err(timed_out())),
        }
    }

    async fn stats(&mut self) -> Result<Identity, SinkError> {
        let mut c = self.take_conn().await?;
        let id = tokio::time::timeout(IO_TIMEOUT, stats_on(&mut c))
            .await
            .unwrap_or_else(|_| Err(timed_out()))?;
        self.conn = Some(c);
        Ok(id)
    }

    /// Sends the commands (each ended by CRLF), [`PIPELINE`] at a time,
    /// and checks every reply; returns how many were sent.
    async fn send(&mut self, cmds: Vec<Vec<u8>>) -> Result<u64, SinkError> {
        let mut c = self.take_conn().await?;
        for chunk in cmds.chunks(PIPELINE) {
            tokio::time::timeout(IO_TIMEOUT, send_on(&mut c, chunk))
                .await
                .unwrap_or_else(|_| Err(timed_out()))?;
        }
        self.conn = Some(c);
        Ok(cmds.len() as u64)
    }

    /// The commands that set every key of `key` until `expires`, or delete
    /// them when it has passed.
    fn set(&self, out: &mut Vec<Vec<u8>>, key: &Cidr, expires: Instant, now: Instant) {
        let left = expires.saturating_duration_since(now);
        if left.is_zero() {
            return self.delete(out, key);
        }
        // Whole seconds, rounded up: the daemon's own delete ends the
        // entry on time while it runs, the expiry soon after if it died.
        let ttl = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        for k in postfix_keys(key).unwrap_or_default() {
            out.push(
                format!("set {}{k} 0 {} 2\r\nOK\r\n", self.prefix, ttl.min(MAX_TTL)).into_bytes(),
            );
        }
    }

    fn delete(&self, out: &mut Vec<Vec<u8>>, key: &Cidr) {
        for k in postfix_keys(key).unwrap_or_default() {
            out.push(format!("delete {}{k}\r\n", self.prefix).into_bytes());
        }
    }
}

type Conn = BufStream<Box<dyn Stream>>;

fn io_error(e: std::io::Error) -> SinkError {
    SinkError(e.to_string())
}

fn timed_out() -> SinkError {
    SinkError(format!("no answer within {} s", IO_TIMEOUT.as_secs()))
}

/// One line of an answer; an error at the end of the stream.
async fn read_line(c: &mut Conn, line: &mut String) -> Result<(), SinkError> {
    line.clear();
    if c.read_line(line).await.map_err(io_error)? == 0 {
        return Err(SinkError("memcached closed the connection".into()));
    }
    Ok(())
}

/// `stats`: the process's identity.
async fn stats_on(c: &mut Conn) -> Result<Identity, SinkError> {
    c.write_all(b"stats\r\n").await.map_err(io_error)?;
    c.flush().await.map_err(io_error)?;
    let (mut id, mut time, mut uptime) = (Identity::default(), 0, 0);
    let mut line = String::new();
    loop {
        read_line(c, &mut line).await?;
        let l = line.trim_end();
        if l == "END" {
            break;
        }
        let mut w = l.split(' ');
        let (Some("STAT"), Some(k), Some(v)) = (w.next(), w.next(), w.next()) else {
            return Err(SinkError(format!(
                "unexpected answer to stats: \"{}\"",
                crate::logging::escape(l)
            )));
        };
        let v = v.parse::<u64>().unwrap_or(0);
        match k {
            "pid" => id.pid = v,
            "time" => time = v,
            "uptime" => uptime = v,
            "cmd_flush" => id.flushes = v,
            "evictions" => id.evictions = v,
            _ => {}
        }
    }
    id.started = time.saturating_sub(uptime);
    Ok(id)
}

/// Writes one pipeline of commands, then reads and checks a reply to each.
async fn send_on(c: &mut Conn, chunk: &[Vec<u8>]) -> Result<(), SinkError> {
    for cmd in chunk {
        c.write_all(cmd).await.map_err(io_error)?;
    }
    c.flush().await.map_err(io_error)?;
    let mut line = String::new();
    for _ in chunk {
        read_line(c, &mut line).await?;
        match line.trim_end() {
            "STORED" | "DELETED" | "NOT_FOUND" => {}
            other => {
                return Err(SinkError(format!(
                    "memcached answered \"{}\"",
                    crate::logging::escape(other)
                )));
            }
        }
    }
    Ok(())
}

impl Sink for Memcache {
    fn name(&self) -> String {
        format!("memcache {}", self.server)
    }

    async fn refill(&mut self, live: &[Live]) -> Result<u64, SinkError> {
        let identity = self.stats().await?;
        let now = Instant::now();
        let keep: HashSet<Cidr> = live.iter().map(|l| l.key).collect();
        let mut cmds = Vec::with_capacity(live.len() + 16);
        for old in self.written.iter().filter(|k| !keep.contains(k)) {
            self.delete(&mut cmds, old);
        }
        for l in live {
            self.set(&mut cmds, &l.key, l.expires, now);
        }
        let n = self.send(cmds).await?;
        self.written = keep;
        self.identity = Some(identity);
        Ok(n)
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<u64, SinkError> {
        if self.conn.is_none() {
            return Err(SinkError("the connection was lost".into()));
        }
        let now = Instant::now();
        let mut cmds = Vec::with_capacity(changes.len());
        for c in changes {
            match c {
                Change::Grant(key, g) => {
                    self.set(&mut cmds, key, g.expires, now);
                    self.written.insert(*key);
                }
                Change::Revoke(key) | Change::Expire(key) => {
                    self.delete(&mut cmds, key);
                    self.written.remove(key);
                }
            }
        }
        self.send(cmds).await
    }

    async fn intact(&mut self) -> Result<bool, SinkError> {
        if self.conn.is_none() {
            return Ok(false);
        }
        let now = self.stats().await?;
        let Some(before) = self.identity else {
            return Ok(false);
        };
        self.identity = Some(now);
        if now.evictions > before.evictions {
            crate::log_warning!(
                "{}: memcached evicted {} items for lack of memory, grants among them perhaps; give it more memory (memcached -m) or a memcached of its own",
                self.name(),
                now.evictions - before.evictions
            );
        }
        if (now.pid, now.started) != (before.pid, before.started) {
            crate::log_warning!(
                "{}: memcached was restarted (pid {} started at {}, was pid {} at {}): refilling",
                self.name(),
                now.pid,
                now.started,
                before.pid,
                before.started
            );
            return Ok(false);
        }
        if now.flushes > before.flushes {
            crate::log_warning!(
                "{}: memcached was flushed (flush_all): refilling",
                self.name()
            );
            return Ok(false);
        }
        Ok(true)
    }

    fn check_every(&self) -> Option<Duration> {
        Some(CHECK_EVERY)
    }
}

/// Starts one follow loop per server (each on its own, so that one
/// failing server holds up nothing else) and waits, at most
/// [`IO_TIMEOUT`] each, for their first fill, so that grants restored
/// from the state file are there before the first login is handled.
pub async fn start(
    servers: &[Server],
    prefix: &str,
    table: &std::sync::Arc<crate::grants::table::GrantTable>,
    stats: &std::sync::Arc<crate::stats::Stats>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let mut firsts = Vec::new();
    for server in servers {
        let feed = crate::grants::follow::Feed::subscribe(table);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let counters = crate::grants::follow::Counters {
            stats: stats.clone(),
            writes: |s| &s.memcache_writes,
            failures: |s| &s.memcache_failures,
            refills: |s| &s.memcache_refills,
        };
        let reports = crate::grants::follow::Reports {
            first_write: Some(tx),
            visible: None,
        };
        let sink = Memcache::new(server.clone(), prefix.to_string());
        tasks.spawn(crate::grants::follow::follow(
            sink,
            table.clone(),
            feed,
            counters,
            reports,
        ));
        firsts.push(rx);
    }
    for rx in firsts {
        let _ = tokio::time::timeout(IO_TIMEOUT, rx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_as_postfix_writes_them() {
        assert_eq!(
            Server::parse("inet:127.0.0.1:11211"),
            Ok(Server::Inet("127.0.0.1".into(), 11211))
        );
        let v6 = Server::parse("inet:[::1]:11211").unwrap();
        assert_eq!(v6, Server::Inet("::1".into(), 11211));
        assert_eq!(v6.to_string(), "inet:[::1]:11211");
        assert_eq!(
            Server::parse("unix:/run/memcached/memcached.sock")
                .unwrap()
                .to_string(),
            "unix:/run/memcached/memcached.sock"
        );
        for bad in [
            "127.0.0.1:11211",
            "inet:127.0.0.1",
            "inet::11211",
            "unix:rel",
            "inet:h:0",
        ] {
            assert!(Server::parse(bad).is_err(), "{bad}");
        }
        assert!(check_prefix("smtp-after-popd:").is_ok());
        assert!(check_prefix("a b").is_err());
    }

    #[test]
    fn sets_round_the_time_left_up_and_cover_every_key() {
        let m = Memcache::new(Server::Unix("/x".into()), "p:".into());
        let now = Instant::now();
        let mut out = Vec::new();
        m.set(
            &mut out,
            &"2001:db8:1::/64".parse().unwrap(),
            now + Duration::from_millis(1500),
            now,
        );
        let text: Vec<String> = out
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "set p:2001:db8:1:0 0 2 2\r\nOK\r\n",
                "set p:2001:db8:1: 0 2 2\r\nOK\r\n"
            ]
        );
        out.clear();
        m.set(
            &mut out,
            &Cidr::host("192.0.2.7".parse().unwrap()),
            now,
            now,
        );
        assert_eq!(out, [b"delete p:192.0.2.7\r\n".to_vec()]);
    }
}
