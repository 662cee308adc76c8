//! Shared test support: a scratch directory with a Postfix configuration
//! for `postmap`, the daemon started as a user would start it, and polling
//! with a deadline instead of sleeping.
#![allow(dead_code)]

use std::io::Read;
use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_smtp-after-popd");

/// A scratch directory with `postfix/main.cf` (empty), so that `postmap`
/// runs without a system-wide Postfix configuration. Tests export it as
/// MAIL_CONFIG to the daemon and to `postmap -q`.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("sap-test-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("postfix")).expect("mkdir");
        std::fs::write(dir.path().join("postfix/main.cf"), "").expect("main.cf");
        // Postfix programs wait up to ~2 s for a main.cf modified within the
        // last second to settle; this one is complete, so date it back.
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("postfix/main.cf"))
            .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
            .expect("main.cf mtime");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn mail_config(&self) -> PathBuf {
        self.path("postfix")
    }

    pub fn map(&self) -> PathBuf {
        self.path("authenticated_ips")
    }

    /// `postmap -q ADDRESS hash:MAP`: `Some(value)` when found, `None`
    /// when not; panics when postmap fails (see [`postmap_lookup`]).
    pub fn postmap_q(&self, ip: &str) -> Option<String> {
        postmap_q(&self.mail_config(), &self.map(), ip)
    }

    /// Polls the map until it holds `ip` (any value), at most `timeout`.
    pub fn wait_granted(&self, ip: &str, timeout: Duration) -> bool {
        wait_for(timeout, || self.postmap_q(ip).is_some())
    }

    /// Polls the map until it maps `ip` to `OK`, at most `timeout`.
    pub fn wait_ok(&self, ip: &str, timeout: Duration) -> bool {
        wait_for(timeout, || self.postmap_q(ip).as_deref() == Some("OK"))
    }

    /// `postmap -q ip` on another map of this scratch directory.
    pub fn postmap_q_at(&self, map: &Path, ip: &str) -> Option<String> {
        postmap_q(&self.mail_config(), map, ip)
    }
}

/// `postmap -q ip hash:MAP`: `Some(value)` when found, `None` when not
/// found; panics when postmap itself fails (a missing or unreadable
/// database, a bad configuration), which is not an answer.
pub fn postmap_q(mail_config: &Path, map: &Path, ip: &str) -> Option<String> {
    postmap_lookup(mail_config, map, ip).unwrap_or_else(|e| panic!("{e}"))
}

/// `postmap -q ip hash:MAP`: `Ok(Some(value))` when found, `Ok(None)` when
/// not found (exit 1 and nothing on stderr), `Err` when postmap failed.
pub fn postmap_lookup(mail_config: &Path, map: &Path, ip: &str) -> Result<Option<String>, String> {
    let out = Command::new("postmap")
        .env("MAIL_CONFIG", mail_config)
        .arg("-q")
        .arg(ip)
        .arg(format!("hash:{}", map.display()))
        .output()
        .map_err(|e| format!("cannot run postmap (install postfix): {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        Some(1) if stderr.trim().is_empty() => Ok(None),
        code => Err(format!(
            "postmap -q {ip} hash:{} failed ({code:?}): {stderr}",
            map.display()
        )),
    }
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Says loudly that the running test is skipped, and why: "SKIPPED:
/// <test>: <reason>" on stderr. With SMTP_AFTER_POPD_REQUIRE_ALL=1 in
/// the environment (CI sets it), a skip is a failure instead.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    if std::env::var("SMTP_AFTER_POPD_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test} cannot run here ({reason}), and SMTP_AFTER_POPD_REQUIRE_ALL=1");
    }
    // Straight to stderr, past the test harness's capture of eprintln!,
    // so that the skip shows in a passing run too.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED: {test}: {reason}\n").as_bytes(),
    );
}

/// True when running as root; otherwise [`skip`]s with `why` (what root
/// is needed for) and returns false.
pub fn require_root(why: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(&format!("needs root ({why})"));
    false
}

/// The receive queue (bytes waiting) and the kernel's drop count of the
/// UDP socket bound to local `port`, from /proc/self/net/udp and udp6.
pub fn udp_queue(port: u16) -> Option<(u64, u64)> {
    let hex = format!(":{port:04X}");
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 13 && f[1].ends_with(&hex) {
                let rx = f[4].split(':').nth(1)?;
                let rx = u64::from_str_radix(rx, 16).ok()?;
                return Some((rx, f[12].parse().ok()?));
            }
        }
    }
    None
}

/// Waits (at most 60 s) until the daemon has read everything queued on
/// its UDP socket at `port`; panics if it does not.
pub fn wait_udp_read(port: u16) {
    let ok = wait_for(Duration::from_secs(60), || {
        udp_queue(port).is_none_or(|(rx, _)| rx == 0)
    });
    assert!(ok, "the daemon did not read its UDP queue on port {port}");
}

/// How many datagrams a paced sender sends before it waits for the
/// daemon to read them: far fewer than the smallest default receive
/// buffer holds (212,992 bytes, about 270 small datagrams).
pub const PACE: usize = 64;

