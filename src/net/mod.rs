//! The network layer: every socket the daemon listens on is bound, guarded
//! and served here, the same way for each service.
//!
//! Consumes: addresses and unix socket paths from the configuration, each
//! unix socket with its owner, group and mode ([`Access`]); sockets systemd
//! passed ([`adopt`]); connections accepted on stream listeners.
//! Produces: bound sockets ([`bind_udp`], [`bind_tcp`], [`bind_unix`]),
//! whose files are removed when they are dropped ([`SocketFile`]); and, for
//! each accepted connection that its listener's allow-list and limits let
//! in, a [`Connection`] (who the kernel says is at the other end) and its
//! byte stream, handed to the service's handler by [`serve_stream`]. That is
//! the one accept loop of TCP syslog ingest, the policy service, the
//! socketmap, the metrics endpoint and the control socket, as Postfix's
//! master skeleton runs each service's callback.
//! Trusts: the kernel's word on who connected, and nothing a peer sends: a
//! TCP peer's address (checked against the listener's allow-list before a
//! byte is read), the owner of the peer's socket when both ends are on this
//! host (/proc/self/net/tcp), and SO_PEERCRED on a unix socket. A unix
//! socket is trusted as far as its file's owner, group and mode reach; a
//! new file is usable by its owner alone until it has its group and mode.
//!
//! # No peer shuts out another
//!
//! Each stream service has its [`Limits`]: connections at once per peer
//! (one uid for a local peer, whatever address it connects from; one IPv4
//! address or IPv6 /64 for a remote one) and per listener, and deadlines in
//! line with Postfix's own policy client: a request must be complete, and
//! its answer written, within `request` of its first byte; a connection may
//! wait `idle` between requests; and one older than `lifetime` is closed
//! when it is next idle. When a new connection finds its peer, or the
//! listener, at the limit, the connection that has waited longest without
//! completing a request (its peer's own, when the peer is at its limit) is
//! closed to make room, so that holding slow connections only ever costs
//! the one who holds them. Every warning on these paths is rate-limited.

mod bind;
mod deadline;
pub mod http;
mod peer;
mod serve;
mod unix;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::grants::addr::Cidr;
use crate::logging::RateLimit;
use crate::swap::Swap;

pub use bind::{
    Adopted, Kind, StreamListener, adopt, bind_tcp, bind_udp, kind_of, set_datagram_buffer,
};
pub use deadline::Limits;
pub use peer::Cred;
pub use serve::{Connection, Io, serve_stream};
pub use unix::{Access, SocketFile, UnixKind, bind_unix, mode_text};

/// A listener's allow-list, replaced by a reload.
pub type AllowList = Arc<Swap<Vec<Cidr>>>;

/// Whether `ip` is in the allow-list.
pub fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.iter().any(|c| c.contains(ip))
}

/// Rate limit of the warnings about refused peers.
pub static PEER_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);

/// Raises the soft limit on open files towards the hard limit (at most
/// `want`), so that the services' connection limits, not the descriptor
/// limit, decide which connection gives way. Returns the soft limit in
/// force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = want.min(lim.rlim_max);
        if lim.rlim_cur < target {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = target;
            }
        }
    }
    lim.rlim_cur
}
