//! Ingest: how fast the daemon takes a realistic mail.log mix over UDP,
//! against a minimal receiver that only counts datagrams (a recvmmsg loop)
//! on the same socket settings, at rising sending rates, in the same run.
//!
//! For each rate, one sender paces datagrams (one login in 50, the rest
//! Postfix, Dovecot and other noise, as rsyslog forwards them) for
//! `--seconds`; the figures are datagrams sent, received and lost (sent
//! but not received, and the socket's kernel drop counter), the share
//! lost, and for the daemon, logins sent and granted.
//!
//! Default settings: the daemon and the baseline ask for the daemon's
//! default receive buffer (8 MiB, forced past `net.core.rmem_max` as root)
//! unless `--receive-buffer SIZE` is given. Unless `--load no`, another process keeps one core busy (a
//! spinning loop) for the whole run. The sender sleeps between bursts of
//! due datagrams (every 200 µs), so it does not take a core of its own.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/ingest_bench [--seconds 10] [--rates 50000,100000,150000,200000,0] [--load yes|no] [--receive-buffer 4M]
//! ```
//! (rate 0 = as fast as the sender can go).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

const NOISE: [&str; 9] = [
    "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: connect from unknown[198.51.100.7]",
    "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: NOQUEUE: reject: RCPT from unknown[198.51.100.7]: 554 5.7.1 <x@example.org>: Relay access denied; from=<a@b> to=<x@example.org> proto=ESMTP helo=<h>",
    "<22>Nov 24 10:00:01 mail1 postfix/cleanup[2345]: 4F1A21234: message-id=<20261124100001.4F1A21234@mail1.example.net>",
    "<22>Nov 24 10:00:01 mail1 postfix/qmgr[345]: 4F1A21234: from=<alice@example.net>, size=1234, nrcpt=1 (queue active)",
    "<22>Nov 24 10:00:01 mail1 postfix/smtp[4567]: 4F1A21234: to=<bob@example.org>, relay=mx.example.org[203.0.113.25]:25, delay=0.5, status=sent (250 2.0.0 Ok)",
    "<22>Nov 24 10:00:01 mail1 dovecot: imap(alice)<4242><abcdefgh>: Disconnected: Logged out in=8 out=468 deleted=0 expunged=0",
    "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<bob>, method=PLAIN, rip=198.51.100.9, lip=192.0.2.1, session=<abcdefgh>",
    "<30>Nov 24 10:00:01 mail1 systemd[1]: Started session 42 of user alice.",
    "<86>Nov 24 10:00:01 mail1 CRON[999]: pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)",
];

/// Sends for `secs` at `rate` per second (0: flat out); returns (sent, logins).
fn send(port: u16, rate: u64, secs: u64, base: u64) -> (u64, u64) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(("127.0.0.1", port)).expect("connect");
    let t0 = Instant::now();
    let (mut sent, mut logins) = (0u64, 0u64);
    let total = Duration::from_secs(secs);
    while t0.elapsed() < total {
        if rate > 0 {
            // Keep to the schedule: never ahead of rate * elapsed; sleep
            // when all that is due is sent.
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        let msg = if sent % 50 == 0 {
            logins += 1;
            let n = base + logins;
            format!(
                "<22>Nov 24 10:00:01 mail1 dovecot: imap-login: Login: user=<u{n}>, method=PLAIN, rip=10.{}.{}.{}, lip=192.0.2.1, mpid=1, TLS, session=<abcdefgh>",
                (n >> 16) & 255,
                (n >> 8) & 255,
                n & 255
            )
        } else {
            NOISE[(sent % NOISE.len() as u64) as usize].to_string()
        };
        if sock.send(msg.as_bytes()).is_ok() {
            sent += 1;
        }
    }
    (sent, logins)
}

/// The receive buffer to ask for (`--receive-buffer`, e.g. `4M`), if any.
fn receive_buffer() -> Option<usize> {
    let v = arg("--receive-buffer", "");
    if v.is_empty() {
        return None;
    }
    let (num, mul) = match v.strip_suffix(['M', 'm']) {
        Some(n) => (n, 1 << 20),
        None => match v.strip_suffix(['K', 'k']) {
            Some(n) => (n, 1 << 10),
            None => (v.as_str(), 1),
        },
    };
    Some(num.parse::<usize>().expect("--receive-buffer SIZE") * mul)
}

fn socket_drops(fd: i32) -> u64 {
    // SAFETY: fstat on our own socket.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return 0;
    }
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 13 && f[9].parse::<u64>().ok() == Some(st.st_ino))
        .and_then(|f| f[12].parse().ok())
        .unwrap_or(0)
}

