//! The daemon as a service: state kept across SIGKILL, SIGHUP reload,
//! the control socket (`list`, `revoke`, `stats`), the Prometheus endpoint,
//! systemd readiness and socket activation, JSON logs, clean SIGTERM.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A child process killed when the test ends, even by a failed assertion.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn login(ip: &str, user: &str) -> String {
    format!(
        "<22>Nov 26 10:00:01 mail1 dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<AAAAAAAAAAAAAAAA>"
    )
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Seconds left on `ip`'s grant, from `smtp-after-popd list`.
fn seconds_left(control: &Path, ip: &str) -> Option<u64> {
    let (code, out, err) = cli(&["list", "--control", control.to_str().unwrap()]);
    assert_eq!(code, 0, "list failed: {err}");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(ip))?;
    let left = line.split_whitespace().nth(1)?;
    Some(match left.split_once('m') {
        Some((m, s)) => {
            m.parse::<u64>().ok()? * 60 + s.trim_end_matches('s').parse::<u64>().ok()?
        }
        None => left.trim_end_matches('s').parse().ok()?,
    })
}

#[test]
fn sigkill_mid_window_keeps_open_windows_and_drops_expired_ones() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let state = s.path("state");
    let control = s.path("control");
    let map = s.map();
    let args = [
        "--listen",
        &listen,
        "--map",
        map.to_str().unwrap(),
        "--window",
        "12s",
        "--state",
        state.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    let window = Duration::from_secs(12);
    let mut d = Daemon::start(&s, &args);
    // B first; A six seconds later, so B's window closes while the daemon
    // is down and A's is still open (six seconds) when it comes back.
    send_udp(port, &login("192.0.2.20", "bob"));
    assert!(s.wait_granted("192.0.2.20", Duration::from_secs(30)));
    // B was granted by now: its window ends before this.
    let b_expiry = Instant::now() + window;
    std::thread::sleep(Duration::from_secs(6));
    let a_granted = Instant::now();
    send_udp(port, &login("192.0.2.21", "alice"));
    assert!(s.wait_granted("192.0.2.21", Duration::from_secs(30)));
    // A was granted between the two instants.
    let a_seen = Instant::now();
    d.signal("KILL");
    let _ = d.child.wait();
    assert!(
        s.postmap_q("192.0.2.20").is_some(),
        "the map outlives a crash"
    );

    // Down until B's window has closed.
    while Instant::now() < b_expiry + Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let d = Daemon::start(&s, &args);
    let log = d.log_text();
    assert!(
        log.contains("restored 1 grant (1 expired meanwhile"),
        "{log}"
    );
    assert!(
        s.postmap_q("192.0.2.21").is_some(),
        "A is back in the map at once\n{log}"
    );
    assert!(
        s.postmap_q("192.0.2.20").is_none(),
        "B expired while down\n{log}"
    );
    // At most what was left of A's original window (a new window would
    // show 12 s); "list" rounds up.
    let most = (a_seen + window)
        .saturating_duration_since(Instant::now())
        .as_secs()
        + 1;
    let left = seconds_left(&control, "192.0.2.21").expect("A listed");
    assert!(
        left <= most && left < 12,
        "A keeps its original expiry, not a new window: {left}s left, at most {most}s"
    );

    // A stays until its original expiry, then goes.
    let a_expiry = a_granted + window;
    assert!(wait_for(Duration::from_secs(60), || s
        .postmap_q("192.0.2.21")
        .is_none()));
    let gone = Instant::now();
    assert!(
        gone + Duration::from_millis(300) >= a_expiry,
        "A left the map {:?} before its original expiry",
        a_expiry - gone
    );
}

