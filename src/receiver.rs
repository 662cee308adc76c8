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
//! counted here, before anything is parsed. A TCP peer address cannot be
//! forged without the TCP handshake, so TCP is the choice where UDP
//! spoofing is possible; each connection is bounded (frame size, idle
//! time) and so is their number. A unix socket is trusted as far as its
//! file permissions reach: its mode (`--socket-mode`, default 0660) decides
//! who may write to it.
//!
//! A UDP source address can be forged on a shared network; loopback UDP can
//! be written by any local user. Prefer a unix socket for the local rsyslog,
//! and see SECURITY.md for remote senders.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{UdpSocket, UnixDatagram};

use crate::addr::{Cidr, canonical};
use crate::config::ListenSpec;
use crate::logging::RateLimit;
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

/// A listener's allow-list, replaced by a reload.
pub type AllowList = Arc<Swap<Vec<Cidr>>>;

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
    /// A TCP socket, the peers it accepts, and its connection slots.
    Tcp {
        /// The listening socket.
        listener: tokio::net::TcpListener,
        /// Peers allowed to connect.
        allow: AllowList,
    },
    /// A unix datagram socket; the guard removes its file on drop.
    Unix {
        /// The socket.
        socket: UnixDatagram,
        /// The socket file, removed when the listener is dropped (unless
        /// systemd made it).
        guard: SocketFile,
    },
}

/// A unix socket file, removed when dropped if the daemon made it.
#[derive(Debug)]
pub struct SocketFile(PathBuf, bool);

impl SocketFile {
    /// A socket file someone else (systemd) made and will remove.
    pub fn borrowed(path: PathBuf) -> SocketFile {
        SocketFile(path, false)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Binds a listener. `recv_buffer` is the receive buffer size to ask for.
pub fn bind(
    spec: &ListenSpec,
    allow: AllowList,
    socket_mode: u32,
    recv_buffer: Option<usize>,
) -> Result<Listener, String> {
    match spec {
        ListenSpec::Tcp(addr, own) => {
            let allow = own.clone().map(|a| Arc::new(Swap::new(a))).unwrap_or(allow);
            let socket = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(|e| format!("cannot create a TCP socket for {spec}: {e}"))?;
            if addr.is_ipv6() {
                socket
                    .set_only_v6(false)
                    .map_err(|e| format!("cannot make {spec} dual-stack: {e}"))?;
            }
            socket
                .set_reuse_address(true)
                .map_err(|e| format!("cannot set SO_REUSEADDR on {spec}: {e}"))?;
            set_recv_buffer(&SockRef::from(&socket), spec, recv_buffer);
            socket
                .bind(&(*addr).into())
                .map_err(|e| format!("cannot bind {spec}: {e}"))?;
            socket
                .listen(128)
                .map_err(|e| format!("cannot listen on {spec}: {e}"))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make {spec} non-blocking: {e}"))?;
            let listener = tokio::net::TcpListener::from_std(socket.into())
                .map_err(|e| format!("cannot register {spec}: {e}"))?;
            Ok(Listener::Tcp { listener, allow })
        }
        ListenSpec::Udp(addr, own) => {
            let allow = own.clone().map(|a| Arc::new(Swap::new(a))).unwrap_or(allow);
            let socket = Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))
                .map_err(|e| format!("cannot create a UDP socket for {spec}: {e}"))?;
            if addr.is_ipv6() {
                // Accept IPv4 peers too on [::]; they arrive IPv4-mapped and
                // are turned back into IPv4 before the allow-list check.
                socket
                    .set_only_v6(false)
                    .map_err(|e| format!("cannot make {spec} dual-stack: {e}"))?;
            }
            set_recv_buffer(&SockRef::from(&socket), spec, recv_buffer);
            socket
                .bind(&(*addr).into())
                .map_err(|e| format!("cannot bind {spec}: {e}"))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make {spec} non-blocking: {e}"))?;
            let socket = UdpSocket::from_std(socket.into())
                .map_err(|e| format!("cannot register {spec}: {e}"))?;
            Ok(Listener::Udp { socket, allow })
        }
        ListenSpec::Unix(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
                return Err(format!(
                    "cannot bind {spec}: the directory {} does not exist: create it (under systemd, RuntimeDirectory=smtp-after-popd creates /run/smtp-after-popd)",
                    dir.display()
                ));
            }
            remove_stale_socket(path)?;
            let socket =
                UnixDatagram::bind(path).map_err(|e| format!("cannot bind {spec}: {e}"))?;
            let guard = SocketFile(path.clone(), true);
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(
                |e| {
                    format!(
                        "cannot set mode {socket_mode:04o} on {}: {e}",
                        path.display()
                    )
                },
            )?;
            set_recv_buffer(&SockRef::from(&socket), spec, recv_buffer);
            Ok(Listener::Unix { socket, guard })
        }
    }
}

