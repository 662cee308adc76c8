//! The whole chain on real parts, all on loopback: Dovecot logs a login
//! through syslog(3) to a private rsyslog (or syslog-ng) that forwards it
//! with the rule we ship in `rsyslog/`; smtp-after-popd writes the map;
//! a private Postfix with the README's `smtpd_relay_restrictions` line
//! then relays for the client that logged in, and for no one else.
//!
//! Needs root (CI runs as root; `.ci/run` installs the packages). Test
//! clients connect from 127.0.0.2 and up; Postfix's mynetworks is
//! 127.0.0.1/32 only, so they are outsiders unless the map lets them in.

mod common;
mod stack;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use stack::*;

/// The daemon listening on a unix socket of the scratch directory (where
/// rsyslog forwards), writing the scratch map, with `--never none` since
/// the test clients are on loopback, and `extra` options. Returns it and
/// its socket.
fn loopback_daemon(s: &Scratch, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    loopback_daemon_on(s, "", extra)
}

/// The same, its socket declared to carry the attested rule
/// (`?attested=yes`), as the packaged configuration declares it.
fn attested_daemon(s: &Scratch, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    loopback_daemon_on(s, "?attested=yes", extra)
}

fn loopback_daemon_on(s: &Scratch, settings: &str, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let socket = s.path("daemon.sock");
    let listen = format!("unix://{}{settings}", socket.display());
    let map = s.map();
    let mut args = vec![
        "--listen",
        &listen,
        "--map",
        map.to_str().unwrap(),
        "--never",
        "none",
    ];
    args.extend_from_slice(extra);
    (Daemon::start(s, &args), socket)
}

/// Skips (loudly) when not root: the servers need it.
macro_rules! require_root {
    () => {
        if !require_root("the private rsyslog, Dovecot and Postfix") {
            return;
        }
    };
}

/// The README's `smtpd_relay_restrictions` line, with our map's path.
fn readme_relay_restrictions(map: &Path) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("smtpd_relay_restrictions = permit_mynetworks")
        .expect("README has the smtpd_relay_restrictions line");
    let block = &readme[start..];
    let end = block.find("```").expect("end of the code block");
    let value = block[..end]
        .trim_start_matches("smtpd_relay_restrictions =")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        value.contains("hash:/var/lib/smtp-after-popd/authenticated_ips"),
        "README line changed: {value}"
    );
    value.replace(
        "/var/lib/smtp-after-popd/authenticated_ips",
        &map.display().to_string(),
    )
}

/// rsyslog with our shipped local rule, forwarding to the daemon's socket.
fn rsyslog_with_local_rule(s: &Scratch, name: &str, daemon_socket: &Path) -> Rsyslog {
    let rule = shipped(
        "smtp-after-popd-local.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &daemon_socket.display().to_string(),
        )],
    );
    Rsyslog::start(&s.path(name), &rule)
}

/// rsyslog with our shipped attested rule, forwarding to the daemon's
/// socket (the test rsyslog's imuxsock input has Annotate and ParseTrusted
/// on, as the rule's installation note asks of /etc/rsyslog.conf).
fn rsyslog_with_attested_rule(s: &Scratch, name: &str, daemon_socket: &Path) -> Rsyslog {
    let rule = shipped(
        "smtp-after-popd-attested.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &daemon_socket.display().to_string(),
        )],
    );
    Rsyslog::start(&s.path(name), &rule)
}

/// Waits until `src` may relay; returns how long that took.
fn until_relay(src: &str, port: u16, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    if wait_for(within, || may_relay(src, port)) {
        Some(t0.elapsed())
    } else {
        None
    }
}

const INJECTED_USER: &str = "eve>, method=plain, rip=127.0.0.8, lip=127.0.0.1";