#[test]
fn sigterm_flushes_the_state_and_exits() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let state = s.path("state");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
    );
    for i in 1..=50 {
        send_udp(port, &login(&format!("192.0.2.{i}"), "u"));
    }
    assert!(s.wait_granted("192.0.2.50", Duration::from_secs(30)));
    // Exits (with 0) within the stop's bounded steps; how fast is for
    // the benchmarks, not for a test on a loaded machine.
    let code = d.stop();
    assert_eq!(code, Some(0), "{}", d.log_text());
    let text = std::fs::read_to_string(&state).expect("state file");
    let grants = text.lines().filter(|l| l.starts_with("grant ")).count();
    assert_eq!(grants, 50, "{text}");
    // Readable by the daemon only: it holds user names.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn state_file_with_bad_lines_is_read_and_repaired() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let state = s.path("state");
    let map = s.map();
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    std::fs::write(
        &state,
        format!(
            "smtp-after-popd state 1\n\
             grant 192.0.2.30 {later} dovecot imap unix:/x mail carol\n\
             grant 192.0.2.31 banana dovecot imap unix:/x mail dave\n\
             grant 127.0.0.5 {later} dovecot imap unix:/x mail lo\n\
             grant 192.0.2.32 {later} dovecot imap unix:/x mail erin\n\
             revoke 192.0.2.32\n\
             grant 192.0.2.33 {later} dovecot imap unix:/x mail cut-short"
        ),
    )
    .unwrap();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--window",
            "2m",
        ],
    );
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "{}, line 3: expiry \"banana\" is not a number: skipped",
            state.display()
        )),
        "{log}"
    );
    assert!(log.contains("line 7: incomplete last line"), "{log}");
    assert!(
        log.contains("restored 1 grant (0 expired meanwhile, 1 refused by the never-grant rules)"),
        "{log}"
    );
    assert!(s.postmap_q("192.0.2.30").is_some());
    for ip in ["192.0.2.31", "127.0.0.5", "192.0.2.32", "192.0.2.33"] {
        assert!(s.postmap_q(ip).is_none(), "{ip}");
    }
    d.stop();
    // The file was rewritten whole.
    let text = std::fs::read_to_string(&state).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");

    // Not a state file: refuse to start (and so to overwrite it).
    std::fs::write(&state, "hello\n").unwrap();
    let out = Command::new(BIN)
        .env("MAIL_CONFIG", s.mail_config())
        .args([
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--control",
            "none",
        ])
        .args(["--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("line 1: \"hello\" is not a state file header"),
        "{err}"
    );
}

#[test]
fn sighup_refuses_a_broken_configuration_and_applies_a_good_one() {
    let s = Scratch::new();
    let port = free_udp_port();
    let config = s.path("smtp-after-popd.toml");
    let control = s.path("control");
    let good = |window: &str| {
        format!(
            "listen = [\"udp://127.0.0.1:{port}\"]\nmap = \"{}\"\nwindow = \"{window}\"\ncontrol = \"{}\"\n",
            s.map().display(),
            control.display()
        )
    };
    std::fs::write(&config, good("2m")).unwrap();
    let d = Daemon::start(
        &s,
        &[
            "--config",
            config.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    send_udp(port, &login("192.0.2.40", "a"));
    assert!(s.wait_granted("192.0.2.40", Duration::from_secs(30)));

    // A broken file: refused, with the file, line and value; the old
    // configuration keeps granting with its 2-minute window.
    std::fs::write(
        &config,
        format!(
            "{}window = \"banana\"\n",
            good("2m").replace("window = \"2m\"\n", "")
        ),
    )
    .unwrap();
    d.signal("HUP");
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("reload refused")));
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "reload refused, the running configuration stays in force: {}, line 4: window = \"banana\"",
            config.display()
        )),
        "{log}"
    );
    send_udp(port, &login("192.0.2.41", "b"));
    assert!(s.wait_granted("192.0.2.41", Duration::from_secs(30)));
    let left = seconds_left(&control, "192.0.2.41").unwrap();
    assert!(left > 100, "old window of 2m still applies: {left}s");

    // A good one: the new window applies to new logins; live grants stay.
    std::fs::write(&config, good("30s")).unwrap();
    d.signal("HUP");
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("info: reloaded: window 30s")));
    send_udp(port, &login("192.0.2.42", "c"));
    assert!(s.wait_granted("192.0.2.42", Duration::from_secs(30)));
    let left = seconds_left(&control, "192.0.2.42").unwrap();
    assert!(left <= 30, "new window: {left}s");
    assert!(
        seconds_left(&control, "192.0.2.40").unwrap() > 100,
        "live grants kept"
    );
    assert!(s.postmap_q("192.0.2.40").is_some());
}

