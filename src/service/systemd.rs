//! systemd integration: readiness notification (`Type=notify`) and socket
//! activation (a `.socket` unit handing over the listening sockets).
//!
//! Consumes: the environment systemd sets (`NOTIFY_SOCKET`, `LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`) and the file descriptors it passes.
//! Produces: sd_notify messages (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `STATUS=...`); and the passed sockets, sorted by what the kernel says
//! they are (UDP, TCP, unix datagram, unix stream) and by their
//! `FileDescriptorName=`.
//! Trusts: the environment only when `LISTEN_PID` is this process (so a
//! variable inherited by mistake is ignored), and each descriptor only as
//! what the kernel reports it to be: a descriptor that is not a socket of a
//! kind the daemon serves stops it at start-up with a message naming it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::net::{Access, Kind};
use crate::service::config::ListenSpec;

/// The first descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// A socket handed over by systemd.
#[derive(Debug)]
pub struct Activated {
    /// The descriptor, now owned by the daemon.
    pub fd: OwnedFd,
    /// Its `FileDescriptorName=` (systemd's default is the unit's name).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Where it listens, as a `--listen` spec without an allow-list (a
    /// socket in the abstract namespace is named `@NAME`).
    pub spec: ListenSpec,
}

/// The listen spec of a socket, from the address the kernel reports.
fn spec_of(fd: &OwnedFd, kind: Kind, name: &str) -> ListenSpec {
    let local = socket2::SockRef::from(fd).local_addr().ok();
    let inet = local.as_ref().and_then(|a| a.as_socket());
    let path = local
        .as_ref()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(format!("@{name}")));
    match (kind, inet) {
        (Kind::Udp, Some(a)) => ListenSpec::Udp(a, None),
        (Kind::Tcp, Some(a)) => ListenSpec::Tcp(a, None),
        _ => ListenSpec::Unix(path, Access::default()),
    }
}

/// Takes the sockets systemd passed, if any were passed to this process.
/// Call before any thread is started: it unsets the variables, so children
/// (postmap) do not see them.
pub fn take_listen_fds() -> Result<Vec<Activated>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: called from main before any other thread exists.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .parse()
        .ok()
        .filter(|n| (0..=64).contains(n))
        .ok_or_else(|| format!("LISTEN_FDS=\"{fds}\" from systemd is not a number of sockets"))?;
    let names: Vec<String> = names
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..n {
        let raw = SD_LISTEN_FDS_START + i;
        let name = names.get(i as usize).cloned().unwrap_or_default();
        // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this
        // process (LISTEN_PID says so); nothing else owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: setting FD_CLOEXEC on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let what = format!("socket {raw} (\"{name}\") passed by systemd");
        let kind = match crate::net::kind_of(raw) {
            Err(()) => return Err(format!("{what} is not a socket")),
            Ok(Some(kind)) => kind,
            Ok(None) => {
                return Err(format!(
                    "{what} is neither a UDP, unix datagram, listening TCP nor listening unix stream socket: fix the .socket unit (ListenDatagram=, ListenStream=)"
                ));
            }
        };
        if kind == Kind::UnixStream && !matches!(name.as_str(), "policy" | "socketmap" | "control")
        {
            return Err(format!(
                "{what} is a unix stream socket: name it FileDescriptorName=policy, socketmap or control in the .socket unit to say what it is for"
            ));
        }
        let spec = spec_of(&fd, kind, &name);
        out.push(Activated {
            fd,
            name,
            kind,
            spec,
        });
    }
    Ok(out)
}

/// Sends a message to systemd if it asked for notifications; returns
/// whether one was sent.
pub fn notify(message: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name) else {
            return false;
        };
        sock.send_to_addr(message.as_bytes(), &addr).is_ok()
    } else {
        sock.send_to(message.as_bytes(), &path).is_ok()
    }
}

/// The monotonic clock in microseconds, for `RELOADING=1`'s
/// `MONOTONIC_USEC=`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
