//! The daemon end to end: datagrams in over UDP and a unix socket, the real
//! `postmap` building the map, answers checked with `postmap -q`.

mod common;

use std::time::Duration;

use common::*;

const LOGINS: &[(&str, Option<&str>)] = &[
    // (datagram, address that must be granted)
    (
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=4242, session=<Vb0F8x8s4NzAAAAB>",
        Some("192.0.2.7"),
    ),
    (
        "<22>Nov 23 10:00:02 mail1 dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=2001:DB8:0:0:0:0:0:2a, lip=2001:db8::1, mpid=4243, TLS, session=<Vb0F8x8s4NzAAAAC>",
        Some("2001:db8::2a"),
    ),
    (
        "<22>Nov 23 10:00:03 mail1 dovecot: imap-login: Logged in: user=<carol>, method=PLAIN, rip=::ffff:198.51.100.4, lip=::ffff:198.51.100.1, mpid=4244, session=<Vb0F8x8s4NzAAAAD>",
        Some("198.51.100.4"),
    ),
    (
        "<22>Nov 23 10:00:04 mail1 courierpop3login: LOGIN, user=dave, ip=[::ffff:203.0.113.5], port=[41234]",
        Some("203.0.113.5"),
    ),
    // A failed login grants nothing.
    (
        "<22>Nov 23 10:00:05 mail1 dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<eve>, method=PLAIN, rip=192.0.2.66, lip=192.0.2.1, session=<Vb0F8x8s4NzAAAAE>",
        None,
    ),
    // An address injected through the user name of a failed login.
    (
        "<22>Nov 23 10:00:06 mail1 dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<Login: user=<x>, method=PLAIN, rip=192.0.2.67, lip=192.0.2.1>, method=PLAIN, rip=192.0.2.68, lip=192.0.2.1",
        None,
    ),
    // A program that is not a mail server saying the same words.
    (
        "<22>Nov 23 10:00:07 mail1 sshd[12]: pop3-login: Login: user=<x>, method=PLAIN, rip=192.0.2.69, lip=192.0.2.1",
        None,
    ),
    // A login from loopback is never granted (default --never).
    (
        "<22>Nov 23 10:00:08 mail1 dovecot: pop3-login: Login: user=<lo>, method=PLAIN, rip=127.0.0.9, lip=127.0.0.1, mpid=1, session=<Vb0F8x8s4NzAAAAF>",
        None,
    ),
    // Garbage, oversize and invalid UTF-8 are dropped.
    ("garbage", None),
];

const NOT_GRANTED: &[&str] = &[
    "192.0.2.66",
    "192.0.2.67",
    "192.0.2.68",
    "192.0.2.69",
    "127.0.0.9",
];

#[test]
fn udp_logins_reach_the_postfix_map() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "1h",
        ],
    );
    // The map exists (empty) as soon as the daemon has started.
    assert!(s.path("authenticated_ips.db").exists(), "{}", d.log_text());

    for (msg, want) in LOGINS {
        send_udp(port, msg);
        if let Some(ip) = want {
            assert!(
                s.wait_ok(ip, Duration::from_secs(30)),
                "{ip} not in the map:\n{}",
                d.log_text()
            );
        }
    }
    let mut big = vec![b'x'; 9000];
    big[0] = b'<';
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&big, ("127.0.0.1", port))
        .unwrap();
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(
            b"<22>Nov 23 10:00:01 mail dovecot: \xff\xfe",
            ("127.0.0.1", port),
        )
        .unwrap();
    // Give the daemon a moment to (not) act on the negatives: a final
    // positive acts as a barrier, since datagrams are handled in order.
    send_udp(
        port,
        "<22>Nov 23 10:00:09 mail1 dovecot: pop3-login: Login: user=<zed>, method=PLAIN, rip=192.0.2.200, lip=192.0.2.1, mpid=9, session=<Vb0F8x8s4NzAAAAG>",
    );
    assert!(s.wait_granted("192.0.2.200", Duration::from_secs(30)));
    for ip in NOT_GRANTED {
        assert_eq!(s.postmap_q(ip), None, "{ip} must not be granted");
    }
    let lines = map_lines(&map);
    assert_eq!(
        lines,
        vec![
            "192.0.2.7 OK",
            "192.0.2.200 OK",
            "198.51.100.4 OK",
            "203.0.113.5 OK",
            "2001:db8::2a OK"
        ]
    );
    let log = d.log_text();
    assert!(
        log.contains("grant 192.0.2.7 for 1h: dovecot pop3 login of user \"alice\""),
        "{log}"
    );
    assert!(
        log.contains("refuse 127.0.0.9: address in never-grant network 127.0.0.0/8"),
        "{log}"
    );
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("dropped_too_long=1"), "{log}");
    assert!(log.contains("dropped_invalid_utf8=1"), "{log}");
    // The garbage datagram names no known program: skipped unparsed.
    assert!(log.contains("skipped=1"), "{log}");
}