#[test]
fn sighup_applies_new_allow_lists_and_never_rules() {
    let s = Scratch::new();
    let port = free_udp_port();
    let config = s.path("c.toml");
    let write = |allow: &str, never: &str| {
        std::fs::write(
            &config,
            format!(
                "listen = [\"udp://127.0.0.1:{port}\"]\nmap = \"{}\"\nallow-from = [\"{allow}\"]\nnever = [\"{never}\"]\n",
                s.map().display()
            ),
        )
        .unwrap()
    };
    write("127.0.0.0/8", "192.0.2.0/24");
    let d = Daemon::start(&s, &["--config", config.to_str().unwrap()]);
    send_udp(port, &login("192.0.2.50", "a"));
    // 198.51.100.50, sent after it, is the marker that 192.0.2.50 was
    // decided.
    send_udp(port, &login("198.51.100.50", "a"));
    assert!(s.wait_granted("198.51.100.50", Duration::from_secs(30)));
    assert!(s.postmap_q("192.0.2.50").is_none(), "never rule");
    // Swap: 192.0.2.0/24 may now be granted, 198.51.100.0/24 not; and only
    // 127.0.0.2 may send.
    write("127.0.0.2/32", "198.51.100.0/24");
    d.signal("HUP");
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("info: reloaded")));
    send_udp(port, &login("192.0.2.51", "a")); // from 127.0.0.1: refused
    send_udp_from("127.0.0.2", port, &login("192.0.2.52", "a"));
    send_udp_from("127.0.0.2", port, &login("198.51.100.52", "a"));
    // A later login is the marker: datagrams are handled in order, so once
    // it is in the map the refusals before it have been decided.
    send_udp_from("127.0.0.2", port, &login("192.0.2.53", "a"));
    assert!(s.wait_granted("192.0.2.53", Duration::from_secs(30)));
    assert!(s.postmap_q("192.0.2.52").is_some());
    assert!(
        s.postmap_q("192.0.2.51").is_none(),
        "peer no longer allowed"
    );
    assert!(s.postmap_q("198.51.100.52").is_none(), "new never rule");
    // A live grant the new never-grant rules refuse ends with the reload.
    assert!(
        wait_for(Duration::from_secs(30), || s
            .postmap_q("198.51.100.50")
            .is_none()),
        "live grant in a new never network"
    );
    assert!(d.log_text().contains(
        "revoke 198.51.100.50: address in never-grant network 198.51.100.0/24 (never-grant rules of the reloaded configuration)"
    ), "{}", d.log_text());
}

