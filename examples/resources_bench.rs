//! Memory and idle cost of the daemon.
//!
//! 1. Idle: the daemon started with an empty table, then left alone for a
//!    minute; CPU time of the whole process from /proc/PID/stat (user +
//!    system, which keeps the time of threads that have exited; in clock
//!    ticks, 10 ms here), and the finer sum of /proc/PID/task/*/schedstat
//!    (nanoseconds, threads alive at both ends only), against a `sleep 60`
//!    process measured the same way at the same time.
//! 2. Memory: 1,000,000 logins from distinct addresses sent to the daemon
//!    (paced so that none is dropped), until its map holds them all; peak
//!    and final RSS, and bytes per live grant over the empty daemon's RSS.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/resources_bench [--idle-seconds 60] [--grants 1000000]
//! ```

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// CPU time of the whole process in nanoseconds, from /proc/PID/stat
/// (utime + stime: every thread, those that exited too), at the
/// resolution of a clock tick.
fn process_stat_cpu_ns(pid: u32) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which ends with the last ')'.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) * 1_000_000_000 / tick)
        })
        .unwrap_or(0)
}

/// CPU time of the threads alive now (schedstat per task).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return cpu_ns(pid);
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
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

fn ip(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn start(daemon: &PathBuf, dir: &std::path::Path, port: u16) -> Child {
    let log = dir.join("daemon.log");
    let child = Command::new(daemon)
        .args(["--listen", &format!("udp://127.0.0.1:{port}")])
        .arg("--map")
        .arg(dir.join("authenticated_ips"))
        .args([
            "--window",
            "1h",
            "--max-grants",
            "2000000",
            "--receive-buffer",
            "4M",
        ])
        .args(["--log-level", "warning"])
        .env("MAIL_CONFIG", dir.join("postfix"))
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon");
    let t = Instant::now();
    while !dir.join("authenticated_ips.db").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child
}

fn main() {
    let idle_s: u64 = arg("--idle-seconds", "60").parse().expect("--idle-seconds");
    let grants: u32 = arg("--grants", "1000000").parse().expect("--grants");
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
    let mut child = start(&daemon, dir.path(), port);
    let pid = child.id();

    // Idle. The runtime's blocking threads (used for the first map write)
    // exit after 10 s idle, taking their CPU time out of the per-thread
    // sums; start measuring after that.
    std::thread::sleep(Duration::from_secs(12));
    let mut sleeper = Command::new("sleep")
        .arg(idle_s.to_string())
        .spawn()
        .expect("sleep");
    let (d0, t0, s0, u0) = (
        process_stat_cpu_ns(pid),
        process_cpu_ns(pid),
        cpu_ns(sleeper.id()),
        process_stat_cpu_ns(sleeper.id()),
    );
    std::thread::sleep(Duration::from_secs(idle_s));
    let (d1, t1, s1, u1) = (
        process_stat_cpu_ns(pid),
        process_cpu_ns(pid),
        cpu_ns(sleeper.id()),
        process_stat_cpu_ns(sleeper.id()),
    );
    let _ = sleeper.wait();
    println!(
        "idle_seconds={idle_s} daemon_cpu_us_proc_stat={} (every thread, {} ms ticks) daemon_cpu_us_live_threads={} baseline_sleep_cpu_us={} baseline_sleep_cpu_us_proc_stat={}",
        d1.saturating_sub(d0) / 1000,
        // SAFETY: sysconf has no preconditions.
        1000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1),
        t1.saturating_sub(t0) / 1000,
        s1.saturating_sub(s0) / 1000,
        u1.saturating_sub(u0) / 1000
    );

    // Memory.
    let rss_empty = rss_kib(pid);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(("127.0.0.1", port)).expect("connect");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let t0 = Instant::now();
    for i in 0..grants {
        let line = format!(
            "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<user{i}@example.com>, method=PLAIN, rip={}, lip=192.0.2.1, mpid=1, session=<abcdefgh>",
            ip(i)
        );
        sock.send(line.as_bytes()).expect("send");
        if i % 500 == 499 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let sent_in = t0.elapsed();
    // Wait until the map stops growing (a datagram the kernel dropped
    // during the load is reported, not waited for).
    let map = dir.path().join("authenticated_ips");
    let count = || {
        std::fs::read_to_string(&map)
            .map(|s| s.lines().filter(|l| l.ends_with(" OK")).count())
            .unwrap_or(0)
    };
    let (mut last, mut stable) = (usize::MAX, 0);
    let mut in_map_count = 0;
    while stable < 6 {
        std::thread::sleep(Duration::from_millis(500));
        let n = count();
        if n == last {
            stable += 1;
        } else {
            stable = 0;
            last = n;
        }
        in_map_count = n;
    }
    let in_map = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_full = rss_kib(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    let stopped = log.lines().find(|l| l.contains("stopped:")).unwrap_or("");
    let granted = stopped
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("granted="))
        .unwrap_or("?");
    println!(
        "grants_sent={grants} in_map={in_map_count} granted={granted} sent_in_s={:.1} map_stable_after_s={:.1}",
        sent_in.as_secs_f64(),
        in_map.as_secs_f64()
    );
    println!("rss_empty_kib={rss_empty} rss_with_grants_kib={rss_full} rss_peak_kib={peak}");
    println!(
        "bytes_per_live_grant={:.0}",
        (rss_full.saturating_sub(rss_empty) * 1024) as f64 / in_map_count.max(1) as f64
    );
}
