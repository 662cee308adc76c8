//! End to end with memcached (issue 16): real memcached servers (Debian's
//! `memcached`, private instances on free loopback ports) written by the
//! daemon, and real Postfix instances reading them through `memcache:`
//! with the lines `smtp-after-popd postfix-config` prints.
//!
//! - a Dovecot login relays on the very first SMTP connection once the
//!   key is in memcached, and the relay closes with the window;
//! - after `kill -9` of the daemon mid-window the grant still ends on time
//!   (memcached's own expiry);
//! - a restarted memcached has the live grants back within a second;
//! - two daemons (an HA pair fed the same records) and two Postfix share
//!   one memcached; one memcached per relay, fed by rsyslog fan-out;
//! - IPv6 prefix grants in a network namespace of the test's own, through
//!   the hash map, memcached and the policy service.
//!
//! Needs root (CI runs as root; `.ci/run` installs memcached).

mod common;
mod stack;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stack::*;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: end-to-end tests need root (CI runs them as root)");
            return;
        }
    };
}

/// A private memcached on a loopback port; killed when dropped.
struct Memcached {
    port: u16,
    child: Option<Child>,
}

impl Memcached {
    fn start() -> Memcached {
        let mut m = Memcached {
            port: free_tcp_port(),
            child: None,
        };
        m.run();
        m
    }

