//! Flood measurement: starts the daemon, floods its UDP listener with
//! syslog noise as fast as loopback takes it while a trickle of real logins
//! (one in `--every` datagrams, each from a new address) goes along, samples
//! the daemon's memory, stops it and accounts for every datagram and every
//! login: received by the daemon, dropped by the kernel (counted), granted.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/flood --seconds 60
//! ```
//!
//! Prints one `key=value` line per figure. Not a test: it asserts nothing
//! about speed; the accounting identities are checked and reported.

use std::io::Read;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn counter(log: &str, key: &str) -> u64 {
    log.lines()
        .rev()
        .find(|l| l.contains("stopped:"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let seconds: u64 = arg("--seconds", "60").parse().expect("--seconds N");
    let every: u64 = arg("--every", "1000").parse().expect("--every N");
    let daemon = PathBuf::from(arg("--daemon", "target/release/smtp-after-popd"));
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
    let map = dir.path().join("authenticated_ips");
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(&daemon)
        .args(["--listen", &format!("udp://127.0.0.1:{port}")])
        .args(["--map", map.to_str().expect("path")])
        .args(["--window", "1h", "--max-grants", "1000000"])
        .args(["--receive-buffer", "4M"])
        .env("MAIL_CONFIG", dir.path().join("postfix"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", daemon.display()));
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("info: started:")
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id();
    let rss_start = rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = rss_kib(pid);
                peak = peak.max(r);
                samples.push(r);
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, samples)
        })
    };

    let noise = [
        "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: connect from unknown[198.51.100.7]",
        "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: NOQUEUE: reject: RCPT from unknown[198.51.100.7]: 554 5.7.1 <x@example.org>: Relay access denied; from=<a@b> to=<x@example.org> proto=ESMTP helo=<h>",
        "<22>Nov 24 10:00:01 mail1 dovecot: imap(alice)<4242><abcdefgh>: Disconnected: Logged out in=8 out=468",
        "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<bob>, method=PLAIN, rip=198.51.100.9, lip=192.0.2.1, session=<abcdefgh>",
        "<30>Nov 24 10:00:01 mail1 systemd[1]: Started session 42 of user alice.",
        "\u{1}\u{2}garbage that is not syslog at all",
    ];
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(("127.0.0.1", port)).expect("connect");
    let t0 = Instant::now();
    let (mut sent, mut logins, mut send_errors) = (0u64, 0u64, 0u64);
    let mut first_logins: Vec<String> = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..256 {
            let msg = if sent % every == 0 {
                logins += 1;
                let ip = format!(
                    "10.{}.{}.{}",
                    (logins >> 16) & 255,
                    (logins >> 8) & 255,
                    logins & 255
                );
                if first_logins.len() < 5 {
                    first_logins.push(ip.clone());
                }
                format!(
                    "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<u{logins}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=1, session=<abcdefgh>"
                )
            } else {
                noise[(sent % noise.len() as u64) as usize].to_string()
            };
            match sock.send(msg.as_bytes()) {
                Ok(_) => sent += 1,
                Err(_) => send_errors += 1,
            }
        }
    }
    let elapsed = t0.elapsed();
    // Responsiveness right after the flood: one more login, timed to the map.
    let probe_sent = Instant::now();
    sock.send(b"<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<probe>, method=PLAIN, rip=192.0.2.250, lip=192.0.2.1")
        .expect("send");
    sent += 1;
    let mut probe_ms = None;
    while probe_sent.elapsed() < Duration::from_secs(30) {
        let out = Command::new("postmap")
            .env("MAIL_CONFIG", dir.path().join("postfix"))
            .args(["-q", "192.0.2.250"])
            .arg(format!("hash:{}", map.display()))
            .output()
            .expect("postmap");
        if out.status.success() {
            probe_ms = Some(probe_sent.elapsed().as_millis());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak, samples) = sampler.join().expect("sampler");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let mut text = String::new();
    std::fs::File::open(&log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("log");
    let received = counter(&text, "received");
    let kernel_dropped = counter(&text, "kernel_dropped");
    let granted = counter(&text, "granted");
    let map_lines = std::fs::read_to_string(&map)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(" OK"))
        .count();
    let tail_rss: Vec<u64> = samples.iter().rev().take(10).copied().collect();
    println!("seconds={:.1}", elapsed.as_secs_f64());
    println!("sent={sent}");
    println!("send_errors={send_errors}");
    println!("rate_per_s={:.0}", sent as f64 / elapsed.as_secs_f64());
    println!("received={received}");
    println!("kernel_dropped={kernel_dropped}");
    println!("accounted={}", received + kernel_dropped == sent);
    println!("logins_sent={}", logins + 1);
    println!("logins_granted={granted}");
    println!("logins_missing={}", (logins + 1).saturating_sub(granted));
    println!(
        "logins_missing_within_kernel_drops={}",
        (logins + 1).saturating_sub(granted) <= kernel_dropped
    );
    println!("map_lines={map_lines}");
    println!("probe_login_to_map_ms={probe_ms:?}");
    println!("rss_start_kib={rss_start}");
    println!("rss_peak_kib={peak}");
    println!("rss_last_second_kib={tail_rss:?}");
}
