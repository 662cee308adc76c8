//! Login to map: how long after a grant the Postfix database holds it,
//! with 0, 10,000, 100,000 and 1,000,000 live grants, while 500 new logins
//! per second arrive; full rebuilds (the baseline) against the daemon's
//! incremental updates (`postmap -i` / `postmap -d` on a copy, renamed into
//! place), in the same run. The real sink code and the real `postmap`.
//!
//! The time measured runs from the grant entering the table to the renamed
//! database holding it; a `postmap -q` check confirms the last address.
//! (From a datagram's arrival to the grant is microseconds: see the
//! parse+match and ingest benchmarks.)
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/map_latency_bench
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_after_popd::grants::table::{Grant, GrantTable};
use smtp_after_popd::postfix::map::{MapType, PostfixMap};
use smtp_after_popd::recognise::matcher::Service;
use smtp_after_popd::stats::Stats;
use tokio::time::Instant;

fn grant(table: &GrantTable, ip: IpAddr) -> u64 {
    table.grant(
        ip,
        Grant {
            expires: Instant::now() + Duration::from_secs(3600),
            server: "dovecot".into(),
            service: Service::Pop3,
            user: "u".into(),
            reporter: "bench".into(),
            host: "mail".into(),
        },
    );
    *table.subscribe().borrow()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

async fn run(live: u32, incremental: bool, seconds: u64) -> (Duration, Duration, Duration, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("postfix")).expect("mkdir");
    std::fs::write(dir.path().join("postfix/main.cf"), "").expect("main.cf");
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("postfix/main.cf"))
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
        .expect("main.cf mtime");
    let map = PostfixMap {
        path: dir.path().join("authenticated_ips"),
        map_type: MapType::Hash,
        postmap: "postmap".into(),
        mail_config: Some(dir.path().join("postfix")),
        incremental,
    };
    let table = Arc::new(GrantTable::with_limit(3_000_000));
    for i in 0..live {
        grant(
            &table,
            IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        );
    }
    let (visible_tx, visible_rx) = tokio::sync::watch::channel(0u64);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let sink = tokio::spawn(map.clone().run_reporting(
        table.clone(),
        Arc::new(Stats::default()),
        Some(first_tx),
        Some(visible_tx),
    ));
    let _ = first_rx.await;
    // 500 logins per second from new addresses; a watcher notes when each
    // one's generation is visible.
    let pending: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let done: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
    let watcher = {
        let (pending, done) = (pending.clone(), done.clone());
        let mut rx = visible_rx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let g = *rx.borrow();
                let now = Instant::now();
                let mut p = pending.lock().expect("lock");
                let mut d = done.lock().expect("lock");
                p.retain(|(gen_, t)| {
                    if *gen_ <= g {
                        d.push(now - *t);
                        false
                    } else {
                        true
                    }
                });
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let n = 500 * seconds as u32;
    let mut last = IpAddr::from([0, 0, 0, 0]);
    for i in 0..n {
        tick.tick().await;
        last = IpAddr::from([11, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let t = Instant::now();
        let g = grant(&table, last);
        pending.lock().expect("lock").push((g, t));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = std::process::Command::new("postmap")
        .env("MAIL_CONFIG", dir.path().join("postfix"))
        .args(["-q", &last.to_string()])
        .arg(format!("hash:{}", map.path.display()))
        .output()
        .expect("postmap -q");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    sink.abort();
    watcher.abort();
    let mut d = done.lock().expect("lock").clone();
    let count = d.len();
    (pct(&mut d, 0.5), pct(&mut d, 0.99), pct(&mut d, 1.0), count)
}

fn main() {
    smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Warning);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| live grants | method | logins | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    let sizes: Vec<u32> = std::env::args()
        .nth(1)
        .map(|a| a.split(',').map(|n| n.parse().expect("sizes")).collect())
        .unwrap_or_else(|| vec![0, 10_000, 100_000, 1_000_000]);
    for live in sizes {
        for incremental in [false, true] {
            let (p50, p99, max, n) = rt.block_on(run(live, incremental, 5));
            println!(
                "| {live} | {} | {n} | {} ms | {} ms | {} ms |",
                if incremental {
                    "incremental (daemon)"
                } else {
                    "full rebuild (baseline)"
                },
                p50.as_millis(),
                p99.as_millis(),
                max.as_millis()
            );
        }
    }
}
