//! The one accept loop: [`serve_stream`] admits each connection (allow-list,
//! limits), says who it is, bounds it with deadlines and runs the service's
//! handler on it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::bind::{Listening, StreamListener};
use super::deadline::{Deadlined, Expired, Limits, Progress};
use super::peer::{self, Cred, Peer, PeerKey};
use super::{PEER_WARNINGS, allowed};
use crate::grants::addr::canonical;
use crate::logging::RateLimit;
use crate::stats::Stats;

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One accepted connection, as its handler sees it.
pub struct Connection {
    listener: Arc<str>,
    peer: Arc<Peer>,
    progress: Arc<Progress>,
}

impl Connection {
    /// How the log names the listener (`policy tcp://127.0.0.1:10040`).
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// How the log names the peer: `tcp:ADDR:PORT`, with `(uid N)` for a
    /// local peer; `unix:PATH (uid N)`.
    pub fn peer(&self) -> &str {
        &self.peer.shown
    }

    /// A TCP peer's address (IPv4-mapped addresses as IPv4).
    pub fn tcp_peer(&self) -> Option<SocketAddr> {
        self.peer.tcp
    }

    /// A local peer's credentials, as the kernel recorded them.
    pub fn cred(&self) -> Option<&Cred> {
        self.peer.cred.as_ref()
    }

    /// The handler completed (and answered) a request: the connection is
    /// idle again, and not a candidate for shedding for a while.
    pub fn completed(&self) {
        self.progress.complete();
    }
}