#[test]
fn unix_socket_grants_and_window_expires() {
    let s = Scratch::new();
    let sock = s.path("syslog.sock");
    let listen = format!("unix://{}", sock.display());
    // A stale socket file from a crashed run is replaced.
    drop(std::os::unix::net::UnixDatagram::bind(&sock).unwrap());
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "8s",
        ],
    );
    // By default only its owner and root (rsyslog) may write to it.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // As a local program writes it: no hostname.
    send_unix(
        &sock,
        "<22>Nov 23 10:00:01 dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.8, lip=192.0.2.1, mpid=77, session=<Vb0F8x8s4NzAAAAH>",
    );
    assert!(
        s.wait_ok("192.0.2.8", Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    // Gone from the source file and the database when the window ends.
    assert!(
        wait_for(Duration::from_secs(60), || s
            .postmap_q("192.0.2.8")
            .is_none()
            && map_lines(&map).is_empty()),
        "{}",
        d.log_text()
    );
    assert!(d.log_text().contains("expire 192.0.2.8: window over"));
    assert_eq!(d.stop(), Some(0));
    assert!(!sock.exists(), "socket file removed on exit");
}

#[test]
fn peers_outside_allow_from_grant_nothing() {
    let s = Scratch::new();
    let port = free_udp_port();
    // Dual-stack socket: an IPv4 peer must be judged as IPv4.
    let listen = format!("udp://[::]:{port}");
    let map = s.map();
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--allow-from",
            "127.0.0.2",
            "--map",
            map.to_str().unwrap(),
        ],
    );
    let line = |ip: &str| {
        format!(
            "<22>Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<Vb0F8x8s4NzAAAAI>"
        )
    };
    send_udp_from("127.0.0.1", port, &line("192.0.2.10"));
    // Sent after the refused one, so it is the marker that the refusal
    // was decided: datagrams are handled in order.
    send_udp_from("127.0.0.2", port, &line("192.0.2.11"));
    assert!(
        s.wait_granted("192.0.2.11", Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("192.0.2.10"), None);
    assert!(d.log_text().contains("peer not in allow-from"));
}

#[test]
fn a_burst_of_logins_costs_few_rebuilds() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "1h",
        ],
    );
    // Paced only so that none is lost to a small receive buffer.
    send_udp_paced(
        port,
        (0..200u32).map(|i| {
            format!(
                "<22>Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<u{i}>, method=PLAIN, rip=198.51.100.{}, lip=192.0.2.1, mpid={i}, session=<Vb0F8x8s4NzAAAAJ>",
                i % 250 + 1
            )
        }),
    );
    assert!(
        wait_for(Duration::from_secs(60), || map_lines(&map).len() == 200),
        "{}",
        d.log_text()
    );
    d.stop();
    let rebuilds = d.log_text().matches("rewritten with").count();
    // One for the empty map at start, then far fewer than one per login.
    assert!(rebuilds < 40, "{rebuilds} rebuilds for 200 logins");
}

