//! Binding: UDP and TCP sockets, the sockets systemd passes, and the
//! stream listeners the services are served on.

use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, UdpSocket, UnixDatagram, UnixListener};

use super::{AllowList, SocketFile};

/// What kind of socket a descriptor is, as the kernel says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A UDP socket.
    Udp,
    /// A listening TCP socket.
    Tcp,
    /// A unix datagram socket.
    UnixDatagram,
    /// A listening unix stream socket.
    UnixStream,
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the size given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// What the socket `fd` is: `Err(())` when it is no socket at all, `Ok(None)`
/// when it is a socket of a kind the daemon does not serve.
#[allow(clippy::result_unit_err)]
pub fn kind_of(fd: RawFd) -> Result<Option<Kind>, ()> {
    let ty = sockopt(fd, libc::SO_TYPE).ok_or(())?;
    let domain = sockopt(fd, libc::SO_DOMAIN).unwrap_or(-1);
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).unwrap_or(0) == 1;
    Ok(match (domain, ty) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM) => Some(Kind::Udp),
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) if listening => Some(Kind::Tcp),
        (libc::AF_UNIX, libc::SOCK_DGRAM) => Some(Kind::UnixDatagram),
        (libc::AF_UNIX, libc::SOCK_STREAM) if listening => Some(Kind::UnixStream),
        _ => None,
    })
}

/// An IP socket of `ty`, dual-stack on `[::]` (IPv4 peers arrive
/// IPv4-mapped and are turned back into IPv4 before any check).
fn ip_socket(addr: SocketAddr, ty: Type, what: &str) -> Result<Socket, String> {
    let proto = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))
        .map_err(|e| format!("cannot create a socket for {what}: {e}"))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(false)
            .map_err(|e| format!("cannot make {what} dual-stack: {e}"))?;
    }
    Ok(socket)
}

/// Binds a UDP socket for `what` (named in messages).
pub fn bind_udp(
    addr: SocketAddr,
    recv_buffer: Option<usize>,
    what: &str,
) -> Result<UdpSocket, String> {
    let socket = ip_socket(addr, Type::DGRAM, what)?;
    set_datagram_buffer(&SockRef::from(&socket), what, recv_buffer);
    socket
        .bind(&addr.into())
        .map_err(|e| format!("cannot bind {what}: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make {what} non-blocking: {e}"))?;
    UdpSocket::from_std(socket.into()).map_err(|e| format!("cannot register {what}: {e}"))
}

/// Binds a listening TCP socket for `what` (named in messages).
pub fn bind_tcp(
    addr: SocketAddr,
    recv_buffer: Option<usize>,
    what: &str,
) -> Result<TcpListener, String> {
    let socket = ip_socket(addr, Type::STREAM, what)?;
    socket
        .set_reuse_address(true)
        .map_err(|e| format!("cannot set SO_REUSEADDR on {what}: {e}"))?;
    set_recv_buffer(&SockRef::from(&socket), what, recv_buffer);
    socket
        .bind(&addr.into())
        .map_err(|e| format!("cannot bind {what}: {e}"))?;
    socket
        .listen(512)
        .map_err(|e| format!("cannot listen on {what}: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make {what} non-blocking: {e}"))?;
    TcpListener::from_std(socket.into()).map_err(|e| format!("cannot register {what}: {e}"))
}

/// The receive buffer a datagram listener asks for when `--receive-buffer`
/// is not given: 8 MiB holds some 10,000 small records, a tenth of a second
/// at 100,000 a second, so that a receiver the scheduler leaves waiting for
/// a few milliseconds (the machine busy) loses nothing. The kernel's own
/// default (212,992 bytes) holds about 270.
pub const DATAGRAM_BUFFER: usize = 8 << 20;

/// Asks for a datagram listener's receive buffer: `size`, or
/// [`DATAGRAM_BUFFER`]. As root (before privileges are given up) the
/// kernel's cap, `net.core.rmem_max`, does not apply (SO_RCVBUFFORCE, as
/// systemd's ReceiveBuffer= does); otherwise the buffer is capped, and a
/// warning says so only for a size the administrator asked for.
pub fn set_datagram_buffer(sock: &SockRef<'_>, what: &str, size: Option<usize>) {
    let asked = size.unwrap_or(DATAGRAM_BUFFER);
    if force_recv_buffer(sock, asked) {
        return;
    }
    if size.is_some() {
        set_recv_buffer(sock, what, size);
    } else {
        // Capped at rmem_max: as much as the kernel allows.
        let _ = sock.set_recv_buffer_size(asked);
    }
}

/// SO_RCVBUFFORCE: needs CAP_NET_ADMIN; true when it took.
fn force_recv_buffer(sock: &SockRef<'_>, size: usize) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(value) = libc::c_int::try_from(size) else {
        return false;
    };
    // SAFETY: setsockopt reads one c_int from a value we own, on a socket
    // descriptor we hold.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Asks for a receive buffer of `size` bytes, warning when the kernel
/// grants less.
pub fn set_recv_buffer(sock: &SockRef<'_>, what: &str, size: Option<usize>) {
    let Some(size) = size else { return };
    if let Err(e) = sock.set_recv_buffer_size(size) {
        crate::log_warning!("{what}: cannot set the receive buffer to {size} bytes: {e}");
        return;
    }
    // Linux reports twice the size it grants (the rest is bookkeeping).
    if let Ok(got) = sock.recv_buffer_size() {
        let granted = got / 2;
        if granted < size {
            crate::log_warning!(
                "{what}: asked for a receive buffer of {size} bytes, the kernel granted {granted}; raise net.core.rmem_max to allow more"
            );
        }
    }
}

