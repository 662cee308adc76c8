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
//! shut out another ([`crate::ingest::tcp::LIMITS`]). A unix socket is trusted as
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{UdpSocket, UnixDatagram};

use crate::grants::addr::canonical;
use crate::ingest::record::MAX_RECORD;
use crate::logging::RateLimit;
use crate::net::{
    self, Access, Adopted, AllowList, PEER_WARNINGS, SocketFile, StreamListener, UnixKind, allowed,
};
use crate::service::config::ListenSpec;
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
    /// [`net::serve_stream`] with [`crate::ingest::tcp::LIMITS`].
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
            net::set_datagram_buffer(&SockRef::from(&socket), &what, recv_buffer);
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
                run_udp(socket, allow, stats, received, handle).await
            }
            Listener::Tcp(l) => run_tcp(l, stats, received, handle).await,
            Listener::Unix { socket, file } => {
                run_unix(socket, file, &stats, &received, handle).await;
            }
        }
    }
}

/// Datagrams a UDP receive thread reads with one `recvmmsg` call.
const BATCH: usize = 64;

/// Tells the receive thread that the daemon stops (or its listener is
/// gone): a flag, and an eventfd the thread polls beside the socket (so
/// that it sleeps until one of them is readable, and costs nothing while
/// the socket is idle).
struct ThreadStop {
    stopping: AtomicBool,
    wake: std::os::fd::OwnedFd,
}

