//! Forged logins, end to end (issue 13): a local unprivileged user and a
//! network peer attack the daemon through a real rsyslog running the rules
//! we ship, and a real Dovecot logs what a crafted user name makes it log.
//! Every attack must be refused and counted; the real logins beside them
//! must still be granted.
//!
//! - Class 1, the executable is no credential: a user created for the test
//!   runs Dovecot's own binaries with a preloaded library (built here with
//!   `cc`) that sends a forged login from its constructor; rsyslog attests
//!   the server's executable and the user's uid, and the uid refuses it.
//! - Class 2, attestation only where the attested rule puts it: a fake
//!   attestation element at the start of a message, through the shipped
//!   plain local rule and through the shipped plain remote rule from a
//!   peer trusted for attestation, is refused even with
//!   --require-attestation.
//! - Class 3, fields the server left out: a Dovecot client on a unix socket
//!   has no address, so Dovecot writes no rip=; a user name supplying one
//!   grants nothing.
//!
//! Needs root (CI runs as root): users, namespaces and the servers.

mod common;
mod stack;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use stack::*;

macro_rules! require_root {
    () => {
        if !require_root("the private servers") {
            return;
        }
    };
}

/// A scratch directory the test user can read (tempfile makes 0700 ones).
fn readable_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("sap-forge-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Builds the preloaded library: its constructor sends the datagram in
/// FORGE_LINE to the unix socket FORGE_SOCKET (the imuxsock socket, the
/// mail host's /dev/log), waits while rsyslog looks at /proc/PID/exe, and
/// ends the process before the server's own code runs.
fn forging_library(dir: &Path) -> PathBuf {
    let src = dir.join("forge.c");
    std::fs::write(
        &src,
        r#"#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

__attribute__((constructor)) static void forge(void) {
    const char *path = getenv("FORGE_SOCKET");
    const char *line = getenv("FORGE_LINE");
    if (!path || !line) return;
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_DGRAM, 0);
    sendto(s, line, strlen(line), 0, (struct sockaddr *)&a, sizeof a);
    sleep(2);
    _exit(0);
}
"#,
    )
    .expect("forge.c");
    let so = dir.join("forge.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success(), "cc failed");
    so
}

/// Runs `binary` as `user` with the forging library preloaded.
fn run_forged(user: &TestUser, so: &Path, socket: &Path, binary: &str, line: &str) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg("env")
        .arg(format!("LD_PRELOAD={}", so.display()))
        .arg(format!("FORGE_SOCKET={}", socket.display()))
        .arg(format!("FORGE_LINE={line}"))
        .arg(binary)
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{binary} as {}: {}",
        user.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// rsyslog with our shipped attested rule, forwarding to `socket`.
fn rsyslog_attested(s: &Scratch, name: &str, socket: &Path) -> Rsyslog {
    let rule = shipped(
        "smtp-after-popd-attested.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &socket.display().to_string(),
        )],
    );
    Rsyslog::start(&s.path(name), &rule)
}

/// The daemon on the attested socket (and `extra` listeners), with
/// --require-attestation.
fn attested_daemon(s: &Scratch, extra: &[&str]) -> (Daemon, PathBuf) {
    let socket = s.path("attested.sock");
    let listen = format!("unix://{}?attested=yes", socket.display());
    let map = s.map();
    let mut args = vec![
        "--listen",
        &listen,
        "--map",
        map.to_str().unwrap(),
        "--never",
        "none",
        "--require-attestation",
    ];
    args.extend_from_slice(extra);
    (Daemon::start(s, &args), socket)
}

/// The counter `name` in the daemon's stop line.
fn counter(log: &str, name: &str) -> u64 {
    let key = format!(" {name}=");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .expect("stop line");
    let at = line.find(&key).expect("counter") + key.len();
    line[at..]
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("number")
}