/// A postmap that fails after start-up is logged and retried, and the
/// grants are kept meanwhile (one that fails at start-up stops the start:
/// tests/deploy.rs).
#[test]
fn postmap_failure_is_retried_and_not_fatal() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let fake = s.path("postmap-missing");
    std::os::unix::fs::symlink(which_postmap(), &fake).unwrap();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--postmap",
            fake.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&fake).unwrap();
    send_udp(
        port,
        "<22>Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<a>, method=PLAIN, rip=192.0.2.12, lip=192.0.2.1, mpid=1, session=<Vb0F8x8s4NzAAAAK>",
    );
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("grant 192.0.2.12")));
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("not updated: cannot run")));
    assert!(!d.exited());
    // Once postmap exists, the retry writes the map with the kept grant.
    std::os::unix::fs::symlink(which_postmap(), &fake).unwrap();
    assert!(
        s.wait_granted("192.0.2.12", Duration::from_secs(60)),
        "{}",
        d.log_text()
    );
    assert_eq!(d.stop(), Some(0));
}

fn which_postmap() -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin"] {
        let p = std::path::Path::new(dir).join("postmap");
        if p.exists() {
            return p;
        }
    }
    panic!("postmap not found: install postfix");
}

#[test]
fn configuration_errors_exit_78_with_a_precise_message() {
    let s = Scratch::new();
    let conf = s.path("smtp-after-popd.toml");
    std::fs::write(&conf, "window = \"2m\"\nallow-from = [\"10.1.2.3/8\"]\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "--config",
            conf.to_str().unwrap(),
            "--map",
            s.map().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}, line 2: allow-from = \"10.1.2.3/8\": \"10.1.2.3/8\" has non-null host address bits, perhaps you should use \"10.0.0.0/8\" instead",
            conf.display()
        )),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["--listen", "udp://nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn match_prints_one_line_per_login() {
    let s = Scratch::new();
    let log = s.path("mail.log");
    std::fs::write(
        &log,
        "Nov 23 10:00:01 mail postfix/smtpd[100]: connect from unknown[192.0.2.50]\n\
         Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=4242, session=<Vb0F8x8s4NzAAAAB>\n\
         Nov 23 10:00:02 mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<eve>, method=PLAIN, rip=192.0.2.66, lip=192.0.2.1, session=<Vb0F8x8s4NzAAAAE>\n\
         Nov 23 10:00:03 mail dovecot: imap(bob)<1234><abc>: Disconnected: Logged out in=10 out=20\n\
         Nov 23 10:00:04 mail imapd[200]: Login user=bob host=client.example.net [198.51.100.9]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("match")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let grants: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("grant\t"))
        .collect();
    assert_eq!(
        grants,
        [
            format!(
                "grant\t192.0.2.7\tdovecot\tpop3\talice\tdovecot-login\t{}:2",
                log.display()
            ),
            format!(
                "grant\t198.51.100.9\tuw-imap\timap\tbob\tuw-login\t{}:5",
                log.display()
            )
        ]
    );
    // Standard input works the same.
    let mut child = std::process::Command::new(BIN)
        .arg("match")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&log).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.lines().filter(|l| l.starts_with("grant\t")).count(), 2);
}

