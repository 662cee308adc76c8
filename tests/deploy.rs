//! The daemon deployed as a mail administrator deploys it: the README's
//! quick start word for word, on a host with /etc/postfix/main.cf and on
//! one without; Postfix's own configuration checked against the map the
//! daemon writes (a real Postfix deferring mail for a map under another
//! path); start-up failures that must stop the start with exit status 78
//! before the daemon says it is ready (real postmap); the directories and
//! pid file a host without systemd needs; messages that say what to do.
//!
//! Tests that need root (a mount namespace, another user, Postfix) skip
//! themselves otherwise. None reads or writes a system path: hosts with and
//! without main.cf are made in private mount namespaces.

mod common;
mod stack;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use stack::*;

macro_rules! require_root {
    () => {
        if !require_root("namespaces and private servers") {
            return;
        }
    };
}

/// A scratch directory that other users may enter (tempdirs are 0700).
fn open_scratch() -> Scratch {
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    s
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The quick start's commands, as the README gives them.
struct QuickStart {
    daemon: Vec<String>,
    logger: String,
    lookup: String,
}

fn quick_start() -> QuickStart {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = &readme[readme.find("## Quick start").expect("Quick start")..];
    let section = &section[..section.find("\n## ").expect("next section")];
    let blocks: Vec<String> = section
        .split("```sh\n")
        .skip(1)
        .map(|b| b[..b.find("```").expect("end of block")].replace("\\\n", " "))
        .collect();
    assert_eq!(blocks.len(), 2, "two code blocks in the quick start");
    let first: Vec<&str> = blocks[0].lines().collect();
    assert_eq!(first.len(), 2, "the quick start is two commands: {first:?}");
    assert!(first[0].starts_with("bash .ci/run"), "{}", first[0]);
    let run = first[1]
        .strip_prefix("cargo run --release -- ")
        .expect("the second command runs the daemon with cargo run");
    let lines: Vec<&str> = blocks[1].lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let lookup = lines[1].split("   #").next().unwrap().trim().to_string();
    assert!(lines[1].ends_with("# prints OK"), "{}", lines[1]);
    QuickStart {
        daemon: run.split_whitespace().map(str::to_string).collect(),
        logger: lines[0].trim().to_string(),
        lookup,
    }
}

/// Runs the quick start in a private mount namespace whose /etc/postfix
/// holds `main_cf` (or nothing), the daemon in `checkout`; returns what the
/// lookup printed and the daemon's log. The fixed port and directory of the
/// README are replaced by ones of this run.
fn run_quick_start(s: &Scratch, main_cf: Option<&str>) -> (String, String) {
    let q = quick_start();
    let port = free_udp_port().to_string();
    let dir = s.path("tmp/smtp-after-popd");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let fix = |t: &str| {
        t.replace("5514", &port)
            .replace("/tmp/smtp-after-popd", &dir.display().to_string())
    };
    let checkout = s.path("checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    let etc = s.path("etc-postfix");
    std::fs::create_dir_all(&etc).unwrap();
    if let Some(text) = main_cf {
        std::fs::write(etc.join("main.cf"), text).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(etc.join("main.cf"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }
    let args: Vec<String> = q.daemon.iter().map(|a| fix(a)).collect();
    let log = s.path("quick-start.log");
    let script = format!(
        "set -u\n\
         mount --make-rprivate /\n\
         mount --bind {etc} /etc/postfix\n\
         mount -t tmpfs tmpfs /run\n\
         unset MAIL_CONFIG\n\
         cd {checkout}\n\
         : > {log}\n\
         {bin} {args} 2>>{log} &\n\
         pid=$!\n\
         for i in $(seq 200); do grep -q 'started: ' {log} && break; sleep 0.05; done\n\
         {logger}\n\
         out=''\n\
         for i in $(seq 200); do out=$({lookup} 2>&1) && [ \"$out\" = OK ] && break; sleep 0.05; done\n\
         echo \"$out\"\n\
         kill $pid; wait $pid\n",
        etc = etc.display(),
        checkout = checkout.display(),
        bin = BIN,
        args = args.join(" "),
        log = log.display(),
        logger = fix(&q.logger),
        lookup = fix(&q.lookup),
    );
    let out = Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("unshare");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let left: Vec<_> = std::fs::read_dir(&checkout)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the quick start left {left:?} in the checkout"
    );
    (format!("{printed}{}", stderr(&out)), log)
}

#[test]
fn the_quick_start_works_word_for_word_with_and_without_main_cf() {
    require_root!();
    let s = Scratch::new();
    // A fresh machine: postfix installed with "No configuration".
    let (printed, log) = run_quick_start(&s, None);
    assert_eq!(printed, "OK", "{log}");
    assert!(
        log.contains("no /etc/postfix/main.cf and no MAIL_CONFIG: postmap runs with Postfix's built-in defaults"),
        "{log}"
    );
    // A configured mail host.
    let s = Scratch::new();
    let (printed, log) = run_quick_start(
        &s,
        Some(
            "compatibility_level = 3.6\nmyhostname = mail.example.org\nmydestination = $myhostname, localhost\n",
        ),
    );
    assert_eq!(printed, "OK", "{log}");
    assert!(!log.contains("built-in defaults"), "{log}");
    assert!(!log.contains("warning"), "{log}");
}

/// The line of `text` that starts with `start`.
fn line_of(text: &str, start: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(start))
        .expect("line")
        + 1
}

/// Postfix's main.cf looks up the map the README once gave,
/// /etc/postfix/authenticated_ips, while the daemon writes its own: the
/// daemon says which line to change, and Postfix indeed defers the client
/// that logged in (451). With the line the daemon names, it relays.
#[test]
fn a_main_cf_that_looks_up_another_map_is_named_at_start_up() {
    require_root!();
    let s = Scratch::new();
    let port = free_udp_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let map = s.map();
    let wrong = "permit_mynetworks, check_client_access hash:/etc/postfix/authenticated_ips, reject_unauth_destination";
    let pf = Postfix::start(&s.path("postfix-wrong"), wrong, "");
    let conf = pf.dir.join("conf");
    let main_cf = std::fs::read_to_string(conf.join("main.cf")).unwrap();
    let line = line_of(&main_cf, "smtpd_relay_restrictions");
    let mut d = Daemon::start_with(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
        ],
        Some(&conf),
    );
    let want = format!(
        "warning: Postfix's {}/main.cf, line {line} (smtpd_relay_restrictions) looks up hash:/etc/postfix/authenticated_ips, but this daemon writes hash:{}: write hash:{} there instead, then postfix reload",
        conf.display(),
        map.display(),
        map.display()
    );
    let log = d.log_text();
    assert!(log.contains(&want), "{want}\nnot in:\n{log}");
    // The warning comes before the daemon says it has started.
    assert!(log.find(&want) < log.find("started: "), "{log}");
    send_udp(
        port,
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, lip=127.0.0.1, mpid=1, session=<Vb0F8x8s4NzAAAAB>",
    );
    assert!(wait_for(Duration::from_secs(30), || s
        .postmap_q("127.0.0.2")
        .is_some()));
    let reply = rcpt("127.0.0.2", pf.port);
    assert!(reply.starts_with("451"), "{reply}");
    d.stop();
    drop(pf);

    // The line the warning asks for: no warning, and the client relays.
    let right = format!(
        "permit_mynetworks, check_client_access hash:{}, reject_unauth_destination",
        map.display()
    );
    let pf = Postfix::start(&s.path("postfix-right"), &right, "");
    let conf = pf.dir.join("conf");
    let d = Daemon::start_with(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--never",
            "none",
        ],
        Some(&conf),
    );
    send_udp(
        port,
        "<22>Nov 23 10:00:02 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, lip=127.0.0.1, mpid=1, session=<Vb0F8x8s4NzAAAAC>",
    );
    assert!(
        wait_for(Duration::from_secs(30), || may_relay("127.0.0.2", pf.port)),
        "{}\n{}",
        d.log_text(),
        pf.log()
    );
    let log = d.log_text();
    assert!(!log.contains("Postfix's"), "{log}");
    assert!(!rcpt("127.0.0.3", pf.port).starts_with("250"));
}

