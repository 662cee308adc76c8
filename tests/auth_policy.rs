//! Dovecot's auth-policy reports, end to end on real parts: a private
//! Dovecot 2.3 configured with the README's auth-policy lines reports each
//! authentication over HTTP to the daemon's `--auth-policy` listener; the
//! daemon writes the map; a private Postfix with the README's
//! `smtpd_relay_restrictions` line relays for the clients that logged in,
//! and for no one else. No syslog daemon is involved: Dovecot's own log
//! goes to a socket the test reads.
//!
//! Needs root (CI runs as root). Test clients connect from 127.0.0.41 and
//! up; Postfix's mynetworks is 127.0.0.1/32 only.

mod common;
mod stack;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use stack::*;

/// The secret file's line, and its base64 as Dovecot's header carries it.
const CREDENTIALS: &str = "dovecot:s3cret";
const BASIC: &str = "ZG92ZWNvdDpzM2NyZXQ=";

macro_rules! require_root {
    () => {
        if !require_root("the private Dovecot and Postfix") {
            return;
        }
    };
}

/// The README's `smtpd_relay_restrictions` line, with our map's path.
fn readme_relay_restrictions(map: &Path) -> String {
    let readme = readme();
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

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// The README's Dovecot auth-policy lines (the block that sets
/// `auth_policy_server_url`), with our port, the test's header and a
/// nonce, and the checks before and after authentication as `checks`
/// says.
fn readme_dovecot_lines(port: u16, checks: &str) -> String {
    let readme = readme();
    let start = readme
        .find("auth_policy_server_url = ")
        .expect("README has the Dovecot auth-policy lines");
    let block = &readme[start..];
    let end = block.find("```").expect("end of the code block");
    let mut out = String::new();
    for line in block[..end].lines() {
        let (key, _) = line.split_once(" = ").unwrap_or((line, ""));
        let value = match key.trim() {
            "auth_policy_server_url" => format!("http://127.0.0.1:{port}/"),
            "auth_policy_server_api_header" => format!("Authorization: Basic {BASIC}"),
            "auth_policy_hash_nonce" => format!("{:032x}", std::process::id()),
            "auth_policy_check_before_auth" | "auth_policy_check_after_auth" => checks.into(),
            "auth_policy_report_after_auth" => "yes".into(),
            "" => continue,
            other => panic!("README Dovecot block has a line this test does not know: {other}"),
        };
        out.push_str(&format!("{} = {value}\n", key.trim()));
    }
    out
}

/// Dovecot's own log, read from the socket its /dev/log is bound to.
struct DovecotLog {
    path: PathBuf,
    text: Arc<Mutex<String>>,
}

impl DovecotLog {
    fn start(path: PathBuf) -> DovecotLog {
        let sock = UnixDatagram::bind(&path).expect("bind log socket");
        let text = Arc::new(Mutex::new(String::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = sock.recv(&mut buf) {
                let mut t = t.lock().unwrap();
                t.push_str(&String::from_utf8_lossy(&buf[..n]));
                t.push('\n');
            }
        });
        DovecotLog { path, text }
    }

    fn contains(&self, s: &str) -> bool {
        self.text.lock().unwrap().contains(s)
    }
}

/// The daemon with an auth-policy listener, a map and a control socket in
/// the scratch directory, and no syslog input but a scratch unix socket.
fn report_daemon(s: &Scratch, port: u16) -> Daemon {
    let secret = s.path("auth-policy.secret");
    if !secret.exists() {
        std::fs::write(&secret, format!("{CREDENTIALS}\n")).expect("secret");
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&secret, mode).expect("chmod");
    }
    let listen = format!("unix://{}", s.path("syslog.sock").display());
    let policy = format!("tcp://127.0.0.1:{port}");
    let map = s.map();
    let control = s.path("control");
    Daemon::start(
        s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
            "--window",
            "1h",
            "--log-level",
            "debug",
            "--control",
            control.to_str().unwrap(),
            "--auth-policy",
            &policy,
            "--auth-policy-secret",
            secret.to_str().unwrap(),
        ],
    )
}

