//! The real mail stack for end-to-end tests: private instances of Dovecot,
//! rsyslog, syslog-ng and Postfix, each in its own scratch directory, on
//! loopback ports, started and stopped by the tests (no systemd, nothing
//! touches the machine's own /dev/log or /etc configuration).
//!
//! - [`Rsyslog`]: an rsyslogd with its own imuxsock socket (the "/dev/log"
//!   of its host) and the rules the caller gives, typically one of ours from
//!   `rsyslog/` via [`shipped`].
//! - [`SyslogNg`]: syslog-ng 3.38 unpacked from Debian's packages into
//!   `target/e2e-syslog-ng` (apt-get download + dpkg -x, once), because
//!   rsyslog and syslog-ng conflict as packages.
//! - [`Dovecot`]: POP3 and IMAP on loopback ports, a passwd-file of test
//!   users, logging through syslog(3) to a socket of the caller's choice: it
//!   runs in a mount namespace whose /dev/log is that socket.
//! - [`Postfix`]: smtpd on a loopback port, `mynetworks = 127.0.0.1/32` so
//!   that the test clients 127.0.0.2 and up are outsiders, with the relay
//!   restrictions the caller gives, logging to a file.
//! - [`pop3_login`], [`imap_login`], [`rcpt`]: small clients that connect
//!   from a chosen 127.0.0.x address.
//!
//! Everything needs root (network namespaces aside, Postfix and Dovecot
//! start as root and drop privileges themselves); [`is_root`] tells, and
//! `common::require_root` skips loudly.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{free_tcp_port, wait_for};

/// A shell script for `unshare -m sh`: a mount namespace whose /dev is a
/// fresh tmpfs with the few device nodes a server needs (bound from the
/// machine's, saved under `save`) and /dev/log bound to `socket`, that then
/// execs `command`. The machine's own /dev is untouched.
pub fn dev_log_namespace(save: &Path, socket: &Path, command: &str) -> String {
    format!(
        "set -e\n\
         mount --make-rprivate /\n\
         mkdir -p {save}\n\
         mount --rbind /dev {save}\n\
         mount -t tmpfs -o mode=755 tmpfs /dev\n\
         for n in null zero full random urandom tty; do touch /dev/$n; mount --bind {save}/$n /dev/$n; done\n\
         umount -l {save}\n\
         touch /dev/log\n\
         mount --bind {sock} /dev/log\n\
         exec {command}\n",
        save = save.display(),
        sock = socket.display(),
    )
}

/// True when running as root, for the benchmarks that include this module
/// without tests/common (the tests use `common::require_root`).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A child process that gets SIGTERM, then SIGKILL, when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        if self.running() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let stopped = wait_for(Duration::from_secs(5), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One of our shipped forwarding rules (a file under `rsyslog/`), with the
/// socket path or address a test must substitute. Panics when a string to
/// replace is missing, so that a changed rule fails loudly here.
pub fn shipped(file: &str, replace: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rsyslog")
        .join(file);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for (from, to) in replace {
        assert!(
            text.contains(from),
            "{} no longer contains {from:?}",
            path.display()
        );
        text = text.replace(from, to);
    }
    text
}

/// A private rsyslogd.
pub struct Rsyslog {
    pub dir: PathBuf,
    /// Its imuxsock socket: the /dev/log of the host it stands for.
    pub socket: PathBuf,
    /// Everything it receives, one line each, in its file format.
    pub all_log: PathBuf,
    proc: Proc,
}

impl Rsyslog {
    /// Starts rsyslogd in `dir` with `rules` after a minimal global part
    /// (its own socket, no kernel log, a copy of everything in `all.log`).
    pub fn start(dir: &Path, rules: &str) -> Rsyslog {
        std::fs::create_dir_all(dir.join("work")).expect("mkdir");
        let socket = dir.join("log.sock");
        let all_log = dir.join("all.log");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{work}\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{sock}\" Annotate=\"on\" ParseTrusted=\"on\")\n\
                 *.* action(type=\"omfile\" file=\"{all}\")\n\
                 {rules}\n",
                work = dir.join("work").display(),
                sock = socket.display(),
                all = all_log.display(),
            ),
        )
        .expect("write rsyslog.conf");
        let mut proc = Proc::spawn(
            "rsyslogd",
            Command::new("rsyslogd")
                .arg("-n")
                .arg("-f")
                .arg(&conf)
                .arg("-i")
                .arg(dir.join("rsyslogd.pid")),
            &dir.join("rsyslogd.out"),
        );
        let up = wait_for(Duration::from_secs(10), || {
            socket.exists() || !proc.running()
        });
        assert!(
            up && proc.running(),
            "rsyslogd did not start: {}",
            std::fs::read_to_string(dir.join("rsyslogd.out")).unwrap_or_default()
        );
        Rsyslog {
            dir: dir.to_path_buf(),
            socket,
            all_log,
            proc,
        }
    }

    /// Lines received so far.
    pub fn received(&self) -> String {
        std::fs::read_to_string(&self.all_log).unwrap_or_default()
    }
}