/// The daemon's start, with NOTIFY_SOCKET listening as systemd would; the
/// output and every message the daemon sent to systemd.
fn start_notified(s: &Scratch, args: &[&str], env: &[(&str, &str)]) -> (Output, Vec<String>) {
    let notify_path = s.path(&format!("notify-{}", free_udp_port()));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env("MAIL_CONFIG", s.mail_config())
        .env("NOTIFY_SOCKET", &notify_path)
        .args(["--control", "none"])
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run daemon");
    let mut msgs = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    (out, msgs)
}

/// Whether this Postfix supports a table type (postconf -m).
fn postfix_has(ty: &str, s: &Scratch) -> bool {
    let out = Command::new("postconf")
        .arg("-m")
        .env("MAIL_CONFIG", s.mail_config())
        .output()
        .expect("postconf");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == ty)
}

/// A first map build that fails ends the start with exit status 78 and
/// what to do, before READY=1 and before the "started" line.
#[test]
fn a_map_that_cannot_be_built_stops_the_start() {
    let s = Scratch::new();
    let map = s.map();
    let listen = format!("udp://127.0.0.1:{}", free_udp_port());
    let base = ["--listen", listen.as_str(), "--map", map.to_str().unwrap()];
    let check = |out: &Output, msgs: &[String], want: &str| {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(
            err.contains("cannot be built, so the daemon does not start"),
            "{err}"
        );
        assert!(err.contains(want), "{want}\nnot in:\n{err}");
        assert!(!err.contains("started: "), "{err}");
        assert!(msgs.iter().all(|m| !m.contains("READY=1")), "{msgs:?}");
    };
    for (ty, package) in [("cdb", "postfix-cdb"), ("lmdb", "postfix-lmdb")] {
        if postfix_has(ty, &s) {
            eprintln!("{ty} is supported here ({package} installed): not checked");
            continue;
        }
        let mut args = base.to_vec();
        args.extend(["--map-type", ty]);
        let (out, msgs) = start_notified(&s, &args, &[]);
        check(
            &out,
            &msgs,
            &format!("install the Debian package {package} (apt-get install {package};"),
        );
    }
    let mut args = base.to_vec();
    args.extend(["--postmap", "/nonexistent-sap/postmap"]);
    let (out, msgs) = start_notified(&s, &args, &[]);
    check(
        &out,
        &msgs,
        "--postmap /nonexistent-sap/postmap does not exist: install postfix (apt-get install postfix)",
    );
    let (out, msgs) = start_notified(&s, &base, &[("PATH", "/nonexistent-sap")]);
    check(
        &out,
        &msgs,
        "postmap is not installed, or not in PATH: install postfix (apt-get install postfix), or give postmap's path with --postmap",
    );
}