#[test]
fn dovecot_rsyslog_daemon_postfix_relays_for_logged_in_clients_only() {
    require_root!();
    let s = Scratch::new();
    let map = s.map();
    let (mut d, daemon_socket) = attested_daemon(&s, &["--window", "1h", "--require-attestation"]);
    let rs = rsyslog_with_attested_rule(&s, "rsyslog", &daemon_socket);
    let dovecot = Dovecot::start(
        &s.path("dovecot"),
        &rs.socket,
        &["alice", "bob", INJECTED_USER],
        // Dovecot refuses such user names by default; a site may allow
        // them, and then the address must still come from Dovecot.
        "auth_username_chars =",
    );
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&map), "");

    // Before any login nobody relays; this also leaves an smtpd process
    // with the map open, as on a live server.
    assert!(rcpt("127.0.0.5", pf.port).contains("Relay access denied"));

    // 1. POP3 login from 127.0.0.5: it may relay within a few seconds.
    assert!(pop3_login(
        "127.0.0.5",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    let delay = until_relay("127.0.0.5", pf.port, Duration::from_secs(10));
    assert!(
        delay.is_some(),
        "127.0.0.5 cannot relay after its login\ndaemon:\n{}\nrsyslog:\n{}\npostfix:\n{}",
        d.log_text(),
        rs.received(),
        pf.log()
    );
    eprintln!("POP3 login to first accepted RCPT: {:?}", delay.unwrap());
    // 127.0.0.6 did not log in.
    let r = rcpt("127.0.0.6", pf.port);
    assert!(
        r.contains("554") && r.contains("Relay access denied"),
        "{r}"
    );

    // 2. IMAP from another address.
    assert!(imap_login("127.0.0.10", dovecot.imap_port, "bob", PASSWORD));
    assert!(
        until_relay("127.0.0.10", pf.port, Duration::from_secs(10)).is_some(),
        "{}",
        d.log_text()
    );

    // 3. A wrong password grants nothing; a user name that injects
    // rip=127.0.0.8 grants nothing (its line holds method=, rip= and lip=
    // twice: ambiguous), neither 127.0.0.8 nor its real address, and the
    // same user name with a wrong password grants nothing at all.
    assert!(!pop3_login(
        "127.0.0.7",
        dovecot.pop3_port,
        "alice",
        "wrong"
    ));
    assert!(!pop3_login(
        "127.0.0.9",
        dovecot.pop3_port,
        INJECTED_USER,
        "wrong"
    ));
    assert!(pop3_login(
        "127.0.0.11",
        dovecot.pop3_port,
        INJECTED_USER,
        PASSWORD
    ));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("matched pattern dovecot-login but is ambiguous")),
        "{}",
        d.log_text()
    );
    for ip in ["127.0.0.7", "127.0.0.8", "127.0.0.9", "127.0.0.11"] {
        assert_eq!(s.postmap_q(ip), None, "{ip} must not be granted");
        assert!(
            rcpt(ip, pf.port).contains("Relay access denied"),
            "{ip} may relay"
        );
    }

    // 6. A line forged by a local user with logger, through the same
    // rsyslog: its attestation names /usr/bin/logger (or nothing, when
    // logger exited before rsyslog looked), so it grants nothing, while
    // Dovecot's own lines above did.
    let st = std::process::Command::new("logger")
        .arg("-u")
        .arg(&rs.socket)
        .args(["-p", "mail.info", "-t", "dovecot"])
        .arg("pop3-login: Login: user=<forger>, method=PLAIN, rip=127.0.0.12, lip=127.0.0.1, mpid=1, session=<abcdefgh>")
        .status()
        .expect("logger");
    assert!(st.success());
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("refuse 127.0.0.12: forgery:")),
        "the forged line was not refused\n{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("127.0.0.12"), None);
    assert!(rcpt("127.0.0.12", pf.port).contains("Relay access denied"));
    let log = d.log_text();
    assert!(
        log.contains("grant 127.0.0.5 for 1h: dovecot pop3 login of user \"alice\""),
        "{log}"
    );
    drop(dovecot);
    assert_eq!(d.stop(), Some(0));
}

/// Point 4: after the window, the address is refused again.
#[test]
fn relay_closes_when_the_window_is_over() {
    require_root!();
    let s = Scratch::new();
    let map = s.map();
    // Long enough to see the relay open on a loaded machine.
    let (mut d, daemon_socket) = loopback_daemon(&s, &["--window", "10s"]);
    let rs = rsyslog_with_local_rule(&s, "rsyslog", &daemon_socket);
    let dovecot = Dovecot::start(&s.path("dovecot"), &rs.socket, &["alice"], "");
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&map), "");

    assert!(pop3_login(
        "127.0.0.5",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(
        until_relay("127.0.0.5", pf.port, Duration::from_secs(30)).is_some(),
        "{}",
        d.log_text()
    );
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(60), || !may_relay("127.0.0.5", pf.port)),
        "127.0.0.5 may still relay after its window\n{}",
        d.log_text()
    );
    eprintln!(
        "relay refused again {:?} after it was first seen open",
        t0.elapsed()
    );
    assert_eq!(s.postmap_q("127.0.0.5"), None);
    assert!(d.log_text().contains("expire 127.0.0.5: window over"));
    assert_eq!(d.stop(), Some(0));
}

