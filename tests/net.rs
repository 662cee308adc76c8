//! The network layer on real parts (issue 13, classes 4 and 5; issue 14,
//! point 4):
//!
//! - each socket has its own owner, group and mode: a process in the group
//!   postfix reaches the policy socket, never the syslog socket, and the
//!   shipped recipe for the policy socket inside Postfix's chroot
//!   (doc/systemd/postfix-policy.conf) works for a chrooted Postfix with
//!   the daemon run as its service user, as the hardened unit runs it;
//! - no peer shuts out another: a local user holding slow connections to
//!   the TCP syslog listener does not stop real rsyslog's logins, nor 300
//!   slow connections to the TCP policy service a real Postfix's queries;
//! - warnings on these paths are rate-limited.
//!
//! The servers and the users need root (CI runs as root); those tests say
//! SKIPPED otherwise. The slow peer is a shell run as `nobody` that opens
//! connections with bash's /dev/tcp and writes a byte on each every 5 s.

mod common;
mod stack;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use stack::*;

/// Skips (loudly) when not root.
macro_rules! require_root {
    () => {
        if !require_root("the private servers and test users") {
            return;
        }
    };
}

fn drop_in_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/systemd/postfix-policy.conf")
}

/// The shipped drop-in.
fn drop_in() -> String {
    std::fs::read_to_string(drop_in_path()).expect("doc/systemd/postfix-policy.conf")
}

/// The value of a `KEY=` line of the drop-in.
fn setting(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the drop-in has no {key}="))
        .to_string()
}

/// A line of the drop-in's instructions (a comment) that starts with
/// `start`, without the `#`.
fn instruction(text: &str, start: &str) -> String {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(str::trim)
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("the drop-in's instructions have no {start}..."))
        .to_string()
}

/// (owner, group, mode) of a file.
fn owner_group_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o777)
}

/// The gid of a group.
fn gid_of(group: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    line.split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no group {group}"))
}

/// `logger` run as the user postfix (its groups as the system gives them),
/// writing one line to the unix socket `path`; returns whether it could,
/// and what it said.
fn logger_as_postfix(path: &Path) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=postfix", "--regid=postfix", "--init-groups"])
        .args(["logger", "--socket-errors=on", "-u"])
        .arg(path)
        .args(["-t", "dovecot"])
        .arg("imap-login: Login: user=<mallory>, method=PLAIN, rip=127.0.0.9, lip=127.0.0.1, mpid=1, session=<abcdefgh>")
        .output()
        .expect("setpriv logger");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const LOGIN: &str = "<22>Dec  1 18:30:00 mail1 dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=1, session=<abcdefgh>";