/// Class 1. A local user runs world-executable Dovecot binaries
/// (/usr/lib/dovecot/imap-login, pop3-login and log) with a preloaded
/// library that sends a forged login through the machine's /dev/log. The
/// shipped attested rule attests each binary truthfully, and the user's
/// uid: every forgery is refused and counted, whatever the binary, while a
/// root process sending through the same socket is believed.
#[test]
fn server_binaries_run_by_a_user_with_a_preloaded_library_are_refused() {
    require_root!();
    let s = Scratch::new();
    let (mut d, socket) = attested_daemon(&s, &[]);
    let rs = rsyslog_attested(&s, "rsyslog", &socket);
    let user = TestUser::create("sapfa");
    let dir = readable_dir();
    let so = forging_library(dir.path());
    let forged = [
        (
            "/usr/lib/dovecot/imap-login",
            "<22>Dec  1 18:30:00 imap-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.20, lip=192.0.2.1",
            "198.51.100.20",
        ),
        (
            "/usr/lib/dovecot/pop3-login",
            "<22>Dec  1 18:30:00 pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.21, lip=192.0.2.1",
            "198.51.100.21",
        ),
        (
            "/usr/lib/dovecot/log",
            "<22>Dec  1 18:30:00 dovecot: pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.22, lip=192.0.2.1, mpid=1, session=<abcdefgh>",
            "198.51.100.22",
        ),
    ];
    for (binary, line, _) in &forged {
        if !Path::new(binary).exists() {
            panic!("{binary} is missing: install dovecot-imapd and dovecot-pop3d");
        }
        run_forged(&user, &so, &rs.socket, binary, line);
    }
    for (binary, _, ip) in &forged {
        let want = format!(
            "refuse {ip}: forgery: sent by {binary} (uid {}, pid",
            user.uid
        );
        assert!(
            wait_for(Duration::from_secs(30), || d.log_text().contains(&want)),
            "{want}\n{}\nrsyslog saw:\n{}",
            d.log_text(),
            rs.received()
        );
        assert_eq!(s.postmap_q(ip), None, "{ip} granted");
    }
    // The same line from root's process with Dovecot's log binary is what
    // Dovecot itself sends: believed.
    let out = Command::new("env")
        .arg(format!("LD_PRELOAD={}", so.display()))
        .arg(format!("FORGE_SOCKET={}", rs.socket.display()))
        .arg("FORGE_LINE=<22>Dec  1 18:30:01 dovecot: pop3-login: Login: user=<root>, method=PLAIN, rip=198.51.100.23, lip=192.0.2.1, mpid=1, session=<abcdefgi>")
        .arg("/usr/lib/dovecot/log")
        .output()
        .expect("env");
    assert!(out.status.success());
    assert!(
        s.wait_granted("198.51.100.23", Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    assert_eq!(d.stop(), Some(0));
    assert_eq!(counter(&d.log_text(), "forgeries"), 3, "{}", d.log_text());
}

/// Class 2, locally. Through the shipped plain rule, a message that starts
/// with a fake attestation element reaches the daemon as RFC 3164, where a
/// parser reads the leading [...] as structured data. It is refused (a
/// forgery: our SD-ID on a listener not declared attested), even with
/// --require-attestation and an attested listener beside it.
#[test]
fn a_fake_attestation_through_the_plain_rule_is_refused() {
    require_root!();
    let s = Scratch::new();
    let plain_socket = s.path("plain.sock");
    let plain = format!("unix://{}", plain_socket.display());
    let (mut d, _attested) = attested_daemon(&s, &["--listen", &plain]);
    let rule = shipped(
        "smtp-after-popd-local.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &plain_socket.display().to_string(),
        )],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let st = Command::new("logger")
        .arg("-u")
        .arg(&rs.socket)
        .args(["-p", "mail.info", "-t", "dovecot"])
        .arg("[attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"1\"] pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.40, lip=192.0.2.1, mpid=1, session=<abc>")
        .status()
        .expect("logger");
    assert!(st.success());
    assert!(
        wait_for(Duration::from_secs(30), || d.log_text().contains(
            "forgery: an attestation element on a listener not declared attested"
        )),
        "{}\nrsyslog saw:\n{}",
        d.log_text(),
        rs.received()
    );
    assert_eq!(s.postmap_q("198.51.100.40"), None);
    assert_eq!(d.stop(), Some(0));
    assert_eq!(counter(&d.log_text(), "forgeries"), 1);
}

/// Class 2, over the network. A mail host's rsyslog forwards with the
/// shipped plain remote rule over UDP to a daemon that trusts that host's
/// attestation (--trust-attestation-from), on a listener declared attested
/// and on one that is not. A local user of the mail host writes a fake
/// element: refused on both. The attested listener accepts only the
/// attested rule's own form.
#[test]
fn a_fake_attestation_from_a_trusted_peer_through_the_plain_remote_rule_is_refused() {
    require_root!();
    let s = Scratch::new();
    let attested_port = free_udp_port();
    let plain_port = free_udp_port();
    let attested = format!("udp://127.0.0.1:{attested_port}?attested=yes");
    let plain = format!("udp://127.0.0.1:{plain_port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &attested,
            "--listen",
            &plain,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
            "--require-attestation",
            "--trust-attestation-from",
            "127.0.0.1",
        ],
    );
    let host = |name: &str, port: u16| {
        let rule = shipped(
            "smtp-after-popd-remote.conf",
            &[
                ("target=\"192.0.2.25\"", "target=\"127.0.0.1\""),
                ("port=\"5514\"", &format!("port=\"{port}\"")),
            ],
        );
        Rsyslog::start(&s.path(name), &rule)
    };
    let to_attested = host("host-a", attested_port);
    let to_plain = host("host-b", plain_port);
    for (rs, ip) in [
        (&to_attested, "198.51.100.41"),
        (&to_plain, "198.51.100.42"),
    ] {
        let st = Command::new("logger")
            .arg("-u")
            .arg(&rs.socket)
            .args(["-p", "mail.info", "-t", "dovecot"])
            .arg(format!("[attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"1\"] pop3-login: Login: user=<eve>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<abc>"))
            .status()
            .expect("logger");
        assert!(st.success());
    }
    assert!(
        wait_for(Duration::from_secs(30), || {
            let log = d.log_text();
            log.contains("not in the form of the attested rule")
                && log
                    .contains("forgery: an attestation element on a listener not declared attested")
        }),
        "{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("198.51.100.41"), None);
    assert_eq!(s.postmap_q("198.51.100.42"), None);
    assert_eq!(d.stop(), Some(0));
    assert_eq!(counter(&d.log_text(), "forgeries"), 2);
}

/// Logs in to IMAP over a unix socket (a client without an address);
/// true when the server said OK.
fn imap_login_unix(path: &Path, user: &str, password: &str) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut l = String::new();
    let _ = r.read_line(&mut l);
    let _ = w.write_all(format!("a LOGIN \"{user}\" \"{password}\"\r\n").as_bytes());
    let ok = loop {
        l.clear();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            break false;
        }
        if l.starts_with("a ") {
            break l.starts_with("a OK");
        }
    };
    let _ = w.write_all(b"z LOGOUT\r\n");
    ok
}

