//! Stream services that answer Postfix's questions about the grant table:
//! the listening side shared by the policy service ([`crate::policy`]) and
//! the socketmap ([`crate::socketmap`]).
//!
//! Consumes: a `unix:///PATH` or `tcp://ADDR:PORT[?allow=...]` spec.
//! Produces: accepted connections, each handed to the service's handler as
//! a boxed byte stream with a description of the peer.
//! Trusts: a unix socket as far as its file mode and group reach; a TCP
//! peer only if its address is in the allow-list (checked before a byte is
//! read). At most [`MAX_CONNECTIONS`] are served at once per listener.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::addr::canonical;
use crate::config::ListenSpec;
use crate::receiver::{AllowList, PEER_WARNINGS, allowed};
use crate::swap::Swap;

/// Connections served at once per listener (Postfix keeps one per smtpd
/// process, and reuses it).
pub const MAX_CONNECTIONS: usize = 256;

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A bound stream listener.
pub enum StreamListener {
    /// TCP, with the peers it accepts.
    Tcp(TcpListener, AllowList),
    /// A unix stream socket; its file is removed when this is dropped.
    Unix(UnixListener, SocketPath),
}

/// A socket file, removed when dropped if the daemon made it (not when
/// systemd did).
pub struct SocketPath(pub PathBuf, pub bool);

impl Drop for SocketPath {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Binds `spec` (unix or tcp) for the service `what`.
pub fn bind(
    what: &str,
    spec: &ListenSpec,
    allow: AllowList,
    mode: u32,
) -> Result<StreamListener, String> {
    match spec {
        ListenSpec::Tcp(addr, own) => {
            let allow = own.clone().map(|a| Arc::new(Swap::new(a))).unwrap_or(allow);
            let std = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot bind {what} {spec}: {e}"))?;
            std.set_nonblocking(true)
                .map_err(|e| format!("cannot make {what} {spec} non-blocking: {e}"))?;
            let l = TcpListener::from_std(std)
                .map_err(|e| format!("cannot register {what} {spec}: {e}"))?;
            Ok(StreamListener::Tcp(l, allow))
        }
        ListenSpec::Unix(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
                return Err(format!(
                    "cannot bind {what} {spec}: the directory {} does not exist: create it",
                    dir.display()
                ));
            }
            remove_stale(path)?;
            let l =
                UnixListener::bind(path).map_err(|e| format!("cannot bind {what} {spec}: {e}"))?;
            let guard = SocketPath(path.clone(), true);
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set mode {mode:04o} on {}: {e}", path.display()))?;
            Ok(StreamListener::Unix(l, guard))
        }
        ListenSpec::Udp(..) => Err(format!(
            "{what} {spec}: expected unix:///PATH or tcp://ADDR:PORT (a stream socket)"
        )),
    }
}

/// Makes a stream listener of a socket systemd passed.
pub fn from_activated(
    a: crate::systemd::Activated,
    allow: AllowList,
) -> Result<StreamListener, String> {
    use crate::systemd::Kind;
    let what = format!("socket \"{}\" passed by systemd", a.name);
    let nonblocking =
        |r: std::io::Result<()>| r.map_err(|e| format!("cannot make {what} non-blocking: {e}"));
    let registered = |e: std::io::Error| format!("cannot register {what}: {e}");
    match (a.kind, a.spec) {
        (Kind::Tcp, _) => {
            let std = std::net::TcpListener::from(a.fd);
            nonblocking(std.set_nonblocking(true))?;
            let l = TcpListener::from_std(std).map_err(registered)?;
            Ok(StreamListener::Tcp(l, allow))
        }
        (Kind::UnixStream, ListenSpec::Unix(path)) => {
            let std = std::os::unix::net::UnixListener::from(a.fd);
            nonblocking(std.set_nonblocking(true))?;
            let l = UnixListener::from_std(std).map_err(registered)?;
            Ok(StreamListener::Unix(l, SocketPath(path, false)))
        }
        _ => Err(format!("{what} is not a stream socket")),
    }
}

/// Replaces a stale stream socket file, never a live one or another file.
fn remove_stale(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket: remove it or choose another path",
            path.display()
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{} is in use by a running process (another smtp-after-popd?): stop it or choose another path",
            path.display()
        ));
    }
    std::fs::remove_file(path)
        .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
}

impl StreamListener {
    /// The allow-list of a TCP listener.
    pub fn allow(&self) -> Option<&AllowList> {
        match self {
            StreamListener::Tcp(_, a) => Some(a),
            StreamListener::Unix(..) => None,
        }
    }

    /// The socket file of a unix listener.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            StreamListener::Unix(_, p) => Some(&p.0),
            StreamListener::Tcp(..) => None,
        }
    }

    /// Accepts connections for ever, running `handler` on each.
    pub async fn serve<H, F>(self, what: &'static str, handler: H)
    where
        H: Fn(Box<dyn Io>, String) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer): (Box<dyn Io>, String) = match &self {
                StreamListener::Tcp(l, allow) => match l.accept().await {
                    Ok((s, a)) => {
                        let ip = canonical(a.ip());
                        if !allowed(&allow.load(), ip) {
                            crate::log_warning_limited!(
                                PEER_WARNINGS,
                                "{what}: connection from {a} refused: peer not in allow-from"
                            );
                            continue;
                        }
                        (Box::new(s), format!("tcp:{a}"))
                    }
                    Err(e) => {
                        crate::log_error!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                StreamListener::Unix(l, p) => match l.accept().await {
                    Ok((s, _)) => (Box::new(s), format!("unix:{}", p.0.display())),
                    Err(e) => {
                        crate::log_error!("{what}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                crate::log_warning_limited!(
                    PEER_WARNINGS,
                    "{what}: connection from {peer} refused: {MAX_CONNECTIONS} connections already open"
                );
                continue;
            };
            let fut = handler(stream, peer);
            tokio::spawn(async move {
                let _permit = permit;
                fut.await;
            });
        }
    }
}