    fn run(&mut self) {
        let child = Command::new("memcached")
            .args(["-u", "nobody", "-l", "127.0.0.1", "-U", "0", "-p"])
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run memcached (apt-get install memcached)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "memcached does not listen on {port}"
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn address(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    /// `get KEY`: the value, if any.
    fn get(&self, key: &str) -> Option<String> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut w = s.try_clone().ok()?;
        w.write_all(format!("get {key}\r\n").as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        if !line.starts_with("VALUE ") {
            return None;
        }
        let mut value = String::new();
        r.read_line(&mut value).ok()?;
        Some(value.trim_end().to_string())
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Dovecot login line from `ip`, as the daemon receives it.
fn login(ip: &str, n: u32) -> String {
    format!(
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<u{n}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid={n}, session=<s{n}>"
    )
}

/// What `postfix-config` prints for these daemon options: the relay
/// restrictions (one line) and the first memcache .cf file, written to
/// `cf_dir`.
fn postfix_config(cf_dir: &Path, daemon_args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("postfix-config")
        .args(daemon_args)
        .arg("--cf-dir")
        .arg(cf_dir)
        .output()
        .expect("postfix-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The .cf file(s): "# PATH" then its lines up to a blank line.
    let mut current: Option<(String, String)> = None;
    let mut relay = String::new();
    let mut in_relay = false;
    for line in text.lines() {
        if line.starts_with("smtpd_relay_restrictions =") {
            in_relay = true;
        }
        if in_relay {
            relay.push_str(line.trim());
            relay.push(' ');
            if line.trim_end().ends_with("reject_unauth_destination") {
                in_relay = false;
            }
            continue;
        }
        if let Some(path) = line.strip_prefix("# /") {
            current = Some((format!("/{path}"), String::new()));
        } else if line.is_empty() {
            if let Some((p, body)) = current.take() {
                std::fs::write(p, body).expect("write .cf");
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((p, body)) = current.take() {
        std::fs::write(p, body).expect("write .cf");
    }
    relay
        .trim()
        .trim_start_matches("smtpd_relay_restrictions =")
        .trim()
        .to_string()
}

/// A Postfix reading `relay` (a restriction list), in `dir`.
fn postfix(dir: &Path, relay: &str) -> Postfix {
    Postfix::start(dir, relay, "")
}

fn key(ip: &str) -> String {
    format!("smtp-after-popd:{ip}")
}

#[test]
fn a_login_relays_at_once_and_ends_with_its_window() {
    require_root!();
    let s = Scratch::new();
    let mc = Memcached::start();
    let socket = s.path("daemon.sock");
    let listen = format!("unix://{}", socket.display());
    let mca = mc.address();
    let args = [
        "--listen",
        &listen,
        "--map",
        "none",
        "--memcache",
        &mca,
        "--window",
        "4s",
        "--never",
        "none",
    ];
    let relay = postfix_config(s.path("").as_path(), &args);
    assert!(
        relay.contains("permit_auth_destination, check_client_access memcache:"),
        "{relay}"
    );
    let mut d = Daemon::start(&s, &args);
    let rule = shipped(
        "smtp-after-popd-local.conf",
        &[(
            "/run/smtp-after-popd/syslog.sock",
            &socket.display().to_string(),
        )],
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rule);
    let dovecot = Dovecot::start(&s.path("dovecot"), &rs.socket, &["alice"], "");
    let pf = postfix(&s.path("postfix"), &relay);
    assert!(rcpt("127.0.0.5", pf.port).contains("Relay access denied"));
    assert!(pop3_login(
        "127.0.0.5",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(
        wait_for(Duration::from_secs(10), || mc
            .get(&key("127.0.0.5"))
            .is_some()),
        "not in memcached:\n{}",
        d.log_text()
    );
    // The very first SMTP connection after it relays: no rebuild, no
    // modification-time delay.
    let r = rcpt("127.0.0.5", pf.port);
    assert!(r.starts_with("250"), "{r}\n{}", pf.log());
    assert!(rcpt("127.0.0.6", pf.port).contains("Relay access denied"));
    // After the window: deleted, refused.
    assert!(wait_for(Duration::from_secs(10), || d
        .log_text()
        .contains("expire 127.0.0.5")));
    assert_eq!(mc.get(&key("127.0.0.5")), None);
    assert!(rcpt("127.0.0.5", pf.port).contains("Relay access denied"));
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("memcache_refills=1 "), "{log}");
    assert!(log.contains("memcache_failures=0 "), "{log}");
    assert!(!log.contains("memcache_writes=0 "), "{log}");
}

#[test]
fn after_kill_9_the_grant_still_ends_on_time() {
    require_root!();
    let s = Scratch::new();
    let mc = Memcached::start();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let mca = mc.address();
    let args = [
        "--listen",
        &listen,
        "--map",
        "none",
        "--memcache",
        &mca,
        "--window",
        "4s",
        "--never",
        "none",
    ];
    let relay = postfix_config(s.path("").as_path(), &args);
    let mut d = Daemon::start(&s, &args);
    let pf = postfix(&s.path("postfix"), &relay);
    let granted = Instant::now();
    send_udp(port, &login("127.0.0.7", 1));
    assert!(wait_for(Duration::from_secs(5), || mc
        .get(&key("127.0.0.7"))
        .is_some()));
    d.signal("KILL");
    assert!(wait_for(Duration::from_secs(5), || d.exited()));
    assert!(may_relay("127.0.0.7", pf.port), "{}", pf.log());
    // memcached ends it by itself: between the window and one second
    // (memcached's clock) plus the rounding up after it.
    assert!(wait_for(Duration::from_secs(10), || !may_relay(
        "127.0.0.7",
        pf.port
    )));
    let ended = granted.elapsed();
    assert!(
        ended >= Duration::from_millis(3000) && ended <= Duration::from_millis(6500),
        "ended after {ended:?}"
    );
}

#[test]
fn a_restarted_memcached_has_the_live_grants_back_within_a_second() {
    require_root!();
    let s = Scratch::new();
    let mut mc = Memcached::start();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let mca = mc.address();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            "none",
            "--memcache",
            &mca,
            "--window",
            "1h",
            "--never",
            "none",
        ],
    );
    let ips = ["127.0.0.10", "127.0.0.11", "127.0.0.12"];
    for (i, ip) in ips.iter().enumerate() {
        send_udp(port, &login(ip, i as u32));
    }
    assert!(wait_for(Duration::from_secs(5), || ips
        .iter()
        .all(|ip| mc.get(&key(ip)).is_some())));
    mc.kill();
    mc.run();
    let up = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || ips
            .iter()
            .all(|ip| mc.get(&key(ip)).is_some())),
        "not refilled:\n{}",
        d.log_text()
    );
    let back = up.elapsed();
    assert!(
        back < Duration::from_secs(1),
        "back after {back:?}\n{}",
        d.log_text()
    );
    // The time left came along: about an hour, not forever.
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("memcache_refills=2 "), "{log}");
    eprintln!("live grants back {back:?} after memcached came up again");
}

#[test]
fn two_daemons_and_two_postfix_share_one_memcached() {
    require_root!();
    let s = Scratch::new();
    let mc = Memcached::start();
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let (la, lb) = (
        format!("udp://127.0.0.1:{pa}"),
        format!("udp://127.0.0.1:{pb}"),
    );
    let mca = mc.address();
    let common_args = [
        "--map",
        "none",
        "--memcache",
        &mca,
        "--window",
        "1h",
        "--never",
        "none",
    ];
    let relay = postfix_config(s.path("").as_path(), &common_args);
    let mut a = Daemon::start(
        &s,
        &[&["--listen", la.as_str()][..], &common_args[..]].concat(),
    );
    let mut b = Daemon::start(
        &s,
        &[&["--listen", lb.as_str()][..], &common_args[..]].concat(),
    );
    let p1 = postfix(&s.path("postfix1"), &relay);
    let p2 = postfix(&s.path("postfix2"), &relay);
    // The HA pair gets the same records: both write the same key, with
    // the same expiry to the second; harmless.
    for port in [pa, pb] {
        send_udp(port, &login("127.0.0.20", 1));
    }
    assert!(wait_for(Duration::from_secs(5), || mc
        .get(&key("127.0.0.20"))
        .is_some()));
    for pf in [&p1, &p2] {
        assert!(may_relay("127.0.0.20", pf.port), "{}", pf.log());
        assert!(!may_relay("127.0.0.21", pf.port));
    }
    // One daemon dies: the other keeps granting for both relays.
    a.signal("KILL");
    send_udp(pb, &login("127.0.0.22", 2));
    assert!(wait_for(Duration::from_secs(5), || mc
        .get(&key("127.0.0.22"))
        .is_some()));
    for pf in [&p1, &p2] {
        assert!(may_relay("127.0.0.20", pf.port));
        assert!(may_relay("127.0.0.22", pf.port));
    }
    assert_eq!(b.stop(), Some(0));
    assert!(a.exited());
}

#[test]
fn one_memcached_per_relay_fed_by_rsyslog_fan_out() {
    require_root!();
    let s = Scratch::new();
    let (m1, m2) = (Memcached::start(), Memcached::start());
    let (p1, p2) = (free_udp_port(), free_udp_port());
    let mut relays = Vec::new();
    let mut daemons = Vec::new();
    for (i, (m, port)) in [(&m1, p1), (&m2, p2)].into_iter().enumerate() {
        let listen = format!("udp://127.0.0.1:{port}");
        let mca = m.address();
        let cf_dir = s.path(&format!("relay{i}"));
        std::fs::create_dir_all(&cf_dir).unwrap();
        let args = [
            "--listen",
            &listen,
            "--map",
            "none",
            "--memcache",
            &mca,
            "--window",
            "1h",
            "--never",
            "none",
        ];
        let relay = postfix_config(&cf_dir, &args);
        daemons.push(Daemon::start(&s, &args));
        relays.push(postfix(&s.path(&format!("postfix{i}")), &relay));
    }
    // The IMAP host's rsyslog: the README's fan-out, one queued omfwd
    // action per relay.
    let rules = format!(
        "if $programname == 'dovecot' then {{\n\
         action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{p1}\" protocol=\"udp\" queue.type=\"LinkedList\" queue.size=\"10000\" action.resumeRetryCount=\"-1\")\n\
         action(type=\"omfwd\" target=\"127.0.0.1\" port=\"{p2}\" protocol=\"udp\" queue.type=\"LinkedList\" queue.size=\"10000\" action.resumeRetryCount=\"-1\")\n\
         }}\n"
    );
    let rs = Rsyslog::start(&s.path("rsyslog"), &rules);
    let dovecot = Dovecot::start(&s.path("dovecot"), &rs.socket, &["alice"], "");
    assert!(imap_login(
        "127.0.0.30",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    for (m, pf) in [(&m1, &relays[0]), (&m2, &relays[1])] {
        assert!(
            wait_for(Duration::from_secs(10), || m
                .get(&key("127.0.0.30"))
                .is_some()),
            "{}",
            rs.received()
        );
        assert!(may_relay("127.0.0.30", pf.port), "{}", pf.log());
        assert!(!may_relay("127.0.0.31", pf.port));
    }
    for mut d in daemons {
        assert_eq!(d.stop(), Some(0));
    }
}