#[test]
fn list_revoke_and_stats_against_a_running_daemon() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let control = s.path("control");
    let c = control.to_str().unwrap();
    let map = s.map();
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--control",
            c,
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "root and the daemon's group only");

    send_udp(port, &login("192.0.2.60", "alice"));
    send_udp(port, &login("2001:db8::60", "bob"));
    assert!(s.wait_granted("2001:db8::60", Duration::from_secs(30)));

    let (code, out, err) = cli(&["list", "--control", c]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ADDRESS"), "{out}");
    assert!(
        lines[0].contains("EXPIRES IN") && lines[0].contains("REPORTED BY"),
        "{out}"
    );
    let alice = lines
        .iter()
        .find(|l| l.starts_with("192.0.2.60"))
        .expect(&out);
    for want in ["dovecot", "imap", "alice", "mail1", "127.0.0.1:"] {
        assert!(alice.contains(want), "{want} missing: {alice}");
    }
    assert!(out.contains("2001:db8::60"), "{out}");

    let (code, out, _) = cli(&["stats", "--control", c]);
    assert_eq!(code, 0);
    for want in [
        "grants 2\n",
        "received 2\n",
        "granted 2\n",
        "map_failures 0\n",
        &format!("received{{listener=\"{listen}\"}} 2\n"),
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }

    let (code, out, err) = cli(&["revoke", "--control", c, "192.0.2.60"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "revoked 192.0.2.60\n");
    assert!(
        wait_for(Duration::from_secs(30), || s
            .postmap_q("192.0.2.60")
            .is_none()),
        "revoked at once: out of the map"
    );
    assert!(
        d.log_text()
            .contains("revoke 192.0.2.60: removed through the control socket")
    );
    let (code, _, err) = cli(&["revoke", "--control", c, "192.0.2.60"]);
    assert_eq!(code, 1);
    assert!(err.contains("192.0.2.60 is not granted"), "{err}");
    let (code, _, err) = cli(&["revoke", "--control", c, "not-an-ip"]);
    assert_eq!(code, 1);
    assert!(err.contains("\"not-an-ip\" is not an IP address"), "{err}");

    // Without the daemon: a precise message.
    let (code, _, err) = cli(&["list", "--control", "/nonexistent/control"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the daemon at /nonexistent/control"),
        "{err}"
    );

    // Another user may not connect (file mode), as root can check.
    if !is_root() {
        skip("needs root to check another user is refused");
    } else {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "list",
                "--control",
                c,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot reach the daemon") && err.contains("Permission denied"),
            "{err}"
        );
    }
}

#[test]
fn prometheus_endpoint_serves_the_counters() {
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let map = s.map();
    let _d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--metrics",
            &metrics,
        ],
    );
    send_udp(port, &login("192.0.2.70", "a"));
    assert!(s.wait_granted("192.0.2.70", Duration::from_secs(30)));
    let get = |path: &str| {
        let mut c = std::net::TcpStream::connect(&metrics).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).unwrap();
        r
    };
    let r = get("/metrics");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    for want in [
        "# TYPE smtp_after_popd_granted_total counter\nsmtp_after_popd_granted_total 1\n",
        "smtp_after_popd_grants 1\n",
        "smtp_after_popd_map_updates_total ",
        &format!("smtp_after_popd_listener_received_total{{listener=\"{listen}\"}} 1\n"),
        "# HELP smtp_after_popd_forgeries_total Logins refused as forgeries",
    ] {
        assert!(r.contains(want), "{want:?} missing:\n{r}");
    }
    assert!(get("/").starts_with("HTTP/1.1 404"));
}

#[test]
fn systemd_readiness_and_socket_activation() {
    let s = Scratch::new();
    // The manager's side of sd_notify.
    let notify_path = s.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = free_udp_port();
    let udp = format!("127.0.0.1:{port}");
    let unix = s.path("syslog.sock");
    let map = s.map();
    // systemd-socket-activate binds the sockets and passes them, as a
    // .socket unit does.
    let log = s.path("activated.log");
    let child = Command::new("systemd-socket-activate")
        .args(["--datagram", "-l", &udp, "-l", unix.to_str().unwrap()])
        .args(["-E", &format!("MAIL_CONFIG={}", s.mail_config().display())])
        .args(["-E", &format!("NOTIFY_SOCKET={}", notify_path.display())])
        .args([BIN, "--map", map.to_str().unwrap(), "--control", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let mut child = KillOnDrop(child);
    // systemd-socket-activate binds both sockets (UDP first), then starts
    // the program on the first datagram.
    assert!(wait_for(Duration::from_secs(30), || unix.exists()));
    send_udp(port, &login("192.0.2.80", "a"));
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains("STATUS=listening on"), "{msg}");
    // The map was written before READY=1.
    assert!(s.path("authenticated_ips.db").exists());
    assert!(
        s.wait_granted("192.0.2.80", Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    send_unix(&unix, &login("192.0.2.81", "b"));
    assert!(s.wait_granted("192.0.2.81", Duration::from_secs(30)));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("listening on udp://{udp}, passed by systemd")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "listening on unix://{}, passed by systemd",
            unix.display()
        )),
        "{text}"
    );
    // The passed sockets are the listeners: the default one was not bound
    // as well.
    assert!(
        text.contains(&format!(
            "started: listening on udp://{udp}, unix://{}; ",
            unix.display()
        )),
        "{text}"
    );

    // SIGHUP: RELOADING=1 then READY=1.
    let pid = child.0.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("READY=1"));
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    let _ = child.0.wait();
    // systemd's socket file is systemd's to remove.
    assert!(unix.exists());
}