/// Runs the daemon as nobody (setpriv), in `s`.
fn as_nobody(s: &Scratch, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(BIN)
        .args(["--control", "none"])
        .args(args)
        .env("MAIL_CONFIG", s.mail_config())
        .stdin(Stdio::null())
        .output()
        .expect("setpriv")
}

/// As a user who may not write where it is told to, the daemon stops at
/// once, saying which user to run as (or to start as root with --user).
#[test]
fn a_user_without_permission_is_told_which_user_to_run_as() {
    require_root!();
    let s = open_scratch();
    let listen = format!("udp://127.0.0.1:{}", free_udp_port());
    // Its own directory, missing, in a directory only root may write.
    let map = s.path("smtp-after-popd/authenticated_ips");
    let out = as_nobody(&s, &["--listen", &listen, "--map", map.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "cannot create the directory {} for --map: Permission denied",
            s.path("smtp-after-popd").display()
        )) && err.contains("start the daemon as root with --user"),
        "{err}"
    );
    // An existing directory it may not write.
    let out = as_nobody(
        &s,
        &["--listen", &listen, "--map", s.map().to_str().unwrap()],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "user nobody may not create files in {} (owner root, group root (gid 0), mode 0755): give the directory to that user (chown nobody {})",
            s.dir.path().display(),
            s.dir.path().display()
        )),
        "{err}"
    );
    // A socket in a directory it may not write.
    let sock = format!("unix://{}", s.path("syslog.sock").display());
    let mapdir = s.path("nobody");
    std::fs::create_dir(&mapdir).unwrap();
    std::os::unix::fs::chown(&mapdir, Some(65534), Some(65534)).unwrap();
    let nmap = mapdir.join("authenticated_ips");
    let out = as_nobody(&s, &["--listen", &sock, "--map", nmap.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(
        err.contains(&format!(
            "user nobody may not create sockets in {} (owner root",
            s.dir.path().display()
        )) && err.contains("start the daemon as root with --user"),
        "{err}"
    );
    // A port below 1024.
    let out = as_nobody(
        &s,
        &[
            "--listen",
            "udp://127.0.0.1:514",
            "--map",
            nmap.to_str().unwrap(),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(
        err.contains(
            "ports below 1024 need root: start the daemon as root with --user smtp-after-popd"
        ),
        "{err}"
    );
}

#[test]
fn an_address_in_use_says_how_to_find_its_holder() {
    let s = Scratch::new();
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let (out, _) = start_notified(
        &s,
        &[
            "--listen",
            &format!("udp://127.0.0.1:{port}"),
            "--map",
            s.map().to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(71), "{err}");
    assert!(
        err.contains(&format!(
            "Address already in use (os error 98); another process holds udp port {port}: find it with ss -lunp 'sport = :{port}' (or fuser {port}/udp), then stop it or choose another port"
        )),
        "{err}"
    );
}

/// Started as root to switch to a user, the daemon makes its missing
/// runtime and state directories for that user, with the modes the unit
/// gives them, and keeps a pid file while it runs.
#[test]
fn own_directories_and_pid_file_on_a_host_without_systemd() {
    require_root!();
    let s = open_scratch();
    for d in ["run", "lib"] {
        std::fs::create_dir(s.path(d)).unwrap();
    }
    let run = s.path("run/smtp-after-popd");
    let lib = s.path("lib/smtp-after-popd");
    let sock = run.join("syslog.sock");
    let pid_file = run.join("smtp-after-popd.pid");
    let map = lib.join("authenticated_ips");
    let state = lib.join("state");
    let control = run.join("control");
    let listen = format!("unix://{}", sock.display());
    let mut d = Daemon::start(
        &s,
        &[
            "--listen",
            &listen,
            "--map",
            map.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--user",
            "nobody",
        ],
    );
    for (dir, mode) in [(&run, 0o750), (&lib, 0o755)] {
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "{}", dir.display());
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", dir.display());
    }
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "created the directory {} for --pid-file, --listen, --control: owner nobody, group nogroup (gid 65534), mode 0750",
            run.display()
        )),
        "{log}"
    );
    assert!(
        log.contains("running as user nobody (uid 65534), group nogroup (gid 65534)"),
        "{log}"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(pid.trim(), d.child.id().to_string());
    send_unix(
        &sock,
        "<22>Nov 23 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<Vb0F8x8s4NzAAAAB>",
    );
    assert!(wait_for(Duration::from_secs(30), || map_lines(&map)
        .iter()
        .any(|l| l == "192.0.2.7 OK")));
    assert_eq!(d.stop(), Some(0));
    assert!(!pid_file.exists(), "the pid file stays after the stop");
    assert!(!sock.exists());
}

/// The shipped configuration's paths under a scratch root, as a host
/// without systemd runs it: the daemon creates /run/smtp-after-popd and
/// /var/lib/smtp-after-popd there.
fn shipped_config_under(root: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/smtp-after-popd.toml"),
    )
    .unwrap();
    for d in ["run", "var/lib"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let text = text
        .replace("/run/", &format!("{}/run/", root.display()))
        .replace("/var/lib/", &format!("{}/var/lib/", root.display()));
    let path = root.join("smtp-after-popd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_shipped_configuration_runs_as_root_with_user_and_nothing_else() {
    require_root!();
    let s = open_scratch();
    let root = s.path("root");
    let conf = shipped_config_under(&root);
    let d = Daemon::start(
        &s,
        &[
            "--config",
            conf.to_str().unwrap(),
            "--user",
            "nobody",
            "--control",
            root.join("run/smtp-after-popd/control").to_str().unwrap(),
        ],
    );
    assert!(root.join("run/smtp-after-popd/syslog.sock").exists());
    assert!(
        root.join("var/lib/smtp-after-popd/authenticated_ips.db")
            .exists()
    );
    let log = d.log_text();
    assert!(log.contains("started: listening on unix://"), "{log}");
}