/// The baseline: a recvmmsg loop that counts datagrams, same buffer size.
fn baseline(rate: u64, secs: u64) -> (u64, u64, u64) {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    // The daemon's own default when --receive-buffer is not given.
    smtp_after_popd::set_datagram_buffer(
        &socket2::SockRef::from(&sock),
        "baseline",
        receive_buffer(),
    );
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .expect("addr")
            .into(),
    )
    .expect("bind");
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let port = sock.local_addr().expect("addr").port();
    let fd = sock.as_raw_fd();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (count, stop) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            const N: usize = 64;
            let mut bufs = vec![[0u8; 8193]; N];
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: mmsghdr is plain old data.
            let mut msgs: Vec<libc::mmsghdr> =
                (0..N).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: msgs points at N valid headers with valid buffers.
                let n = unsafe {
                    libc::recvmmsg(fd, msgs.as_mut_ptr(), N as u32, 0, std::ptr::null_mut())
                };
                if n > 0 {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            drop(sock);
        })
    };
    let (sent, _) = send(port, rate, secs, 0);
    std::thread::sleep(Duration::from_millis(300));
    let drops = socket_drops(fd);
    stop.store(true, Ordering::Relaxed);
    let _ = rx.join();
    (sent, count.load(Ordering::Relaxed), drops)
}

fn counter(log: &str, key: &str) -> u64 {
    log.lines()
        .find(|l| l.contains("stopped:"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn daemon_run(daemon: &PathBuf, rate: u64, secs: u64, base: u64) -> (u64, u64, u64, u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("postfix")).expect("mkdir");
    std::fs::write(dir.path().join("postfix/main.cf"), "").expect("main.cf");
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("postfix/main.cf"))
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
        .expect("main.cf mtime");
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port();
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(daemon)
        .args(["--listen", &format!("udp://127.0.0.1:{port}")])
        .arg("--map")
        .arg(dir.path().join("authenticated_ips"))
        .args(["--window", "1h", "--max-grants", "1000000"])
        .args(
            receive_buffer()
                .map(|b| vec!["--receive-buffer".to_string(), b.to_string()])
                .unwrap_or_default(),
        )
        .env("MAIL_CONFIG", dir.path().join("postfix"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon");
    // Sent before the daemon handles its sockets (during its start-up
    // checks), the flood would wait in the kernel's buffer and overflow
    // it: start sending once it says it started.
    let t = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started: listening on")) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (sent, logins) = send(port, rate, secs, base);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (
        sent,
        counter(&text, "received"),
        counter(&text, "kernel_dropped"),
        logins,
        counter(&text, "granted"),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--burn") {
        // The load: one core kept busy until killed.
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }
    let secs: u64 = arg("--seconds", "10").parse().expect("--seconds");
    let rates: Vec<u64> = arg("--rates", "50000,100000,150000,200000,0")
        .split(',')
        .map(|r| r.parse().expect("--rates"))
        .collect();
    let daemon = PathBuf::from(arg("--daemon", "target/release/smtp-after-popd"));
    let load = arg("--load", "yes") == "yes";
    /// Ends the load process however the run ends.
    struct Burner(std::process::Child);
    impl Drop for Burner {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let burner = load.then(|| {
        Burner(
            Command::new(std::env::current_exe().expect("own path"))
                .arg("--burn")
                .spawn()
                .expect("load process"),
        )
    });
    println!(
        "receive buffer: {}; other load: {}; {secs} s per run",
        receive_buffer().map_or(
            "the daemon's default (8 MiB; rmem_max does not cap it for root)".to_string(),
            |b| format!("{b} bytes")
        ),
        if load {
            "one process spinning on one core"
        } else {
            "none"
        }
    );
    println!(
        "| target rate/s | baseline sent | baseline received | baseline lost (kernel-counted) | baseline lost % | daemon sent | daemon received | daemon lost (kernel-counted) | daemon lost % | logins sent | logins granted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, rate) in rates.iter().enumerate() {
        let (bs, br, bd) = baseline(*rate, secs);
        let (ds, dr, dd, dl, dg) = daemon_run(&daemon, *rate, secs, i as u64 * 10_000_000);
        let shown = if *rate == 0 {
            "flat out".to_string()
        } else {
            rate.to_string()
        };
        let pct = |lost: u64, sent: u64| 100.0 * lost as f64 / sent.max(1) as f64;
        let (bl, dlost) = (bs - br.min(bs), ds - dr.min(ds));
        println!(
            "| {shown} | {bs} | {br} | {bl} ({bd}) | {:.3} | {ds} | {dr} | {dlost} ({dd}) | {:.3} | {dl} | {dg} |",
            pct(bl, bs),
            pct(dlost, ds),
        );
    }
    drop(burner);
}
