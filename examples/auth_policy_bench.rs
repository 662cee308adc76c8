//! Auth-policy benchmark (issue 19), in one run:
//!
//! 1. Report to grant: the daemon (`--auth-policy`, `--policy tcp://...`,
//!    `--map none`) gets Dovecot's report of a login over one kept-alive
//!    HTTP connection, as Dovecot's client sends it; the time runs from
//!    the report's first byte to the policy service answering `OK` for its
//!    address on one kept connection (as smtpd asks). Baseline in the same
//!    run: the same login as a Dovecot syslog line in one UDP datagram, to
//!    the same `OK`. Also the report's own answer time.
//! 2. Dovecot's login time (root only): POP3 `PASS` to `+OK` on private
//!    Dovecot 2.3 instances, logins interleaved: without auth-policy (the
//!    baseline); reporting to the daemon; reporting to a port where nothing
//!    listens (the daemon stopped); and with Dovecot's default checks
//!    before and after authentication answered by the daemon.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/auth_policy_bench [DAEMON]
//! ```

#[path = "../tests/stack/mod.rs"]
mod stack;

/// What `tests/stack` takes from the tests' common module.
mod common {
    pub fn free_tcp_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    pub fn wait_for(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        cond()
    }
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPORTS: u32 = 5000;
const LOGINS: usize = 200;
const BASIC: &str = "ZG92ZWNvdDpzM2NyZXQ=";

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn us(d: Duration) -> u128 {
    d.as_micros()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("udp")
        .port()
}

/// The daemon under test, with its listeners' ports.
struct Daemon {
    child: Child,
    udp: u16,
    policy: u16,
    auth: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(bin: &Path, dir: &Path) -> Daemon {
    let secret = dir.join("secret");
    std::fs::write(&secret, "dovecot:s3cret\n").expect("secret");
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&secret, mode).expect("chmod");
    let (udp, policy, auth) = (
        free_udp_port(),
        common::free_tcp_port(),
        common::free_tcp_port(),
    );
    let child = Command::new(bin)
        .args(["--listen", &format!("udp://127.0.0.1:{udp}")])
        .args(["--map", "none", "--control", "none", "--never", "none"])
        .args(["--policy", &format!("tcp://127.0.0.1:{policy}")])
        .args(["--auth-policy", &format!("tcp://127.0.0.1:{auth}")])
        .args(["--auth-policy-secret", secret.to_str().expect("path")])
        .args(["--window", "1h", "--log-level", "warning"])
        .stderr(std::fs::File::create(dir.join("daemon.log")).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon");
    let up = common::wait_for(Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", policy)).is_ok()
            && TcpStream::connect(("127.0.0.1", auth)).is_ok()
    });
    assert!(up, "daemon did not start");
    Daemon {
        child,
        udp,
        policy,
        auth,
    }
}

/// One connection and its reader.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_nodelay(true).expect("nodelay");
        Conn {
            w: c.try_clone().expect("clone"),
            r: BufReader::new(c),
        }
    }

    /// A policy request for `addr`: true for `action=OK`.
    fn granted(&mut self, addr: &str) -> bool {
        write!(
            self.w,
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={addr}\n\n"
        )
        .expect("write");
        let mut a = String::new();
        self.r.read_line(&mut a).expect("read");
        let mut blank = String::new();
        self.r.read_line(&mut blank).expect("read");
        a == "action=OK\n"
    }

    /// Dovecot's report of a POP3 login from `addr`; returns the status.
    fn report(&mut self, addr: &str) -> u16 {
        let body = format!(
            r#"{{"device_id":"","login":"alice","protocol":"pop3","pwhash":"00d7","remote":"{addr}","session_id":"eNtdP5dhdK9/AAAB","success":true,"policy_reject":false,"tls":false}}"#
        );
        write!(
            self.w,
            "POST /?command=report HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {BASIC}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let (mut status, mut length) = (0, 0usize);
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("read");
            if let Some(code) = line.strip_prefix("HTTP/1.1 ") {
                status = code.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; length];
        self.r.read_exact(&mut body).expect("body");
        status
    }
}