impl ThreadStop {
    fn stop(&self) {
        use std::os::fd::AsRawFd;
        self.stopping.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a u64 we own to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Stops the receive thread when the listener's task ends, however it ends.
struct StopOnDrop(Arc<ThreadStop>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A new eventfd, or why not.
fn eventfd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd has no memory preconditions; a valid descriptor it
    // returns is ours alone.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Receives datagrams from the allowed peers of a UDP socket.
///
/// A thread of its own reads the socket (up to [`BATCH`] datagrams a
/// `recvmmsg` call) and hands each datagram to the pipeline itself: the
/// socket is read as soon as the kernel wakes the thread, and a busy flow
/// costs no wake-ups of the runtime's threads, so that the kernel's buffer
/// does not overflow while a task waits for a core. Each datagram keeps its
/// own peer address, checked against the allow-list as before.
async fn run_udp<F>(
    socket: UdpSocket,
    allow: AllowList,
    stats: Arc<Stats>,
    received: Arc<AtomicU64>,
    handle: F,
) where
    F: Fn(&[u8], &Peer) + Send + Sync + 'static,
{
    use std::os::fd::AsFd;
    let local = socket
        .local_addr()
        .map_or_else(|_| "udp".to_string(), |a| format!("udp://{a}"));
    let handle = Arc::new(handle);
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<u64>();
    let thread = eventfd().and_then(|wake| {
        let stop = Arc::new(ThreadStop {
            stopping: AtomicBool::new(false),
            wake,
        });
        let fd = socket.as_fd().try_clone_to_owned()?;
        let theirs = stop.clone();
        let (allow, stats, received, handle, local) = (
            allow.clone(),
            stats.clone(),
            received.clone(),
            handle.clone(),
            local.clone(),
        );
        std::thread::Builder::new()
            .name("udp-receive".to_string())
            .spawn(move || {
                let each = |bytes: &[u8], peer: SocketAddr| {
                    accept(bytes, peer, &allow, &stats, &received, &*handle, &local)
                };
                let drained = receive_thread(fd, each, &theirs, &local);
                let _ = done_tx.send(drained);
            })?;
        Ok(stop)
    });
    let stop = match thread {
        Ok(stop) => StopOnDrop(stop),
        Err(e) => {
            crate::log_warning!(
                "{local}: no receive thread ({e}): receiving in the pipeline's task"
            );
            let each = |b: &[u8], p: &Peer| handle(b, p);
            return run_udp_in_task(socket, allow, &stats, &received, each, &local).await;
        }
    };
    // At a stop the queue is read to the end ([`crate::ingest::shutdown`]):
    // the thread reads the socket until it is empty (for at most
    // [`crate::ingest::shutdown::DRAIN`]), then ends. The socket stays open
    // after that, until the daemon has read the kernel's count of what it
    // dropped, and the task is ended.
    let draining = crate::ingest::shutdown::Draining::enter();
    tokio::select! {
        () = crate::ingest::shutdown::stopping() => {
            stop.0.stop();
            let wait = crate::ingest::shutdown::DRAIN + Duration::from_millis(100);
            if let Ok(Ok(n)) = tokio::time::timeout(wait, done_rx).await {
                crate::ingest::shutdown::count_queued(n);
            }
            drop(draining);
            std::future::pending::<()>().await;
        }
        _ = &mut done_rx => {
            // The thread stopped: it said why. Go on in this task.
            drop(draining);
            let each = |b: &[u8], p: &Peer| handle(b, p);
            run_udp_in_task(socket, allow, &stats, &received, each, &local).await;
        }
    }
}

/// Counts one datagram from `peer` and hands it on, if its peer is allowed.
fn accept<F>(
    bytes: &[u8],
    peer: SocketAddr,
    allow: &AllowList,
    stats: &Stats,
    received: &AtomicU64,
    handle: &F,
    local: &str,
) where
    F: Fn(&[u8], &Peer),
{
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
}

/// Logs (rate-limited) that a receive on the socket `what` failed, and
/// says how long to pause before the next, so that a failing socket does
/// not spin.
fn receive_failed(what: impl std::fmt::Display, e: &std::io::Error) -> Duration {
    crate::log_warning_limited!(RECEIVE_WARNINGS, "{what}: receive failed: {e}");
    Duration::from_millis(100)
}

/// Sleeps until `raw` is readable or `stop` is (the caller reads the stop
/// flag itself).
fn wait_readable(raw: std::os::fd::RawFd, stop: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut pfd = [
        libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll on two pollfds we own; no timeout: the thread
    // sleeps until a datagram or the stop arrives.
    unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
}

/// Hands each datagram `recvmmsg` put in `msgs` (slots of `slot` bytes of
/// `bufs`, source addresses in `names`) to `each`, with its sender.
fn each_received(
    msgs: &[libc::mmsghdr],
    names: &mut [socket2::SockAddrStorage],
    bufs: &[u8],
    slot: usize,
    each: &impl Fn(&[u8], SocketAddr),
) {
    for (i, m) in msgs.iter().enumerate() {
        let len = (m.msg_len as usize).min(slot);
        // SAFETY: the kernel wrote msg_namelen bytes of an address
        // into names[i], a sockaddr_storage.
        let storage = std::mem::replace(&mut names[i], socket2::SockAddrStorage::zeroed());
        let addr = unsafe { socket2::SockAddr::new(storage, m.msg_hdr.msg_namelen) };
        // A UDP datagram always has a source address; one that does
        // not read as one is not believed to come from anywhere.
        let Some(peer) = addr.as_socket() else {
            continue;
        };
        each(&bufs[i * slot..i * slot + len], peer);
    }
}

/// The receive thread of a UDP socket (`fd`, a duplicate of the listener's
/// descriptor, non-blocking as the listener is): reads batches with
/// `recvmmsg` and hands each datagram to `each`, until `stop` says so; then
/// reads what is still queued (for at most
/// [`crate::ingest::shutdown::DRAIN`]) and returns how many that was.
fn receive_thread(
    fd: std::os::fd::OwnedFd,
    each: impl Fn(&[u8], SocketAddr),
    stop: &ThreadStop,
    local: &str,
) -> u64 {
    use std::os::fd::AsRawFd;
    // One byte more than the limit, to tell an oversized datagram.
    const SLOT: usize = MAX_RECORD + 1;
    let raw = fd.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * SLOT];
    // SAFETY: sockaddr_storage and mmsghdr are plain old data, valid when
    // zeroed.
    let mut names: Vec<socket2::SockAddrStorage> = (0..BATCH)
        .map(|_| socket2::SockAddrStorage::zeroed())
        .collect();
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_mut(SLOT)
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    // Set once the stop is seen: when, and what was read since.
    let mut draining: Option<(std::time::Instant, u64)> = None;
    loop {
        if draining.is_none() && stop.stopping.load(Ordering::SeqCst) {
            draining = Some((std::time::Instant::now(), 0));
        }
        if let Some((since, n)) = draining
            && since.elapsed() >= crate::ingest::shutdown::DRAIN
        {
            return n;
        }
        for ((m, iov), name) in msgs.iter_mut().zip(iovs.iter_mut()).zip(names.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (name as *mut socket2::SockAddrStorage).cast();
            m.msg_hdr.msg_namelen = name.size_of();
            m.msg_len = 0;
        }
        // SAFETY: msgs holds BATCH headers, each pointing at its own slot
        // of bufs and its own address buffer, all alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                raw,
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if n < 0
                && !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                )
            {
                if let Some((_, n)) = draining {
                    return n;
                }
                std::thread::sleep(receive_failed(local, &e));
                continue;
            }
            // The queue is empty.
            if let Some((_, n)) = draining {
                return n;
            }
            wait_readable(raw, &stop.wake);
            continue;
        }
        each_received(&msgs[..n as usize], &mut names, &bufs, SLOT, &each);
        if let Some((_, read)) = &mut draining {
            *read += n as u64;
        }
    }
}

/// Receives datagrams from the allowed peers of a UDP socket in the
/// pipeline's task, one `recv_from` each: when no receive thread could be
/// started.
async fn run_udp_in_task<F>(
    socket: UdpSocket,
    allow: AllowList,
    stats: &Stats,
    received: &AtomicU64,
    handle: F,
    local: &str,
) where
    F: Fn(&[u8], &Peer),
{
    // One byte more than the limit, to tell an oversized datagram.
    let mut buf = vec![0u8; MAX_RECORD + 1];
    // At a stop the queue is read to the end ([`crate::ingest::shutdown`]); the
    // socket stays open after that, as above.
    let draining = crate::ingest::shutdown::Draining::enter();
    let stop = crate::ingest::shutdown::stopping();
    tokio::pin!(stop);
    let each = |bytes: &[u8], peer: SocketAddr| {
        accept(bytes, peer, &allow, stats, received, &handle, local)
    };
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tokio::time::sleep(receive_failed(local, &e)).await;
                    continue;
                }
            },
            () = &mut stop => {
                crate::ingest::shutdown::drain_queue(&socket, &mut buf, |d, from| {
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
    // ([`crate::ingest::shutdown`]). One systemd passed outlives us, and what
    // waits in it is the next daemon's.
    let owned = file.owned();
    let _draining = owned.then(crate::ingest::shutdown::Draining::enter);
    let stop = crate::ingest::shutdown::stopping_if(owned);
    tokio::pin!(stop);
    loop {
        let n = tokio::select! {
            r = socket.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => {
                    tokio::time::sleep(receive_failed(&peer, &e)).await;
                    continue;
                }
            },
            () = &mut stop => {
                crate::ingest::shutdown::refuse_and_drain(&socket, &mut buf, |d| {
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
/// frames, within the limits of [`crate::ingest::tcp::LIMITS`].
async fn run_tcp<F>(l: StreamListener, stats: Arc<Stats>, received: Arc<AtomicU64>, handle: F)
where
    F: Fn(&[u8], &Peer) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    let served = stats.clone();
    // Logins sent before a stop are read to the end ([`crate::ingest::shutdown`]).
    let l = l.drain_at_stop();
    net::serve_stream(l, crate::ingest::tcp::LIMITS, served, move |conn, io| {
        let (stats, received, handle) = (stats.clone(), received.clone(), handle.clone());
        async move {
            let Some(addr) = conn.tcp_peer() else { return };
            let peer = Peer::Tcp(addr);
            crate::ingest::tcp::session(conn, io, &stats, &received, |frame| handle(frame, &peer))
                .await;
        }
    })
    .await;
}