static SHED_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);
static SLOW_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);
static ACCEPT_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// Accepts connections on `listener` for ever, running `handler` on each
/// one its allow-list and `limits` admit, with the deadlines of `limits`.
/// A listener marked [`StreamListener::drain_at_stop`] returns at a stop,
/// after taking the connections still waiting in its backlog; the daemon
/// waits for the handlers of its connections to end (within
/// [`crate::ingest::shutdown::DRAIN`]).
pub async fn serve_stream<H, F>(
    listener: StreamListener,
    limits: Limits,
    stats: Arc<Stats>,
    handler: H,
) where
    H: Fn(Connection, Box<dyn Io>) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let label: Arc<str> = listener.label.as_str().into();
    let served = Arc::new(Served {
        label: listener.label.clone(),
        limits,
        stats,
        base: Instant::now(),
        registry: Mutex::new(Registry::default()),
    });
    let drains = listener.drain_at_stop;
    // Held until the backlog is taken at a stop, so that the daemon waits
    // for that too.
    let _draining = drains.then(crate::ingest::shutdown::Draining::enter);
    let stop = crate::ingest::shutdown::stopping_if(drains);
    tokio::pin!(stop);
    let start = |peer: Peer, io: Accepted| {
        served.make_room(peer.key, &peer.shown);
        let progress = Arc::new(Progress::new(served.base));
        let io: Box<dyn Io> = match io {
            Accepted::Tcp(s) => Box::new(Deadlined::new(s, progress.clone(), limits)),
            Accepted::Unix(s) => Box::new(Deadlined::new(s, progress.clone(), limits)),
        };
        let peer = Arc::new(peer);
        let id = served.register(peer.clone(), progress.clone());
        let conn = Connection {
            listener: label.clone(),
            peer,
            progress: progress.clone(),
        };
        let task = handler(conn, io);
        // Counted from here, so that a stop waits for it to be read.
        let draining = drains.then(crate::ingest::shutdown::Draining::enter);
        let handle = tokio::spawn(run(served.clone(), id, progress, draining, task));
        served.set_abort(id, handle.abort_handle());
    };
    loop {
        let next = tokio::select! {
            next = accept(&listener, &served) => next,
            () = &mut stop => {
                // Accept no more: the listener closes when this returns,
                // and later senders are refused and retry. Connections
                // already made would be reset with what they sent: they
                // are taken and served to the end too.
                for (addr, io) in pending(&listener) {
                    if let Some((peer, io)) = admit(&listener, &served, addr, io) {
                        start(peer, io);
                    }
                }
                return;
            }
        };
        if let Some((peer, io)) = next {
            start(peer, io);
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// The next connection and its peer, or None for one refused (or a failed
/// accept, after a pause).
async fn accept(listener: &StreamListener, served: &Served) -> Option<(Peer, Accepted)> {
    let accepted = match &listener.socket {
        Listening::Tcp(l) => l.accept().await.map(|(s, addr)| {
            let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
            (Some(addr), Accepted::Tcp(s))
        }),
        Listening::Unix(l) => l.accept().await.map(|(s, _)| (None, Accepted::Unix(s))),
    };
    let (addr, io) = match accepted {
        Ok(x) => x,
        Err(e) => {
            served.accept_failed(&e).await;
            return None;
        }
    };
    admit(listener, served, addr, io)
}

/// The connections waiting in the backlog, taken without waiting.
fn pending(listener: &StreamListener) -> Vec<(Option<SocketAddr>, Accepted)> {
    let mut out = Vec::new();
    match &listener.socket {
        Listening::Tcp(l) => {
            for s in crate::ingest::shutdown::pending_connections(l) {
                let s = std::net::TcpStream::from(s);
                if let Ok(addr) = s.peer_addr()
                    && let Ok(s) = tokio::net::TcpStream::from_std(s)
                {
                    let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
                    out.push((Some(addr), Accepted::Tcp(s)));
                }
            }
        }
        Listening::Unix(l) => {
            for s in crate::ingest::shutdown::pending_connections(l) {
                let s = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(s));
                if let Ok(s) = tokio::net::UnixStream::from_std(s) {
                    out.push((None, Accepted::Unix(s)));
                }
            }
        }
    }
    out
}

/// An accepted connection that the listener's allow-list admits, with
/// who it is; None for one refused.
fn admit(
    listener: &StreamListener,
    served: &Served,
    addr: Option<SocketAddr>,
    io: Accepted,
) -> Option<(Peer, Accepted)> {
    if let (Some(addr), Some(allow)) = (addr, &listener.allow)
        && !allowed(&allow.load(), addr.ip())
    {
        Stats::bump(&served.stats.dropped_peer);
        crate::log_warning_limited!(
            PEER_WARNINGS,
            "{}: connection from {addr} refused: peer not in allow-from",
            served.label
        );
        return None;
    }
    let peer = match (&io, addr) {
        (Accepted::Tcp(s), Some(addr)) => peer::of_tcp(s, addr),
        (Accepted::Unix(s), _) => peer::of_unix(s, listener.socket_path().unwrap_or(".".as_ref())),
        (Accepted::Tcp(_), None) => return None,
    };
    Some((peer, io))
}

/// Runs one connection's handler, then reports a missed deadline.
async fn run<F: Future<Output = ()>>(
    served: Arc<Served>,
    id: u64,
    progress: Arc<Progress>,
    draining: Option<crate::ingest::shutdown::Draining>,
    task: F,
) {
    let _draining = draining;
    let _registered = Registered {
        served: served.clone(),
        id,
    };
    task.await;
    match progress.expired() {
        Some(Expired::Request) => {
            Stats::bump(&served.stats.timed_out_connections);
            let peer = served.peer_of(id);
            crate::log_warning_limited!(
                SLOW_WARNINGS,
                "{}: connection from {peer} closed: a request was not complete (or its answer not taken) within {}s",
                served.label,
                served.limits.request.as_secs()
            );
        }
        Some(Expired::Idle) => {
            crate::log_debug!(
                "{}: connection from {} closed after being idle",
                served.label,
                served.peer_of(id)
            );
        }
        None => {}
    }
}

/// One listener's connections.
struct Served {
    label: String,
    limits: Limits,
    stats: Arc<Stats>,
    base: Instant,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    conns: HashMap<u64, Entry>,
    per_peer: HashMap<PeerKey, usize>,
}

struct Entry {
    peer: Arc<Peer>,
    progress: Arc<Progress>,
    abort: Option<AbortHandle>,
}

impl Registry {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&e.peer.key) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&e.peer.key);
            }
        }
        Some(e)
    }

    /// The connection that has waited longest without completing a
    /// request, among those of `key` (all when None).
    fn longest_waiting(&self, key: Option<PeerKey>) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, e)| key.is_none_or(|k| e.peer.key == k))
            .min_by_key(|(id, e)| (e.progress.waiting_since(), **id))
            .map(|(id, _)| *id)
    }
}

impl Served {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        match self.registry.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn register(&self, peer: Arc<Peer>, progress: Arc<Progress>) -> u64 {
        let mut r = self.lock();
        let id = r.next;
        r.next += 1;
        *r.per_peer.entry(peer.key).or_default() += 1;
        r.conns.insert(
            id,
            Entry {
                peer,
                progress,
                abort: None,
            },
        );
        id
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        if let Some(e) = self.lock().conns.get_mut(&id) {
            e.abort = Some(abort);
        }
    }

    fn peer_of(&self, id: u64) -> String {
        self.lock()
            .conns
            .get(&id)
            .map_or_else(|| "a peer".to_string(), |e| e.peer.shown.clone())
    }

