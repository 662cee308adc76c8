//! The control socket: `smtp-after-popd list`, `revoke` and `stats` talking
//! to the running daemon; and the client side of those subcommands.
//!
//! Consumes: one request line per connection on a unix stream socket
//! (`list`, `revoke ADDRESS`, `stats`).
//! Produces: `ok` and the answer's lines, or `error: ...`; a revocation
//! takes the grant out of the table (and so out of the map) at once.
//! Trusts: the socket file's permissions (mode 0660, group of the daemon,
//! in a directory of the daemon's) and, on top of them, the kernel's word
//! on who connected (SO_PEERCRED): root, the daemon's user, or a member of
//! the daemon's group. Everyone else is refused before a byte is read.
//! Requests are bounded (one line of at most 512 bytes, 5 s to send it and
//! take the answer; [`LIMITS`]), each connection accepted by
//! [`crate::net::serve_stream`].

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::grants::table::GrantTable;
use crate::logging::{RateLimit, escape};
use crate::net::{Access, Connection, Io, Limits, StreamListener};
use crate::stats::{ListenerCounts, Stats};

/// Longest request line.
const MAX_REQUEST: u64 = 512;

/// The bounds of the control socket: one request per connection.
pub const LIMITS: Limits = Limits {
    total: 16,
    per_peer: 8,
    request: Duration::from_secs(5),
    idle: Duration::from_secs(5),
    lifetime: Some(Duration::from_secs(5)),
};

static REFUSED_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// What the control socket and the metrics endpoint report on.
pub struct Status {
    /// The grants.
    pub table: Arc<GrantTable>,
    /// The counters.
    pub stats: Arc<Stats>,
    /// Datagrams per listener.
    pub listeners: Arc<ListenerCounts>,
}

impl Status {
    /// One tab-separated line per live grant, soonest expiry first:
    /// address, seconds left, server, service, user, host, reporter.
    pub fn list_text(&self) -> String {
        let now = tokio::time::Instant::now();
        let mut out = String::new();
        for (key, g) in self.table.list_blocks() {
            let left = g.expires.saturating_duration_since(now).as_secs();
            let _ = writeln!(
                out,
                "{}\t{left}\t{}\t{}\t{}\t{}\t{}",
                key.shown(),
                escape(&g.server),
                g.service,
                escape(&g.user),
                escape(&g.host),
                escape(&g.reporter)
            );
        }
        out
    }

    /// `name value` lines: the live grants, each counter, each listener.
    pub fn stats_text(&self) -> String {
        let mut out = format!("grants {}\n", self.table.len());
        for (name, value) in self.stats.snapshot() {
            let _ = writeln!(out, "{name} {value}");
        }
        for (name, value) in self.listeners.snapshot() {
            let _ = writeln!(out, "received{{listener=\"{name}\"}} {value}");
        }
        out
    }

    /// The Prometheus text exposition of the same figures.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP smtp_after_popd_grants Addresses granted now.\n# TYPE smtp_after_popd_grants gauge\nsmtp_after_popd_grants {}",
            self.table.len()
        );
        for (name, help, value) in self.stats.described() {
            let _ = writeln!(
                out,
                "# HELP smtp_after_popd_{name}_total {help}\n# TYPE smtp_after_popd_{name}_total counter\nsmtp_after_popd_{name}_total {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP smtp_after_popd_listener_received_total Datagrams (or TCP frames) read by each listener.\n# TYPE smtp_after_popd_listener_received_total counter"
        );
        for (name, value) in self.listeners.snapshot() {
            let mut label = String::new();
            for c in name.chars() {
                match c {
                    '\\' => label.push_str("\\\\"),
                    '"' => label.push_str("\\\""),
                    '\n' => label.push_str("\\n"),
                    c => label.push(c),
                }
            }
            let _ = writeln!(
                out,
                "smtp_after_popd_listener_received_total{{listener=\"{label}\"}} {value}"
            );
        }
        out
    }
}

/// Whether the peer may use the control socket.
fn permitted(conn: &Connection) -> Result<(), String> {
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    permitted_for(conn.cred(), uid, gid)
}

/// [`permitted`] for a daemon running as `uid` and `gid`.
fn permitted_for(cred: Option<&crate::net::Cred>, uid: u32, gid: u32) -> Result<(), String> {
    let cred = cred.ok_or_else(|| "cannot learn who connected".to_string())?;
    let ok =
        cred.uid == 0 || cred.uid == uid || cred.gid == Some(gid) || cred.groups.contains(&gid);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "uid {} (gid {}) is neither root, the daemon's user nor in its group",
            cred.uid,
            cred.gid.map_or_else(|| "?".to_string(), |g| g.to_string())
        ))
    }
}

/// Serves one control connection: one request, one answer.
pub async fn session(conn: Connection, io: Box<dyn Io>, status: Arc<Status>) {
    if let Err(why) = permitted(&conn) {
        crate::log_warning_limited!(
            REFUSED_WARNINGS,
            "control socket: connection refused: {why}"
        );
        return;
    }
    if answer(io, &status).await.is_ok() {
        conn.completed();
    }
}