/// Point 5: several mail hosts, one instance. Two rsyslog instances (standing for
/// two mail hosts, sending from 127.0.0.2 and 127.0.0.3) forward with our
/// shipped remote rule over UDP; a third, from 127.0.0.4, is outside
/// --allow-from and is ignored.
#[test]
fn two_mail_hosts_feed_one_daemon_over_udp() {
    require_root!();
    let s = Scratch::new();
    let port = free_udp_port();
    let map = s.map();
    let listen = format!("udp://127.0.0.1:{port}");
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--allow-from",
            "127.0.0.2/32",
            "--allow-from",
            "127.0.0.3/32",
            "--map",
            map.to_str().unwrap(),
            "--window",
            "1h",
            "--never",
            "none",
        ],
    );
    let host = |name: &str, from: &str| {
        let rule = shipped(
            "smtp-after-popd-remote.conf",
            &[
                ("target=\"192.0.2.25\"", "target=\"127.0.0.1\""),
                (
                    "port=\"5514\"",
                    &format!("port=\"{port}\" address=\"{from}\""),
                ),
            ],
        );
        Rsyslog::start(&s.path(name), &rule)
    };
    let a = host("host-a", "127.0.0.2");
    let b = host("host-b", "127.0.0.3");
    let outsider = host("host-c", "127.0.0.4");
    let dovecot_a = Dovecot::start(&s.path("dovecot-a"), &a.socket, &["alice"], "");
    let dovecot_b = Dovecot::start(&s.path("dovecot-b"), &b.socket, &["bob"], "");
    let dovecot_c = Dovecot::start(&s.path("dovecot-c"), &outsider.socket, &["carol"], "");
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&map), "");

    assert!(pop3_login(
        "127.0.0.20",
        dovecot_a.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(imap_login(
        "127.0.0.21",
        dovecot_b.imap_port,
        "bob",
        PASSWORD
    ));
    assert!(pop3_login(
        "127.0.0.22",
        dovecot_c.pop3_port,
        "carol",
        PASSWORD
    ));
    for ip in ["127.0.0.20", "127.0.0.21"] {
        assert!(
            until_relay(ip, pf.port, Duration::from_secs(10)).is_some(),
            "{ip}\n{}",
            d.log_text()
        );
    }
    // The outsider's line reached its rsyslog; the daemon dropped it.
    assert!(wait_for(Duration::from_secs(30), || outsider
        .received()
        .contains("rip=127.0.0.22")));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("127.0.0.4")),
        "{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("127.0.0.22"), None);
    assert!(rcpt("127.0.0.22", pf.port).contains("Relay access denied"));
    let log = d.log_text();
    assert!(log.contains("reported by 127.0.0.2:"), "{log}");
    assert!(log.contains("reported by 127.0.0.3:"), "{log}");
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("dropped_peer="), "{log}");
    assert!(!log.contains("dropped_peer=0 "), "{log}");
}