/// Where syslog-ng is unpacked (shared by all tests and runs).
fn syslog_ng_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-syslog-ng")
}

/// Unpacks syslog-ng from Debian's packages once; returns its root.
pub fn syslog_ng_unpacked() -> PathBuf {
    let root = syslog_ng_root();
    let bin = root.join("usr/sbin/syslog-ng");
    if bin.exists() {
        return root;
    }
    let lock = std::fs::File::create(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-syslog-ng.lock"),
    )
    .expect("lock file");
    // SAFETY: flock on a file we own; released when `lock` is dropped.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::flock(lock.as_raw_fd(), libc::LOCK_EX);
    }
    if bin.exists() {
        return root;
    }
    let dl = tempfile::tempdir().expect("tempdir");
    let pkgs = ["syslog-ng-core", "libivykis0", "libnet1", "libpcre3"];
    let st = Command::new("apt-get")
        .arg("download")
        .args(pkgs)
        .current_dir(dl.path())
        .status()
        .expect("apt-get");
    assert!(st.success(), "apt-get download {pkgs:?} failed");
    let staging = root.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("mkdir");
    for e in std::fs::read_dir(dl.path()).expect("readdir") {
        let deb = e.expect("entry").path();
        let st = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(&staging)
            .status()
            .expect("dpkg");
        assert!(st.success(), "dpkg -x {} failed", deb.display());
    }
    std::fs::rename(&staging, &root).expect("rename");
    root
}

/// A private syslog-ng, unpacked beside rsyslog.
pub struct SyslogNg {
    pub dir: PathBuf,
    /// Its unix-dgram source: the /dev/log of the host it stands for.
    pub socket: PathBuf,
    proc: Proc,
}

impl SyslogNg {
    /// Starts syslog-ng with a source `s_src` on its own socket (the name
    /// Debian's syslog-ng.conf gives the local source, which our shipped
    /// rule refers to) followed by `rules`.
    pub fn start(dir: &Path, rules: &str) -> SyslogNg {
        let root = syslog_ng_unpacked();
        std::fs::create_dir_all(dir).expect("mkdir");
        let socket = dir.join("log.sock");
        let conf = dir.join("syslog-ng.conf");
        std::fs::write(
            &conf,
            format!(
                "@version: 3.38\n\
                 options {{ keep-hostname(yes); }};\n\
                 source s_src {{ unix-dgram(\"{sock}\"); }};\n\
                 {rules}\n",
                sock = socket.display()
            ),
        )
        .expect("write syslog-ng.conf");
        let libs = [
            "usr/lib/x86_64-linux-gnu",
            "lib/x86_64-linux-gnu",
            "usr/lib/syslog-ng",
        ]
        .iter()
        .map(|p| root.join(p).display().to_string())
        .collect::<Vec<_>>()
        .join(":");
        let mut proc = Proc::spawn(
            "syslog-ng",
            Command::new(root.join("usr/sbin/syslog-ng"))
                .arg("-F")
                .arg("-f")
                .arg(&conf)
                .arg(format!(
                    "--module-path={}",
                    root.join("usr/lib/syslog-ng/3.38").display()
                ))
                .arg("-R")
                .arg(dir.join("persist"))
                .arg("-p")
                .arg(dir.join("syslog-ng.pid"))
                .arg("-c")
                .arg(dir.join("syslog-ng.ctl"))
                .env("LD_LIBRARY_PATH", libs),
            &dir.join("syslog-ng.out"),
        );
        let up = wait_for(Duration::from_secs(10), || {
            socket.exists() || !proc.running()
        });
        assert!(
            up && proc.running(),
            "syslog-ng did not start: {}",
            std::fs::read_to_string(dir.join("syslog-ng.out")).unwrap_or_default()
        );
        SyslogNg {
            dir: dir.to_path_buf(),
            socket,
            proc,
        }
    }
}

/// A private Dovecot: POP3 and IMAP on loopback, logging through syslog(3)
/// to a socket of the caller's choice.
pub struct Dovecot {
    pub dir: PathBuf,
    pub pop3_port: u16,
    pub imap_port: u16,
    proc: Proc,
}

/// The password of every test user.
pub const PASSWORD: &str = "secret";