/// Issue 13 class 4 and issue 14 point 4. The shipped recipe, followed as
/// written with the paths of a private Postfix: its drop-in's
/// ExecStartPre makes the socket's directory in the queue directory, the
/// daemon runs as its own user with the drop-in's SupplementaryGroups= and
/// no capabilities (setpriv, as the hardened unit's User=,
/// SupplementaryGroups= and CapabilityBoundingSet= do), the policy URL and
/// the check_policy_service line are the recipe's. A chrooted smtpd then
/// relays for a client that logged in, and for no one else; the group
/// postfix may use the policy socket, but not write to the syslog socket.
/// Before that, the README's old advice (a socket in Postfix's private/)
/// fails with a message that says what to do.
#[test]
fn the_chroot_policy_recipe_works_as_the_service_user() {
    require_root!();
    let s = Scratch::new();
    // smtpd (as postfix) must reach its queue directory under the scratch.
    std::fs::set_permissions(s.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = TestUser::create("sap-net");
    let text = drop_in();
    let groups = setting(&text, "SupplementaryGroups");
    assert_eq!(groups, "postfix");
    let check = instruction(&text, "check_policy_service unix:");
    let pf = Postfix::start_chrooted(
        &s.path("pf"),
        &format!("permit_mynetworks, {check}, reject_unauth_destination"),
        "",
    );
    let queue = pf.queue();
    let in_queue = |t: &str| t.replace("/var/spool/postfix", queue.to_str().unwrap());
    let wrapper_args = [
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        format!("--groups={groups}"),
        "--no-new-privs".to_string(),
        "--inh-caps=-all".to_string(),
        "--bounding-set=-all".to_string(),
    ];
    let mut wrapper = vec!["setpriv"];
    wrapper.extend(wrapper_args.iter().map(String::as_str));
    // The runtime directory (RuntimeDirectory=), open to all here, so that
    // only the syslog socket's own mode keeps the group postfix out.
    let run = s.path("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(user.uid), Some(user.gid)).unwrap();
    let syslog = run.join("syslog.sock");
    let listen = format!("unix://{}", syslog.display());

    // The old advice: Postfix's private/ is postfix's alone.
    let private = format!("unix://{}/private/smtp-after-popd", queue.display());
    let (status, log) = Daemon::run_as(
        &s,
        &wrapper,
        &["--listen", &listen, "--map", "none", "--policy", &private],
    );
    assert_eq!(status, Some(71), "{log}");
    assert!(log.contains("Permission denied"), "{log}");
    assert!(
        log.contains(&format!(
            "user {} (uid {}) may not enter",
            user.name, user.uid
        )),
        "{log}"
    );
    assert!(
        log.contains("doc/systemd/postfix-policy.conf")
            && log.contains("unix:smtp-after-popd/policy"),
        "{log}"
    );

    // The recipe: the drop-in's ExecStartPre (with full privileges, "+").
    let pre = setting(&text, "ExecStartPre");
    let pre = in_queue(pre.strip_prefix('+').expect("ExecStartPre=+"))
        .replace("-o smtp-after-popd", &format!("-o {}", user.name));
    let st = Command::new("sh").arg("-c").arg(&pre).status().unwrap();
    assert!(st.success(), "{pre}");
    let policy_line = instruction(&text, "policy = [\"unix://");
    let url = in_queue(policy_line.split('"').nth(1).expect("a quoted URL"));
    let mut d = Daemon::start_as(
        &s,
        &wrapper,
        &[
            "--listen", &listen, "--map", "none", "--policy", &url, "--never", "none",
        ],
    );
    let policy = queue.join("smtp-after-popd/policy");
    let postfix_gid = gid_of("postfix");
    assert_eq!(owner_group_mode(&policy), (user.uid, postfix_gid, 0o660));
    assert_eq!(owner_group_mode(&syslog), (user.uid, user.gid, 0o600));

    // rsyslog (root) writes a login; Postfix asks the policy socket.
    send_unix(&syslog, LOGIN);
    assert!(
        wait_for(Duration::from_secs(5), || d
            .log_text()
            .contains("grant 127.0.0.5")),
        "{}",
        d.log_text()
    );
    let r = rcpt("127.0.0.5", pf.port);
    assert!(r.starts_with("250"), "{r}\n{}\n{}", pf.log(), d.log_text());
    let r = rcpt("127.0.0.6", pf.port);
    assert!(r.contains("Relay access denied"), "{r}");
    assert!(chrooted_in(&queue), "no process of Postfix ran chrooted");

    // The group postfix: the policy socket, never the syslog socket.
    let (wrote, said) = logger_as_postfix(&syslog);
    assert!(!wrote && said.contains("Permission denied"), "{said}");
    let (asked, said) = logger_as_postfix(&policy);
    assert!(asked, "{said}");
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(!log.contains("grant 127.0.0.9"), "{log}");
    assert!(log.contains("policy_ok=1 "), "{log}");
}

/// Whether some process (smtpd) runs chrooted in `dir`.
fn chrooted_in(dir: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .flatten()
        .any(|p| std::fs::read_link(p.path().join("root")).is_ok_and(|root| root == dir))
}

/// The packaged unit with the drop-in passes `systemd-analyze verify`
/// (no unknown key, no bad value), and stays hardened.
#[test]
fn the_drop_in_passes_systemd_analyze_with_the_hardened_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("no systemd-analyze (install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit_src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/systemd/smtp-after-popd.service");
    // ExecStart= must name an existing program: the binary under test.
    let unit = std::fs::read_to_string(unit_src)
        .unwrap()
        .replace("/usr/sbin/smtp-after-popd", BIN);
    let unit_path = dir.path().join("smtp-after-popd.service");
    std::fs::write(&unit_path, unit).unwrap();
    let d = dir.path().join("smtp-after-popd.service.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(drop_in_path(), d.join("postfix-policy.conf")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_path)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("postfix-policy.conf"), "{said}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit_path)
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // The drop-in was read: its supplementary group shows.
    assert!(report.contains("SupplementaryGroups="), "{report}");
    let score: f32 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for smtp-after-popd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(score <= 1.5, "exposure {score}:\n{report}");
}

/// A local user (`nobody`) holding `n` TCP connections to 127.0.0.1:`port`,
/// each sent a byte every 5 s (never a whole record or request); killed
/// when dropped.
struct SlowPeer {
    child: Child,
}

impl SlowPeer {
    fn start(port: u16, n: usize) -> SlowPeer {
        let script = format!(
            "trap '' PIPE\n\
             fds=()\n\
             for i in $(seq {n}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} || exit 1; fds+=($fd); done\n\
             echo ready\n\
             while :; do for fd in \"${{fds[@]}}\"; do printf x >&$fd 2>/dev/null; done; sleep 5; done\n"
        );
        let mut child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv bash");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(
            line.trim(),
            "ready",
            "the slow peer could not connect {n} times"
        );
        SlowPeer { child }
    }
}