/// Every line of every annotated sample log (real Dovecot lines among
/// them), sent as a datagram the way rsyslog forwards it, one file after
/// the other: each file's lines grant (or renew) exactly the addresses
/// annotated `grant` in that file, and nothing from its failures,
/// disconnects and injections, even where another file grants the same
/// address; the map ends up holding exactly all of them.
#[test]
fn sample_logs_sent_as_datagrams_grant_exactly_their_annotations() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "1h",
            // The captured Dovecot lines come from 127.0.0.x clients.
            "--never",
            "none",
            // The Zimbra samples' proxy, whose oip= is then believed.
            "--trusted-proxy",
            "198.51.100.31",
        ],
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut all = std::collections::BTreeSet::new();
    let mut sent = 0;
    let mut counted = 0;
    let mut ambiguous = 0;
    // The log lines already accounted to earlier files.
    let mut seen = 0;
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).unwrap();
        let mut want = std::collections::BTreeSet::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("#= grant ") {
                want.insert(rest.split(' ').next().unwrap().to_string());
            } else if line == "#= counted" || line.starts_with("#= counted injection ") {
                counted += 1;
            } else if line == "#= ambiguous"
                // Logouts are not matched without --hold-while-connected.
                || (line.starts_with("#= ambiguous injection ") && !line.ends_with("-logout"))
            {
                ambiguous += 1;
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                lines.push(format!("<22>{line}"));
            }
        }
        // A last login of its own ends each file: datagrams are handled
        // in order, so once it is granted, the file's lines have been.
        // 198.18.0.0/15 appears in no sample.
        let barrier = format!("198.18.0.{}", i + 1);
        lines.push(format!(
            "<22>Nov 23 10:00:09 mail1 dovecot: pop3-login: Login: user=<zed>, method=PLAIN, rip={barrier}, lip=192.0.2.1, mpid=9, session=<Vb0F8x8s4NzAAAAG>"
        ));
        sent += send_udp_paced(port, &lines);
        let marker = format!("info: grant {barrier} ");
        assert!(
            wait_for(Duration::from_secs(60), || d.log_text().contains(&marker)),
            "{}: barrier {barrier} not granted:\n{}",
            file.display(),
            d.log_text()
        );
        let log = d.log_text();
        let log: Vec<&str> = log.lines().collect();
        let end = log
            .iter()
            .position(|l| l.contains(&marker))
            .expect("barrier line");
        let got: std::collections::BTreeSet<String> = log[seen..end]
            .iter()
            .filter_map(|l| {
                let (_, rest) = l
                    .split_once("info: grant ")
                    .or_else(|| l.split_once("info: renew "))?;
                rest.split(' ').next().map(str::to_string)
            })
            .collect();
        seen = end + 1;
        assert_eq!(
            got,
            want,
            "{}: what its lines granted or renewed, against its annotations",
            file.display()
        );
        all.extend(want);
        all.insert(barrier);
    }
    let in_map = || -> std::collections::BTreeSet<String> {
        map_lines(&map)
            .into_iter()
            .map(|l| l.trim_end_matches(" OK").to_string())
            .collect()
    };
    // The map follows the table shortly after the last barrier's grant.
    wait_for(Duration::from_secs(60), || in_map() == all);
    assert_eq!(in_map(), all, "after {sent} datagrams:\n{}", d.log_text());
    let want: Vec<String> = all.into_iter().collect();
    for ip in &want {
        assert_eq!(s.postmap_q(ip).as_deref(), Some("OK"), "{ip}");
    }
    assert_eq!(d.stop(), Some(0));
    // Logins without an address were recognised and counted.
    assert!(counted > 0);
    let log = d.log_text();
    assert!(
        log.contains(&format!(" logins_unaddressed={counted} ")),
        "{counted} counted samples:\n{log}"
    );
    // Lines whose user's text could stand for the server's were refused
    // and counted.
    assert!(ambiguous > 0);
    assert!(
        log.contains(&format!(" refused_ambiguous={ambiguous} ")),
        "{ambiguous} ambiguous samples:\n{log}"
    );
    // Nothing was lost on the way.
    assert!(
        log.contains(&format!(" received={sent} ")) && log.contains(" kernel_dropped=0"),
        "{sent} sent:\n{log}"
    );
}

/// Without MAIL_CONFIG, postmap runs with the daemon's own configuration
/// directory next to the map (a link to /etc/postfix/main.cf, or an empty
/// main.cf on a fresh machine), and the README's lookup through it works
/// on either kind of host. (tests/deploy.rs runs both kinds of host in
/// mount namespaces.)
#[test]
fn without_mail_config_postmap_runs_with_the_daemons_own_configuration() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start_with(
        &s,
        &["--listen", &listen, "--map", map.to_str().unwrap()],
        None,
    );
    let private = s.path(".smtp-after-popd-postfix");
    assert!(private.join("main.cf").exists(), "{}", d.log_text());
    send_udp(
        port,
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=4242, session=<Vb0F8x8s4NzAAAAB>",
    );
    assert!(
        wait_for(Duration::from_secs(30), || postmap_q(
            &private,
            &map,
            "192.0.2.7"
        )
        .as_deref()
            == Some("OK")),
        "{}",
        d.log_text()
    );
    assert_eq!(d.stop(), Some(0));
}

