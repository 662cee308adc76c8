//! Unix socket files: bound with their own owner, group and mode, never
//! over a live socket or a file that is not a socket, and removed when the
//! daemon is done with them.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::service::privilege::{self, Group, User};

/// Who may use a unix socket file. What is not set is left as the system
/// makes it (owner and group of the daemon's process; mode 0600).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// The file's owner (`owner=`; changing it needs root).
    pub owner: Option<User>,
    /// The file's group (`group=`; the daemon's user must be a member, or
    /// the daemon root).
    pub group: Option<Group>,
    /// The file's mode (`mode=`, octal).
    pub mode: Option<u32>,
}

impl Access {
    /// This access, with what it does not set taken from `defaults`.
    pub fn or(&self, defaults: &Access) -> Access {
        Access {
            owner: self.owner.clone().or_else(|| defaults.owner.clone()),
            group: self.group.clone().or_else(|| defaults.group.clone()),
            mode: self.mode.or(defaults.mode),
        }
    }

    /// The URL parameters that say it (`owner=U&group=G&mode=0660`), empty
    /// when nothing is set.
    pub fn params(&self) -> String {
        let mut out = Vec::new();
        if let Some(u) = &self.owner {
            out.push(format!("owner={}", u.name));
        }
        if let Some(g) = &self.group {
            out.push(format!("group={}", g.name));
        }
        if let Some(m) = self.mode {
            out.push(format!("mode={}", mode_text(m)));
        }
        out.join("&")
    }
}

/// A file mode as the configuration writes it (`0660`).
pub fn mode_text(mode: u32) -> String {
    format!("{mode:04o}")
}

/// What kind of unix socket to bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixKind {
    /// A datagram socket (syslog).
    Datagram,
    /// A listening stream socket (policy, socketmap, control).
    Stream,
}

/// A unix socket file, removed when dropped if the daemon made it (not
/// when systemd did, which removes its own).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    owned: bool,
}

impl SocketFile {
    /// A socket file someone else (systemd) made and will remove.
    pub fn borrowed(path: PathBuf) -> SocketFile {
        SocketFile { path, owned: false }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the daemon made it (and gave it its owner, group and mode).
    pub fn owned(&self) -> bool {
        self.owned
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a unix socket of `kind` at `path` for `what` (`--listen
/// unix:///...`, named in every message), with `access`. The file is
/// usable by its owner alone until it has its owner, group and mode; a
/// stream socket listens only then.
pub fn bind_unix(
    path: &Path,
    kind: UnixKind,
    access: &Access,
    what: &str,
) -> Result<(Socket, SocketFile), String> {
    check_directory(path, what)?;
    remove_stale(path, what)?;
    let ty = match kind {
        UnixKind::Datagram => Type::DGRAM,
        UnixKind::Stream => Type::STREAM,
    };
    let socket = Socket::new(Domain::UNIX, ty, None)
        .map_err(|e| format!("{what}: cannot create a socket: {e}"))?;
    // Linux creates the file with the mode of the socket's inode (less the
    // umask): owner only, until apply() below.
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("{what}: cannot restrict the new socket: {e}"));
    }
    let addr = SockAddr::unix(path).map_err(|e| format!("{what}: {e}"))?;
    socket.bind(&addr).map_err(|e| bind_error(path, what, e))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        owned: true,
    };
    let bound = std::fs::symlink_metadata(path)
        .map_err(|e| format!("{what}: cannot inspect {}: {e}", path.display()))?;
    apply(path, bound.ino(), access, what)?;
    if kind == UnixKind::Stream {
        socket
            .listen(512)
            .map_err(|e| format!("{what}: cannot listen: {e}"))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("{what}: cannot make the socket non-blocking: {e}"))?;
    Ok((socket, file))
}