/// A socket systemd passed, ready for the runtime.
#[derive(Debug)]
pub enum Adopted {
    /// A UDP socket.
    Udp(UdpSocket),
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// A unix datagram socket, and its file (systemd's to remove).
    UnixDatagram(UnixDatagram, SocketFile),
    /// A listening unix stream socket, and its file (systemd's to remove).
    UnixStream(UnixListener, SocketFile),
}

/// Takes over a socket systemd passed: `kind` is what [`kind_of`] said,
/// `path` its file (unix sockets), `what` how messages name it.
pub fn adopt(fd: OwnedFd, kind: Kind, path: PathBuf, what: &str) -> Result<Adopted, String> {
    let nonblocking =
        |r: std::io::Result<()>| r.map_err(|e| format!("cannot make {what} non-blocking: {e}"));
    let registered = |e: std::io::Error| format!("cannot register {what}: {e}");
    Ok(match kind {
        Kind::Udp => {
            let std = std::net::UdpSocket::from(fd);
            nonblocking(std.set_nonblocking(true))?;
            Adopted::Udp(UdpSocket::from_std(std).map_err(registered)?)
        }
        Kind::Tcp => {
            let std = std::net::TcpListener::from(fd);
            nonblocking(std.set_nonblocking(true))?;
            Adopted::Tcp(TcpListener::from_std(std).map_err(registered)?)
        }
        Kind::UnixDatagram => {
            let std = std::os::unix::net::UnixDatagram::from(fd);
            nonblocking(std.set_nonblocking(true))?;
            let socket = UnixDatagram::from_std(std).map_err(registered)?;
            Adopted::UnixDatagram(socket, SocketFile::borrowed(path))
        }
        Kind::UnixStream => {
            let std = std::os::unix::net::UnixListener::from(fd);
            nonblocking(std.set_nonblocking(true))?;
            let l = UnixListener::from_std(std).map_err(registered)?;
            Adopted::UnixStream(l, SocketFile::borrowed(path))
        }
    })
}

/// A bound stream listener, ready for [`super::serve_stream`].
#[derive(Debug)]
pub struct StreamListener {
    pub(crate) socket: Listening,
    /// How the log names it (`policy tcp://127.0.0.1:10040`).
    pub(crate) label: String,
    pub(crate) allow: Option<AllowList>,
    pub(crate) file: Option<SocketFile>,
    /// Whether a stop takes its backlog and waits for its connections
    /// ([`StreamListener::drain_at_stop`]).
    pub(crate) drain_at_stop: bool,
}

#[derive(Debug)]
pub(crate) enum Listening {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl StreamListener {
    /// A TCP listener that admits the peers in `allow`.
    pub fn tcp(listener: TcpListener, label: String, allow: AllowList) -> StreamListener {
        StreamListener {
            socket: Listening::Tcp(listener),
            label,
            allow: Some(allow),
            file: None,
            drain_at_stop: false,
        }
    }

    /// A unix stream listener, with its socket file.
    pub fn unix(listener: UnixListener, file: SocketFile, label: String) -> StreamListener {
        StreamListener {
            socket: Listening::Unix(listener),
            label,
            allow: None,
            file: Some(file),
            drain_at_stop: false,
        }
    }

    /// Binds a unix stream socket at `path` with `access` for `what`.
    pub fn bind_unix(
        path: &Path,
        access: &super::Access,
        what: &str,
    ) -> Result<StreamListener, String> {
        let (socket, file) = super::bind_unix(path, super::UnixKind::Stream, access, what)?;
        let l = UnixListener::from_std(socket.into())
            .map_err(|e| format!("{what}: cannot register the socket: {e}"))?;
        Ok(StreamListener::unix(l, file, what.to_string()))
    }

    /// Marks a listener whose senders must lose nothing at a stop (TCP
    /// syslog): [`super::serve_stream`] then takes the connections waiting
    /// in its backlog before it closes, and the daemon waits for the
    /// connections' handlers to end ([`crate::ingest::shutdown`]).
    pub fn drain_at_stop(mut self) -> StreamListener {
        self.drain_at_stop = true;
        self
    }

    /// The allow-list of a TCP listener.
    pub fn allow(&self) -> Option<&AllowList> {
        self.allow.as_ref()
    }

    /// The socket file of a unix listener.
    pub fn socket_path(&self) -> Option<&Path> {
        self.file.as_ref().map(SocketFile::path)
    }

    /// How the log names it.
    pub fn label(&self) -> &str {
        &self.label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_datagram_listener_asks_for_its_own_buffer() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let s = bind_udp(addr, None, "test").unwrap();
        // Linux reports twice what it granted.
        let granted = SockRef::from(&s).recv_buffer_size().unwrap() / 2;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(granted, DATAGRAM_BUFFER, "root is not capped by rmem_max");
        } else {
            let cap: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            assert_eq!(
                granted,
                DATAGRAM_BUFFER.min(cap),
                "as much as rmem_max allows"
            );
        }
        // Asked for explicitly, the size is what is asked.
        let s = bind_udp(addr, Some(1 << 20), "test").unwrap();
        let granted = SockRef::from(&s).recv_buffer_size().unwrap() / 2;
        assert!(granted >= 1 << 20 || unsafe { libc::geteuid() } != 0);
    }
}
