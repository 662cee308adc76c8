//! Receivers: the sockets syslog datagrams arrive on.
//!
//! Consumes: datagrams from UDP sockets (`udp://ADDR:PORT`) and unix
//! datagram sockets (`unix:///PATH`), and framed records from TCP
//! connections (`tcp://ADDR:PORT`, RFC 6587: octet counting or LF framing).
//! Produces: for each record, its bytes and the [`Peer`] the kernel
//! reported, handed to a callback (the rest of the pipeline).
//! Trusts: the kernel's word on who sent a record, and nothing in the
//! record. A UDP datagram or TCP connection from a peer outside the
//! listener's allow-list (its `?allow=`, else `--allow-from`) is dropped and
//! counted before anything is parsed ([`crate::net`]). A TCP peer address
//! cannot be forged without the TCP handshake, so TCP is the choice where
//! UDP spoofing is possible; each connection is bounded and no peer can
//! shut out another ([`crate::tcp::LIMITS`]). A unix socket is trusted as
//! far as its file's owner, group and mode reach: by default mode 0600, so
//! only its owner and root (rsyslog) may write to it; its URL may name a
//! group that may (`unix:///PATH?group=adm&mode=0620`), never every user.
//!
//! A UDP source address can be forged on a shared network; loopback UDP can
//! be written by any local user. Prefer a unix socket for the local rsyslog,
//! and see SECURITY.md for remote senders.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{UdpSocket, UnixDatagram};

use crate::addr::canonical;
use crate::config::ListenSpec;
use crate::logging::RateLimit;
use crate::net::{
    self, Access, Adopted, AllowList, PEER_WARNINGS, SocketFile, StreamListener, UnixKind, allowed,
};
use crate::record::MAX_RECORD;
use crate::stats::Stats;
use crate::swap::Swap;

/// Who sent a datagram, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A UDP peer; IPv4 peers on dual-stack sockets are given as IPv4.
    Udp(SocketAddr),
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A sender on the unix socket at this path.
    Unix(Arc<str>),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Udp(a) => write!(f, "{a}"),
            Peer::Tcp(a) => write!(f, "tcp:{a}"),
            Peer::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A UDP socket and the peers it accepts.
    Udp {
        /// The socket.
        socket: UdpSocket,
        /// Peers allowed to send.
        allow: AllowList,
    },
    /// A TCP listener (with the peers it accepts), served by
    /// [`net::serve_stream`] with [`crate::tcp::LIMITS`].
    Tcp(StreamListener),
    /// A unix datagram socket; its file is removed when it is dropped.
    Unix {
        /// The socket.
        socket: UnixDatagram,
        /// The socket file, removed when the listener is dropped (unless
        /// systemd made it).
        file: SocketFile,
    },
}

/// Binds a listener. A unix socket gets `access` (the listener's own
/// `?owner=&group=&mode=`, with the defaults filled in); `recv_buffer` is
/// the receive buffer size to ask for.
pub fn bind(
    spec: &ListenSpec,
    allow: AllowList,
    access: &Access,
    recv_buffer: Option<usize>,
) -> Result<Listener, String> {
    let what = spec.to_string();
    match spec {
        ListenSpec::Tcp(addr, own) => {
            let allow = own.clone().map(|a| Arc::new(Swap::new(a))).unwrap_or(allow);
            let l = net::bind_tcp(*addr, recv_buffer, &what)?;
            Ok(Listener::Tcp(StreamListener::tcp(l, spec.address(), allow)))
        }
        ListenSpec::Udp(addr, own) => {
            let allow = own.clone().map(|a| Arc::new(Swap::new(a))).unwrap_or(allow);
            let socket = net::bind_udp(*addr, recv_buffer, &what)?;
            Ok(Listener::Udp { socket, allow })
        }
        ListenSpec::Unix(path, _) => {
            let what = format!("--listen {what}");
            let (socket, file) = net::bind_unix(path, UnixKind::Datagram, access, &what)?;
            net::set_recv_buffer(&SockRef::from(&socket), &what, recv_buffer);
            let socket = UnixDatagram::from_std(socket.into())
                .map_err(|e| format!("{what}: cannot register the socket: {e}"))?;
            Ok(Listener::Unix { socket, file })
        }
    }
}

/// Makes a listener of a datagram or TCP socket systemd passed.
pub fn from_adopted(a: Adopted, address: String, allow: AllowList) -> Result<Listener, String> {
    match a {
        Adopted::Udp(socket) => Ok(Listener::Udp { socket, allow }),
        Adopted::Tcp(l) => Ok(Listener::Tcp(StreamListener::tcp(l, address, allow))),
        Adopted::UnixDatagram(socket, file) => Ok(Listener::Unix { socket, file }),
        Adopted::UnixStream(..) => Err(format!(
            "{address}, passed by systemd, is a stream socket, not a syslog listener"
        )),
    }
}

/// Rate limit of the warnings about failed receives.
static RECEIVE_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// Datagrams the kernel dropped because the receive queues of these UDP
/// sockets (by inode) were full, from /proc/self/net/udp and udp6.
pub fn kernel_drops(inodes: &[u64]) -> u64 {
    let mut total = 0;
    // /proc/self/net, not /proc/net: the latter is hidden by systemd's
    // ProcSubset=pid.
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 13
                && f[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i))
                && let Ok(d) = f[12].parse::<u64>()
            {
                total += d;
            }
        }
    }
    total
}