/// Makes a listener of a datagram or TCP socket systemd passed.
pub fn from_activated(a: crate::systemd::Activated, allow: AllowList) -> Result<Listener, String> {
    use crate::systemd::Kind;
    let what = format!("socket \"{}\" passed by systemd", a.name);
    let nonblocking =
        |r: std::io::Result<()>| r.map_err(|e| format!("cannot make {what} non-blocking: {e}"));
    let registered = |e: std::io::Error| format!("cannot register {what}: {e}");
    match (a.kind, a.spec) {
        (Kind::Udp, _) => {
            let std = std::net::UdpSocket::from(a.fd);
            nonblocking(std.set_nonblocking(true))?;
            let socket = UdpSocket::from_std(std).map_err(registered)?;
            Ok(Listener::Udp { socket, allow })
        }
        (Kind::Tcp, _) => {
            let std = std::net::TcpListener::from(a.fd);
            nonblocking(std.set_nonblocking(true))?;
            let listener = tokio::net::TcpListener::from_std(std).map_err(registered)?;
            Ok(Listener::Tcp { listener, allow })
        }
        (Kind::UnixDatagram, ListenSpec::Unix(path)) => {
            let std = std::os::unix::net::UnixDatagram::from(a.fd);
            nonblocking(std.set_nonblocking(true))?;
            let socket = UnixDatagram::from_std(std).map_err(registered)?;
            Ok(Listener::Unix {
                socket,
                guard: SocketFile::borrowed(path),
            })
        }
        _ => Err(format!("{what} is a stream socket, not a syslog listener")),
    }
}

/// Replaces a stale socket file, but never a live socket or another file.
fn remove_stale_socket(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket: remove it or choose another --listen path",
            path.display()
        ));
    }
    let probe = std::os::unix::net::UnixDatagram::unbound()
        .map_err(|e| format!("cannot create a probe socket: {e}"))?;
    if probe.connect(path).is_ok() {
        return Err(format!(
            "{} is in use by a running process (another smtp-after-popd?): stop it or choose another --listen path",
            path.display()
        ));
    }
    std::fs::remove_file(path)
        .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
}

fn set_recv_buffer(sock: &SockRef<'_>, spec: &ListenSpec, size: Option<usize>) {
    let Some(size) = size else { return };
    if let Err(e) = sock.set_recv_buffer_size(size) {
        crate::log_warning!("{spec}: cannot set the receive buffer to {size} bytes: {e}");
        return;
    }
    // Linux reports twice the size it grants (the rest is bookkeeping).
    if let Ok(got) = sock.recv_buffer_size() {
        let granted = got / 2;
        if granted < size {
            crate::log_warning!(
                "{spec}: asked for a receive buffer of {size} bytes, the kernel granted {granted}; raise net.core.rmem_max to allow more"
            );
        }
    }
}

/// Rate limit of the warnings about refused peers.
pub static PEER_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

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
            Listener::Unix { guard, .. } => Some(&guard.0),
            _ => None,
        }
    }

    /// The allow-list of a UDP or TCP listener.
    pub fn allow(&self) -> Option<&AllowList> {
        match self {
            Listener::Udp { allow, .. } | Listener::Tcp { allow, .. } => Some(allow),
            Listener::Unix { .. } => None,
        }
    }

    /// Receives datagrams until the socket fails, handing each accepted one
    /// to `handle`; `received` counts this listener's datagrams.
    pub async fn run<F>(self, stats: Arc<Stats>, received: Arc<AtomicU64>, handle: F)
    where
        F: Fn(&[u8], &Peer) + Send + Sync + 'static,
    {
        // One byte more than the limit, to tell an oversized datagram.
        let mut buf = vec![0u8; MAX_RECORD + 1];
        match self {
            Listener::Udp { socket, allow } => {
                let local = socket
                    .local_addr()
                    .map_or_else(|_| "udp".to_string(), |a| format!("udp://{a}"));
                loop {
                    let (n, peer) = match socket.recv_from(&mut buf).await {
                        Ok(x) => x,
                        Err(e) => {
                            crate::log_error!("{local}: receive failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    Stats::bump(&stats.received);
                    Stats::bump(&received);
                    let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
                    if !allowed(&allow.load(), peer.ip()) {
                        Stats::bump(&stats.dropped_peer);
                        crate::log_warning_limited!(
                            PEER_WARNINGS,
                            "{local}: datagram from {peer} dropped: peer not in allow-from"
                        );
                        continue;
                    }
                    handle(&buf[..n], &Peer::Udp(peer));
                }
            }
            Listener::Tcp { listener, allow } => {
                crate::tcp::serve(listener, allow, stats, received, Arc::new(handle)).await;
            }
            Listener::Unix { socket, guard } => {
                let peer = Peer::Unix(guard.0.to_string_lossy().into());
                // A socket we bound ourselves dies with us: at a stop, its
                // senders are refused (EPIPE; syslog-ng then keeps the
                // record and sends it to the next daemon) and what they
                // sent before is read to the end. One systemd passed
                // outlives us, and what waits in it is the next daemon's.
                let owned = guard.1;
                let _draining = owned.then(crate::shutdown::Draining::enter);
                let stop = async {
                    if owned {
                        crate::shutdown::stopping().await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::pin!(stop);
                loop {
                    let n = tokio::select! {
                        r = socket.recv(&mut buf) => match r {
                            Ok(n) => n,
                            Err(e) => {
                                crate::log_error!("{peer}: receive failed: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                        () = &mut stop => {
                            let _ = SockRef::from(&socket).shutdown(std::net::Shutdown::Read);
                            while let Ok(n) = socket.try_recv(&mut buf) {
                                Stats::bump(&stats.received);
                                Stats::bump(&received);
                                handle(&buf[..n], &peer);
                            }
                            return;
                        }
                    };
                    Stats::bump(&stats.received);
                    Stats::bump(&received);
                    handle(&buf[..n], &peer);
                }
            }
        }
    }
}

/// Whether `ip` is in the allow-list.
pub fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.iter().any(|c| c.contains(ip))
}