/// A socket systemd passes at the address of a configured listener keeps
/// that listener's own allow-list.
#[test]
fn a_passed_socket_keeps_the_allow_list_configured_for_its_address() {
    let s = Scratch::new();
    let port = free_udp_port();
    let udp = format!("127.0.0.1:{port}");
    let listen = format!("udp://{udp}?allow=127.0.0.2");
    let map = s.map();
    let log = s.path("activated.log");
    let _child = KillOnDrop(
        Command::new("systemd-socket-activate")
            .args(["--datagram", "-l", &udp])
            .args(["-E", &format!("MAIL_CONFIG={}", s.mail_config().display())])
            .args([BIN, "--listen", &listen, "--map", map.to_str().unwrap()])
            .args(["--control", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("systemd-socket-activate (package systemd)"),
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(30), || text().contains("Listening on")));
    // The first datagram starts the daemon; it is not from an allowed peer.
    send_udp(port, &login("192.0.2.85", "a"));
    send_udp_from("127.0.0.2", port, &login("192.0.2.86", "b"));
    // The map does not exist until that first datagram started the daemon.
    assert!(
        wait_for(Duration::from_secs(30), || matches!(
            postmap_lookup(&s.mail_config(), &map, "192.0.2.86"),
            Ok(Some(_))
        )),
        "{}",
        text()
    );
    // Datagrams are handled in order: the first one was dropped.
    assert!(s.postmap_q("192.0.2.85").is_none(), "{}", text());
    let t = text();
    assert!(
        t.contains(&format!("listening on udp://{udp}, passed by systemd")),
        "{t}"
    );
    assert!(t.contains("peer not in allow-from"), "{t}");
}

#[test]
fn json_log_lines() {
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
            "--log-format",
            "json",
        ],
    );
    send_udp(port, &login("192.0.2.90", "we\"ird\\user"));
    assert!(s.wait_granted("192.0.2.90", Duration::from_secs(30)));
    d.stop();
    let text = d.log_text();
    let mut saw_grant = false;
    for line in text.lines() {
        assert!(line.starts_with("{\"time\":\"20"), "{line}");
        assert!(line.contains("Z\",\"level\":\""), "{line}");
        assert!(line.ends_with("\"}"), "{line}");
        if line.contains("\"level\":\"info\",\"message\":\"grant 192.0.2.90") {
            saw_grant = true;
            // The user's quote and backslash were escaped once for the log
            // line and once for JSON.
            assert!(line.contains(r#"user \"we\\\"ird\\\\user\"#), "{line}");
        }
    }
    assert!(saw_grant, "{text}");
}

#[test]
fn an_explicit_control_socket_that_cannot_be_made_stops_the_start() {
    let s = Scratch::new();
    let out = Command::new(BIN)
        .env("MAIL_CONFIG", s.mail_config())
        .args(["--listen", &format!("udp://127.0.0.1:{}", free_udp_port())])
        .args(["--map", s.map().to_str().unwrap()])
        .args(["--control", "/nonexistent-dir/control"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(
        err.contains("--control /nonexistent-dir/control: the directory /nonexistent-dir does not exist: create it"),
        "{err}"
    );
}

#[test]
fn under_systemd_each_line_carries_its_journal_priority() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    let port = free_udp_port();
    // What systemd sets when stderr is the journal: its device and inode.
    let listen = format!("udp://127.0.0.1:{port}");
    let d = Daemon::start_env(
        &s,
        &["--listen", &listen, "--map", s.map().to_str().unwrap()],
        |stderr| {
            let meta = stderr.metadata().unwrap();
            vec![(
                "JOURNAL_STREAM".to_string(),
                format!("{}:{}", meta.dev(), meta.ino()),
            )]
        },
    );
    send_udp(port, "<22>Nov 26 10:00:01 mail1 dovecot: garbage");
    send_udp(port, &login("127.0.0.7", "lo"));
    assert!(wait_for(Duration::from_secs(30), || d
        .log_text()
        .contains("refuse 127.0.0.7")));
    let t = d.log_text();
    assert!(t.contains("<6>smtp-after-popd: info: started: "), "{t}");
    assert!(
        t.contains("<4>smtp-after-popd: warning: refuse 127.0.0.7"),
        "{t}"
    );
    assert!(t.lines().all(|l| l.starts_with('<')), "{t}");
}
