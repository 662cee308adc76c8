//! What the daemon prepares on the host before it serves, and how it
//! explains a start-up failure so that a person can act on it.
//!
//! Consumes: the validated [`Config`], and error messages of the stages
//! that bind sockets and build the map.
//! Produces: the directories of the map, the state file, the pid file and
//! the unix sockets, created when missing with the owner and mode the
//! packaged unit gives them (so that a host without systemd works the
//! same); the pid file; and hints appended to errors: who holds a port,
//! which user to run as.
//! Trusts: the configuration and the system's user and group databases.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Exit status when the daemon cannot start for a reason other than its
/// configuration (a port in use, no permission).
pub const EX_OSERR: i32 = 71;
/// Exit status of `match` when an input file cannot be read.
pub const EX_NOINPUT: i32 = 66;

use crate::postfix::map::dir_of;
use crate::service::config::{Config, ListenSpec};
use crate::service::privilege;

/// The system user the package creates and the unit runs as.
pub const SERVICE_USER: &str = "smtp-after-popd";

/// Why the daemon does not start: the exit status it ends with
/// ([`crate::service::config::EX_CONFIG`] for what the configuration must change, [`EX_OSERR`] for
/// what the system refused), and the message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// The exit status.
    pub status: i32,
    /// The message, ready to log.
    pub message: String,
}

impl StartError {
    /// A failure the configuration must fix (exit status 78).
    pub fn config(message: impl std::fmt::Display) -> StartError {
        StartError {
            status: crate::service::config::EX_CONFIG,
            message: message.to_string(),
        }
    }

    /// A failure of the system: a port in use, no permission (exit
    /// status 71).
    pub fn os(message: impl std::fmt::Display) -> StartError {
        StartError {
            status: EX_OSERR,
            message: message.to_string(),
        }
    }

