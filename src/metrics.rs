//! The Prometheus endpoint (`--metrics ADDR:PORT`): the counters of
//! `smtp-after-popd stats` at `http://ADDR:PORT/metrics`.
//!
//! Consumes: HTTP GET requests on a TCP listener, each connection accepted
//! by [`crate::net::serve_stream`] within [`LIMITS`].
//! Produces: the text exposition format (version 0.0.4) of
//! [`crate::control::Status::prometheus`]; 404 for any other path.
//! Trusts: peers in the listener's allow-list (`?allow=`, else
//! `--allow-from`), checked before a byte is read; nothing in the request
//! beyond its first line, which is bounded (8 KiB header, 10 s for the
//! request and its answer; one request per connection).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control::Status;
use crate::net::{Connection, Io, Limits};

/// Longest request header read.
const MAX_HEADER: usize = 8192;

/// The bounds of the metrics endpoint: a scraper asks once in a while.
pub const LIMITS: Limits = Limits {
    total: 16,
    per_peer: 4,
    request: Duration::from_secs(10),
    idle: Duration::from_secs(10),
    lifetime: Some(Duration::from_secs(10)),
};

/// Answers one HTTP connection.
pub async fn session(conn: Connection, mut io: Box<dyn Io>, status: Arc<Status>) {
    let _ = async {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
            let n = io.read(&mut chunk).await?;
            if n == 0 || buf.len() + n > MAX_HEADER {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let first = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let mut words = first.split(|&b| b == b' ');
        let (method, target) = (words.next(), words.next());
        let (code, kind, body) = match (method, target) {
            (Some(b"GET"), Some(b"/metrics")) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                status.prometheus(),
            ),
            (Some(b"GET"), Some(_)) => (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "not found: the counters are at /metrics\n".to_string(),
            ),
            _ => (
                "400 Bad Request",
                "text/plain; charset=utf-8",
                "expected GET /metrics\n".to_string(),
            ),
        };
        let head = format!(
            "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        io.write_all(head.as_bytes()).await?;
        io.write_all(body.as_bytes()).await?;
        io.shutdown().await?;
        conn.completed();
        Ok::<(), std::io::Error>(())
    }
    .await;
}