fn ip(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// Part 1: report to grant, against a syslog datagram to grant.
fn report_to_grant(d: &Daemon) {
    let mut http = Conn::new(d.auth);
    let mut policy = Conn::new(d.policy);
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
    udp.connect(("127.0.0.1", d.udp)).expect("connect");
    let (mut report, mut answer, mut syslog) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..REPORTS {
        // Alternate the two inputs, so that both see the same machine.
        let a = ip(2 * i);
        let t = Instant::now();
        assert_eq!(http.report(&a), 200);
        answer.push(t.elapsed());
        while !policy.granted(&a) {}
        report.push(t.elapsed());
        let b = ip(2 * i + 1);
        let line = format!(
            "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip={b}, lip=192.0.2.1, mpid=1, session=<eNtdP5dhdK9/AAAB>"
        );
        let t = Instant::now();
        udp.send(line.as_bytes()).expect("send");
        while !policy.granted(&b) {}
        syslog.push(t.elapsed());
    }
    for (name, v) in [
        ("report_to_policy_ok", &mut report),
        ("report_answer", &mut answer),
        ("syslog_datagram_to_policy_ok (baseline)", &mut syslog),
    ] {
        println!(
            "{name}: n={} p50_us={} p99_us={} max_us={}",
            v.len(),
            us(pct(v, 0.5)),
            us(pct(v, 0.99)),
            us(pct(v, 1.0))
        );
    }
}

/// POP3 `PASS` to `+OK` from `src`.
fn pop3_login_time(src: &str, port: u16) -> Duration {
    let s = stack::connect_from(src, port);
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    write!(w, "USER alice\r\n").expect("write");
    line.clear();
    r.read_line(&mut line).expect("user");
    let t = Instant::now();
    write!(w, "PASS {}\r\n", stack::PASSWORD).expect("write");
    line.clear();
    r.read_line(&mut line).expect("pass");
    let took = t.elapsed();
    assert!(line.starts_with("+OK"), "login failed: {line}");
    write!(w, "QUIT\r\n").expect("write");
    line.clear();
    let _ = r.read_line(&mut line);
    took
}

/// Dovecot's settings for reporting to `port`, with the checks as `checks`.
fn policy_lines(port: u16, checks: &str) -> String {
    format!(
        "auth_policy_server_url = http://127.0.0.1:{port}/\n\
         auth_policy_server_api_header = Authorization: Basic {BASIC}\n\
         auth_policy_hash_nonce = 0123456789abcdef0123456789abcdef\n\
         auth_policy_check_before_auth = {checks}\n\
         auth_policy_check_after_auth = {checks}\n\
         auth_policy_report_after_auth = yes\n"
    )
}

/// Part 2: Dovecot's login time, with and without the report service.
fn dovecot_login_times(d: &Daemon, dir: &Path) {
    let log = dir.join("dovecot-log.sock");
    let sink = std::os::unix::net::UnixDatagram::bind(&log).expect("log socket");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while sink.recv(&mut buf).is_ok() {}
    });
    let nobody = common::free_tcp_port();
    let configs = [
        ("no auth-policy (baseline)", String::new()),
        ("report to the daemon", policy_lines(d.auth, "no")),
        ("report, daemon stopped", policy_lines(nobody, "no")),
        ("checks and report (defaults)", policy_lines(d.auth, "yes")),
    ];
    let dovecots: Vec<stack::Dovecot> = configs
        .iter()
        .enumerate()
        .map(|(i, (_, extra))| {
            stack::Dovecot::start(&dir.join(format!("dovecot{i}")), &log, &["alice"], extra)
        })
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    for n in 0..LOGINS {
        for (i, dc) in dovecots.iter().enumerate() {
            let src = format!("127.0.{}.{}", 10 + i, 1 + n % 250);
            times[i].push(pop3_login_time(&src, dc.pop3_port));
        }
    }
    for ((name, _), v) in configs.iter().zip(times.iter_mut()) {
        println!(
            "dovecot_pop3_login[{name}]: n={} p50_us={} p99_us={} max_us={}",
            v.len(),
            us(pct(v, 0.5)),
            us(pct(v, 0.99)),
            us(pct(v, 1.0))
        );
    }
}

fn main() {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release/smtp-after-popd".into()),
    );
    let dir = tempfile::Builder::new()
        .prefix("sap-auth-policy-bench-")
        .tempdir()
        .expect("tempdir");
    let d = start_daemon(&bin, dir.path());
    report_to_grant(&d);
    if stack::is_root() {
        dovecot_login_times(&d, dir.path());
    } else {
        println!("dovecot_pop3_login: skipped (needs root to run Dovecot)");
    }
}
