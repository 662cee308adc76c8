//! Stopping without losing what senders already sent. When the daemon
//! stops (SIGTERM), each receiver first tells its senders to stop sending
//! and then handles everything they sent before that, so that a sender
//! that retries (syslog-ng, rsyslog's omfwd over TCP) sends the rest to
//! the next daemon rather than into a socket about to close:
//!
//! - a unix datagram socket the daemon bound itself is shut for reading
//!   (senders now get EPIPE) and its queue is read to the end
//!   ([`refuse_and_drain`], called by the unix receive loop in
//!   [`crate::ingest::receiver`]);
//! - a TCP syslog listener accepts no more, but takes the connections
//!   already made and still waiting in its backlog, which closing it would
//!   reset with what their senders sent ([`pending_connections`], called
//!   by [`crate::net::serve_stream`] for a listener marked
//!   [`crate::net::StreamListener::drain_at_stop`]);
//! - each TCP syslog connection gets our FIN (rsyslog checks for it before
//!   each send, closes, and sends the rest on a new connection) and is read
//!   until the peer closes it ([`fin_at_stop`], called by
//!   [`crate::ingest::tcp::session`]);
//! - a UDP socket the daemon bound itself is read until its queue is
//!   empty ([`drain_queue`], called by the UDP receive loop), and then kept
//!   open until the daemon has read the kernel's count of the datagrams it
//!   dropped for a full queue;
//! - a unix socket systemd passed is left alone: it outlives the daemon,
//!   and what waits in it is the next daemon's.
//!
//! The daemon calls [`begin`], then waits for [`drained`] (at most
//! [`DRAIN`]), logs how many queued datagrams were handled
//! ([`queued_handled`]), lets every sink write once more
//! ([`crate::grants::follow::flush_all`], at most [`FLUSH`]), and only
//! then stops its other tasks and writes its state.
//!
//! Consumes: the daemon's decision to stop.
//! Produces: a signal receivers wait for, and a count of receivers still
//! draining ([`Draining`]), which the daemon waits on.
//! Trusts: nothing from outside; a peer that never closes, or a sender
//! that keeps a queue full, is cut off at the deadline.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{SockRef, Socket};
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::watch;

use crate::net::Io;

/// How long a receiver may take to read what was sent before the stop.
pub const DRAIN: Duration = Duration::from_millis(500);

fn stopping_tx() -> &'static watch::Sender<bool> {
    static TX: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
    TX.get_or_init(|| watch::channel(false).0)
}

static DRAINING: AtomicUsize = AtomicUsize::new(0);

/// Datagrams read from the queues at a stop, by every receiver.
static QUEUED: AtomicU64 = AtomicU64::new(0);

/// How long the map sink may take to write what the drain granted.
pub const FLUSH: Duration = Duration::from_secs(4);

/// The datagrams the receivers read from their queues at the stop.
pub fn queued_handled() -> u64 {
    QUEUED.load(Ordering::SeqCst)
}

/// Counts `n` datagrams a receiver read from its queue at the stop.
pub fn count_queued(n: u64) {
    QUEUED.fetch_add(n, Ordering::SeqCst);
}

fn done_tx() -> &'static watch::Sender<usize> {
    static TX: std::sync::OnceLock<watch::Sender<usize>> = std::sync::OnceLock::new();
    TX.get_or_init(|| watch::channel(0).0)
}

/// Tells every receiver that the daemon stops.
pub fn begin() {
    stopping_tx().send_replace(true);
}

/// Resolves once the daemon stops (at once if it already has).
pub async fn stopping() {
    let mut rx = stopping_tx().subscribe();
    let _ = rx.wait_for(|s| *s).await;
}