/// A TCP listener serves at most 32 connections of one peer at once: the
/// next one closes the connection that has waited longest without sending
/// a complete frame (counted). A frame longer than 8 KiB closes its
/// connection. Records in both RFC 6587 framings are granted.
#[test]
fn tcp_listener_bounds_connections_and_frames() {
    use std::io::{Read, Write};
    let s = Scratch::new();
    let port = free_tcp_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(&s, &["--listen", &listen, "--map", map.to_str().unwrap()]);
    let mut conns = Vec::new();
    for _ in 0..32 {
        conns.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        // Accepted in this order, so that the first is the longest waiting.
        std::thread::sleep(Duration::from_millis(5));
    }
    let line = "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.41, lip=192.0.2.1";
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || d.log_text().contains(
            "without completing a request, to make room for one from tcp:127.0.0.1:"
        )),
        "{}",
        d.log_text()
    );
    // The oldest was closed; the newcomer is served.
    conns[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(conns[0].read(&mut [0u8; 1]), Ok(0) | Err(_)));
    extra
        .write_all(format!("{line}\n{} {}", line.len(), line.replace(".41", ".42")).as_bytes())
        .unwrap();
    for ip in ["192.0.2.41", "192.0.2.42"] {
        assert!(
            s.wait_granted(ip, Duration::from_secs(30)),
            "{ip}\n{}",
            d.log_text()
        );
    }
    conns[1].write_all(&vec![b'x'; 9000]).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("longer than 8192 bytes: connection closed")),
        "{}",
        d.log_text()
    );
    drop(conns);
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("dropped_connections=1"), "{log}");
    assert!(log.contains("dropped_too_long=1"), "{log}");
}

/// Started as root with --user, the daemon binds its sockets, gives each
/// its own group and mode (the syslog socket's from its URL; the deprecated
/// --socket-group only to the policy socket, never to a syslog socket),
/// switches to the user for good (all four uids and gids), and still keeps
/// the map, now as that user.
#[test]
fn drops_root_after_binding() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !require_root("to change users") {
        return;
    }
    let s = Scratch::new();
    let root = s.path("");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mapdir = s.path("maps");
    std::fs::create_dir(&mapdir).unwrap();
    std::os::unix::fs::chown(&mapdir, Some(65534), Some(65534)).unwrap();
    let map = mapdir.join("authenticated_ips");
    let sock = s.path("syslog.sock");
    let plain = s.path("plain.sock");
    let policy = s.path("policy.sock");
    let listen = format!("unix://{}?group=mail&mode=0620", sock.display());
    let listen_plain = format!("unix://{}", plain.display());
    let policy_url = format!("unix://{}", policy.display());
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--listen",
            &listen_plain,
            "--policy",
            &policy_url,
            "--map",
            map.to_str().unwrap(),
            "--user",
            "nobody",
            "--group",
            "nogroup",
            "--socket-group",
            "mail",
        ],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    let ids = |key: &str| -> String {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(ids("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(ids("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(ids("Groups:"), "65534", "{status}");
    let owner_group_mode = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o777)
    };
    assert_eq!(
        owner_group_mode(&sock),
        (0, 8, 0o620),
        "its URL's group mail"
    );
    assert_eq!(
        owner_group_mode(&plain),
        (0, 0, 0o600),
        "root (rsyslog) only"
    );
    assert_eq!(owner_group_mode(&policy), (0, 8, 0o660), "--socket-group");
    assert!(
        d.log_text().contains(
            "socket-group mail is deprecated: it gives its group to the policy and socketmap sockets only"
        ),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text()
            .contains("running as user nobody (uid 65534), group nogroup (gid 65534)")
    );
    send_unix(
        &sock,
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1",
    );
    assert!(
        wait_for(Duration::from_secs(30), || s
            .postmap_q_at(&map, "192.0.2.7")
            .as_deref()
            == Some("OK")),
        "{}",
        d.log_text()
    );
    assert_eq!(
        std::fs::metadata(mapdir.join("authenticated_ips.db"))
            .unwrap()
            .uid(),
        65534
    );
    assert_eq!(d.stop(), Some(0));
}

