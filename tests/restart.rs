//! No login is lost while the daemon restarts. A real rsyslog (or
//! syslog-ng) forwards a steady stream of logins through each rule we ship
//! in `rsyslog/`, the daemon is restarted in the middle of the stream, and
//! every login of the stream must end up granted.
//!
//! The daemon is started as systemd's `smtp-after-popd.socket` starts it:
//! the test holds the listening socket (as systemd does, so it outlives
//! each daemon process) and passes it to every new daemon with
//! `LISTEN_FDS`. rsyslog 8.2302's omuxsock ignores send errors, so with a
//! socket the daemon binds itself, records sent while it is gone are lost;
//! with the held socket they wait in the kernel and in the rule's queue.
//! The remote rule over TCP is also run against a daemon that binds its
//! own port: omfwd notices the lost connection, and its queue and resume
//! retries carry the records over the gap.
//!
//! Needs root (private rsyslog, syslog-ng); skipped otherwise.

mod common;
mod stack;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use stack::*;

/// Logins in each stream, and the pause between two.
const LOGINS: usize = 240;
const PACE: Duration = Duration::from_millis(8);

/// Skips (loudly) when not root.
macro_rules! require_root {
    () => {
        if !require_root("the private rsyslog and syslog-ng") {
            return;
        }
    };
}

/// The address of login `i` of a stream.
fn address(i: usize) -> String {
    format!("10.77.{}.{}", i / 200, i % 200 + 1)
}

/// A configuration with a pattern for the stream's lines, which the test
/// process itself sends (so that rsyslog's attestation names a process
/// that is still alive: this test's executable, uid 0).
fn config(s: &Scratch) -> PathBuf {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .expect("test executable");
    let path = s.path("flow.toml");
    std::fs::write(
        &path,
        format!(
            "[[pattern]]\nid = \"flow-login\"\nserver = \"flow\"\nprogram = [\"sapflow\"]\nservice = \"pop3\"\nregex = 'flow login of (?P<user>\\S+) from (?P<ip>[0-9.]+)$'\nexecutables = [\"{}\"]\nuids = [0]\n",
            exe.display()
        ),
    )
    .expect("config");
    path
}

/// The socket the daemon listens on, held by the test as systemd holds it.
enum Held {
    Unix(std::os::unix::net::UnixDatagram),
    Udp(std::net::UdpSocket),
    Tcp(std::net::TcpListener),
}

