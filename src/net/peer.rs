//! Who is at the other end of a connection, as the kernel says, and what
//! the per-peer limit counts it as.
//!
//! A local peer is its uid, whatever address it connects from: a unix
//! socket's SO_PEERCRED, or, for a TCP connection between two addresses of
//! this host, the owner of the peer's socket as /proc/self/net/tcp lists it
//! (so a local user cannot pass for rsyslog by connecting from 127.0.0.1,
//! nor get a fresh allowance from each of 127.0.0.2, 127.0.0.3...). A
//! remote peer is its IPv4 address or its IPv6 /64, the block one host
//! usually has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;

use tokio::net::{TcpStream, UnixStream};

use crate::grants::addr::canonical;

/// A local peer's credentials, as the kernel recorded them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cred {
    /// Its uid.
    pub uid: u32,
    /// Its gid (unix sockets only).
    pub gid: Option<u32>,
    /// Its supplementary groups (unix sockets only, SO_PEERGROUPS).
    pub groups: Vec<u32>,
}

/// What the per-peer limit counts a connection as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PeerKey {
    /// A local peer.
    Uid(u32),
    /// A remote IPv4 peer.
    V4(Ipv4Addr),
    /// A remote IPv6 peer's /64.
    V6(u64),
    /// A unix peer whose credentials could not be read.
    Unknown,
}

/// One connection's peer.
#[derive(Debug)]
pub(crate) struct Peer {
    /// A TCP peer's address (IPv4-mapped addresses as IPv4).
    pub tcp: Option<SocketAddr>,
    /// A local peer's credentials.
    pub cred: Option<Cred>,
    /// What the per-peer limit counts it as.
    pub key: PeerKey,
    /// How the log names it: `tcp:ADDR:PORT`, with `(uid N)` for a local
    /// peer; `unix:PATH (uid N)`.
    pub shown: String,
}

/// The peer of an accepted TCP connection from `addr`.
pub(crate) fn of_tcp(stream: &TcpStream, addr: SocketAddr) -> Peer {
    let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
    let local = stream
        .local_addr()
        .ok()
        .map(|l| SocketAddr::new(canonical(l.ip()), l.port()));
    let same_host = local.is_some_and(|l| addr.ip().is_loopback() || addr.ip() == l.ip());
    let uid = local
        .filter(|_| same_host)
        .and_then(|l| local_owner(addr, l));
    let key = match (uid, addr.ip()) {
        (Some(uid), _) => PeerKey::Uid(uid),
        (None, IpAddr::V4(v4)) => PeerKey::V4(v4),
        (None, IpAddr::V6(v6)) => PeerKey::V6((u128::from(v6) >> 64) as u64),
    };
    let shown = match uid {
        Some(uid) => format!("tcp:{addr} (uid {uid})"),
        None => format!("tcp:{addr}"),
    };
    Peer {
        tcp: Some(addr),
        cred: uid.map(|uid| Cred {
            uid,
            gid: None,
            groups: Vec::new(),
        }),
        key,
        shown,
    }
}

/// The peer of an accepted connection on the unix socket at `path`.
pub(crate) fn of_unix(stream: &UnixStream, path: &Path) -> Peer {
    let cred = stream.peer_cred().ok().map(|c| Cred {
        uid: c.uid(),
        gid: Some(c.gid()),
        groups: peer_groups(stream),
    });
    let (key, shown) = match &cred {
        Some(c) => (
            PeerKey::Uid(c.uid),
            format!("unix:{} (uid {})", path.display(), c.uid),
        ),
        None => (PeerKey::Unknown, format!("unix:{}", path.display())),
    };
    Peer {
        tcp: None,
        cred,
        key,
        shown,
    }
}

/// The supplementary groups of a unix peer, as the kernel recorded them
/// when it connected (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// The uid owning the TCP socket of this host bound to `client` and
/// connected to `server`.
fn local_owner(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    // /proc/self/net, not /proc/net, which systemd's ProcSubset=pid hides.
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(uid) = text
            .lines()
            .skip(1)
            .find_map(|l| owner_in_line(l, client, server))
        {
            return Some(uid);
        }
    }
    None
}

/// The uid of one line of /proc/net/tcp if it is the socket wanted:
/// `sl local rem st tx:rx tr:when retrnsmt uid ...`.
fn owner_in_line(line: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let mut f = line.split_whitespace();
    let _slot = f.next()?;
    if proc_addr(f.next()?)? != client || proc_addr(f.next()?)? != server {
        return None;
    }
    f.nth(4)?.parse().ok()
}

/// An address as /proc/net/tcp writes it: the address's bytes as
/// native-endian 32-bit words in hex, a colon, the port in hex.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            canonical(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_addresses() {
        // As the kernel writes them on a little-endian machine.
        if cfg!(target_endian = "little") {
            assert_eq!(
                proc_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                proc_addr("0000000000000000FFFF00000100007F:0035"),
                Some("127.0.0.1:53".parse().unwrap())
            );
            assert_eq!(
                proc_addr("00000000000000000000000001000000:0016"),
                Some("[::1]:22".parse().unwrap())
            );
        }
        assert_eq!(proc_addr("zz:1"), None);
        assert_eq!(proc_addr("0100007F"), None);
    }

    #[tokio::test]
    async fn a_loopback_peer_is_its_uid() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let client = std::net::TcpStream::connect(to).unwrap();
        let (stream, addr) = l.accept().await.unwrap();
        assert_eq!(addr, client.local_addr().unwrap());
        let peer = of_tcp(&stream, addr);
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer.key, PeerKey::Uid(me));
        assert_eq!(peer.shown, format!("tcp:{addr} (uid {me})"));
    }

    #[test]
    fn a_line_of_proc_net_tcp_gives_its_owner() {
        let line = "   0: 0100007F:1F90 0100007F:0035 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1";
        if cfg!(target_endian = "little") {
            let (client, server) = (
                "127.0.0.1:8080".parse().unwrap(),
                "127.0.0.1:53".parse().unwrap(),
            );
            assert_eq!(owner_in_line(line, client, server), Some(1000));
            assert_eq!(owner_in_line(line, server, client), None);
        }
    }
}