/// The same chain through syslog-ng and our shipped syslog-ng rule.
#[test]
fn dovecot_syslog_ng_daemon_postfix() {
    require_root!();
    let s = Scratch::new();
    let map = s.map();
    let (mut d, daemon_socket) = loopback_daemon(&s, &["--window", "1h"]);
    let rule = shipped(
        "syslog-ng-smtp-after-popd.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &daemon_socket.display().to_string(),
        )],
    );
    let ng = SyslogNg::start(&s.path("syslog-ng"), &rule);
    let dovecot = Dovecot::start(&s.path("dovecot"), &ng.socket, &["alice"], "");
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&map), "");

    assert!(imap_login(
        "127.0.0.5",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    assert!(
        until_relay("127.0.0.5", pf.port, Duration::from_secs(10)).is_some(),
        "{}",
        d.log_text()
    );
    assert!(!pop3_login(
        "127.0.0.6",
        dovecot.pop3_port,
        "alice",
        "wrong"
    ));
    // A later login is the marker that the failure before it was handled
    // (the lines come in order through syslog-ng's one connection).
    assert!(pop3_login(
        "127.0.0.8",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(
        until_relay("127.0.0.8", pf.port, Duration::from_secs(30)).is_some(),
        "{}",
        d.log_text()
    );
    assert!(!d.log_text().contains("127.0.0.6 for"), "{}", d.log_text());
    assert!(rcpt("127.0.0.6", pf.port).contains("Relay access denied"));
    assert!(
        d.log_text()
            .contains("grant 127.0.0.5 for 1h: dovecot imap login of user \"alice\"")
    );
    assert_eq!(d.stop(), Some(0));
}

/// How long from a completed POP3 login to the first RCPT that Postfix
/// accepts, with an smtpd process that already had the map open (it
/// notices the rebuilt map, because its modification second changed,
/// before it accepts the next connection). Prints figures; asserts only
/// that every login did open the relay.
#[test]
fn login_to_relay_delay_figures() {
    require_root!();
    let s = Scratch::new();
    let map = s.map();
    let (mut d, daemon_socket) = loopback_daemon(&s, &["--window", "1h"]);
    let rs = rsyslog_with_local_rule(&s, "rsyslog", &daemon_socket);
    let dovecot = Dovecot::start(&s.path("dovecot"), &rs.socket, &["alice"], "");
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&map), "");
    let mut delays = Vec::new();
    for i in 1..=20 {
        let ip = format!("127.0.1.{i}");
        assert!(rcpt(&ip, pf.port).contains("Relay access denied"));
        assert!(pop3_login(&ip, dovecot.pop3_port, "alice", PASSWORD));
        let t = until_relay(&ip, pf.port, Duration::from_secs(10));
        assert!(t.is_some(), "{ip}\n{}", d.log_text());
        delays.push(t.unwrap());
    }
    delays.sort();
    eprintln!(
        "login to first accepted RCPT over {} logins: min {:?}, p50 {:?}, p90 {:?}, max {:?}",
        delays.len(),
        delays[0],
        delays[delays.len() / 2],
        delays[delays.len() * 9 / 10],
        delays[delays.len() - 1]
    );
    let restarts = pf.log().matches("has changed -- restarting").count();
    eprintln!("smtpd restarts on a changed map: {restarts}");
    assert_eq!(d.stop(), Some(0));
}

/// A local user who runs Dovecot's own log binary with a preloaded library
/// that writes a forged login line: rsyslog attests the right executable,
/// but the wrong uid (Dovecot's log process runs as root), so the line is
/// refused.
#[test]
fn dovecots_log_binary_run_by_a_user_is_refused() {
    require_root!();
    let s = Scratch::new();
    let (mut d, daemon_socket) = attested_daemon(&s, &["--require-attestation"]);
    let rs = rsyslog_with_attested_rule(&s, "rsyslog", &daemon_socket);
    // The library must be readable by the unprivileged user.
    let libdir = tempfile::Builder::new()
        .prefix("forge")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(
        libdir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let src = libdir.path().join("forge.c");
    std::fs::write(
        &src,
        "#include <syslog.h>\n#include <unistd.h>\n\
         __attribute__((constructor)) static void forge(void) {\n\
           openlog(\"dovecot\", 0, LOG_MAIL);\n\
           syslog(LOG_INFO, \"pop3-login: Login: user=<x>, method=PLAIN, rip=127.0.0.13, lip=127.0.0.1, mpid=1, session=<abcdefgh>\");\n\
           sleep(2);\n\
           _exit(0);\n\
         }\n",
    )
    .unwrap();
    let so = libdir.path().join("forge.so");
    let st = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success());
    // /dev/log may not exist on this machine; give the forger a /dev of
    // its own, as the Dovecot harness does.
    let ns = libdir.path().join("ns.sh");
    std::fs::write(
        &ns,
        dev_log_namespace(
            &libdir.path().join("devsave"),
            &rs.socket,
            &format!(
                "setpriv --reuid=65534 --regid=65534 --clear-groups env LD_PRELOAD={} /usr/lib/dovecot/log",
                so.display()
            ),
        ),
    )
    .unwrap();
    let out = std::process::Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg(&ns)
        .output()
        .expect("unshare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_for(Duration::from_secs(30), || d.log_text().contains(
            "refuse 127.0.0.13: forgery: sent by /usr/lib/dovecot/log (uid 65534"
        )),
        "{}\nrsyslog saw:\n{}",
        d.log_text(),
        rs.received()
    );
    assert_eq!(s.postmap_q("127.0.0.13"), None);
    assert_eq!(d.stop(), Some(0));
}