async fn answer(io: Box<dyn Io>, status: &Status) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(io);
    let mut reader = BufReader::new(r.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let request = line.trim_end_matches(['\n', '\r']);
    let reply = match request.split_once(' ').unwrap_or((request, "")) {
        ("list", "") => format!("ok\n{}", status.list_text()),
        ("stats", "") => format!("ok\n{}", status.stats_text()),
        ("revoke", arg) => revoke(status, arg),
        _ => format!(
            "error: unknown request \"{}\": expected list, revoke ADDRESS or stats\n",
            escape(request)
        ),
    };
    w.write_all(reply.as_bytes()).await?;
    w.shutdown().await
}

/// `revoke ADDRESS`: the answer. Every grant that lets the address relay
/// goes: its own, and an IPv6 prefix grant covering it.
fn revoke(status: &Status, arg: &str) -> String {
    let Ok(ip) = arg.parse::<IpAddr>() else {
        return format!("error: \"{}\" is not an IP address\n", escape(arg));
    };
    let ip = crate::grants::addr::canonical(ip);
    let gone = status.table.revoke_covering(ip);
    if gone.is_empty() {
        return format!("error: {ip} is not granted\n");
    }
    let mut out = String::from("ok\n");
    for (key, g) in gone {
        Stats::bump(&status.stats.revoked);
        crate::log_info!(
            "revoke {}: removed through the control socket (last login: {} {} user \"{}\")",
            key.shown(),
            g.server,
            g.service,
            escape(&g.user)
        );
        let _ = writeln!(out, "revoked {}", key.shown());
    }
    out
}

/// Binds the control socket at `path`: mode 0660, group `group` (the
/// daemon's, when it switches to one), in an existing directory.
pub fn bind(
    path: &Path,
    group: Option<crate::service::privilege::Group>,
) -> Result<StreamListener, String> {
    let access = Access {
        owner: None,
        group,
        mode: Some(0o660),
    };
    StreamListener::bind_unix(path, &access, &format!("--control {}", path.display())).map_err(
        |e| {
            if e.contains("does not exist") {
                format!("{e}, or give --control none")
            } else {
                e
            }
        },
    )
}

/// The client: sends one request, returns the answer's lines (after `ok`)
/// or the error.
pub fn request(path: &Path, line: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e}; is it running, is this its control socket (--control), and are you root or in its group?",
            path.display()
        )
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("{}: cannot send the request: {e}", path.display()))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("{}: cannot read the answer: {e}", path.display()))?;
    if let Some(body) = reply.strip_prefix("ok\n") {
        Ok(body.to_string())
    } else if reply.is_empty() {
        Err(format!(
            "{}: the daemon closed the connection without answering: you may not be allowed (root, the daemon's user or its group only); see the daemon's log",
            path.display()
        ))
    } else {
        Err(reply
            .trim_end()
            .strip_prefix("error: ")
            .unwrap_or(reply.trim_end())
            .to_string())
    }
}

/// Formats `list_text` as an aligned table with a header, times as
/// `1m05s`.
pub fn format_list(text: &str) -> String {
    let header = [
        "ADDRESS",
        "EXPIRES IN",
        "SERVER",
        "SERVICE",
        "USER",
        "HOST",
        "REPORTED BY",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for line in text.lines() {
        let mut f: Vec<String> = line.split('\t').map(str::to_string).collect();
        if let Some(secs) = f.get(1).and_then(|s| s.parse::<u64>().ok()) {
            f[1] = if secs >= 60 {
                format!("{}m{:02}s", secs / 60, secs % 60)
            } else {
                format!("{secs}s")
            };
        }
        rows.push(f);
    }
    let cols = header.len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, w) in widths.iter().enumerate() {
            let cell = r.get(c).map_or("", String::as_str);
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::permitted_for;
    use crate::net::Cred;

    fn cred(uid: u32, gid: Option<u32>, groups: &[u32]) -> Cred {
        Cred {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    /// The daemon runs as uid 120, gid 130 in these tests.
    const UID: u32 = 120;
    const GID: u32 = 130;

    #[test]
    fn root_the_daemons_user_and_its_group_are_permitted() {
        for c in [
            cred(0, Some(0), &[]),
            cred(0, None, &[]),
            cred(UID, Some(65534), &[]),
            cred(1000, Some(GID), &[]),
            cred(1000, Some(1000), &[27, GID, 100]),
        ] {
            assert_eq!(permitted_for(Some(&c), UID, GID), Ok(()), "{c:?}");
        }
    }

    #[test]
    fn everyone_else_is_refused_with_their_uid_and_gid() {
        let e = permitted_for(Some(&cred(65534, Some(65534), &[])), UID, GID).unwrap_err();
        assert_eq!(
            e,
            "uid 65534 (gid 65534) is neither root, the daemon's user nor in its group"
        );
        for c in [
            cred(1000, Some(1000), &[27, 100]),
            // Near misses: the daemon's gid as a uid, its uid as a group.
            cred(GID, Some(1000), &[UID]),
            cred(UID + 1, Some(GID + 1), &[GID - 1, GID + 1]),
            // A TCP-style credential: no gid, no groups.
            cred(1000, None, &[]),
        ] {
            assert!(permitted_for(Some(&c), UID, GID).is_err(), "{c:?}");
        }
        let e = permitted_for(Some(&cred(1000, None, &[])), UID, GID).unwrap_err();
        assert!(e.contains("(gid ?)"), "{e}");
    }

    #[test]
    fn an_unknown_peer_is_refused() {
        assert_eq!(
            permitted_for(None, UID, GID),
            Err("cannot learn who connected".to_string())
        );
        // Not even when the daemon runs as root.
        assert!(permitted_for(None, 0, 0).is_err());
    }
}
