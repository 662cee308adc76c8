//! The state file's cost per change (`--state`), against the obvious
//! baseline of rewriting the whole file atomically at each change.
//!
//! With 100,000 live grants, 200,000 renewals go through the table; the
//! writer appends one line per change and rewrites the file (temporary
//! file, fsync, rename) when the appended lines outnumber twice the live
//! grants. Prints the time of one whole rewrite (the baseline's cost per
//! change) and the amortised cost per change of the real writer, fsyncs and
//! rewrites included.
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/state_bench [DIR]
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_after_popd::grants::{Grant, GrantTable};
use smtp_after_popd::matcher::Service;
use smtp_after_popd::state::StateWriter;

fn grant(server: &Arc<str>, reporter: &Arc<str>, i: u32) -> Grant {
    Grant {
        expires: tokio::time::Instant::now() + Duration::from_secs(3600),
        server: server.clone(),
        service: Service::Imap,
        user: format!("user{i}@example.org").into(),
        reporter: reporter.clone(),
        host: reporter.clone(),
    }
}

fn ip(i: u32) -> IpAddr {
    IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("state-bench-{}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let (live, changes) = (100_000u32, 200_000u32);
    let table = Arc::new(GrantTable::with_limit(1_000_000));
    let server: Arc<str> = "dovecot".into();
    let reporter: Arc<str> = "unix:/run/smtp-after-popd/syslog.sock".into();
    for i in 0..live {
        table.grant(ip(i), grant(&server, &reporter, i));
    }

    // Baseline: one whole atomic rewrite, which StateWriter::start does.
    let mut rewrites = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let w = StateWriter::start(path.clone(), table.clone()).expect("start");
        rewrites.push(t.elapsed());
        w.stop(Duration::from_secs(60));
    }
    rewrites.sort();
    let rewrite = rewrites[rewrites.len() / 2];
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    // The writer: 200,000 renewals, paced in bursts of 100 (about what a
    // busy site's logins look like to it), then a stop that waits until
    // every change is on disk.
    let w = StateWriter::start(path.clone(), table.clone()).expect("start");
    let t = Instant::now();
    for i in 0..changes {
        table.grant(ip(i % live), grant(&server, &reporter, i));
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let stopped = w.stop(Duration::from_secs(120));
    let total = t.elapsed();
    let lines = std::fs::read_to_string(&path)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    let _ = std::fs::remove_file(&path);

    println!("state file at {}", dir.display());
    println!(
        "{live} live grants: one atomic rewrite {:.1} ms ({:.1} MB): the baseline's cost per change",
        rewrite.as_secs_f64() * 1e3,
        size as f64 / 1e6
    );
    println!(
        "{changes} changes through the writer: {:.2} s in all (pacing sleeps included), all written: {stopped}; file now {lines} lines",
        total.as_secs_f64()
    );
    let per_change = total.as_secs_f64() / f64::from(changes);
    println!(
        "per change: {:.1} µs amortised, appends, fsyncs and rewrites included (baseline {:.0} µs: {:.0}x)",
        per_change * 1e6,
        rewrite.as_secs_f64() * 1e6,
        rewrite.as_secs_f64() / per_change
    );
}