    /// Logs the failure; gives the exit status.
    pub fn report(self) -> i32 {
        crate::logging::write(
            crate::logging::Level::Fatal,
            format_args!("{}", self.message),
        );
        self.status
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartError {}

/// A directory the daemon needs, and what for.
#[derive(Debug, PartialEq, Eq)]
struct Needed {
    dir: PathBuf,
    /// 0755 for the map's and the state file's (Postfix reads the map),
    /// 0750 for a runtime directory (sockets, pid file), as the unit has.
    mode: u32,
    /// Which settings need it (`--map`, `--listen`...).
    what: Vec<&'static str>,
    /// Only Postfix's sockets (policy, socketmap) live there, all of this
    /// group: the directory gets it too, so that Postfix may enter it (as
    /// doc/systemd/postfix-policy.conf makes the chroot's directory). Any
    /// other directory gets the daemon's group.
    group: Option<u32>,
}

/// What kind of file a directory holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// The map or the state file.
    Files,
    /// The daemon's own sockets and pid file.
    Runtime,
    /// A socket Postfix connects to, and the group it gives Postfix.
    Postfix(Option<u32>),
}

fn needed(config: &Config) -> Vec<Needed> {
    let mut paths: Vec<(&'static str, PathBuf, Holds)> = Vec::new();
    if let Some(m) = &config.map {
        paths.push(("--map", m.path.clone(), Holds::Files));
    }
    if let Some(s) = &config.state {
        paths.push(("--state", s.clone(), Holds::Files));
    }
    if let Some(p) = &config.pid_file {
        paths.push(("--pid-file", p.clone(), Holds::Runtime));
    }
    for spec in &config.listen {
        if let ListenSpec::Unix(p, _) = spec {
            paths.push(("--listen", p.clone(), Holds::Runtime));
        }
    }
    for (what, specs) in [
        ("--policy", &config.policy),
        ("--socketmap", &config.socketmap),
    ] {
        for spec in specs {
            if let ListenSpec::Unix(p, access) = spec {
                let group = access
                    .group
                    .as_ref()
                    .or(config.socket_group.as_ref())
                    .map(|g| g.gid);
                paths.push((what, p.clone(), Holds::Postfix(group)));
            }
        }
    }
    // The default control socket is optional: without its directory the
    // daemon runs without one (a daemon started by hand next to a
    // packaged one, or the quick start).
    if let Some((path, false)) = &config.control {
        paths.push(("--control", path.clone(), Holds::Runtime));
    }
    let mut out: Vec<(Needed, Holds)> = Vec::new();
    for (what, path, holds) in paths {
        let dir = dir_of(&path);
        match out.iter_mut().find(|(n, _)| n.dir == dir) {
            Some((n, h)) => {
                if !n.what.contains(&what) {
                    n.what.push(what);
                }
                *h = match (*h, holds) {
                    (Holds::Files, _) | (_, Holds::Files) => Holds::Files,
                    (Holds::Postfix(a), Holds::Postfix(b)) if a == b => Holds::Postfix(a),
                    _ => Holds::Runtime,
                };
            }
            None => out.push((
                Needed {
                    dir,
                    mode: 0,
                    what: vec![what],
                    group: None,
                },
                holds,
            )),
        }
    }
    out.into_iter()
        .map(|(mut n, holds)| {
            n.mode = if holds == Holds::Files { 0o755 } else { 0o750 };
            n.group = match holds {
                Holds::Postfix(g) => g,
                _ => None,
            };
            n
        })
        .collect()
}

/// Creates the missing directories of the files and sockets the daemon is
/// configured to write, when they are its own (named smtp-after-popd, in
/// an existing parent: [`crate::service::config::is_own_dir`]),
/// with mode 0755 (0750 for sockets and the pid file), owned by `--user` and its group
/// when the daemon starts as root to switch to it. Returns a message to
/// stop with when one cannot be made.
pub fn make_dirs(config: &Config) -> Result<(), StartError> {
    let root = privilege::effective_uid() == 0;
    for n in needed(config) {
        if n.dir.exists() || !crate::service::config::is_own_dir(&n.dir) {
            // Another missing directory is reported by whoever needs it.
            continue;
        }
        let what = n.what.join(", ");
        if let Err(e) = std::fs::DirBuilder::new().mode(n.mode).create(&n.dir) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                continue;
            }
            let mut why = format!(
                "cannot create the directory {} for {what}: {e}",
                n.dir.display()
            );
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                why.push_str(&format!(
                    "; {}, or create it as root: install -d -o {SERVICE_USER} -g {SERVICE_USER} -m {:04o} {}",
                    who_should_run(&n.dir),
                    n.mode,
                    n.dir.display()
                ));
            }
            return Err(StartError::config(why));
        }
        // The umask may have taken bits away.
        let _ = std::fs::set_permissions(&n.dir, std::fs::Permissions::from_mode(n.mode));
        let (uid, gid) = match &config.run_as {
            Some((u, g)) if root => (Some(u.uid), Some(n.group.unwrap_or(g.gid))),
            _ => (None, None),
        };
        if (uid, gid) != (None, None)
            && let Err(e) = std::os::unix::fs::chown(&n.dir, uid, gid)
        {
            return Err(StartError::config(format_args!(
                "cannot give the directory {} to the daemon's user: {e}",
                n.dir.display()
            )));
        }
        let meta = std::fs::metadata(&n.dir)
            .map_err(|e| StartError::config(format_args!("{}: {e}", n.dir.display())))?;
        crate::log_info!(
            "created the directory {} for {what}: owner {}, {}, mode {:04o}",
            n.dir.display(),
            privilege::user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string()),
            privilege::describe_gid(meta.gid()),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Checks, as the user the daemon now runs as, that it may create the map,
/// the state file and the pid file; the message to stop with otherwise.
pub fn check_writable(config: &Config) -> Result<(), StartError> {
    let mut files: Vec<(&str, &Path)> = Vec::new();
    if let Some(m) = &config.map {
        files.push(("--map", &m.path));
    }
    if let Some(s) = &config.state {
        files.push(("--state", s));
    }
    if let Some(p) = &config.pid_file {
        files.push(("--pid-file", p));
    }
    for (key, file) in files {
        let dir = dir_of(file);
        if !privilege::can_write(&dir) {
            let uid = privilege::effective_uid();
            let me = current_user();
            let name = privilege::user_name(uid).unwrap_or_else(|| uid.to_string());
            return Err(StartError::config(format_args!(
                "{key} {}: {me} may not create files in {}{}: give the directory to that user (chown {name} {}), {}, or choose a file in a directory it may write",
                file.display(),
                dir.display(),
                owner_and_mode(&dir),
                dir.display(),
                who_should_run(&dir)
            )));
        }
    }
    Ok(())
}

/// `user NAME` for the current user (`uid N` without a name).
fn current_user() -> String {
    let uid = privilege::effective_uid();
    match privilege::user_name(uid) {
        Some(n) => format!("user {n}"),
        None => format!("uid {uid}"),
    }
}

/// `(owner NAME, group NAME, mode 0755)` of a directory, or nothing.
fn owner_and_mode(dir: &Path) -> String {
    match std::fs::metadata(dir) {
        Ok(m) => format!(
            " (owner {}, {}, mode {:04o})",
            privilege::user_name(m.uid()).unwrap_or_else(|| m.uid().to_string()),
            privilege::describe_gid(m.gid()),
            m.mode() & 0o7777
        ),
        Err(_) => String::new(),
    }
}

/// The nearest directory at or above `path` that exists.
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.is_dir())
}

