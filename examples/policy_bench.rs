//! Policy service benchmark: requests per second and latency with 100,000
//! live grants, against Postfix's own `postmap -q` on a 100,000-entry hash
//! map as the baseline, measured in the same run.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/policy_bench
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GRANTS: u32 = 100_000;

fn ip(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn ask(w: &mut TcpStream, r: &mut BufReader<TcpStream>, addr: &str) -> String {
    write!(
        w,
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={addr}\nclient_name=unknown\nsender=a@example.org\nrecipient=b@remote.example\n\n"
    )
    .expect("write");
    let mut a = String::new();
    r.read_line(&mut a).expect("read");
    let mut blank = String::new();
    r.read_line(&mut blank).expect("read");
    a
}

fn main() {
    let daemon = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release/smtp-after-popd".into()),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("postfix")).expect("mkdir");
    std::fs::write(dir.path().join("postfix/main.cf"), "").expect("main.cf");
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("postfix/main.cf"))
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
        .expect("main.cf mtime");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let udp_port = udp.local_addr().expect("addr").port();
    drop(udp);
    let tcp_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("tcp")
        .port();
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(&daemon)
        .args(["--listen", &format!("udp://127.0.0.1:{udp_port}")])
        .args([
            "--map",
            "none",
            "--policy",
            &format!("tcp://127.0.0.1:{tcp_port}"),
        ])
        .args([
            "--window",
            "1h",
            "--max-grants",
            "200000",
            "--log-level",
            "warning",
        ])
        .args(["--receive-buffer", "4M", "--never", "none"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon");
    let t = Instant::now();
    let conn = loop {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", tcp_port)) {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    conn.set_nodelay(true).expect("nodelay");
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);

    // Load the table, paced so that no datagram is dropped.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(("127.0.0.1", udp_port)).expect("connect");
    for i in 0..GRANTS {
        let line = format!(
            "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip={}, lip=192.0.2.1",
            ip(i)
        );
        sock.send(line.as_bytes()).expect("send");
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let t = Instant::now();
    while ask(&mut w, &mut r, &ip(GRANTS - 1)) != "action=OK\n" {
        assert!(t.elapsed() < Duration::from_secs(30), "grants not loaded");
        std::thread::sleep(Duration::from_millis(10));
    }
    let granted = (0..GRANTS)
        .step_by(997)
        .filter(|&i| ask(&mut w, &mut r, &ip(i)) == "action=OK\n")
        .count();
    println!("live_grants_checked={granted}/{}", GRANTS.div_ceil(997));

    // Policy: one persistent connection, as one smtpd process uses it.
    let n = 100_000u32;
    let mut lat = Vec::with_capacity(n as usize);
    let mut wrong = 0u32;
    let t0 = Instant::now();
    for i in 0..n {
        let a = if i % 2 == 0 {
            ip(i % GRANTS)
        } else {
            format!("192.0.2.{}", i % 250)
        };
        let t = Instant::now();
        let answer = ask(&mut w, &mut r, &a);
        lat.push(t.elapsed());
        // Every answer is checked: a granted address OK, the others not.
        if (answer == "action=OK\n") != (i % 2 == 0) {
            wrong += 1;
        }
    }
    let el = t0.elapsed();
    assert_eq!(wrong, 0, "policy answers that were wrong");
    println!(
        "policy_one_connection: requests={n} per_s={:.0} p50_us={} p99_us={}",
        f64::from(n) / el.as_secs_f64(),
        pct(&mut lat, 0.5).as_micros(),
        pct(&mut lat, 0.99).as_micros()
    );

    // Policy: eight connections at once.
    let t0 = Instant::now();
    let per = 25_000u32;
    let handles: Vec<_> = (0..8)
        .map(|k| {
            std::thread::spawn(move || {
                let c = TcpStream::connect(("127.0.0.1", tcp_port)).expect("connect");
                c.set_nodelay(true).expect("nodelay");
                let mut w = c.try_clone().expect("clone");
                let mut r = BufReader::new(c);
                let mut lat = Vec::with_capacity(per as usize);
                for i in 0..per {
                    let t = Instant::now();
                    let answer = ask(&mut w, &mut r, &ip((i * 8 + k) % GRANTS));
                    lat.push(t.elapsed());
                    assert_eq!(answer, "action=OK\n", "a granted address was not OK");
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    let el = t0.elapsed();
    println!(
        "policy_8_connections: requests={} per_s={:.0} p50_us={} p99_us={}",
        all.len(),
        all.len() as f64 / el.as_secs_f64(),
        pct(&mut all, 0.5).as_micros(),
        pct(&mut all, 0.99).as_micros()
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();

    // Baseline: Postfix's postmap -q on a 100,000-entry hash map.
    let map = dir.path().join("map");
    let mut text = String::new();
    for i in 0..GRANTS {
        text.push_str(&format!("{} OK\n", ip(i)));
    }
    std::fs::write(&map, text).expect("map");
    let mc = dir.path().join("postfix");
    let st = Command::new("postmap")
        .env("MAIL_CONFIG", &mc)
        .arg(format!("hash:{}", map.display()))
        .status()
        .expect("postmap");
    assert!(st.success());
    let runs = 300;
    let mut lat = Vec::with_capacity(runs);
    let t0 = Instant::now();
    for i in 0..runs {
        let t = Instant::now();
        let out = Command::new("postmap")
            .env("MAIL_CONFIG", &mc)
            .args(["-q", &ip(i as u32 * 7)])
            .arg(format!("hash:{}", map.display()))
            .output()
            .expect("postmap -q");
        assert!(out.status.success());
        lat.push(t.elapsed());
    }
    let el = t0.elapsed();
    println!(
        "baseline_postmap_q_per_lookup: lookups={runs} per_s={:.0} p50_us={} p99_us={}",
        runs as f64 / el.as_secs_f64(),
        pct(&mut lat, 0.5).as_micros(),
        pct(&mut lat, 0.99).as_micros()
    );
    let keys: String = (0..n).map(|i| format!("{}\n", ip(i % GRANTS))).collect();
    let t0 = Instant::now();
    let mut p = Command::new("postmap")
        .env("MAIL_CONFIG", &mc)
        .args(["-q", "-"])
        .arg(format!("hash:{}", map.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("postmap -q -");
    let mut stdin = p.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(keys.as_bytes()));
    let out = p.wait_with_output().expect("postmap -q -");
    let _ = writer.join();
    let el = t0.elapsed();
    let found = String::from_utf8_lossy(&out.stdout).lines().count();
    println!(
        "baseline_postmap_q_stdin: lookups={n} found={found} per_s={:.0}",
        f64::from(n) / el.as_secs_f64()
    );
}
