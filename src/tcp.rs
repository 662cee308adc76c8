//! The TCP receiver: syslog over TCP as rsyslog's omfwd sends it.
//!
//! Consumes: connections accepted on a `tcp://ADDR:PORT` listener.
//! Produces: one record per RFC 6587 frame, with the [`Peer::Tcp`] the
//! kernel reported, handed to the pipeline's callback; the same callback the
//! datagram listeners use, so a TCP record is judged like a UDP one.
//! Trusts: the peer address (a TCP peer must complete the handshake, so the
//! address cannot simply be forged as a UDP source can), checked against the
//! listener's allow-list before a byte is read; nothing in the stream.
//!
//! Framing (RFC 6587): a frame that starts with a digit is octet-counted
//! (`LENGTH SP RECORD`, rsyslog's `TCP_Framing="octet-counted"`); any other
//! is terminated by LF (rsyslog's default). Bounds, so that no peer can make
//! the daemon hold much: a frame is at most [`MAX_RECORD`] bytes (a longer
//! one is counted and its connection closed, since the stream can no longer
//! be trusted to be in step), a connection idle for [`IDLE_TIMEOUT`] is
//! closed, and a listener serves at most [`MAX_CONNECTIONS`] at once (more
//! are refused and counted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::addr::canonical;
use crate::logging::RateLimit;
use crate::receiver::{AllowList, PEER_WARNINGS, Peer, allowed};
use crate::record::MAX_RECORD;
use crate::stats::Stats;

/// Connections served at once per TCP listener.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed (rsyslog
/// reconnects when it next has something to send).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

static FRAME_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// Why a frame could not be read.
#[derive(Debug)]
enum FrameError {
    /// Longer than [`MAX_RECORD`].
    TooLong,
    /// An octet count that is not a number followed by a space.
    BadCount,
    /// The connection failed or ended inside a frame.
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// Accepts connections until the listener fails for good.
pub async fn serve<F>(
    listener: TcpListener,
    allow: AllowList,
    stats: Arc<Stats>,
    received: Arc<AtomicU64>,
    handle: Arc<F>,
) where
    F: Fn(&[u8], &Peer) + Send + Sync + 'static,
{
    let local = listener
        .local_addr()
        .map_or_else(|_| "tcp".to_string(), |a| format!("tcp://{a}"));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stop = crate::shutdown::stopping();
    tokio::pin!(stop);
    let admit = |stream: TcpStream, peer: SocketAddr| {
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        if !allowed(&allow.load(), peer.ip()) {
            Stats::bump(&stats.dropped_peer);
            crate::log_warning_limited!(
                PEER_WARNINGS,
                "{local}: connection from {peer} refused: peer not in allow-from"
            );
            return;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            Stats::bump(&stats.dropped_connections);
            crate::log_warning_limited!(
                PEER_WARNINGS,
                "{local}: connection from {peer} refused: {MAX_CONNECTIONS} connections already open"
            );
            return;
        };
        Stats::bump(&stats.tcp_connections);
        let stats = stats.clone();
        let received = received.clone();
        let handle = handle.clone();
        let local = local.clone();
        // Counted from here, so that a stop waits for it to be read.
        let draining = crate::shutdown::Draining::enter();
        tokio::spawn(async move {
            let _permit = permit;
            let _draining = draining;
            connection(stream, &local, peer, &stats, &received, &*handle).await;
        });
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => {
                // At a stop, accept no more: the listener closes, and
                // senders are refused and retry later (or, when systemd
                // holds it, wait for the next daemon). Connections already
                // made but not yet accepted would be reset with what their
                // senders sent: they are taken and read to the end too.
                while let Ok((socket, _)) = socket2::SockRef::from(&listener).accept() {
                    let stream = std::net::TcpStream::from(socket);
                    if let (Ok(()), Ok(peer)) = (stream.set_nonblocking(true), stream.peer_addr())
                        && let Ok(stream) = TcpStream::from_std(stream)
                    {
                        admit(stream, peer);
                    }
                }
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => admit(stream, peer),
            Err(e) => {
                crate::log_error!("{local}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads frames from one connection until it ends, fails or idles out.
async fn connection<F>(
    stream: TcpStream,
    local: &str,
    peer: SocketAddr,
    stats: &Stats,
    received: &AtomicU64,
    handle: &F,
) where
    F: Fn(&[u8], &Peer),
{
    // At a stop, our FIN tells the sender to send no more here (rsyslog
    // checks for it before each send, then reconnects to the next daemon);
    // what it sent before is read until it closes its side.
    let (read, write) = stream.into_split();
    let fin = tokio::spawn(async move {
        crate::shutdown::stopping().await;
        // Dropping the write half shuts it down.
        drop(write);
    });
    let _fin = AbortOnDrop(fin);
    let mut reader = BufReader::with_capacity(16 * 1024, read);
    let mut frame = Vec::with_capacity(1024);
    let who = Peer::Tcp(peer);
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut reader, &mut frame)).await {
            Err(_) => {
                crate::log_debug!("{local}: connection from {peer} closed after being idle");
                return;
            }
            Ok(Ok(true)) => {
                Stats::bump(&stats.received);
                Stats::bump(received);
                handle(&frame, &who);
            }
            Ok(Ok(false)) => return,
            Ok(Err(FrameError::TooLong)) => {
                Stats::bump(&stats.dropped_too_long);
                crate::log_warning_limited!(
                    FRAME_WARNINGS,
                    "{local}: frame from {peer} longer than {MAX_RECORD} bytes: connection closed"
                );
                return;
            }
            Ok(Err(FrameError::BadCount)) => {
                Stats::bump(&stats.dropped_unparsed);
                crate::log_warning_limited!(
                    FRAME_WARNINGS,
                    "{local}: bad octet count from {peer}: connection closed"
                );
                return;
            }
            Ok(Err(FrameError::Io(e))) => {
                crate::log_debug!("{local}: connection from {peer} ended: {e}");
                return;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