/// With --user, a map directory the user may not write stops the daemon
/// at start-up with a message that says what to do.
#[test]
fn a_map_directory_the_user_cannot_write_is_a_start_up_error() {
    if !require_root("to change users") {
        return;
    }
    let s = Scratch::new();
    let map = s.map();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-after-popd"))
        .args([
            "--listen",
            "udp://127.0.0.1:0",
            "--map",
            map.to_str().unwrap(),
            "--user",
            "nobody",
        ])
        .env("MAIL_CONFIG", s.mail_config())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("user nobody may not create files in") && err.contains("chown"),
        "{err}"
    );
}

/// An attestation is believed only on a listener declared ?attested=yes,
/// from a peer trusted to speak there (a unix socket, whose permissions
/// decide who writes; a --trust-attestation-from network peer), and in the
/// attested rule's exact form; anywhere else it is a forgery, since any
/// local user of the sending host could have written the same bytes.
#[test]
fn attestation_is_believed_only_on_attested_listeners_from_trusted_peers() {
    let line = |ip: &str| {
        format!(
            "<22>1 2026-11-24T10:00:01Z mail dovecot - - [attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"4242\"]  pop3-login: Login: user=<alice>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<abcdefgh>"
        )
    };
    let s = Scratch::new();
    let port = free_udp_port();
    let port2 = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}?attested=yes");
    let plain_udp = format!("udp://127.0.0.1:{port2}");
    let sock = s.path("syslog.sock");
    let plain_sock = s.path("plain.sock");
    let unix = format!("unix://{}?attested=yes", sock.display());
    let plain = format!("unix://{}", plain_sock.display());
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &plain_udp,
            "--listen",
            &unix,
            "--listen",
            &plain,
            "--map",
            map.to_str().unwrap(),
            "--require-attestation",
        ],
    );
    assert!(
        d.log_text().contains(&format!(
            "{} (attested)",
            unix.trim_end_matches("?attested=yes")
        )),
        "{}",
        d.log_text()
    );
    send_udp(port2, &line("192.0.2.51"));
    send_unix(&plain_sock, &line("192.0.2.54"));
    send_unix(&sock, &line("192.0.2.52"));
    assert!(s.wait_granted("192.0.2.52", Duration::from_secs(30)));
    assert!(
        wait_for(Duration::from_secs(30), || {
            d.log_text()
                .matches("forgery: an attestation element on a listener not declared attested")
                .count()
                == 2
        }),
        "{}",
        d.log_text()
    );
    assert_eq!(s.postmap_q("192.0.2.51"), None);
    assert_eq!(s.postmap_q("192.0.2.54"), None);
    assert_eq!(d.stop(), Some(0));
    assert!(d.log_text().contains(" forgeries=2 "), "{}", d.log_text());

    let s = Scratch::new();
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--require-attestation",
            "--trust-attestation-from",
            "127.0.0.1",
        ],
    );
    send_udp(port, &line("192.0.2.53"));
    assert!(
        s.wait_granted("192.0.2.53", Duration::from_secs(30)),
        "{}",
        d.log_text()
    );
    assert_eq!(d.stop(), Some(0));
}