/// Which user to run as so that `dir` (or its nearest existing parent) may
/// be written: its owner, or root with `--user`.
fn who_should_run(dir: &Path) -> String {
    let service = privilege::user(SERVICE_USER)
        .ok()
        .filter(|u| privilege::user_name(u.uid).is_some())
        .map(|u| u.name);
    let owner = existing_ancestor(dir)
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.uid());
    let run_as = service.as_deref().unwrap_or("USER");
    match owner.and_then(|uid| (uid != 0).then(|| privilege::user_name(uid)).flatten()) {
        Some(name) if Some(name.as_str()) == service.as_deref() => format!(
            "run the daemon as {name}, the directory's owner (runuser -u {name} -- smtp-after-popd ...), or start it as root with --user {name}"
        ),
        Some(name) => format!(
            "start the daemon as root with --user {run_as} (it binds and prepares its files, then gives up root for good), or run it as {name}, the directory's owner"
        ),
        None => format!(
            "start the daemon as root with --user {run_as} (it creates its directories for that user, then gives up root for good)"
        ),
    }
}

/// A socket bind failure with a hint of what to do: who holds the address,
/// or which user may bind there.
pub fn bind_hint(spec: &ListenSpec, error: &str) -> String {
    let in_use = error.contains("(os error 98)") || error.contains("in use by a running process");
    let denied = error.contains("(os error 13)") || error.contains("Permission denied");
    let mut out = error.to_string();
    match spec {
        ListenSpec::Udp(a, _) | ListenSpec::Tcp(a, _) => {
            let (proto, flag) = match spec {
                ListenSpec::Udp(..) => ("udp", "u"),
                _ => ("tcp", "t"),
            };
            if in_use {
                out.push_str(&format!(
                    "; another process holds {proto} port {port}: find it with ss -l{flag}np 'sport = :{port}' (or fuser {port}/{proto}), then stop it or choose another port",
                    port = a.port()
                ));
            } else if denied && a.port() < 1024 && privilege::effective_uid() != 0 {
                out.push_str(&format!(
                    "; ports below 1024 need root: start the daemon as root with --user {SERVICE_USER} (it binds, then gives up root for good), or choose a port from 1024 up"
                ));
            }
        }
        ListenSpec::Unix(path, _) => {
            if in_use {
                out.push_str(&format!(
                    "; find the process with ss -lxp | grep {p} (or fuser {p})",
                    p = path.display()
                ));
            } else if denied && privilege::effective_uid() != 0 {
                let dir = dir_of(path);
                out.push_str(&format!(
                    "; {} may not create sockets in {}{}: {}",
                    current_user(),
                    dir.display(),
                    owner_and_mode(&dir),
                    who_should_run(&dir)
                ));
            }
        }
    }
    out
}