/// [`stopping`] when `drains`; otherwise never resolves (a receiver that
/// has nothing to finish at a stop runs until its task is ended).
pub async fn stopping_if(drains: bool) {
    if drains {
        stopping().await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Held by a receiver (or a connection it serves) while it has something
/// to finish at a stop.
pub struct Draining(());

impl Draining {
    /// Counts a receiver that must finish before the daemon stops.
    pub fn enter() -> Draining {
        DRAINING.fetch_add(1, Ordering::SeqCst);
        Draining(())
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        let left = DRAINING.fetch_sub(1, Ordering::SeqCst) - 1;
        done_tx().send_replace(left);
    }
}

/// Waits until every receiver has finished, or `deadline` passed.
pub async fn drained(deadline: Duration) {
    let mut rx = done_tx().subscribe();
    let _ = tokio::time::timeout(deadline, async {
        while DRAINING.load(Ordering::SeqCst) > 0 {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Shuts a datagram socket for reading, so that its senders are refused
/// from now on (EPIPE: syslog-ng keeps the record for the next daemon),
/// then hands each datagram still queued to `each`, for at most
/// [`DRAIN`]. `buf` holds one datagram. The queue is read with plain
/// non-blocking receives, not through the runtime's readiness, which may
/// not have seen the last datagrams yet.
pub fn refuse_and_drain(socket: &impl AsFd, buf: &mut [u8], mut each: impl FnMut(&[u8])) -> u64 {
    let _ = SockRef::from(socket).shutdown(std::net::Shutdown::Read);
    drain_queue(socket, buf, |d, _| each(d))
}

/// Hands each datagram still queued on a non-blocking datagram socket to
/// `each` (with its sender's address, when the socket has one), until the
/// queue is empty or [`DRAIN`] passed; counts them in [`queued_handled`].
pub fn drain_queue(
    socket: &impl AsFd,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8], Option<std::net::SocketAddr>),
) -> u64 {
    let sock = SockRef::from(socket);
    let deadline = Instant::now() + DRAIN;
    let mut n = 0;
    while Instant::now() < deadline {
        // The socket is non-blocking: an empty queue is WouldBlock.
        // SAFETY: MaybeUninit<u8> has the layout of u8, and recv_from
        // only writes initialised bytes into it.
        let uninit =
            unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [std::mem::MaybeUninit<u8>]) };
        match sock.recv_from(uninit) {
            Ok((len, from)) => {
                each(&buf[..len], from.as_socket());
                n += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    QUEUED.fetch_add(n, Ordering::SeqCst);
    n
}

/// The connections made to a listening socket and still waiting in its
/// backlog, taken without waiting (closing the listener would reset them
/// with what their senders sent). Each is non-blocking.
pub fn pending_connections(listener: &impl AsFd) -> Vec<Socket> {
    let sock = SockRef::from(listener);
    let mut out = Vec::new();
    while let Ok((s, _)) = sock.accept() {
        if s.set_nonblocking(true).is_ok() {
            out.push(s);
        }
    }
    out
}

/// Runs `read` on the read half of a syslog connection; at a stop, shuts
/// our side for writing (the FIN tells the sender to send no more here)
/// while `read` goes on reading what was sent before, until the sender
/// closes its side.
pub async fn fin_at_stop<T, F, Fut>(io: Box<dyn Io>, read: F) -> T
where
    F: FnOnce(ReadHalf<Box<dyn Io>>) -> Fut,
    Fut: Future<Output = T>,
{
    let (r, mut w) = tokio::io::split(io);
    let fin = async move {
        stopping().await;
        let _ = w.shutdown().await;
        // The write half is kept until the reading ends.
        std::future::pending::<Infallible>().await
    };
    tokio::select! {
        t = read(r) => t,
        never = fin => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shut_datagram_socket_gives_up_its_queue_and_refuses_senders() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        for i in 0..100u8 {
            a.send(&[i]).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let n = refuse_and_drain(&b, &mut buf, |d| got.push(d[0]));
        assert_eq!(n, 100);
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
        assert!(
            a.send(b"late").is_err(),
            "a sender is refused after the stop"
        );
    }

    #[test]
    fn a_udp_queue_is_read_to_the_end_with_each_sender() {
        let r = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_nonblocking(true).unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..100u8 {
            a.send_to(&[i], r.local_addr().unwrap()).unwrap();
        }
        let before = queued_handled();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let n = drain_queue(&r, &mut buf, |d, from| {
            assert_eq!(from, Some(a.local_addr().unwrap()));
            got.push(d[0]);
        });
        assert_eq!(n, 100);
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
        assert!(queued_handled() >= before + 100);
    }

    #[test]
    fn connections_waiting_in_the_backlog_are_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let _c: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(pending_connections(&l).len(), 3);
        assert!(pending_connections(&l).is_empty());
    }
}