/// rsyslog forwarding over TCP, in both RFC 6587 framings it offers (LF,
/// its default, and octet counting): logins are granted. A second TCP
/// listener with its own allow-list (which does not include loopback)
/// refuses the connection of a third rsyslog. (rsyslog 8.2302's omfwd binds
/// a source address for UDP only, so the listeners tell the senders apart.)
#[test]
fn rsyslog_over_tcp_in_both_framings_with_a_per_listener_allow_list() {
    require_root!();
    let s = Scratch::new();
    let port = free_tcp_port();
    let closed_port = free_tcp_port();
    let map = s.map();
    let listen = format!("tcp://127.0.0.1:{port}");
    let closed = format!("tcp://127.0.0.1:{closed_port}?allow=192.0.2.0/24");
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--listen",
            &closed,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
        ],
    );
    let host = |name: &str, port: u16, framing: &str| {
        let rule = shipped(
            "smtp-after-popd-remote.conf",
            &[
                ("target=\"192.0.2.25\"", "target=\"127.0.0.1\""),
                ("protocol=\"udp\"", &format!("protocol=\"tcp\"{framing}")),
                ("port=\"5514\"", &format!("port=\"{port}\"")),
            ],
        );
        Rsyslog::start(&s.path(name), &rule)
    };
    let lf = host("lf", port, "");
    let counted = host("counted", port, " TCP_Framing=\"octet-counted\"");
    let outsider = host("outsider", closed_port, "");
    let login = |rs: &Rsyslog, ip: &str| {
        let st = std::process::Command::new("logger")
            .arg("-u")
            .arg(&rs.socket)
            .args(["-p", "mail.info", "-t", "dovecot"])
            .arg(format!("imap-login: Login: user=<u>, method=PLAIN, rip={ip}, lip=127.0.0.1, mpid=1, session=<abcdefgh>"))
            .status()
            .expect("logger");
        assert!(st.success());
    };
    login(&lf, "192.0.2.31");
    login(&counted, "192.0.2.32");
    login(&outsider, "192.0.2.33");
    for ip in ["192.0.2.31", "192.0.2.32"] {
        assert!(
            wait_for(Duration::from_secs(30), || s.postmap_q(ip).is_some()),
            "{ip}\n{}",
            d.log_text()
        );
    }
    assert!(
        wait_for(Duration::from_secs(30), || d.log_text().contains(&format!(
            "tcp://127.0.0.1:{closed_port}: connection from 127.0.0.1"
        ))),
        "{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("192.0.2.33"), None);
    let log = d.log_text();
    assert!(log.contains("reported by tcp:127.0.0.1:"), "{log}");
    assert!(!log.contains("192.0.2.33 for"), "{log}");
    assert_eq!(d.stop(), Some(0));
}

/// Issue 7: Postfix asks the daemon directly, over the policy protocol
/// (unix socket and TCP, two Postfix instances) and the socketmap protocol
/// (a third), with no map file (`--map none`). A client may relay on its
/// very first SMTP connection right after the grant (no modification-time
/// delay), another address may not, and after the window nobody may.
#[test]
fn policy_service_and_socketmap_answer_postfix_at_once() {
    use std::os::unix::fs::PermissionsExt;
    require_root!();
    let s = Scratch::new();
    // Postfix's smtpd runs as postfix and must reach the sockets.
    std::fs::set_permissions(s.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_udp_port();
    let tcp_port = free_tcp_port();
    let policy_sock = s.path("policy.sock");
    let socketmap_sock = s.path("socketmap.sock");
    let listen = format!("udp://127.0.0.1:{port}");
    let policy_unix = format!("unix://{}", policy_sock.display());
    let policy_tcp = format!("tcp://127.0.0.1:{tcp_port}");
    let socketmap = format!("unix://{}", socketmap_sock.display());
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            "none",
            "--policy",
            &policy_unix,
            "--policy",
            &policy_tcp,
            "--socketmap",
            &socketmap,
            "--socket-group",
            "postfix",
            // Long enough for six SMTP conversations on a loaded machine.
            "--window",
            "30s",
            "--never",
            "none",
        ],
    );
    assert!(!s.map().exists());
    let via_unix = Postfix::start(
        &s.path("postfix-policy-unix"),
        &format!(
            "permit_mynetworks, check_policy_service unix:{}, reject_unauth_destination",
            policy_sock.display()
        ),
        "",
    );
    let via_tcp = Postfix::start(
        &s.path("postfix-policy-tcp"),
        &format!(
            "permit_mynetworks, check_policy_service inet:127.0.0.1:{tcp_port}, reject_unauth_destination"
        ),
        "",
    );
    let via_socketmap = Postfix::start(
        &s.path("postfix-socketmap"),
        &format!(
            "permit_mynetworks, check_client_access socketmap:unix:{}:authenticated_ips, reject_unauth_destination",
            socketmap_sock.display()
        ),
        "",
    );
    let all = [&via_unix, &via_tcp, &via_socketmap];
    // Before the login: refused everywhere (and each smtpd has asked once).
    for pf in all {
        let r = rcpt("127.0.0.5", pf.port);
        assert!(r.contains("Relay access denied"), "{r}\n{}", pf.log());
    }
    send_udp(
        port,
        "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=1, session=<abcdefgh>",
    );
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("grant 127.0.0.5")));
    // The very first connection after the grant relays: no polling.
    for pf in all {
        let r = rcpt("127.0.0.5", pf.port);
        assert!(r.starts_with("250"), "{r}\n{}\n{}", pf.log(), d.log_text());
        let r = rcpt("127.0.0.6", pf.port);
        assert!(r.contains("Relay access denied"), "{r}");
    }
    // After the window: refused again.
    assert!(
        wait_for(Duration::from_secs(90), || d
            .log_text()
            .contains("expire 127.0.0.5")),
        "{}",
        d.log_text()
    );
    for pf in all {
        let r = rcpt("127.0.0.5", pf.port);
        assert!(r.contains("Relay access denied"), "{r}");
    }
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(!log.contains("policy_requests=0 "), "{log}");
    assert!(!log.contains("socketmap_requests=0 "), "{log}");
}

