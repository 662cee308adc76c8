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
//! Requests are bounded (one line of at most 512 bytes, 5 s to send it).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::grants::GrantTable;
use crate::logging::escape;
use crate::serve::SocketPath;
use crate::stats::{ListenerCounts, Stats};

/// Longest request line.
const MAX_REQUEST: u64 = 512;

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
        for (ip, g) in self.table.list() {
            let left = g.expires.saturating_duration_since(now).as_secs();
            let _ = writeln!(
                out,
                "{ip}\t{left}\t{}\t{}\t{}\t{}\t{}",
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

/// The supplementary groups of the peer, as the kernel recorded them when
/// it connected (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// Whether the peer may use the control socket.
fn permitted(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot learn who connected: {e}"))?;
    // SAFETY: geteuid and getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let ok = cred.uid() == 0
        || cred.uid() == uid
        || cred.gid() == gid
        || peer_groups(stream).contains(&gid);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "uid {} (gid {}) is neither root, the daemon's user nor in its group",
            cred.uid(),
            cred.gid()
        ))
    }
}

/// Serves the control socket for ever.
pub async fn serve(listener: UnixListener, path: SocketPath, status: Arc<Status>) {
    let _path = path;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::log_error!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(why) = permitted(&stream) {
                crate::log_warning!("control socket: connection refused: {why}");
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), session(stream, &status)).await;
        });
    }
}

async fn session(stream: UnixStream, status: &Status) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let request = line.trim_end_matches(['\n', '\r']);
    let reply = match request.split_once(' ').unwrap_or((request, "")) {
        ("list", "") => format!("ok\n{}", status.list_text()),
        ("stats", "") => format!("ok\n{}", status.stats_text()),
        ("revoke", arg) => match arg.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = crate::addr::canonical(ip);
                match status.table.revoke(ip) {
                    Some(g) => {
                        Stats::bump(&status.stats.revoked);
                        crate::log_info!(
                            "revoke {ip}: removed through the control socket (last login: {} {} user \"{}\")",
                            g.server,
                            g.service,
                            escape(&g.user)
                        );
                        format!("ok\nrevoked {ip}\n")
                    }
                    None => format!("error: {ip} is not granted\n"),
                }
            }
            Err(_) => format!("error: \"{}\" is not an IP address\n", escape(arg)),
        },
        _ => format!(
            "error: unknown request \"{}\": expected list, revoke ADDRESS or stats\n",
            escape(request)
        ),
    };
    w.write_all(reply.as_bytes()).await?;
    w.shutdown().await
}

/// Binds the control socket: mode 0660, in an existing directory.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketPath), String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
        return Err(format!(
            "--control {}: the directory {} does not exist: create it (under systemd, RuntimeDirectory=smtp-after-popd creates /run/smtp-after-popd), or give --control none",
            path.display(),
            dir.display()
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "--control {}: exists and is not a socket: remove it or choose another path",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--control {}: in use by a running process (another smtp-after-popd?): stop it or choose another path",
                path.display()
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .map_err(|e| format!("--control {}: cannot bind: {e}", path.display()))?;
    let guard = SocketPath(path.to_path_buf(), true);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("--control {}: cannot set mode 0660: {e}", path.display()))?;
    Ok((l, guard))
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