impl Listener {
    /// The inode of a UDP listener's socket, to find its kernel counters.
    pub fn udp_inode(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let Listener::Udp { socket, .. } = self else {
            return None;
        };
        // SAFETY: fstat on a socket we own, into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(socket.as_raw_fd(), &mut st) } == 0).then_some(st.st_ino)
    }

    /// The socket file of a unix listener.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix { file, .. } => Some(file.path()),
            _ => None,
        }
    }

    /// The allow-list of a UDP or TCP listener.
    pub fn allow(&self) -> Option<&AllowList> {
        match self {
            Listener::Udp { allow, .. } => Some(allow),
            Listener::Tcp(l) => l.allow(),
            Listener::Unix { .. } => None,
        }
    }

    /// Receives records until the socket fails, handing each accepted one
    /// to `handle`; `received` counts this listener's records.
    pub async fn run<F>(self, stats: Arc<Stats>, received: Arc<AtomicU64>, handle: F)
    where
        F: Fn(&[u8], &Peer) + Send + Sync + 'static,
    {
        match self {
            Listener::Udp { socket, allow } => {
                run_udp(socket, allow, &stats, &received, handle).await
            }
            Listener::Tcp(l) => run_tcp(l, stats, received, handle).await,
            Listener::Unix { socket, file } => {
                run_unix(socket, file, &stats, &received, handle).await;
            }
        }
    }
}

/// Receives datagrams from the allowed peers of a UDP socket.
async fn run_udp<F>(
    socket: UdpSocket,
    allow: AllowList,
    stats: &Stats,
    received: &AtomicU64,
    handle: F,
) where
    F: Fn(&[u8], &Peer),
{
    // One byte more than the limit, to tell an oversized datagram.
    let mut buf = vec![0u8; MAX_RECORD + 1];
    let local = socket
        .local_addr()
        .map_or_else(|_| "udp".to_string(), |a| format!("udp://{a}"));
    // At a stop the queue is read to the end ([`crate::shutdown`]); the
    // socket stays open after that, until the daemon has read the kernel's
    // count of what it dropped, and the task is ended.
    let draining = crate::shutdown::Draining::enter();
    let stop = crate::shutdown::stopping();
    tokio::pin!(stop);
    let each = |bytes: &[u8], peer: SocketAddr| {
        Stats::bump(&stats.received);
        Stats::bump(received);
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        if !allowed(&allow.load(), peer.ip()) {
            Stats::bump(&stats.dropped_peer);
            crate::log_warning_limited!(
                PEER_WARNINGS,
                "{local}: datagram from {peer} dropped: peer not in allow-from"
            );
            return;
        }
        handle(bytes, &Peer::Udp(peer));
    };
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    crate::log_warning_limited!(RECEIVE_WARNINGS, "{local}: receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => {
                crate::shutdown::drain_queue(&socket, &mut buf, |d, from| {
                    if let Some(from) = from {
                        each(d, from);
                    }
                });
                drop(draining);
                return std::future::pending().await;
            }
        };
        each(&buf[..n], peer);
    }
}

/// Receives datagrams on a unix socket, whose file mode decides who may
/// send.
async fn run_unix<F>(
    socket: UnixDatagram,
    file: SocketFile,
    stats: &Stats,
    received: &AtomicU64,
    handle: F,
) where
    F: Fn(&[u8], &Peer),
{
    let mut buf = vec![0u8; MAX_RECORD + 1];
    let peer = Peer::Unix(file.path().to_string_lossy().into());
    // A socket we bound ourselves dies with us: at a stop its senders are
    // refused and what they sent before is read to the end
    // ([`crate::shutdown`]). One systemd passed outlives us, and what
    // waits in it is the next daemon's.
    let owned = file.owned();
    let _draining = owned.then(crate::shutdown::Draining::enter);
    let stop = crate::shutdown::stopping_if(owned);
    tokio::pin!(stop);
    loop {
        let n = tokio::select! {
            r = socket.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => {
                    crate::log_warning_limited!(RECEIVE_WARNINGS, "{peer}: receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => {
                crate::shutdown::refuse_and_drain(&socket, &mut buf, |d| {
                    Stats::bump(&stats.received);
                    Stats::bump(received);
                    handle(d, &peer);
                });
                return;
            }
        };
        Stats::bump(&stats.received);
        Stats::bump(received);
        handle(&buf[..n], &peer);
    }
}

/// Serves a TCP listener: one task per connection, each reading RFC 6587
/// frames, within the limits of [`crate::tcp::LIMITS`].
async fn run_tcp<F>(l: StreamListener, stats: Arc<Stats>, received: Arc<AtomicU64>, handle: F)
where
    F: Fn(&[u8], &Peer) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let served = stats.clone();
    // Logins sent before a stop are read to the end ([`crate::shutdown`]).
    let l = l.drain_at_stop();
    net::serve_stream(l, crate::tcp::LIMITS, served, move |conn, io| {
        let (stats, received, handle) = (stats.clone(), received.clone(), handle.clone());
        async move {
            let Some(addr) = conn.tcp_peer() else { return };
            let peer = Peer::Tcp(addr);
            crate::tcp::session(conn, io, &stats, &received, |frame| handle(frame, &peer)).await;
        }
    })
    .await;
}