/// One HTTP POST to the listener; returns the status line.
fn post(port: u16, auth: Option<&str>, body: &str) -> String {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
    // A peer refused by the allow-list may find the connection closed.
    let _ = write!(
        c,
        "POST /?command=report HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut r = String::new();
    let _ = c.read_to_string(&mut r);
    r.lines().next().unwrap_or("").to_string()
}

fn report(remote: &str, protocol: &str) -> String {
    format!(
        r#"{{"device_id":"","login":"alice","protocol":"{protocol}","pwhash":"00d7","remote":"{remote}","session_id":"x","success":true,"policy_reject":false,"tls":false}}"#
    )
}

fn relays_within(src: &str, port: u16) -> bool {
    wait_for(Duration::from_secs(30), || may_relay(src, port))
}

/// Dovecot reporting to `port`, with the README's lines in a file of their
/// own, readable by root and Dovecot only, as the README says (the header
/// holds the secret).
fn reporting_dovecot(s: &Scratch, log: &DovecotLog, port: u16) -> Dovecot {
    let include = s.path("95-smtp-after-popd.conf");
    std::fs::write(&include, readme_dovecot_lines(port, "no")).expect("include");
    let st = std::process::Command::new("chgrp")
        .arg("dovecot")
        .arg(&include)
        .status()
        .expect("chgrp");
    assert!(st.success());
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o640);
    std::fs::set_permissions(&include, mode).expect("chmod");
    Dovecot::start(
        &s.path("dovecot"),
        &log.path,
        &["alice"],
        &format!("!include {}", include.display()),
    )
}