impl Drop for SlowPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections of `uid` to 127.0.0.1:`port` that the other end has not
/// closed (ESTABLISHED in /proc/net/tcp).
fn established(uid: u32, port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 7 && f[2] == remote && f[3] == "01" && f[7] == uid.to_string()
        })
        .count()
}

/// Issue 13 class 5, syslog: a local user holding 70 connections that
/// each get a byte every 5 s does not stop real rsyslog, forwarding over
/// TCP from the same address (127.0.0.1) with the shipped remote rule:
/// every login is granted. The user keeps only the 32 connections one peer
/// may hold; its extra ones closed its own oldest, never rsyslog's.
#[test]
fn a_local_user_holding_slow_connections_does_not_stop_rsyslogs_logins() {
    require_root!();
    let s = Scratch::new();
    let port = free_tcp_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let map = s.map();
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
        ],
    );
    let slow = SlowPeer::start(port, 70);
    let rule = shipped(
        "smtp-after-popd-remote.conf",
        &[
            ("target=\"192.0.2.25\"", "target=\"127.0.0.1\""),
            ("protocol=\"udp\"", "protocol=\"tcp\""),
            ("port=\"5514\"", &format!("port=\"{port}\"")),
        ],
    );
    let rsyslog = Rsyslog::start(&s.path("rsyslog"), &rule);
    let login = |ip: &str| {
        let st = Command::new("logger")
            .arg("-u")
            .arg(&rsyslog.socket)
            .args(["-p", "mail.info", "-t", "dovecot"])
            .arg(format!("imap-login: Login: user=<u>, method=PLAIN, rip={ip}, lip=127.0.0.1, mpid=1, session=<abcdefgh>"))
            .status()
            .expect("logger");
        assert!(st.success());
    };
    for (i, ip) in ["192.0.2.51", "192.0.2.52", "192.0.2.53"]
        .iter()
        .enumerate()
    {
        if i > 0 {
            // Let the slow peer trickle on meanwhile.
            std::thread::sleep(Duration::from_secs(3));
        }
        login(ip);
        assert!(
            wait_for(Duration::from_secs(10), || s.postmap_q(ip).is_some()),
            "{ip} not granted while a local user holds slow connections:\n{}",
            d.log_text()
        );
    }
    let nobody = 65534;
    assert_eq!(established(nobody, port), 32, "{}", d.log_text());
    drop(slow);
    drop(rsyslog);
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(
        log.contains("to make room for one from tcp:127.0.0.1:"),
        "{log}"
    );
    assert!(log.contains("(uid 65534)"), "{log}");
    assert!(
        !log.contains("(uid 0), which had waited"),
        "rsyslog's connection was shed:\n{log}"
    );
    assert!(log.contains("dropped_connections=38 "), "{log}");
}