impl Dovecot {
    /// Starts Dovecot in `dir` with these users (all with [`PASSWORD`]);
    /// its syslog(3) lines go to `log_socket`. `extra` is appended to the
    /// configuration.
    pub fn start(dir: &Path, log_socket: &Path, users: &[&str], extra: &str) -> Dovecot {
        for d in ["run", "state", "home"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        // The mail processes run as nobody and create their maildirs here.
        set_mode(&dir.join("home"), 0o1777);
        let passwd = dir.join("passwd");
        let mut text = String::new();
        for u in users {
            text.push_str(&format!("{u}:{{PLAIN}}{PASSWORD}\n"));
        }
        std::fs::write(&passwd, text).expect("passwd");
        let pop3_port = free_tcp_port();
        let imap_port = free_tcp_port();
        let conf = dir.join("dovecot.conf");
        std::fs::write(
            &conf,
            format!(
                "base_dir = {run}\n\
                 state_dir = {state}\n\
                 protocols = pop3 imap\n\
                 listen = 127.0.0.1\n\
                 ssl = no\n\
                 disable_plaintext_auth = no\n\
                 auth_mechanisms = plain login\n\
                 syslog_facility = mail\n\
                 first_valid_uid = 100\n\
                 passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {passwd}\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home={home}/%u\n}}\n\
                 mail_location = maildir:~/Maildir\n\
                 service pop3-login {{\n  inet_listener pop3 {{\n    port = {pop3_port}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n}}\n\
                 service imap-login {{\n  inet_listener imap {{\n    port = {imap_port}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n\
                 {extra}\n",
                run = dir.join("run").display(),
                state = dir.join("state").display(),
                passwd = passwd.display(),
                home = dir.join("home").display(),
            ),
        )
        .expect("dovecot.conf");
        let script = dir.join("ns.sh");
        std::fs::write(
            &script,
            dev_log_namespace(
                &dir.join("devsave"),
                log_socket,
                &format!("dovecot -F -c {}", conf.display()),
            ),
        )
        .expect("ns.sh");
        let mut proc = Proc::spawn(
            "dovecot",
            Command::new("unshare").arg("-m").arg("sh").arg(&script),
            &dir.join("dovecot.out"),
        );
        let up = wait_for(Duration::from_secs(10), || {
            (TcpStream::connect(("127.0.0.1", pop3_port)).is_ok()
                && TcpStream::connect(("127.0.0.1", imap_port)).is_ok())
                || !proc.running()
        });
        assert!(
            up && proc.running(),
            "dovecot did not start: {}",
            std::fs::read_to_string(dir.join("dovecot.out")).unwrap_or_default()
        );
        Dovecot {
            dir: dir.to_path_buf(),
            pop3_port,
            imap_port,
            proc,
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A TCP connection to 127.0.0.1:`port` from the local address `src`.
pub fn connect_from(src: &str, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let from: SocketAddr = format!("{src}:0").parse().expect("address");
    s.bind(&from.into()).expect("bind client address");
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

/// One line-based conversation: sends each command, returns every reply
/// line read after it (multi-line replies included).
struct Talk {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Talk {
    fn new(s: TcpStream) -> Talk {
        let writer = s.try_clone().expect("clone");
        Talk {
            reader: BufReader::new(s),
            writer,
        }
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.reader.read_line(&mut l);
        l
    }
    fn send(&mut self, cmd: &str) {
        let _ = self.writer.write_all(format!("{cmd}\r\n").as_bytes());
    }
    /// An SMTP reply: lines until one with a space after the code.
    fn smtp_reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let l = self.line();
            all.push_str(&l);
            if l.len() < 4 || l.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }
}

/// Logs in to Dovecot's POP3 from `src` and quits; true when the server
/// said the login succeeded.
pub fn pop3_login(src: &str, port: u16, user: &str, password: &str) -> bool {
    let mut t = Talk::new(connect_from(src, port));
    t.line();
    t.send(&format!("USER {user}"));
    t.line();
    t.send(&format!("PASS {password}"));
    let ok = t.line().starts_with("+OK");
    t.send("QUIT");
    t.line();
    ok
}

/// An open IMAP session (logged out when dropped).
pub struct ImapSession {
    talk: Talk,
    pub logged_in: bool,
}

impl Drop for ImapSession {
    fn drop(&mut self) {
        self.talk.send("z LOGOUT");
        self.talk.line();
    }
}

/// Logs in to Dovecot's IMAP from `src` and keeps the session open.
pub fn imap_session(src: &str, port: u16, user: &str, password: &str) -> ImapSession {
    let mut t = Talk::new(connect_from(src, port));
    t.line();
    t.send(&format!("a LOGIN \"{user}\" \"{password}\""));
    let logged_in = loop {
        let l = t.line();
        if l.is_empty() || l.starts_with("a ") {
            break l.starts_with("a OK");
        }
    };
    ImapSession { talk: t, logged_in }
}

/// Logs in to Dovecot's IMAP from `src` and logs out; true on success.
pub fn imap_login(src: &str, port: u16, user: &str, password: &str) -> bool {
    imap_session(src, port, user, password).logged_in
}

/// A private Postfix (smtpd on a loopback port).
pub struct Postfix {
    pub dir: PathBuf,
    pub port: u16,
}

impl Postfix {
    /// Starts Postfix in `dir` with `smtpd_relay_restrictions = relay`
    /// and `extra` lines appended to main.cf.
    pub fn start(dir: &Path, relay: &str, extra: &str) -> Postfix {
        Self::start_with(dir, relay, extra, false)
    }

    /// As [`Postfix::start`], with smtpd chrooted in the queue directory
    /// ([`Postfix::queue`]), as Debian's master.cf runs it.
    pub fn start_chrooted(dir: &Path, relay: &str, extra: &str) -> Postfix {
        Self::start_with(dir, relay, extra, true)
    }

    /// The queue directory (smtpd's chroot, with `start_chrooted`).
    pub fn queue(&self) -> PathBuf {
        self.dir.join("queue")
    }

    fn start_with(dir: &Path, relay: &str, extra: &str, chroot: bool) -> Postfix {
        let conf = dir.join("conf");
        for d in ["conf", "queue", "data", "log"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        // Postfix writes its data directory as its own user.
        let st = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .expect("chown");
        assert!(st.success());
        let port = free_tcp_port();
        let base = format!(
            "compatibility_level = 3.6\n\
                 queue_directory = {queue}\n\
                 data_directory = {data}\n\
                 myhostname = relay.test.invalid\n\
                 mydestination =\n\
                 relay_domains =\n\
                 mynetworks = 127.0.0.1/32\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 smtpd_peername_lookup = no\n\
                 smtpd_reject_unlisted_recipient = no\n\
                 maillog_file = {log}/maillog\n\
                 maillog_file_prefixes = {log}\n\
                 smtpd_relay_restrictions = {relay}\n",
            queue = dir.join("queue").display(),
            data = dir.join("data").display(),
            log = dir.join("log").display(),
        );
        // A setting in `extra` replaces the base's: a parameter set twice
        // makes every Postfix program log "overriding earlier entry", and
        // enough of those at once fill postlogd's socket, whose reader then
        // blocks logging its own copy of the warning (and master with it).
        let names: Vec<&str> = extra
            .lines()
            .filter_map(|l| l.split_once('=').map(|(n, _)| n.trim()))
            .collect();
        let mut main_cf: String = base
            .lines()
            .filter(|l| {
                l.split_once('=')
                    .is_none_or(|(n, _)| !names.contains(&n.trim()))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        main_cf.push_str(extra);
        main_cf.push('\n');
        std::fs::write(conf.join("main.cf"), main_cf).expect("main.cf");
        // Debian's master.cf without chroot (the test directories are
        // outside the queue directory; smtpd may keep it) and smtpd on our
        // port.
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("master.cf");
        let mut out = String::new();
        for line in master.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with('#')
                || line.trim().is_empty()
                || line.starts_with(char::is_whitespace)
            {
                out.push_str(line);
            } else if fields.len() >= 8 && fields[0] == "smtp" && fields[1] == "inet" {
                let chroot = if chroot { "y" } else { "n" };
                out.push_str(&format!("127.0.0.1:{port} inet n - {chroot} - - smtpd"));
            } else if fields.len() >= 8 {
                let mut f = fields.clone();
                f[4] = "n";
                out.push_str(&f.join(" "));
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        std::fs::write(conf.join("master.cf"), out).expect("master.cf");
        let o = Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .output()
            .expect("postfix start");
        assert!(
            o.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let up = wait_for(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let pf = Postfix {
            dir: dir.to_path_buf(),
            port,
        };
        assert!(up, "postfix does not listen:\n{}", pf.log());
        pf
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("conf"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Asks Postfix on `port`, from `src`, to relay to a remote domain; returns
/// the RCPT TO reply (e.g. "250 2.1.5 Ok" or "554 5.7.1 ... Relay access
/// denied").
pub fn rcpt(src: &str, port: u16) -> String {
    let mut t = Talk::new(connect_from(src, port));
    t.smtp_reply();
    t.send("EHLO client.test");
    t.smtp_reply();
    t.send("MAIL FROM:<someone@example.org>");
    t.smtp_reply();
    t.send("RCPT TO:<friend@remote.example>");
    let reply = t.smtp_reply();
    t.send("QUIT");
    t.smtp_reply();
    reply.trim_end().to_string()
}

/// True when Postfix on `port` lets `src` relay.
pub fn may_relay(src: &str, port: u16) -> bool {
    rcpt(src, port).starts_with("250")
}
