//! The TCP receiver: syslog over TCP as rsyslog's omfwd sends it.
//!
//! Consumes: a connection accepted on a `tcp://ADDR:PORT` listener by
//! [`crate::net::serve_stream`], which has already checked the peer
//! against the listener's allow-list and its [`LIMITS`].
//! Produces: one record per RFC 6587 frame, handed to the receiver's
//! callback (the same one the datagram listeners use, so a TCP record is
//! judged like a UDP one).
//! Trusts: nothing in the stream.
//!
//! Framing (RFC 6587): a frame that starts with a digit is octet-counted
//! (`LENGTH SP RECORD`, rsyslog's `TCP_Framing="octet-counted"`); any other
//! is terminated by LF (rsyslog's default). Bounds, so that no peer can make
//! the daemon hold much or shut out another: a frame is at most
//! [`MAX_RECORD`] bytes (a longer one is counted and its connection closed,
//! since the stream can no longer be trusted to be in step), and [`LIMITS`]:
//! a frame must be complete within 100 s of its first byte, a connection
//! idle for 10 minutes is closed (rsyslog reconnects when it next has
//! something to send), and one peer holds at most 32 connections, a
//! listener 256; a new connection beyond either closes the one that has
//! waited longest without completing a frame.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader, ReadHalf};

use crate::ingest::record::MAX_RECORD;
use crate::logging::RateLimit;
use crate::net::{Connection, Io, Limits};
use crate::stats::Stats;

/// The bounds of a TCP syslog listener.
pub const LIMITS: Limits = Limits {
    total: 256,
    per_peer: 32,
    request: Duration::from_secs(100),
    idle: Duration::from_secs(600),
    lifetime: None,
};

static FRAME_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// Why a frame could not be read.
#[derive(Debug)]
enum FrameError {
    /// Longer than [`MAX_RECORD`].
    TooLong,
    /// An octet count that is not a number followed by a space.
    BadCount,
    /// The connection failed, ended inside a frame, or missed a deadline.
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Reads frames from one connection until it ends or fails, handing each
/// to `on_frame`. At a stop, the sender is told to send no more here
/// (our FIN: rsyslog checks for it before each send, then reconnects to
/// the next daemon) and what it sent before is read until it closes its
/// side ([`crate::ingest::shutdown::fin_at_stop`]).
pub async fn session<F>(
    conn: Connection,
    io: Box<dyn Io>,
    stats: &Stats,
    received: &AtomicU64,
    on_frame: F,
) where
    F: Fn(&[u8]),
{
    Stats::bump(&stats.tcp_connections);
    crate::ingest::shutdown::fin_at_stop(io, |read| frames(read, &conn, stats, received, on_frame))
        .await;
}

/// Reads the frames of a connection's read half.
async fn frames<F>(
    read: ReadHalf<Box<dyn Io>>,
    conn: &Connection,
    stats: &Stats,
    received: &AtomicU64,
    on_frame: F,
) where
    F: Fn(&[u8]),
{
    let mut reader = BufReader::with_capacity(16 * 1024, read);
    let mut frame = Vec::with_capacity(1024);
    let (local, peer) = (conn.listener(), conn.peer());
    loop {
        match read_frame(&mut reader, &mut frame).await {
            Ok(true) => {
                Stats::bump(&stats.received);
                Stats::bump(received);
                on_frame(&frame);
                conn.completed();
            }
            Ok(false) => return,
            Err(FrameError::TooLong) => {
                Stats::bump(&stats.dropped_too_long);
                crate::log_warning_limited!(
                    FRAME_WARNINGS,
                    "{local}: frame from {peer} longer than {MAX_RECORD} bytes: connection closed"
                );
                return;
            }
            Err(FrameError::BadCount) => {
                Stats::bump(&stats.dropped_unparsed);
                crate::log_warning_limited!(
                    FRAME_WARNINGS,
                    "{local}: bad octet count from {peer}: connection closed"
                );
                return;
            }
            Err(FrameError::Io(e)) => {
                crate::log_debug!("{local}: connection from {peer} ended: {e}");
                return;
            }
        }
    }
}

/// Reads one frame into `out`; false at a clean end of the stream.
async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    out.clear();
    // Skip line ends between frames (some senders end octet-counted
    // frames with LF as well).
    let first = loop {
        let buf = r.fill_buf().await?;
        match buf.first() {
            None => return Ok(false),
            Some(b'\n' | b'\r' | 0) => r.consume(1),
            Some(&b) => break b,
        }
    };
    if first.is_ascii_digit() {
        let mut len: usize = 0;
        loop {
            let b = r.read_u8().await?;
            match b {
                b' ' => break,
                b'0'..=b'9' => {
                    len = len * 10 + usize::from(b - b'0');
                    if len > MAX_RECORD {
                        return Err(FrameError::TooLong);
                    }
                }
                _ => return Err(FrameError::BadCount),
            }
        }
        out.resize(len, 0);
        r.read_exact(out).await?;
        return Ok(true);
    }
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            // The last frame may lack its LF.
            return Ok(!out.is_empty());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(&buf[..i]);
            r.consume(i + 1);
            break;
        }
        let n = buf.len();
        out.extend_from_slice(buf);
        r.consume(n);
        if out.len() > MAX_RECORD {
            return Err(FrameError::TooLong);
        }
    }
    if out.len() > MAX_RECORD {
        return Err(FrameError::TooLong);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8]) -> (Vec<String>, Option<String>) {
        let mut r = BufReader::new(input);
        let mut out = Vec::new();
        let mut v = Vec::new();
        loop {
            match read_frame(&mut r, &mut out).await {
                Ok(true) => v.push(String::from_utf8_lossy(&out).into_owned()),
                Ok(false) => return (v, None),
                Err(e) => return (v, Some(format!("{e:?}"))),
            }
        }
    }

    #[tokio::test]
    async fn lf_and_octet_counted_frames() {
        let (v, err) = frames(b"<22>a: x\n<22>b: y\n10 <22>c: z\nw\n<22>last").await;
        assert_eq!(v, ["<22>a: x", "<22>b: y", "<22>c: z\nw", "<22>last"]);
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn oversized_and_bad_frames_end_the_stream() {
        let big = format!("{} ", MAX_RECORD + 1);
        assert!(frames(big.as_bytes()).await.1.unwrap().contains("TooLong"));
        let long = vec![b'x'; MAX_RECORD + 2];
        assert!(frames(&long).await.1.unwrap().contains("TooLong"));
        assert!(frames(b"12x <22>").await.1.unwrap().contains("BadCount"));
        // A count larger than what follows: the stream ends inside a frame.
        assert!(frames(b"99 <22>short").await.1.unwrap().contains("Io"));
    }
}