/// Gives a new socket file (inode `ino`) its owner, group and mode; never
/// through a symbolic link, nor to a file that replaced it meanwhile.
fn apply(path: &Path, ino: u64, access: &Access, what: &str) -> Result<(), String> {
    if access.owner.is_some() || access.group.is_some() {
        let uid = access.owner.as_ref().map(|u| u.uid);
        let gid = access.group.as_ref().map(|g| g.gid);
        std::os::unix::fs::lchown(path, uid, gid)
            .map_err(|e| chown_error(path, access, what, e))?;
    }
    let same =
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && m.ino() == ino);
    if !same {
        return Err(format!(
            "{what}: {} was replaced while it was being bound: is its directory writable by others?",
            path.display()
        ));
    }
    let mode = access.mode.unwrap_or(0o600);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        format!(
            "{what}: cannot set mode {} on {}: {e}",
            mode_text(mode),
            path.display()
        )
    })
}

fn chown_error(path: &Path, access: &Access, what: &str, e: std::io::Error) -> String {
    let me = privilege::describe_uid(privilege::effective_uid());
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return format!(
            "{what}: cannot give {} its owner or group: {e}",
            path.display()
        );
    }
    if let Some(owner) = &access.owner {
        return format!(
            "{what}: {me} may not give {} to the owner {} (uid {}): only root may; start the daemon as root (with --user), or leave owner= out",
            path.display(),
            owner.name,
            owner.uid
        );
    }
    let group = access
        .group
        .as_ref()
        .map_or_else(String::new, |g| format!("{} (gid {})", g.name, g.gid));
    format!(
        "{what}: {me} may not give {} the group {group}: {e}; the daemon's user must be a member of that group (under systemd, SupplementaryGroups= in a drop-in, as doc/systemd/postfix-policy.conf does for postfix), or the daemon must start as root",
        path.display()
    )
}

/// Adds what to do to a failed bind.
fn bind_error(path: &Path, what: &str, e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "{what}: cannot bind {}: {e}; {}",
            path.display(),
            explain_denied(path)
        )
    } else {
        format!("{what}: cannot bind {}: {e}", path.display())
    }
}

/// The socket's directory must exist: the daemon does not guess its owner
/// and mode.
fn check_directory(path: &Path, what: &str) -> Result<(), String> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{what}: {} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = if dir.starts_with("/run/smtp-after-popd") {
                " (under systemd, RuntimeDirectory=smtp-after-popd creates /run/smtp-after-popd)"
            } else if dir.starts_with("/var/spool/postfix") {
                " (doc/systemd/postfix-policy.conf creates /var/spool/postfix/smtp-after-popd for the hardened service)"
            } else {
                ""
            };
            Err(format!(
                "{what}: the directory {} does not exist: create it{hint}",
                dir.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "{what}: cannot inspect {}: {e}; {}",
            dir.display(),
            explain_denied(path)
        )),
        Err(e) => Err(format!("{what}: cannot inspect {}: {e}", dir.display())),
    }
}

/// Replaces a stale socket file, never a live socket or another file.
fn remove_stale(path: &Path, what: &str) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "{what}: cannot inspect {}: {e}; {}",
                path.display(),
                explain_denied(path)
            ));
        }
        Err(e) => return Err(format!("{what}: cannot inspect {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{what}: {} exists and is not a socket: remove it or choose another path",
            path.display()
        ));
    }
    match in_use(path) {
        Ok(false) => {}
        Ok(true) => {
            return Err(format!(
                "{what}: {} is in use by a running process (another smtp-after-popd?): stop it or choose another path",
                path.display()
            ));
        }
        Err(e) => {
            return Err(format!(
                "{what}: cannot tell whether {} is in use ({e}): remove it if no daemon is running",
                path.display()
            ));
        }
    }
    std::fs::remove_file(path).map_err(|e| {
        format!(
            "{what}: cannot remove the stale socket {}: {e}",
            path.display()
        )
    })
}

