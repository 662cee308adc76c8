//! Tests of claims SECURITY.md and the man page make, each exercising the
//! claim itself:
//!
//! - "if postmap fails, the old map stays": a good map is written with the
//!   real postmap, then postmap really fails (the file system holding the
//!   map is full: a tmpfs of its own, where root has no reserved blocks),
//!   and Postfix's lookup (`postmap -q`) still answers from the old map
//!   while the daemon logs the failure and retries; once there is room the
//!   retry writes the new grant;
//! - the control socket's SO_PEERCRED check: with the socket's file mode
//!   opened to everyone (0666, in a directory everyone may enter), a client
//!   running as `nobody` reaches the socket and is refused by its kernel
//!   credentials, while root is answered.
//!
//! Both need root (mount, setpriv); without it they fail loudly rather
//! than skip, unless SAP_SKIP_ROOT_TESTS=1 says so.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Scratch, free_udp_port, postmap_lookup, send_udp, wait_for};

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("SAP_SKIP_ROOT_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: needs root (SAP_SKIP_ROOT_TESTS=1)");
        return false;
    }
    panic!("{test} needs root (set SAP_SKIP_ROOT_TESTS=1 to skip it, loudly)");
}

fn login(user: &str, ip: &str) -> String {
    format!(
        "<22>Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<Vb0F8x8s4NzAAAAB>"
    )
}

/// A scratch directory with an empty Postfix configuration for postmap.
/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).expect("mount point");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` (a file of `dir` grown until ENOSPC).
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let block = vec![0u8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    path
}

#[test]
fn when_postmap_fails_the_old_map_stays_and_the_daemon_retries() {
    if !root_or_skip("when_postmap_fails_the_old_map_stays_and_the_daemon_retries") {
        return;
    }
    let s = Scratch::new();
    let fs = Tmpfs::mount(s.path("maps"), "2m");
    let map = fs.0.join("authenticated_ips");
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--window",
            "10m",
            "--control",
            "none",
        ],
    );
    // 1. A good map, written by the real postmap.
    send_udp(port, &login("alice", "192.0.2.201"));
    assert!(
        wait_for(Duration::from_secs(20), || postmap_lookup(
            &s.mail_config(),
            &map,
            "192.0.2.201"
        )
        .is_ok_and(|v| v.as_deref() == Some("OK"))),
        "the first grant never reached the map:\n{}",
        d.log_text()
    );
    // 2. postmap fails for real: no room left where the map is built.
    let filler = fill(&fs.0);
    let failures_before = d.log_text().matches("not updated").count();
    send_udp(port, &login("bob", "192.0.2.202"));
    assert!(
        wait_for(Duration::from_secs(20), || d
            .log_text()
            .matches("not updated")
            .count()
            > failures_before),
        "no failure logged:\n{}",
        d.log_text()
    );
    // Logged with what happens next, twice at least (it retries).
    assert!(
        wait_for(Duration::from_secs(20), || d
            .log_text()
            .matches("not updated")
            .count()
            >= failures_before + 2),
        "no retry logged:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("retrying in"), "{log}");
    assert!(!d.exited(), "a failing postmap stopped the daemon:\n{log}");
    // Postfix's lookup still answers from the old map, which is whole.
    assert_eq!(
        postmap_lookup(&s.mail_config(), &map, "192.0.2.201"),
        Ok(Some("OK".to_string())),
        "the old map is gone:\n{log}"
    );
    assert_eq!(
        postmap_lookup(&s.mail_config(), &map, "192.0.2.202"),
        Ok(None),
        "{log}"
    );
    // 3. Room again: the retry writes the new grant, and keeps the old.
    std::fs::remove_file(&filler).expect("remove filler");
    assert!(
        wait_for(Duration::from_secs(30), || postmap_lookup(
            &s.mail_config(),
            &map,
            "192.0.2.202"
        )
        .is_ok_and(|v| v.as_deref() == Some("OK"))),
        "the retry never wrote the map:\n{}",
        d.log_text()
    );
    assert_eq!(
        postmap_lookup(&s.mail_config(), &map, "192.0.2.201"),
        Ok(Some("OK".to_string()))
    );
    assert_eq!(d.stop(), Some(0), "{}", d.log_text());
}

/// Connects to the control socket as `nobody` (uid and gid 65534, no
/// supplementary groups) and sends `list`; returns what came back and
/// whether the connection was made.
fn control_as_nobody(socket: &Path) -> (bool, String) {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n\
        s.connect(sys.argv[1])\n\
        print('connected',flush=True)\n\
        s.sendall(b'list\\n')\n\
        s.settimeout(10)\n\
        d=b''\n\
        while True:\n\
        \x20   c=s.recv(4096)\n\
        \x20   if not c: break\n\
        \x20   d+=c\n\
        sys.stdout.write(d.decode())\n";
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(socket)
        .output()
        .expect("setpriv python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let connected = text.starts_with("connected");
    (
        connected,
        format!(
            "{}{}",
            text.trim_start_matches("connected\n"),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn control_as_root(socket: &Path) -> String {
    let mut c = std::os::unix::net::UnixStream::connect(socket).expect("connect as root");
    c.write_all(b"list\n").expect("send");
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

#[test]
fn the_control_socket_refuses_by_kernel_credentials_when_the_file_mode_lets_a_user_in() {
    if !root_or_skip("the_control_socket_refuses_by_kernel_credentials") {
        return;
    }
    let s = Scratch::new();
    let run = s.path("run");
    std::fs::create_dir(&run).expect("run dir");
    let control = run.join("control");
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.path("authenticated_ips");
    let d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    send_udp(port, &login("alice", "192.0.2.203"));
    assert!(
        wait_for(Duration::from_secs(20), || control_as_root(&control)
            .contains("192.0.2.203")),
        "root is not answered:\n{}",
        d.log_text()
    );
    // The file mode no longer keeps anyone out: the scratch directory, the
    // socket's directory and the socket open to every user.
    for dir in [s.dir.path(), run.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let refused_before = d.log_text().matches("connection refused").count();
    let (connected, answer) = control_as_nobody(&control);
    // The kernel let nobody connect (the file mode did not refuse it)...
    assert!(connected, "nobody could not connect: {answer}");
    // ...and the daemon refused it by its credentials, before answering.
    assert!(
        !answer.contains("192.0.2.203") && !answer.starts_with("ok"),
        "nobody was answered: {answer:?}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || d
            .log_text()
            .matches("connection refused")
            .count()
            > refused_before),
        "no refusal logged:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("control socket: connection refused: uid 65534 (gid 65534) is neither root, the daemon's user nor in its group"),
        "{log}"
    );
    // Root still is answered.
    assert!(control_as_root(&control).contains("192.0.2.203"));
}