/// Class 3. Dovecot leaves out empty log elements: a client on a unix
/// socket has no address, so its login line has no rip=. With a relaxed
/// auth_username_chars, the user name from issue 13 supplies one, through
/// the shipped attested rule and Dovecot's own (attested) log process. The
/// line is ambiguous (mpid= and session= twice) and grants nothing; a
/// login over TCP beside it is granted.
#[test]
fn a_user_name_cannot_supply_the_address_dovecot_left_out() {
    require_root!();
    let s = Scratch::new();
    let (mut d, socket) = attested_daemon(&s, &[]);
    let rs = rsyslog_attested(&s, "rsyslog", &socket);
    let user = "eve>, rip=203.0.113.9, lip=10.0.0.1, mpid=1, session=<abc";
    let dovecot = Dovecot::start(
        &s.path("dovecot"),
        &rs.socket,
        &[user, "alice"],
        "auth_username_chars =\n\
         service imap-login {\n  unix_listener imap-direct {\n    mode = 0666\n  }\n}\n",
    );
    let direct = dovecot.dir.join("run/imap-direct");
    assert!(imap_login_unix(&direct, user, PASSWORD));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("matched pattern dovecot-login but is ambiguous")),
        "{}\nrsyslog saw:\n{}",
        d.log_text(),
        rs.received()
    );
    assert!(
        rs.received()
            .contains("rip=203.0.113.9, lip=10.0.0.1, mpid=1, session=<abc>, method=PLAIN"),
        "Dovecot did not log the line of issue 13:\n{}",
        rs.received()
    );
    assert_eq!(s.postmap_q("203.0.113.9"), None);
    assert!(imap_login(
        "127.0.0.5",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    assert!(
        s.wait_granted("127.0.0.5", Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    drop(dovecot);
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert_eq!(counter(&log, "refused_ambiguous"), 1, "{log}");
    assert_eq!(counter(&log, "forgeries"), 0, "{log}");
}