/// Issue 13 class 5, policy ("Done when"): while another peer (a local
/// user) holds 300 slow connections to the TCP policy service, a real
/// Postfix's policy query still gets action=OK for a client with a live
/// grant (so it relays), and DUNNO for another; the other peer keeps all
/// 300 (none of Postfix's was needed to make room, nor any of its).
#[test]
fn postfix_gets_action_ok_while_another_peer_holds_300_slow_connections() {
    require_root!();
    let s = Scratch::new();
    let udp = free_udp_port();
    let policy_port = free_tcp_port();
    let listen = format!("udp://127.0.0.1:{udp}");
    let policy = format!("tcp://127.0.0.1:{policy_port}");
    let mut d = Daemon::start(
        &s,
        &[
            "--listen", &listen, "--map", "none", "--policy", &policy, "--never", "none",
        ],
    );
    let pf = Postfix::start(
        &s.path("pf"),
        &format!(
            "permit_mynetworks, check_policy_service inet:127.0.0.1:{policy_port}, reject_unauth_destination"
        ),
        "",
    );
    let slow = SlowPeer::start(policy_port, 300);
    // Until the daemon has taken them all (asserted after Postfix's query,
    // so that a daemon which refuses some fails on the query itself).
    // (The slow peer is a shell, slow to open 300 connections on a loaded
    // machine: the wait is long, and ends as soon as they are all up.)
    let _ = wait_for(Duration::from_secs(60), || {
        established(65534, policy_port) == 300
    });
    send_udp(udp, LOGIN);
    assert!(
        wait_for(Duration::from_secs(30), || d
            .log_text()
            .contains("grant 127.0.0.5")),
        "{}",
        d.log_text()
    );
    let r = rcpt("127.0.0.5", pf.port);
    assert!(r.starts_with("250"), "{r}\n{}\n{}", pf.log(), d.log_text());
    let r = rcpt("127.0.0.6", pf.port);
    assert!(r.contains("Relay access denied"), "{r}\n{}", pf.log());
    assert_eq!(established(65534, policy_port), 300);
    drop(slow);
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    assert!(log.contains("policy_ok=1 "), "{log}");
    assert!(log.contains("dropped_connections=0 "), "{log}");
}

/// Issue 13 class 5: every warning on these paths is rate-limited. 2000
/// oversized policy requests (101 attributes each) are each answered DUNNO,
/// but write at most a handful of warning lines, the last saying how many
/// were suppressed; the service still answers afterwards.
#[test]
fn two_thousand_oversized_policy_requests_write_a_handful_of_warnings() {
    let s = Scratch::new();
    let udp = free_udp_port();
    let policy_port = free_tcp_port();
    let listen = format!("udp://127.0.0.1:{udp}");
    let policy = format!("tcp://127.0.0.1:{policy_port}");
    let mut d = Daemon::start(
        &s,
        &["--listen", &listen, "--map", "none", "--policy", &policy],
    );
    let request: String = (0..=100).map(|i| format!("a{i}=b\n")).collect();
    let ask = |text: &str| -> String {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", policy_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = c.write_all(text.as_bytes());
        let mut answer = String::new();
        let _ = BufReader::new(c).read_line(&mut answer);
        answer
    };
    let t0 = std::time::Instant::now();
    for _ in 0..2000 {
        assert_eq!(ask(&request), "action=DUNNO\n");
    }
    // The limit is per minute: a loaded machine may take more than one.
    let minutes = t0.elapsed().as_secs() as usize / 60 + 1;
    let normal = "request=smtpd_access_policy\nclient_address=192.0.2.7\n\n";
    assert_eq!(ask(normal), "action=DUNNO\n");
    assert_eq!(d.stop(), Some(0));
    let log = d.log_text();
    let warnings = log.lines().filter(|l| l.contains("larger than")).count();
    assert!(
        (1..=12 * minutes).contains(&warnings),
        "{warnings} warnings in {minutes} minute(s):\n{log}"
    );
    assert!(log.contains("policy_requests=2001 "), "{log}");
}
