//! Postfix policy delegation (SMTPD_POLICY_README): Postfix's smtpd asks,
//! with `check_policy_service`, whether a client may relay, and gets the
//! answer from the grant table itself, at once, with no map file and no
//! modification-time delay.
//!
//! Consumes: policy requests (`name=value` lines ended by an empty line)
//! on a connection accepted by [`crate::net::serve_stream`] within
//! [`LIMITS`]; the grant table.
//! Produces: one `action=OK` (a live grant for `client_address`) or
//! `action=DUNNO` (anything else) per request, ended by an empty line.
//! Trusts: nothing in the request beyond `client_address`, which it only
//! looks up. It fails closed: a malformed, oversized or unknown request, or
//! any trouble, is answered `DUNNO` (or the connection is closed, which
//! Postfix treats as a temporary failure), never `OK`.
//!
//! Bounds ([`LIMITS`]), those of Postfix's own policy client: a request must
//! be complete, and its answer taken, within 100 s of its first byte
//! (`smtpd_policy_service_timeout`); a connection idle for 300 s is closed
//! (`smtpd_policy_service_max_idle`), as is one older than 1000 s when it
//! is next idle (`smtpd_policy_service_max_ttl`). One peer holds at most
//! 512 connections (Postfix keeps one per smtpd process), a listener 1024;
//! a new connection beyond either closes the one that has waited longest
//! without completing a request, so slow connections from one peer never
//! shut out Postfix.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::grants::addr::canonical;
use crate::grants::table::GrantTable;
use crate::logging::RateLimit;
use crate::net::{Connection, Io, Limits};
use crate::stats::Stats;

/// Most bytes in one request (Postfix sends well under 2 KiB).
pub const MAX_REQUEST: usize = 16 * 1024;
/// Most attributes in one request.
pub const MAX_ATTRIBUTES: usize = 100;
/// The bounds of a policy service listener (and of the socketmap's), in
/// line with Postfix's policy client: `smtpd_policy_service_timeout`
/// (100s), `smtpd_policy_service_max_idle` (300s) and
/// `smtpd_policy_service_max_ttl` (1000s).
pub const LIMITS: Limits = Limits {
    total: 1024,
    per_peer: 512,
    request: Duration::from_secs(100),
    idle: Duration::from_secs(300),
    lifetime: Some(Duration::from_secs(1000)),
};

static REQUEST_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// One request as read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// `request=` (must be `smtpd_access_policy`).
    pub request: Option<String>,
    /// `client_address=`.
    pub client_address: Option<String>,
    /// Attributes read.
    pub attributes: usize,
    /// A line without `=`.
    pub malformed: bool,
}

/// Why no request could be read.
#[derive(Debug)]
enum ReadError {
    /// Over [`MAX_REQUEST`] bytes or [`MAX_ATTRIBUTES`] attributes.
    TooLarge,
    /// The connection failed.
    Io,
}

/// The action for a request: OK only for a well-formed access-policy
/// request whose client address holds a live grant.
pub fn decide(req: &Request, table: &GrantTable) -> &'static str {
    if req.malformed || req.request.as_deref() != Some("smtpd_access_policy") {
        return "DUNNO";
    }
    let Some(ip) = req
        .client_address
        .as_deref()
        .and_then(|a| a.parse::<IpAddr>().ok())
    else {
        return "DUNNO";
    };
    if table.lookup(canonical(ip)).is_some() {
        "OK"
    } else {
        "DUNNO"
    }
}

/// Reads one request; `None` at the end of the stream.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Request>, ReadError> {
    let mut req = Request::default();
    let mut total = 0usize;
    let mut line = Vec::new();
    loop {
        line.clear();
        let budget = (MAX_REQUEST - total) as u64 + 1;
        let n = (&mut *r)
            .take(budget)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|_| ReadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        total += n;
        if total > MAX_REQUEST || line.last() != Some(&b'\n') {
            if line.last() != Some(&b'\n') && total <= MAX_REQUEST {
                // The stream ended inside a request.
                return Ok(None);
            }
            return Err(ReadError::TooLarge);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            if req.attributes == 0 && !req.malformed {
                // Stray empty lines between requests.
                continue;
            }
            return Ok(Some(req));
        }
        req.attributes += 1;
        if req.attributes > MAX_ATTRIBUTES {
            return Err(ReadError::TooLarge);
        }
        match text.split_once('=') {
            Some(("request", v)) => req.request = Some(v.to_string()),
            Some(("client_address", v)) => req.client_address = Some(v.to_string()),
            Some(_) => {}
            None => req.malformed = true,
        }
    }
}

/// Serves one connection until it ends, fails or misses a deadline.
pub async fn session(conn: Connection, io: Box<dyn Io>, table: Arc<GrantTable>, stats: Arc<Stats>) {
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::new(r);
    loop {
        let req = match read_request(&mut r).await {
            Ok(None) | Err(ReadError::Io) => return,
            Err(ReadError::TooLarge) => {
                Stats::bump(&stats.policy_requests);
                crate::log_warning_limited!(
                    REQUEST_WARNINGS,
                    "{}: request from {} larger than {MAX_REQUEST} bytes or {MAX_ATTRIBUTES} attributes: answered DUNNO, connection closed",
                    conn.listener(),
                    conn.peer()
                );
                let _ = w.write_all(b"action=DUNNO\n\n").await;
                return;
            }
            Ok(Some(req)) => req,
        };
        Stats::bump(&stats.policy_requests);
        let action = decide(&req, &table);
        if action == "OK" {
            Stats::bump(&stats.policy_ok);
        }
        if w.write_all(format!("action={action}\n\n").as_bytes())
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
        crate::grants::table::table_granting("192.0.2.7", Service::Pop3)
    }

    async fn ask(input: &[u8]) -> Vec<Result<Option<&'static str>, String>> {
        let t = table();
        let mut r = BufReader::new(input);
        let mut out = Vec::new();
        loop {
            match read_request(&mut r).await {
                Ok(Some(req)) => out.push(Ok(Some(decide(&req, &t)))),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(format!("{e:?}")));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn answers_ok_only_for_a_live_grant() {
        let req = b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nclient_name=x\n\n\
                    request=smtpd_access_policy\nclient_address=192.0.2.8\n\n\
                    request=smtpd_access_policy\nclient_address=::ffff:192.0.2.7\n\n";
        assert_eq!(
            ask(req).await,
            [Ok(Some("OK")), Ok(Some("DUNNO")), Ok(Some("OK"))]
        );
    }

    #[tokio::test]
    async fn anything_odd_is_dunno() {
        let req = b"request=other\nclient_address=192.0.2.7\n\n\
                    client_address=192.0.2.7\n\n\
                    request=smtpd_access_policy\nclient_address=192.0.2.7\ngarbage line\n\n\
                    request=smtpd_access_policy\nclient_address=not-an-ip\n\n";
        assert_eq!(ask(req).await, [const { Ok(Some("DUNNO")) }; 4]);
    }

    #[tokio::test]
    async fn oversized_requests_are_refused() {
        let mut big = b"request=smtpd_access_policy\nclient_address=192.0.2.7\n".to_vec();
        big.extend(vec![b'x'; MAX_REQUEST]);
        big.extend(b"\n\n");
        assert!(
            ask(&big).await[0]
                .as_ref()
                .unwrap_err()
                .contains("TooLarge")
        );
        let many: String = (0..=MAX_ATTRIBUTES).map(|i| format!("a{i}=b\n")).collect();
        assert!(
            ask(many.as_bytes()).await[0]
                .as_ref()
                .unwrap_err()
                .contains("TooLarge")
        );
    }
}
