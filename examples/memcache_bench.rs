//! Login to memcached against login to the hash map, side by side in one
//! run: 100,000 live grants, then 500 new logins per second for 10 s, with
//! the map sink (incremental `postmap`, the real sink code) and the
//! memcached sink (the real follow loop) following the same table; p50 and
//! p99 of the time from the grant entering the table to the store holding
//! it. Then the time to refill a memcached with the 100,000 live grants
//! (what a restarted memcached costs).
//!
//! Needs `memcached` (Debian's package) and `postmap`; starts a private
//! memcached on a free loopback port (as root it runs it as `nobody`).
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/memcache_bench
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smtp_after_popd::grants::follow::{self, Counters, Feed, Live, Reports, Sink};
use smtp_after_popd::grants::table::{Grant, GrantTable};
use smtp_after_popd::postfix::map::{MapType, PostfixMap};
use smtp_after_popd::postfix::memcache::{Memcache, Server};
use smtp_after_popd::recognise::matcher::Service;
use smtp_after_popd::stats::Stats;
use tokio::time::Instant;

const LIVE: u32 = 100_000;
const SECONDS: u32 = 10;

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

/// Pending (number, started) pairs, each moved to `done` once a watch
/// reports a number at least as high.
type Pending = Arc<Mutex<Vec<(u64, Instant)>>>;
/// Latencies measured.
type Done = Arc<Mutex<Vec<Duration>>>;

fn watch(
    mut rx: tokio::sync::watch::Receiver<u64>,
    pending: Pending,
    done: Arc<Mutex<Vec<Duration>>>,
) {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let seen = *rx.borrow();
            let now = Instant::now();
            let mut d = done.lock().expect("lock");
            pending.lock().expect("lock").retain(|(n, t)| {
                if *n <= seen {
                    d.push(now - *t);
                    false
                } else {
                    true
                }
            });
        }
    });
}

fn memcached_get(port: u16, key: &str) -> bool {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut w = s.try_clone().expect("clone");
    let _ = w.write_all(format!("get {key}\r\n").as_bytes());
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line.starts_with("VALUE")
}

#[tokio::main]
async fn main() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut memcached = std::process::Command::new("memcached")
        .args([
            "-u",
            "nobody",
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-m",
            "512",
            "-p",
        ])
        .arg(port.to_string())
        .spawn()
        .expect("run memcached (apt-get install memcached)");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
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
        incremental: true,
    };
    let table = Arc::new(GrantTable::with_limit(3_000_000));
    for i in 0..LIVE {
        grant(
            &table,
            IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        );
    }
    let server = Server::Inet("127.0.0.1".into(), port);

    // The refill of a fresh memcached, then of one that holds them all.
    let live: Vec<Live> = table
        .list_blocks()
        .into_iter()
        .map(|(key, g)| Live {
            key,
            expires: g.expires,
        })
        .collect();
    let mut refills = Vec::new();
    for _ in 0..3 {
        let mut sink = Memcache::new(server.clone(), "smtp-after-popd:".into());
        let t = Instant::now();
        sink.refill(&live).await.expect("refill");
        refills.push(t.elapsed());
    }

    let stats = Arc::new(Stats::default());
    let (map_tx, map_rx) = tokio::sync::watch::channel(0u64);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(map.clone().run_reporting(
        table.clone(),
        stats.clone(),
        Some(first_tx),
        Some(map_tx),
    ));
    let _ = first_rx.await;
    let (mc_tx, mc_rx) = tokio::sync::watch::channel(0u64);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let feed = Feed::subscribe(&table);
    let counters = Counters {
        stats: stats.clone(),
        writes: |s| &s.memcache_writes,
        failures: |s| &s.memcache_failures,
        refills: |s| &s.memcache_refills,
    };
    let reports = Reports {
        first_write: Some(first_tx),
        visible: Some(mc_tx),
    };
    let sink = Memcache::new(server.clone(), "smtp-after-popd:".into());
    tokio::spawn(follow::follow(sink, table.clone(), feed, counters, reports));
    let _ = first_rx.await;

    let (map_pending, mc_pending): (Pending, Pending) = Default::default();
    let (map_done, mc_done): (Done, Done) = Default::default();
    watch(map_rx, map_pending.clone(), map_done.clone());
    watch(mc_rx, mc_pending.clone(), mc_done.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let mut last = IpAddr::from([0, 0, 0, 0]);
    for i in 0..500 * SECONDS {
        tick.tick().await;
        last = IpAddr::from([11, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let t = Instant::now();
        let generation = grant(&table, last);
        map_pending.lock().expect("lock").push((generation, t));
        // The memcached feed began after the 100,000: this is its change
        // number i + 1.
        mc_pending.lock().expect("lock").push((u64::from(i) + 1, t));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (!map_pending.lock().expect("lock").is_empty()
        || !mc_pending.lock().expect("lock").is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        memcached_get(port, &format!("smtp-after-popd:{last}")),
        "last login not in memcached"
    );
    let mut m = map_done.lock().expect("lock").clone();
    let mut c = mc_done.lock().expect("lock").clone();
    println!(
        "{LIVE} live grants, 500 logins/s for {SECONDS} s ({} logins):",
        500 * SECONDS
    );
    println!(
        "  login -> hash map (incremental postmap): p50 {:>8.2} ms  p99 {:>8.2} ms  ({} map updates)",
        pct(&mut m, 0.5).as_secs_f64() * 1e3,
        pct(&mut m, 0.99).as_secs_f64() * 1e3,
        stats.map_updates.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "  login -> memcached:                      p50 {:>8.3} ms  p99 {:>8.3} ms  ({} memcached writes)",
        pct(&mut c, 0.5).as_secs_f64() * 1e3,
        pct(&mut c, 0.99).as_secs_f64() * 1e3,
        stats
            .memcache_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "refill of {LIVE} grants into memcached: fresh {} ms, then {} ms and {} ms over them",
        refills[0].as_millis(),
        refills[1].as_millis(),
        refills[2].as_millis()
    );
    let _ = memcached.kill();
    let _ = memcached.wait();
}