/// A short flood as fast as one sender can go (faster than the debug build
/// keeps up with), with a login every 500 datagrams: afterwards every
/// datagram is accounted for, received by the daemon or counted as dropped
/// by the kernel, and every login missing from the map is within those
/// counted drops. (The full-minute measurement is examples/flood.rs.)
#[test]
fn a_flood_loses_nothing_silently() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "1h",
        ],
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(("127.0.0.1", port)).unwrap();
    let noise = "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: connect from unknown[198.51.100.7]";
    let login = |n: u64| {
        format!(
            "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip=10.0.{}.{}, lip=192.0.2.1",
            n / 250,
            n % 250 + 1
        )
    };
    // As fast as the daemon reads, in bursts of 128 (far less than the
    // smallest default receive buffer holds), so that the kernel drops
    // little and a login the daemon read but lost would show.
    let t0 = std::time::Instant::now();
    let (mut sent, mut logins) = (0u64, 0u64);
    while t0.elapsed() < Duration::from_secs(2) {
        if sent % 128 == 0 {
            wait_udp_read(port);
        }
        let msg = if sent % 500 == 0 {
            logins += 1;
            login(logins)
        } else {
            noise.to_string()
        };
        sock.send(msg.as_bytes()).unwrap();
        sent += 1;
    }
    // A last login as a barrier: datagrams are handled in order.
    logins += 1;
    sock.send(login(logins).as_bytes()).unwrap();
    sent += 1;
    let barrier = format!("10.0.{}.{}", logins / 250, logins % 250 + 1);
    assert!(
        s.wait_granted(&barrier, Duration::from_secs(60)),
        "{}",
        d.log_text()
    );
    // Then a burst the daemon may not have read when it gets SIGTERM: it
    // reads its queue to the end, and the map takes the last login.
    for _ in 0..100 {
        sock.send(noise.as_bytes()).unwrap();
        sent += 1;
    }
    logins += 1;
    sock.send(login(logins).as_bytes()).unwrap();
    sent += 1;
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    let counter = |key: &str| -> u64 {
        log.lines()
            .find(|l| l.contains("stopped:"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {log}"))
    };
    let (received, dropped, granted) = (
        counter("received"),
        counter("kernel_dropped"),
        counter("granted"),
    );
    eprintln!(
        "flood: sent={sent} received={received} kernel_dropped={dropped} logins={logins} granted={granted}"
    );
    let queued = log
        .lines()
        .find(|l| l.contains("stopping: ") && l.contains(" handled"))
        .unwrap_or_else(|| panic!("no drain line in {log}"));
    eprintln!("flood: {queued}");
    assert_eq!(received + dropped, sent, "{log}");
    // Paced: the kernel drops little, if anything.
    assert!(dropped * 100 <= sent, "{dropped} of {sent} dropped:\n{log}");
    assert!(logins - granted <= dropped, "{log}");
    let last = format!("10.0.{}.{} OK", logins / 250, logins % 250 + 1);
    let lines = map_lines(&map);
    assert_eq!(lines.len() as u64, granted);
    assert!(
        dropped > 0 || lines.contains(&last),
        "{last} not in the map after the stop:\n{log}"
    );
}

/// Started unprivileged from the start (as nobody, through setpriv), with
/// only its map and socket directory writable, the daemon works.
#[test]
fn runs_unprivileged_from_the_start() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("to become nobody") {
        return;
    }
    let s = Scratch::new();
    std::fs::set_permissions(s.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = s.path("run");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let map = dir.join("authenticated_ips");
    let sock = dir.join("syslog.sock");
    let log = s.path("daemon.log");
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_smtp-after-popd"))
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--map")
        .arg(&map)
        .env("MAIL_CONFIG", s.mail_config())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(30), || text()
            .contains("info: started:")),
        "{}",
        text()
    );
    send_unix(
        &sock,
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.61, lip=192.0.2.1",
    );
    assert!(
        wait_for(Duration::from_secs(30), || s
            .postmap_q_at(&map, "192.0.2.61")
            .is_some()),
        "{}",
        text()
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!sock.exists(), "the socket file is removed on exit");
}

