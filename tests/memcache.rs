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
        if !require_root("the private servers and namespaces") {
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
            wait_for(Duration::from_secs(30), || TcpStream::connect((
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
        "15s",
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
        wait_for(Duration::from_secs(30), || mc
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
    assert!(wait_for(Duration::from_secs(60), || d
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
    assert!(wait_for(Duration::from_secs(30), || mc
        .get(&key("127.0.0.7"))
        .is_some()));
    // Granted by now: the window ends before this, on memcached's clock.
    let seen = Instant::now();
    d.signal("KILL");
    assert!(wait_for(Duration::from_secs(30), || d.exited()));
    assert!(may_relay("127.0.0.7", pf.port), "{}", pf.log());
    // memcached ends it by itself: after the window, and by one second
    // (memcached's clock) plus the rounding up after it. Asked of
    // memcached itself, so a slow SMTP conversation cannot make it late.
    let by = seen + Duration::from_secs(4) + Duration::from_millis(2500);
    assert!(wait_for(
        by.saturating_duration_since(Instant::now()),
        || mc.get(&key("127.0.0.7")).is_none()
    ));
    let ended = granted.elapsed();
    assert!(
        ended >= Duration::from_millis(3000),
        "ended after {ended:?}"
    );
    assert!(wait_for(Duration::from_secs(30), || !may_relay(
        "127.0.0.7",
        pf.port
    )));
}

#[test]
fn a_restarted_memcached_gets_the_live_grants_back() {
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
    assert!(wait_for(Duration::from_secs(30), || ips
        .iter()
        .all(|ip| mc.get(&key(ip)).is_some())));
    mc.kill();
    mc.run();
    let up = Instant::now();
    // How fast is for the benchmarks (printed below), not asserted.
    assert!(
        wait_for(Duration::from_secs(30), || ips
            .iter()
            .all(|ip| mc.get(&key(ip)).is_some())),
        "not refilled:\n{}",
        d.log_text()
    );
    let back = up.elapsed();
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
    assert!(wait_for(Duration::from_secs(30), || mc
        .get(&key("127.0.0.20"))
        .is_some()));
    for pf in [&p1, &p2] {
        assert!(may_relay("127.0.0.20", pf.port), "{}", pf.log());
        assert!(!may_relay("127.0.0.21", pf.port));
    }
    // One daemon dies: the other keeps granting for both relays.
    a.signal("KILL");
    send_udp(pb, &login("127.0.0.22", 2));
    assert!(wait_for(Duration::from_secs(30), || mc
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
            wait_for(Duration::from_secs(30), || m
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

/// An SMTP relay probe from IPv6 address `src` to `[::1]:port`: the RCPT
/// TO reply.
fn rcpt6(src: &str, port: u16) -> String {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).expect("socket");
    let from: std::net::SocketAddr = format!("[{src}]:0").parse().expect("address");
    s.bind(&from.into()).expect("bind client address");
    let to: std::net::SocketAddr = format!("[::1]:{port}").parse().expect("address");
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            let _ = r.read_line(&mut l);
            all.push_str(&l);
            if l.len() < 4 || l.as_bytes()[3] == b' ' {
                return all;
            }
        }
    };
    reply();
    let mut last = String::new();
    for cmd in [
        "EHLO client.test",
        "MAIL FROM:<someone@example.org>",
        "RCPT TO:<friend@remote.example>",
        "QUIT",
    ] {
        let _ = w.write_all(format!("{cmd}\r\n").as_bytes());
        let r = reply();
        if cmd.starts_with("RCPT") {
            last = r;
        }
    }
    last.trim_end().to_string()
}

/// A Postfix that also listens on [::1] (inet_protocols = all), with
/// `relay` as its restrictions; returns it and its IPv6 port.
fn postfix6(dir: &Path, relay: &str) -> (Postfix, u16) {
    let pf = Postfix::start(dir, relay, "inet_protocols = all");
    let port = free_tcp_port();
    let master = dir.join("conf/master.cf");
    let mut text = std::fs::read_to_string(&master).expect("master.cf");
    text.push_str(&format!("[::1]:{port} inet n - n - - smtpd\n"));
    std::fs::write(&master, text).expect("master.cf");
    let st = Command::new("postfix")
        .arg("-c")
        .arg(dir.join("conf"))
        .arg("reload")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("postfix reload");
    assert!(st.success());
    assert!(
        wait_for(Duration::from_secs(30), || TcpStream::connect((
            "::1", port
        ))
        .is_ok()),
        "postfix does not listen on [::1]:{port}:\n{}",
        pf.log()
    );
    (pf, port)
}

/// Runs [`ipv6_prefix_inside_a_namespace`] in a network namespace of its
/// own (`unshare -n`), where the documentation addresses of 2001:db8::/32
/// can sit on the loopback interface without touching the host.
#[test]
fn ipv6_prefix_grants_end_to_end_in_a_network_namespace() {
    require_root!();
    let me = std::env::current_exe().expect("test binary");
    let out = Command::new("unshare")
        .arg("-n")
        .arg("--")
        .arg(me)
        .args([
            "--exact",
            "ipv6_prefix_inside_a_namespace",
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("SAP_TEST_NETNS", std::process::id().to_string())
        .output()
        .expect("unshare -n (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[test]
#[ignore = "run inside a network namespace by ipv6_prefix_grants_end_to_end_in_a_network_namespace"]
fn ipv6_prefix_inside_a_namespace() {
    // Only ever inside the namespace the outer test made: it changes the
    // loopback interface.
    if std::env::var_os("SAP_TEST_NETNS").is_none() {
        eprintln!("SKIPPED: runs only inside the outer test's network namespace");
        return;
    }
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(args)
            .status()
            .expect("ip (iproute2)");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["link", "set", "lo", "up"]);
    let clients = [
        "2001:db8:1:2:aaaa::1",
        "2001:db8:1:3::9",
        "2001:db8:1:0:bbbb::2",
        "2001:db8:1::3:4",
        "2001:0:0:1::5",
        "2001:0:0:1::6",
    ];
    for c in clients {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{c}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    let s = Scratch::new();
    let mc = Memcached::start();
    let port = free_udp_port();
    let policy_port = free_tcp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let policy = format!("tcp://127.0.0.1:{policy_port}");
    let map = s.map();
    let mca = mc.address();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--memcache",
            &mca,
            "--policy",
            &policy,
            "--ipv6-prefix",
            "64",
            "--window",
            "1h",
            "--never",
            "none",
        ],
    );
    let base = "permit_mynetworks, permit_auth_destination";
    let tables = [
        format!(
            "{base}, check_client_access hash:{}, reject_unauth_destination",
            map.display()
        ),
        {
            let cf = s.path("mc.cf");
            std::fs::write(
                &cf,
                format!("memcache = {mca}\nkey_format = smtp-after-popd:%s\n"),
            )
            .unwrap();
            format!(
                "{base}, check_client_access memcache:{}, reject_unauth_destination",
                cf.display()
            )
        },
        format!(
            "{base}, check_policy_service inet:127.0.0.1:{policy_port}, reject_unauth_destination"
        ),
    ];
    let relays: Vec<(Postfix, u16)> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| postfix6(&s.path(&format!("postfix{i}")), t))
        .collect();
    // Logins from one address of each /64: 2001:db8:1:2::/64 (key
    // 2001:db8:1:2), 2001:db8:1::/64 (keys 2001:db8:1:0 and 2001:db8:1:),
    // and 2001:0:0:1::/64, which has no safe key: its address alone.
    for (n, login_ip) in ["2001:db8:1:2::5", "2001:db8:1::7", "2001:0:0:1::5"]
        .iter()
        .enumerate()
    {
        send_udp(port, &login(login_ip, n as u32));
    }
    assert!(
        wait_for(Duration::from_secs(30), || {
            let lines = map_lines(&map);
            lines.iter().any(|l| l == "2001:db8:1: OK") && mc.get(&key("2001:db8:1:2")).is_some()
        }),
        "{:?}\n{}",
        map_lines(&map),
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("grant 2001:db8:1:2::/64 (login from 2001:db8:1:2::5)"),
        "{log}"
    );
    assert!(
        log.contains("grant 2001:0:0:1::5 alone (2001:0:0:1::/64 has no key"),
        "{log}"
    );
    for (pf, port6) in &relays {
        let probe = |src: &str| rcpt6(src, *port6);
        for ok in [
            "2001:db8:1:2:aaaa::1",
            "2001:db8:1:0:bbbb::2",
            "2001:db8:1::3:4",
            "2001:0:0:1::5",
        ] {
            // The hash map is seen once smtpd notices the rebuilt file.
            let relayed = wait_for(Duration::from_secs(30), || probe(ok).starts_with("250"));
            assert!(relayed, "{ok} refused: {}\n{}", probe(ok), pf.log());
        }
        for refused in ["2001:db8:1:3::9", "2001:0:0:1::6"] {
            let r = probe(refused);
            assert!(r.contains("Relay access denied"), "{refused}: {r}");
        }
    }
    assert_eq!(d.stop(), Some(0));
}