/// Writes the pid file (atomically: a temporary file renamed into place).
pub fn write_pid_file(path: &Path) -> Result<(), StartError> {
    let pid = std::process::id();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pid".into());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StartError::config(format_args!(
                "--pid-file {}: cannot write it: {e}",
                path.display()
            ))
        })
}

/// Removes the pid file if it still names this process.
pub fn remove_pid_file(path: &Path) {
    let ours =
        std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours && let Err(e) = std::fs::remove_file(path) {
        crate::log_warning!("cannot remove the pid file {}: {e}", path.display());
    }
}

/// "1 grant", "2 grants": a count and its noun, singular or plural.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1, "grant", "grants"), "1 grant");
        assert_eq!(count(0, "grant", "grants"), "0 grants");
        assert_eq!(count(2, "address", "addresses"), "2 addresses");
    }

    #[test]
    fn hints_name_the_tool_to_find_the_holder() {
        let udp = ListenSpec::Udp("127.0.0.1:5514".parse().unwrap(), None);
        let h = bind_hint(
            &udp,
            "cannot bind udp://127.0.0.1:5514: Address already in use (os error 98)",
        );
        assert!(h.ends_with("find it with ss -lunp 'sport = :5514' (or fuser 5514/udp), then stop it or choose another port"), "{h}");
        let tcp = ListenSpec::Tcp("127.0.0.1:10040".parse().unwrap(), None);
        assert!(bind_hint(&tcp, "x (os error 98)").contains("ss -ltnp 'sport = :10040'"));
        let unix = ListenSpec::Unix("/nonexistent-sap/s.sock".into(), Default::default());
        assert!(
            bind_hint(&unix, "/nonexistent-sap/s.sock is in use by a running process")
                .ends_with("find the process with ss -lxp | grep /nonexistent-sap/s.sock (or fuser /nonexistent-sap/s.sock)")
        );
    }

    #[test]
    fn a_missing_directory_is_created_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let map = dir.path().join("lib/smtp-after-popd/authenticated_ips");
        let sock = dir.path().join("run/smtp-after-popd/syslog.sock");
        use clap::Parser;
        let args = crate::service::config::Cli::try_parse_from([
            "smtp-after-popd",
            "--map",
            map.to_str().unwrap(),
            "--listen",
            &format!("unix://{}", sock.display()),
            "--control",
            "none",
        ])
        .unwrap()
        .daemon;
        let config = Config::from_args(&args).unwrap();
        make_dirs(&config).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir.path().join("lib/smtp-after-popd")), 0o755);
        assert_eq!(mode(&dir.path().join("run/smtp-after-popd")), 0o750);
        // Another missing directory is not made: the path may be a typo.
        let other = dir.path().join("lib/smtp-after-pop/authenticated_ips");
        let args = crate::service::config::Cli::try_parse_from([
            "smtp-after-popd",
            "--map",
            other.to_str().unwrap(),
        ])
        .unwrap()
        .daemon;
        let e = Config::from_args(&args).unwrap_err();
        assert!(e.0.contains("does not exist: create it"), "{e}");
    }

    #[test]
    fn a_directory_of_postfix_sockets_gets_their_group() {
        if privilege::effective_uid() != 0 {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for d in ["run", "spool"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let run = dir.path().join("run/smtp-after-popd");
        let spool = dir.path().join("spool/smtp-after-popd");
        use clap::Parser;
        let args = crate::service::config::Cli::try_parse_from([
            "smtp-after-popd",
            "--map",
            "none",
            "--listen",
            &format!("unix://{}/syslog.sock", run.display()),
            "--policy",
            &format!("unix://{}/policy?group=root&mode=0660", spool.display()),
            "--control",
            "none",
            "--user",
            "nobody",
        ])
        .unwrap()
        .daemon;
        let config = Config::from_args(&args).unwrap();
        make_dirs(&config).unwrap();
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        let nobody = privilege::user("nobody").unwrap();
        // The policy socket's group may enter its directory (Postfix, in
        // the README's recipe); the syslog socket's is the daemon's alone.
        assert_eq!(owner(&spool), (nobody.uid, 0, 0o750));
        assert_eq!(owner(&run), (nobody.uid, nobody.gid, 0o750));
    }
}
