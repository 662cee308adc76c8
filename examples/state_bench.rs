//! The state file's cost per change (`--state`), against the obvious
//! baseline of rewriting the whole file atomically at each change.
//!
//! With 100,000 live grants, 200,000 renewals go through the table; the
//! writer appends one line per change and rewrites the file (temporary
//! file, fsync, rename) when the appended lines outnumber twice the live
//! grants. Prints the time of one whole rewrite (the baseline's cost per
//! change) and the cost per change of the real writer: its thread's CPU time
//! (from /proc, not the wall time, which the pacing sleeps fill), fsyncs and
//! rewrites included; then the same changes unpaced, without a writer and
//! with one, for the time it adds.
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/state_bench [DIR]
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_after_popd::grants::state::StateWriter;
use smtp_after_popd::grants::table::{Grant, GrantTable};
use smtp_after_popd::recognise::matcher::Service;

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
    // every change is on disk. Its cost is the writer's own CPU time (the
    // runtime's threads, from /proc), not the wall time, which is mostly
    // the pacing.
    let w = StateWriter::start(path.clone(), table.clone()).expect("start");
    let cpu_before = writer_cpu_ns();
    let t = Instant::now();
    for i in 0..changes {
        table.grant(ip(i % live), grant(&server, &reporter, i));
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let fed = t.elapsed();
    let cpu_after = writer_cpu_ns();
    let stopped = w.stop(Duration::from_secs(120));
    let total = t.elapsed();
    let writer_cpu = cpu_after.saturating_sub(cpu_before);

    // Unpaced: the same changes as fast as the table takes them, without
    // a writer and then with one (until every change is on disk); the
    // difference is what the writer adds.
    let unpaced = |with_writer: bool| {
        let w =
            with_writer.then(|| StateWriter::start(path.clone(), table.clone()).expect("start"));
        let t = Instant::now();
        for i in 0..changes {
            table.grant(ip(i % live), grant(&server, &reporter, i));
        }
        let ok = w.is_none_or(|w| w.stop(Duration::from_secs(120)));
        (t.elapsed(), ok)
    };
    let (bare, _) = unpaced(false);
    let (with, unpaced_ok) = unpaced(true);
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
        "{changes} changes, paced: fed in {:.2} s (pacing sleeps included), all written {:.1} ms later: {stopped}; file now {lines} lines",
        fed.as_secs_f64(),
        (total - fed).as_secs_f64() * 1e3
    );
    let per_change = writer_cpu as f64 / 1e9 / f64::from(changes);
    println!(
        "per change: {:.2} µs of the writer's CPU (runtime threads), appends, fsyncs and rewrites included (baseline {:.0} µs: {:.0}x)",
        per_change * 1e6,
        rewrite.as_secs_f64() * 1e6,
        rewrite.as_secs_f64() / per_change
    );
    let added = with.saturating_sub(bare).as_secs_f64() / f64::from(changes);
    println!(
        "unpaced: {changes} changes in {:.3} s without a writer, {:.3} s with one until all on disk ({unpaced_ok}): {:.2} µs per change added",
        bare.as_secs_f64(),
        with.as_secs_f64(),
        added * 1e6
    );
}

/// CPU time of the state writer's thread (named `state`), in nanoseconds,
/// from /proc/self/task/*/schedstat.
fn writer_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        // The writer runs on the runtime's threads (the follow loop, and
        // its blocking pool for the disk): every thread but this one.
        .filter(|t| t.file_name() != std::process::id().to_string().as_str())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}