    /// Before admitting a connection of `key`: if its peer, or the
    /// listener, is at the limit, sheds the connection that has waited
    /// longest without completing a request (the peer's own, if the peer
    /// is at its limit).
    fn make_room(&self, key: PeerKey, newcomer: &str) {
        let mut r = self.lock();
        let peer_full = r.per_peer.get(&key).copied().unwrap_or(0) >= self.limits.per_peer;
        let all_full = r.conns.len() >= self.limits.total;
        if !peer_full && !all_full {
            return;
        }
        let Some(victim) = r.longest_waiting(peer_full.then_some(key)) else {
            return;
        };
        let Some(e) = r.remove(victim) else { return };
        drop(r);
        let why = if peer_full {
            format!(
                "that peer has {} connections open, the most one peer may",
                self.limits.per_peer
            )
        } else {
            format!(
                "{} connections are open, the most this listener serves",
                self.limits.total
            )
        };
        self.shed(e, newcomer, &why);
    }

    /// Closes a connection taken out of the registry, and says why.
    fn shed(&self, e: Entry, newcomer: &str, why: &str) {
        if let Some(a) = &e.abort {
            a.abort();
        }
        Stats::bump(&self.stats.dropped_connections);
        crate::log_warning_limited!(
            SHED_WARNINGS,
            "{}: closed the connection from {}, which had waited {}s without completing a request, to make room for one from {newcomer}: {why}",
            self.label,
            e.peer.shown,
            e.progress.waited().as_secs()
        );
    }

    /// A failed accept: out of descriptors, the longest-waiting connection
    /// makes room; in any case, a short pause before the next.
    async fn accept_failed(&self, e: &std::io::Error) {
        crate::log_warning_limited!(ACCEPT_WARNINGS, "{}: accept failed: {e}", self.label);
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            let mut r = self.lock();
            if let Some(e) = r.longest_waiting(None).and_then(|id| r.remove(id)) {
                drop(r);
                self.shed(
                    e,
                    "a peer waiting to connect",
                    "the daemon has no file descriptor left",
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes a connection out of its listener's registry when its task ends.
struct Registered {
    served: Arc<Served>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.served.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    /// A line service: answers each line with "ok", on a unix socket.
    fn start(limits: Limits) -> (tempfile::TempDir, std::path::PathBuf, Arc<Stats>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let access = crate::net::Access::default();
        let l = StreamListener::bind_unix(&path, &access, "test").unwrap();
        let stats = Arc::new(Stats::default());
        tokio::spawn(serve_stream(
            l,
            limits,
            stats.clone(),
            |conn, io| async move {
                let (r, mut w) = tokio::io::split(io);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(_)) = lines.next_line().await {
                    if w.write_all(b"ok\n").await.is_err() {
                        return;
                    }
                    conn.completed();
                }
            },
        ));
        (dir, path, stats)
    }

    async fn ask(s: &mut UnixStream) -> bool {
        if s.write_all(b"q\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 3];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        )
    }

    /// True when the server closed the connection.
    async fn closed(s: &mut UnixStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn pause() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_peer_at_its_limit_loses_its_longest_waiting_connection() {
        let limits = Limits {
            total: 100,
            per_peer: 2,
            request: Duration::from_secs(100),
            idle: Duration::from_secs(300),
            lifetime: None,
        };
        let (_dir, path, stats) = start(limits);
        let mut a = UnixStream::connect(&path).await.unwrap();
        pause().await;
        let mut b = UnixStream::connect(&path).await.unwrap();
        pause().await;
        // A completes a request after B connected: B has waited longest.
        assert!(ask(&mut a).await);
        pause().await;
        let mut c = UnixStream::connect(&path).await.unwrap();
        assert!(
            closed(&mut b).await,
            "the longest-waiting connection is shed"
        );
        assert!(ask(&mut a).await && ask(&mut c).await);
        assert_eq!(
            stats
                .dropped_connections
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn a_full_listener_sheds_the_longest_waiting_of_all() {
        let limits = Limits {
            total: 3,
            per_peer: 100,
            request: Duration::from_secs(100),
            idle: Duration::from_secs(300),
            lifetime: None,
        };
        let (_dir, path, _stats) = start(limits);
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(UnixStream::connect(&path).await.unwrap());
            pause().await;
        }
        assert!(ask(&mut conns[0]).await);
        pause().await;
        let mut d = UnixStream::connect(&path).await.unwrap();
        assert!(closed(&mut conns[1]).await);
        assert!(ask(&mut conns[0]).await && ask(&mut conns[2]).await && ask(&mut d).await);
    }

    #[tokio::test]
    async fn a_slow_request_is_cut_and_counted() {
        let limits = Limits {
            total: 10,
            per_peer: 10,
            request: Duration::from_millis(200),
            idle: Duration::from_secs(300),
            lifetime: None,
        };
        let (_dir, path, stats) = start(limits);
        let mut slow = UnixStream::connect(&path).await.unwrap();
        slow.write_all(b"half a requ").await.unwrap();
        assert!(closed(&mut slow).await);
        let counted = async {
            while stats
                .timed_out_connections
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            {
                pause().await;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(5), counted)
                .await
                .is_ok()
        );
    }
}