/// --hold-while-connected with a real Dovecot: an IMAP session kept open
/// well past the window keeps its address in the map; after LOGOUT (the
/// mail process's "Disconnected: Logged out" line, attested like the
/// login) the address leaves the map one window later.
#[test]
fn an_open_imap_session_holds_its_grant_until_one_window_after_logout() {
    require_root!();
    let s = Scratch::new();
    let (mut d, daemon_socket) = attested_daemon(
        &s,
        &[
            "--window",
            "3s",
            "--require-attestation",
            "--hold-while-connected",
            "--hold-max",
            "1h",
        ],
    );
    let rs = rsyslog_with_attested_rule(&s, "rsyslog", &daemon_socket);
    let dovecot = Dovecot::start(&s.path("dovecot"), &rs.socket, &["alice"], "");

    let session = imap_session("127.0.0.5", dovecot.imap_port, "alice", PASSWORD);
    assert!(session.logged_in);
    assert!(
        wait_for(Duration::from_secs(30), || s
            .postmap_q("127.0.0.5")
            .is_some()),
        "127.0.0.5 not granted\n{}",
        d.log_text()
    );
    // Three windows with the session open: still in the map.
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        s.postmap_q("127.0.0.5").is_some(),
        "127.0.0.5 left the map while its session was open\n{}",
        d.log_text()
    );
    // A POP3 session from another address, without hold-breaking effects:
    // it ends at once, and its address leaves one window later.
    assert!(pop3_login(
        "127.0.0.6",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("grant 127.0.0.6 ")),
        "127.0.0.6 not granted\n{}",
        d.log_text()
    );

    drop(session);
    let t0 = Instant::now();
    assert!(
        wait_for(Duration::from_secs(30), || d.log_text().contains(
            "logout from 127.0.0.5 of user \"alice\": last session closed"
        )),
        "the logout was not paired with the login\n{}",
        d.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(60), || s
            .postmap_q("127.0.0.5")
            .is_none()),
        "127.0.0.5 still in the map a minute after logout\n{}",
        d.log_text()
    );
    let after = t0.elapsed();
    eprintln!("127.0.0.5 left the map {after:?} after LOGOUT");
    assert!(
        after >= Duration::from_millis(2500),
        "left the map {after:?} after logout, before the 3 s window\n{}",
        d.log_text()
    );
    // Its POP3 session ended at once, so its grant ended one window
    // later.
    assert!(
        wait_for(Duration::from_secs(60), || s
            .postmap_q("127.0.0.6")
            .is_none()),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("expire 127.0.0.6"),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains(
            "grant 127.0.0.5 for 3s after the session ends (held while it is open, at most 1h)"
        ),
        "{log}"
    );
    assert!(!log.contains("forgery"), "{log}");
    drop(dovecot);
    assert_eq!(d.stop(), Some(0));
}