/// Sends each message as one datagram to `port`, waiting after every
/// [`PACE`] until the daemon has read its queue, so that nothing depends
/// on the size of its receive buffer. Returns how many were sent.
pub fn send_udp_paced<S: AsRef<str>>(port: u16, msgs: impl IntoIterator<Item = S>) -> usize {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    let mut n = 0;
    for m in msgs {
        if n > 0 && n % PACE == 0 {
            wait_udp_read(port);
        }
        s.send_to(m.as_ref().as_bytes(), ("127.0.0.1", port))
            .expect("send");
        n += 1;
    }
    n
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free UDP port on 127.0.0.1 (bound, then released).
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A running daemon; stopped with SIGTERM when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `args` (MAIL_CONFIG set to the scratch
    /// Postfix directory) and waits until it logs that it started.
    pub fn start(scratch: &Scratch, args: &[&str]) -> Daemon {
        Self::start_with(scratch, args, Some(&scratch.mail_config()))
    }

    /// Starts the daemon with `args` and `MAIL_CONFIG` set to `mail_config`,
    /// or unset, and waits until it logs that it started.
    pub fn start_with(scratch: &Scratch, args: &[&str], mail_config: Option<&Path>) -> Daemon {
        Self::spawn(scratch, &[], args, mail_config, |_| Vec::new())
    }

    /// Starts the daemon with `args` and more environment variables, which
    /// may depend on its log file (systemd's JOURNAL_STREAM names it).
    pub fn start_env(
        scratch: &Scratch,
        args: &[&str],
        env: impl FnOnce(&std::fs::File) -> Vec<(String, String)>,
    ) -> Daemon {
        Self::spawn(scratch, &[], args, Some(&scratch.mail_config()), env)
    }

    /// Starts the daemon through `wrapper` (e.g. `setpriv --reuid=...`,
    /// which execs it, so that the child is the daemon) and waits until it
    /// logs that it started.
    pub fn start_as(scratch: &Scratch, wrapper: &[&str], args: &[&str]) -> Daemon {
        Self::spawn(scratch, wrapper, args, Some(&scratch.mail_config()), |_| {
            Vec::new()
        })
    }

    /// Runs the daemon through `wrapper` until it exits (within 10 s);
    /// returns its exit status and log.
    pub fn run_as(scratch: &Scratch, wrapper: &[&str], args: &[&str]) -> (Option<i32>, String) {
        let log = scratch.path(&format!("daemon-{}.log", unique()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Self::command(wrapper, args)
            .stderr(stderr)
            .spawn()
            .expect("spawn daemon");
        let exited = wait_for(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = child.kill();
        }
        let status = child.wait().ok().and_then(|s| s.code());
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// The daemon's command line: `wrapper` (if any), the binary, `args`,
    /// and no control socket unless `args` ask for one.
    fn command(wrapper: &[&str], args: &[&str]) -> Command {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        // No control socket unless the test asks for one: the default path
        // may belong to an installed daemon.
        if !args.contains(&"--control") {
            command.args(["--control", "none"]);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }

    fn spawn(
        scratch: &Scratch,
        wrapper: &[&str],
        args: &[&str],
        mail_config: Option<&Path>,
        env: impl FnOnce(&std::fs::File) -> Vec<(String, String)>,
    ) -> Daemon {
        let log = scratch.path(&format!("daemon-{}.log", unique()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut command = Self::command(wrapper, args);
        command.envs(env(&stderr));
        match mail_config {
            Some(dir) => command.env("MAIL_CONFIG", dir),
            None => command.env_remove("MAIL_CONFIG"),
        };
        let child = command.stderr(stderr).spawn().expect("spawn daemon");
        let mut d = Daemon { child, log };
        // "started: " in every log format (text, journal, JSON).
        let ok = wait_for(Duration::from_secs(60), || {
            d.log_text().contains("started: ") || d.exited()
        });
        assert!(ok && !d.exited(), "daemon did not start:\n{}", d.log_text());
        d
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends a signal (TERM, HUP, KILL...).
    pub fn signal(&self, sig: &str) {
        unsafe_kill(self.child.id(), sig);
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> Option<i32> {
        unsafe_kill(self.child.id(), "TERM");
        // The stop drains the receivers (0.5 s), lets the map be written
        // once more (4 s) and writes the state (0.8 s), at most.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited() {
            self.stop();
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Sends one datagram over UDP from 127.0.0.1 to `port`.
pub fn send_udp(port: u16, msg: &str) {
    send_udp_from("127.0.0.1", port, msg);
}

/// Sends one datagram over UDP from `src` (a loopback address) to `port`.
pub fn send_udp_from(src: &str, port: u16, msg: &str) {
    let s = UdpSocket::bind(format!("{src}:0")).expect("bind sender");
    s.send_to(msg.as_bytes(), ("127.0.0.1", port))
        .expect("send");
}

/// Sends one datagram to a unix datagram socket.
pub fn send_unix(path: &Path, msg: &str) {
    let s = UnixDatagram::unbound().expect("socket");
    s.send_to(msg.as_bytes(), path).expect("send");
}

/// The lines of the map source file that grant an address.
pub fn map_lines(map: &Path) -> Vec<String> {
    std::fs::read_to_string(map)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A system user (and its group) made for one test run, named with the
/// test's pid; removed when dropped.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    /// Its own group's gid.
    pub gid: u32,
}

impl TestUser {
    /// `useradd --system --user-group` a user named `PREFIX-PID`.
    pub fn create(prefix: &str) -> TestUser {
        let name = format!("{prefix}-{}", std::process::id());
        let st = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"])
            .arg(&name)
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .arg(flag)
                .arg(&name)
                .output()
                .expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
        let _ = Command::new("groupdel")
            .arg(&self.name)
            .stderr(Stdio::null())
            .status();
    }
}
