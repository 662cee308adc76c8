//! The grant table as a Postfix socketmap (socketmap_table(5)): Postfix
//! looks a client address up with
//! `check_client_access socketmap:unix:PATH:authenticated_ips` and gets
//! `OK` for a live grant, at once, with no map file.
//!
//! Consumes: netstring requests `NAME KEY` on a unix stream connection
//! accepted by [`crate::net::serve_stream`] within the policy service's
//! bounds ([`crate::postfix::policy::LIMITS`]); the grant table.
//! Produces: one netstring reply per request: `OK OK` for a live grant of
//! the map [`MAP_NAME`], `NOTFOUND ` for any other key, `PERM ...` for a
//! malformed request or an unknown map name (Postfix then defers, which an
//! administrator notices; a typo never silently grants or denies).
//! Trusts: the socket's file permissions: Postfix's socketmap protocol has
//! no authentication, so it is served on a unix socket only, whose mode and
//! group should admit Postfix alone.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use crate::grants::addr::canonical;
use crate::grants::table::GrantTable;
use crate::logging::RateLimit;
use crate::net::{Connection, Io};
use crate::stats::Stats;

/// The map name this daemon answers for.
pub const MAP_NAME: &str = "authenticated_ips";
/// Longest request accepted (a map name, a space and an address).
pub const MAX_REQUEST: usize = 1024;

static REQUEST_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// The reply to one request.
pub fn answer(req: &[u8], table: &GrantTable) -> String {
    let Ok(text) = std::str::from_utf8(req) else {
        return "PERM request is not UTF-8".into();
    };
    let Some((name, key)) = text.split_once(' ') else {
        return "PERM expected NAME KEY".into();
    };
    if name != MAP_NAME {
        let shown: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
            .take(64)
            .collect();
        return format!("PERM unknown map name {shown}: this daemon serves {MAP_NAME}");
    }
    match key.parse::<IpAddr>() {
        Ok(ip) if table.lookup(canonical(ip)).is_some() => "OK OK".into(),
        _ => "NOTFOUND ".into(),
    }
}

/// Why no request could be read.
#[derive(Debug)]
enum ReadError {
    /// Not a netstring, or too long.
    Malformed,
    /// The connection failed.
    Io,
}

/// Reads one netstring; `None` at the end of the stream.
async fn read_netstring<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<Option<()>, ReadError> {
    let mut len = 0usize;
    let mut digits = 0;
    loop {
        let mut b = [0u8];
        if r.read(&mut b).await.map_err(|_| ReadError::Io)? == 0 {
            return if digits == 0 {
                Ok(None)
            } else {
                Err(ReadError::Io)
            };
        }
        match b[0] {
            b'0'..=b'9' => {
                len = len * 10 + usize::from(b[0] - b'0');
                digits += 1;
                if len > MAX_REQUEST {
                    return Err(ReadError::Malformed);
                }
            }
            b':' if digits > 0 => break,
            _ => return Err(ReadError::Malformed),
        }
    }
    out.resize(len + 1, 0);
    r.read_exact(out).await.map_err(|_| ReadError::Io)?;
    if out.pop() != Some(b',') {
        return Err(ReadError::Malformed);
    }
    Ok(Some(()))
}

/// Serves one connection until it ends, fails or misses a deadline.
pub async fn session(conn: Connection, io: Box<dyn Io>, table: Arc<GrantTable>, stats: Arc<Stats>) {
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::new(r);
    let mut req = Vec::new();
    loop {
        let reply = match read_netstring(&mut r, &mut req).await {
            Ok(None) | Err(ReadError::Io) => return,
            Err(ReadError::Malformed) => {
                crate::log_warning_limited!(
                    REQUEST_WARNINGS,
                    "{}: malformed request from {}: answered PERM, connection closed",
                    conn.listener(),
                    conn.peer()
                );
                let msg = "PERM malformed netstring";
                let _ = w
                    .write_all(format!("{}:{msg},", msg.len()).as_bytes())
                    .await;
                return;
            }
            Ok(Some(())) => answer(&req, &table),
        };
        Stats::bump(&stats.socketmap_requests);
        if reply.starts_with("OK") {
            Stats::bump(&stats.socketmap_ok);
        }
        if w.write_all(format!("{}:{reply},", reply.len()).as_bytes())
            .await
            .is_err()
        {
            return;
        }
        conn.completed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recognise::matcher::Service;

    fn table() -> GrantTable {
        crate::grants::table::table_granting("2001:db8::7", Service::Imap)
    }

    #[test]
    fn answers() {
        let t = table();
        assert_eq!(answer(b"authenticated_ips 2001:DB8:0::7", &t), "OK OK");
        assert_eq!(answer(b"authenticated_ips 192.0.2.7", &t), "NOTFOUND ");
        assert_eq!(answer(b"authenticated_ips unknown[x]", &t), "NOTFOUND ");
        assert!(answer(b"other 2001:db8::7", &t).starts_with("PERM unknown map name other"));
        assert!(answer(b"nospace", &t).starts_with("PERM"));
    }

    #[tokio::test]
    async fn netstrings() {
        let mut out = Vec::new();
        let mut r: &[u8] = b"27:authenticated_ips 192.0.2.7,5:x y z,";
        assert!(read_netstring(&mut r, &mut out).await.unwrap().is_some());
        assert_eq!(out, b"authenticated_ips 192.0.2.7");
        assert!(read_netstring(&mut r, &mut out).await.unwrap().is_some());
        assert!(read_netstring(&mut r, &mut out).await.unwrap().is_none());
        for bad in [&b"5:abcde;"[..], b"x:", b"99999:", b":"] {
            let mut r = bad;
            assert!(read_netstring(&mut r, &mut out).await.is_err(), "{bad:?}");
        }
    }
}