impl Held {
    fn fd(&self) -> RawFd {
        match self {
            Held::Unix(s) => s.as_raw_fd(),
            Held::Udp(s) => s.as_raw_fd(),
            Held::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// One daemon process of the run.
struct Instance {
    child: Child,
    log: PathBuf,
}

impl Instance {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopped = wait_for(Duration::from_secs(30), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        assert!(stopped, "the daemon did not stop:\n{}", self.log_text());
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a daemon with `args`, passing it `held` as systemd would (or
/// letting it bind its own sockets), and waits until it has started.
fn start(s: &Scratch, n: usize, held: Option<&Held>, args: &[String]) -> Instance {
    let log = s.path(&format!("daemon-{n}.log"));
    let stderr = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .env("MAIL_CONFIG", s.mail_config())
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if let Some(h) = held {
        let fd = h.fd();
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "syslog");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut i = Instance {
        child: cmd.spawn().expect("spawn daemon"),
        log,
    };
    let up = wait_for(Duration::from_secs(30), || {
        i.log_text().contains("started: ") || !matches!(i.child.try_wait(), Ok(None))
    });
    assert!(
        up && matches!(i.child.try_wait(), Ok(None)),
        "daemon did not start:\n{}",
        i.log_text()
    );
    i
}

/// The addresses in the map's source file.
fn granted(map: &Path) -> std::collections::HashSet<String> {
    map_lines(map)
        .into_iter()
        .map(|l| l.trim_end_matches(" OK").to_string())
        .collect()
}

/// Sends the stream to `log_socket` (the syslog daemon's /dev/log) from
/// another thread; counts what was sent.
fn stream(log_socket: PathBuf, sent: Arc<AtomicUsize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let sock = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        let pid = std::process::id();
        for i in 0..LOGINS {
            let line = format!(
                "<22>sapflow[{pid}]: flow login of user{i} from {}",
                address(i)
            );
            sock.send_to(line.as_bytes(), &log_socket).expect("send");
            sent.store(i + 1, Ordering::SeqCst);
            std::thread::sleep(PACE);
        }
    })
}

/// Runs the stream through a syslog daemon whose socket is `log_socket`,
/// restarting the daemon three times in the middle of it, and checks that
/// every login was granted.
fn restart_during_stream(
    s: &Scratch,
    log_socket: &Path,
    held: Option<&Held>,
    args: &[String],
    syslog_log: &Path,
) {
    let map = s.map();
    let mut daemon = start(s, 0, held, args);
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = stream(log_socket.to_path_buf(), sent.clone());
    let mut logs = Vec::new();
    // The second restart follows the first at once: a daemon stopped just
    // after it started loses nothing either.
    for (n, at) in [(1, LOGINS / 3), (2, LOGINS / 3), (3, 2 * LOGINS / 3)] {
        assert!(wait_for(Duration::from_secs(30), || sent
            .load(Ordering::SeqCst)
            >= at));
        daemon.stop();
        logs.push(daemon.log_text());
        daemon = start(s, n, held, args);
    }
    sender.join().expect("sender");
    let want: Vec<String> = (0..LOGINS).map(address).collect();
    let all = wait_for(Duration::from_secs(30), || {
        let have = granted(&map);
        want.iter().all(|a| have.contains(a))
    });
    let have = granted(&map);
    let missing: Vec<&String> = want.iter().filter(|a| !have.contains(*a)).collect();
    logs.push(daemon.log_text());
    // What the syslog daemon said about itself (suspensions, errors), and
    // whether it received the logins that did not arrive.
    let text = std::fs::read_to_string(syslog_log).unwrap_or_default();
    let mut own: Vec<String> = text
        .lines()
        .filter(|l| !l.contains("sapflow"))
        .map(str::to_string)
        .collect();
    for m in &missing {
        let seen = text.lines().any(|l| l.ends_with(&format!(" from {m}")));
        own.push(format!(
            "{m}: {}",
            if seen {
                "received by the syslog daemon"
            } else {
                "not in the syslog daemon's log"
            }
        ));
    }
    assert!(
        all,
        "{} of {LOGINS} logins lost across the restarts: {missing:?}\n{}\n----- the syslog daemon's own lines -----\n{}",
        missing.len(),
        logs.join("\n----- next daemon -----\n"),
        own.join("\n")
    );
    daemon.stop();
}

/// The daemon's options for a run: its map and state in the scratch
/// directory, the test's pattern, a long window, no never-grant rules.
fn daemon_args(s: &Scratch, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--config",
        config(s).to_str().unwrap(),
        "--map",
        s.map().to_str().unwrap(),
        "--state",
        s.path("state").to_str().unwrap(),
        "--control",
        "none",
        "--window",
        "1h",
        "--never",
        "none",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn held_unix(s: &Scratch) -> (Held, PathBuf) {
    let path = s.path("syslog.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    (Held::Unix(sock), path)
}

#[test]
fn rsyslog_local_rule_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let (held, path) = held_unix(&s);
    let rule = shipped(
        "smtp-after-popd-local.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &path.display().to_string(),
        )],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let args = daemon_args(&s, &[]);
    restart_during_stream(&s, &rs.socket, Some(&held), &args, &rs.all_log);
}

#[test]
fn rsyslog_attested_rule_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let (held, path) = held_unix(&s);
    let rule = shipped(
        "smtp-after-popd-attested.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &path.display().to_string(),
        )],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    // The passed socket is the configured listener, declared to carry the
    // attested rule (attestation is believed only there).
    let listen = format!("unix://{}?attested=yes", path.display());
    let args = daemon_args(&s, &["--listen", &listen, "--require-attestation"]);
    restart_during_stream(&s, &rs.socket, Some(&held), &args, &rs.all_log);
}

#[test]
fn rsyslog_remote_rule_over_udp_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = udp.local_addr().unwrap().port().to_string();
    let rule = shipped(
        "smtp-after-popd-remote.conf",
        &[
            ("192.0.2.25", "127.0.0.1"),
            ("port=\"5514\"", &format!("port=\"{port}\"")),
        ],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let args = daemon_args(&s, &[]);
    restart_during_stream(&s, &rs.socket, Some(&Held::Udp(udp)), &args, &rs.all_log);
}

/// TCP, as the remote rule's comment says to switch it: the daemon binds
/// its own port, and rsyslog's queue and resume retries carry the records
/// over the gap.
#[test]
fn rsyslog_remote_rule_over_tcp_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let port = free_tcp_port().to_string();
    let rule = shipped(
        "smtp-after-popd-remote.conf",
        &[
            ("192.0.2.25", "127.0.0.1"),
            ("port=\"5514\"", &format!("port=\"{port}\"")),
            ("protocol=\"udp\"", "protocol=\"tcp\""),
        ],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let listen = format!("tcp://127.0.0.1:{port}");
    let args = daemon_args(&s, &["--listen", &listen]);
    restart_during_stream(&s, &rs.socket, None, &args, &rs.all_log);
}

/// The same over a TCP socket systemd holds (ListenStream=).
#[test]
fn rsyslog_remote_rule_over_held_tcp_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = tcp.local_addr().unwrap().port().to_string();
    let rule = shipped(
        "smtp-after-popd-remote.conf",
        &[
            ("192.0.2.25", "127.0.0.1"),
            ("port=\"5514\"", &format!("port=\"{port}\"")),
            ("protocol=\"udp\"", "protocol=\"tcp\""),
        ],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let args = daemon_args(&s, &[]);
    restart_during_stream(&s, &rs.socket, Some(&Held::Tcp(tcp)), &args, &rs.all_log);
}

#[test]
fn syslog_ng_local_rule_loses_nothing_across_restarts() {
    require_root!();
    let s = Scratch::new();
    let (held, path) = held_unix(&s);
    let rule = shipped(
        "syslog-ng-smtp-after-popd.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &path.display().to_string(),
        )],
    );
    let ng = SyslogNg::start(&s.path("syslog-ng"), &rule);
    let args = daemon_args(&s, &[]);
    restart_during_stream(
        &s,
        &ng.socket,
        Some(&held),
        &args,
        &ng.dir.join("syslog-ng.out"),
    );
}