#[test]
fn dovecot_reports_logins_and_postfix_relays_for_them_only() {
    require_root!();
    let s = Scratch::new();
    let port = free_tcp_port();
    let mut d = report_daemon(&s, port);
    let log = DovecotLog::start(s.path("dovecot-log.sock"));
    let dovecot = reporting_dovecot(&s, &log, port);
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&s.map()), "");
    assert!(rcpt("127.0.0.41", pf.port).contains("Relay access denied"));

    // A POP3 login from 127.0.0.41 relays.
    assert!(pop3_login(
        "127.0.0.41",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(relays_within("127.0.0.41", pf.port), "{}", d.log_text());
    assert!(
        d.log_text().contains(
            "grant 127.0.0.41 for 1h: dovecot pop3 login of user \"alice\" (pattern auth-policy, host -, reported by auth-policy tcp:127.0.0.1:"
        ),
        "{}",
        d.log_text()
    );
    // Revoked, then an IMAP login from the same address relays again.
    let control = s.path("control");
    let st = std::process::Command::new(BIN)
        .args([
            "revoke",
            "--control",
            control.to_str().unwrap(),
            "127.0.0.41",
        ])
        .output()
        .expect("revoke");
    assert!(st.status.success(), "{st:?}");
    assert!(wait_for(Duration::from_secs(30), || !may_relay(
        "127.0.0.41",
        pf.port
    )));
    assert!(imap_login(
        "127.0.0.41",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    assert!(relays_within("127.0.0.41", pf.port), "{}", d.log_text());
    assert!(
        d.log_text()
            .contains("dovecot imap login of user \"alice\" (pattern auth-policy")
    );

    // A wrong password from 127.0.0.42 grants nothing: once Dovecot's report
    // of the failure has been read (the debug line), it still does not relay.
    assert!(!pop3_login(
        "127.0.0.42",
        dovecot.pop3_port,
        "alice",
        "wrong"
    ));
    assert!(wait_for(Duration::from_secs(30), || d.log_text().contains(
        "failed pop3 login of user \"alice\" from 127.0.0.42: nothing granted"
    )));
    assert!(!may_relay("127.0.0.42", pf.port));

    // A POST without the secret, and one for SMTP AUTH, grant nothing; a
    // valid report sent after them does, and shows they were read.
    assert!(post(port, None, &report("127.0.0.45", "pop3")).starts_with("HTTP/1.1 401"));
    let wrong = "ZG92ZWNvdDp3cm9uZw==";
    assert!(post(port, Some(wrong), &report("127.0.0.45", "pop3")).starts_with("HTTP/1.1 401"));
    assert!(post(port, Some(BASIC), &report("127.0.0.46", "smtp")).starts_with("HTTP/1.1 200"));
    assert!(post(port, Some(BASIC), &report("127.0.0.47", "pop3")).starts_with("HTTP/1.1 200"));
    assert!(relays_within("127.0.0.47", pf.port));
    assert!(!may_relay("127.0.0.45", pf.port));
    assert!(!may_relay("127.0.0.46", pf.port));
    assert!(
        d.log_text()
            .contains("refused (401): no Authorization header")
    );

    // With the daemon stopped, Dovecot logins still succeed (and Dovecot
    // says it could not report them).
    assert_eq!(d.stop(), Some(0));
    let text = d.log_text();
    for want in [
        "auth_policy_reports=3 ",
        "auth_policy_ignored=2 ",
        "auth_policy_refused=2 ",
        "granted=3 ",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert!(pop3_login(
        "127.0.0.48",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(imap_login(
        "127.0.0.48",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    assert!(
        wait_for(Duration::from_secs(30), || log
            .contains("Policy server HTTP error")),
        "{}",
        log.text.lock().unwrap()
    );
}

#[test]
fn checks_before_and_after_auth_are_allowed_at_once() {
    require_root!();
    let s = Scratch::new();
    let port = free_tcp_port();
    let mut d = report_daemon(&s, port);
    let log = DovecotLog::start(s.path("dovecot-log.sock"));
    // Dovecot's defaults: check before and after authentication, report.
    let dovecot = Dovecot::start(
        &s.path("dovecot"),
        &log.path,
        &["alice"],
        &readme_dovecot_lines(port, "yes"),
    );
    let pf = Postfix::start(&s.path("postfix"), &readme_relay_restrictions(&s.map()), "");
    assert!(pop3_login(
        "127.0.0.51",
        dovecot.pop3_port,
        "alice",
        PASSWORD
    ));
    assert!(relays_within("127.0.0.51", pf.port), "{}", d.log_text());
    assert!(!pop3_login(
        "127.0.0.52",
        dovecot.pop3_port,
        "alice",
        "wrong"
    ));
    assert!(imap_login(
        "127.0.0.53",
        dovecot.imap_port,
        "alice",
        PASSWORD
    ));
    assert!(relays_within("127.0.0.53", pf.port), "{}", d.log_text());
    assert!(!may_relay("127.0.0.52", pf.port));
    // Two checks for each successful login, one for the failed one (its
    // password is refused before the check after authentication).
    assert_eq!(d.stop(), Some(0));
    let text = d.log_text();
    assert!(!text.contains("refused ("), "{text}");
    for want in [
        "auth_policy_reports=2 ",
        "auth_policy_ignored=1 ",
        "auth_policy_checks=5 ",
        "auth_policy_refused=0 ",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    assert!(
        !log.contains("Policy server"),
        "{}",
        log.text.lock().unwrap()
    );
}

#[test]
fn a_secret_file_others_may_read_stops_the_daemon_with_the_chmod_to_run() {
    let s = Scratch::new();
    let secret = s.path("auth-policy.secret");
    std::fs::write(&secret, format!("{CREDENTIALS}\n")).expect("secret");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o640);
    std::fs::set_permissions(&secret, mode).expect("chmod");
    let policy = format!("tcp://127.0.0.1:{}", free_tcp_port());
    let map = s.map();
    let (status, log) = Daemon::run_as(
        &s,
        &[],
        &[
            "--listen",
            &format!("udp://127.0.0.1:{}", free_udp_port()),
            "--map",
            map.to_str().unwrap(),
            "--auth-policy",
            &policy,
            "--auth-policy-secret",
            secret.to_str().unwrap(),
        ],
    );
    assert_eq!(status, Some(78), "{log}");
    let want = format!(
        "--auth-policy-secret {}: mode 0640 lets its group read it, and whoever knows the secret can grant relay access: run chmod 600 {}",
        secret.display(),
        secret.display()
    );
    assert!(log.contains(&want), "{log}");
    assert!(!log.contains("s3cret"), "the secret is never logged: {log}");
}

#[test]
fn peers_outside_the_listeners_allow_list_are_not_answered() {
    let s = Scratch::new();
    let secret = s.path("auth-policy.secret");
    std::fs::write(&secret, format!("{CREDENTIALS}\n")).expect("secret");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, mode).expect("chmod");
    let (open, closed) = (free_tcp_port(), free_tcp_port());
    let map = s.map();
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            &format!("udp://127.0.0.1:{}", free_udp_port()),
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
            "--auth-policy",
            &format!("tcp://127.0.0.1:{open}"),
            "--auth-policy",
            &format!("tcp://127.0.0.1:{closed}?allow=192.0.2.0/24"),
            "--auth-policy-secret",
            secret.to_str().unwrap(),
        ],
    );
    assert_eq!(post(closed, Some(BASIC), &report("192.0.2.61", "pop3")), "");
    assert!(post(open, Some(BASIC), &report("192.0.2.62", "pop3")).starts_with("HTTP/1.1 200"));
    assert!(wait_for(Duration::from_secs(30), || s
        .postmap_q("192.0.2.62")
        .is_some()));
    assert!(s.postmap_q("192.0.2.61").is_none());
    assert!(
        d.log_text().contains(&format!(
            "auth-policy tcp://127.0.0.1:{closed}: connection from 127.0.0.1:"
        )),
        "{}",
        d.log_text()
    );
}