/// Whether a process listens on the socket file, of either kind: a connect
/// that succeeds, would block, or meets the other kind of socket says so;
/// one that is refused says the file is stale.
fn in_use(path: &Path) -> std::io::Result<bool> {
    let addr = SockAddr::unix(path)?;
    for ty in [Type::STREAM, Type::DGRAM] {
        let probe = Socket::new(Domain::UNIX, ty, None)?;
        probe.set_nonblocking(true)?;
        match probe.connect(&addr) {
            Ok(()) => return Ok(true),
            Err(e) => match e.raw_os_error() {
                Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => {}
                Some(libc::EPROTOTYPE) | Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                    return Ok(true);
                }
                _ => return Err(e),
            },
        }
    }
    Ok(false)
}

/// Why the daemon may not reach `path`, and what to do.
fn explain_denied(path: &Path) -> String {
    let me = privilege::describe_uid(privilege::effective_uid());
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    let (blocked, why) = match dirs.iter().find(|d| !privilege::can_search(d)) {
        Some(d) => (*d, "may not enter"),
        None => (
            path.parent().unwrap_or(Path::new("/")),
            "may not create files in",
        ),
    };
    let postfix = privilege::user("postfix").ok().map(|u| u.uid);
    let postfixs = std::fs::metadata(blocked).is_ok_and(|m| Some(m.uid()) == postfix);
    let hint = if postfixs {
        "; that directory is Postfix's own (as private/ is): put the socket in a directory of the daemon's inside the queue directory, such as /var/spool/postfix/smtp-after-popd/policy, which the drop-in doc/systemd/postfix-policy.conf (installed under /usr/share/doc/smtp-after-popd/) makes and opens to the hardened service, and ask for it with check_policy_service unix:smtp-after-popd/policy; see the README, \"Chroot\" (or serve the policy over tcp://127.0.0.1:PORT)"
    } else {
        "; choose a directory that user may write, or give it one"
    };
    format!("{me} {why} {}{hint}", describe_dir(blocked))
}

/// `DIR (owner U, group G, mode 0750)`.
fn describe_dir(dir: &Path) -> String {
    match std::fs::metadata(dir) {
        Ok(m) => format!(
            "{} (owner {}, group {}, mode {})",
            dir.display(),
            privilege::describe_uid(m.uid()),
            privilege::describe_gid(m.gid()),
            mode_text(m.mode() & 0o7777)
        ),
        Err(_) => dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_has_its_mode_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let access = Access {
            mode: Some(0o620),
            ..Access::default()
        };
        let (_socket, file) = bind_unix(&path, UnixKind::Datagram, &access, "test").unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o620);
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn a_live_socket_of_either_kind_is_never_replaced_but_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let none = Access::default();
        let (live, file) = bind_unix(&path, UnixKind::Stream, &none, "first").unwrap();
        for kind in [UnixKind::Stream, UnixKind::Datagram] {
            let e = bind_unix(&path, kind, &none, "second").unwrap_err();
            assert!(e.contains("is in use by a running process"), "{e}");
        }
        // Closed but left behind, as after a crash.
        drop(live);
        std::mem::forget(file);
        let (_again, _file) = bind_unix(&path, UnixKind::Datagram, &none, "third").unwrap();
        let other = dir.path().join("plain");
        std::fs::write(&other, "x").unwrap();
        let e = bind_unix(&other, UnixKind::Stream, &none, "fourth").unwrap_err();
        assert!(e.contains("exists and is not a socket"), "{e}");
        let e = bind_unix(
            &dir.path().join("no/such.sock"),
            UnixKind::Stream,
            &none,
            "--policy unix:///x",
        )
        .unwrap_err();
        assert!(e.starts_with("--policy unix:///x: the directory "), "{e}");
        assert!(e.ends_with("does not exist: create it"), "{e}");
    }

    #[test]
    fn access_merges_and_prints_as_url_parameters() {
        let set = Access {
            mode: Some(0o620),
            ..Access::default()
        };
        let defaults = Access {
            group: Some(Group {
                name: "mail".into(),
                gid: 8,
            }),
            mode: Some(0o660),
            ..Access::default()
        };
        assert_eq!(set.or(&defaults).params(), "group=mail&mode=0620");
        assert_eq!(Access::default().params(), "");
    }
}