/// The policy service over TCP answers allowed peers (OK for a live grant,
/// DUNNO otherwise, on one persistent connection) and closes the
/// connection of a peer outside its allow-list without answering.
/// `--map none` needs a policy service or socketmap; a socketmap must be a
/// unix socket.
#[test]
fn policy_service_over_tcp_answers_allowed_peers_only() {
    use std::io::{BufRead, Write};
    let s = Scratch::new();
    let port = free_udp_port();
    let open_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("udp://127.0.0.1:{port}");
    let open = format!("tcp://127.0.0.1:{open_port}");
    let closed = format!("tcp://127.0.0.1:{closed_port}?allow=192.0.2.0/24");
    let mut d = Daemon::start(
        &s,
        &[
            "--listen", &listen, "--map", "none", "--policy", &open, "--policy", &closed,
        ],
    );
    send_udp(
        port,
        "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1",
    );
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("grant 192.0.2.7")));
    let c = std::net::TcpStream::connect(("127.0.0.1", open_port)).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = std::io::BufReader::new(c);
    let mut ask = |ip: &str| {
        write!(
            w,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={ip}\n\n"
        )
        .unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        let mut blank = String::new();
        r.read_line(&mut blank).unwrap();
        assert_eq!(blank, "\n");
        answer
    };
    assert_eq!(ask("192.0.2.7"), "action=OK\n");
    assert_eq!(ask("192.0.2.8"), "action=DUNNO\n");
    assert_eq!(ask("::ffff:192.0.2.7"), "action=OK\n");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", closed_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = c.write_all(b"request=smtpd_access_policy\nclient_address=192.0.2.7\n\n");
    let mut buf = [0u8; 64];
    // Closed without an answer: end of file, or a reset if the request
    // was still unread. A timeout would be no decision at all.
    match std::io::Read::read(&mut c, &mut buf) {
        Ok(n) => assert_eq!(n, 0, "a refused peer gets no answer"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the refused peer's connection stayed open: {e}"),
    }
    assert_eq!(d.stop(), Some(0));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-after-popd"))
        .args(["--map", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "--map \"none\": with no map file, Postfix needs --policy, --socketmap or --memcache to ask"
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-after-popd"))
        .args(["--map", "none", "--socketmap", "tcp://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("served on a unix socket only"));
}

/// Small changes reach the database incrementally (postmap -i and -d on a
/// copy, renamed into place), and the database then answers exactly like
/// a full rebuild: every granted address OK, every expired one gone.
#[test]
fn small_changes_update_the_map_incrementally() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            // Long enough that none expires before the 301st login is
            // in, on a loaded machine.
            "--window",
            "30s",
        ],
    );
    let login = |i: u32| {
        format!(
            "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip=10.0.{}.{}, lip=192.0.2.1",
            i / 200,
            i % 200 + 1
        )
    };
    // Paced: the kernel's default receive buffer holds only about 270
    // small datagrams.
    send_udp_paced(port, (0..300).map(login));
    assert!(
        wait_for(Duration::from_secs(60), || map_lines(&map).len() == 300),
        "{}",
        d.log_text()
    );
    send_udp(port, &login(300));
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("updated (+1 -0) to 301 addresses")),
        "{}",
        d.log_text()
    );
    for i in [0, 150, 299, 300] {
        let ip = format!("10.0.{}.{}", i / 200, i % 200 + 1);
        assert_eq!(s.postmap_q(&ip).as_deref(), Some("OK"), "{ip}");
    }
    assert!(
        wait_for(Duration::from_secs(90), || map_lines(&map).is_empty()),
        "{}",
        d.log_text()
    );
    // The line is logged just after the map is renamed into place.
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("to 0 addresses")),
        "{}",
        d.log_text()
    );
    for i in [0, 150, 300] {
        let ip = format!("10.0.{}.{}", i / 200, i % 200 + 1);
        assert_eq!(s.postmap_q(&ip), None, "{ip}");
    }
    assert_eq!(d.stop(), Some(0));
}

/// `smtp-after-popd match` on every sample file prints exactly the grants
/// annotated there, in order: what an administrator checking a real log
/// with it would see.
#[test]
fn match_on_every_sample_file_prints_exactly_its_grants() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let want: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#= grant "))
            .map(|rest| {
                let mut w = rest.split(' ');
                (w.next().unwrap().to_string(), w.next().unwrap().to_string())
            })
            .collect();
        // As the daemon test above is run: no never rule (127.0.0.x
        // clients), the Zimbra samples' proxy trusted.
        let config = std::env::temp_dir().join(format!("sap-match-{}.toml", std::process::id()));
        std::fs::write(
            &config,
            "never = [\"none\"]\ntrusted-proxy = [\"198.51.100.31\"]\n",
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["match", "--config", config.to_str().unwrap()])
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_file(&config).unwrap();
        assert!(out.status.success(), "{}", path.display());
        let got: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("grant\t"))
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[1].to_string(), f[3].to_string())
            })
            .collect();
        assert_eq!(got, want, "smtp-after-popd match {}", path.display());
    }
}
