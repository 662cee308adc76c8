//! Bytes per live grant in the grant table alone, in one thread: RSS
//! before and after 1,000,000 grants with realistic user names.
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/grant_memory
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_after_popd::grants::table::{Grant, GrantTable};
use smtp_after_popd::recognise::matcher::Service;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: u32 = 1_000_000;
    let table = GrantTable::with_limit(2_000_000);
    let server: Arc<str> = "dovecot".into();
    let reporter: Arc<str> = "unix:/run/smtp-after-popd/syslog.sock".into();
    let before = rss_kib();
    for i in 0..n {
        let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        table.grant(
            ip,
            Grant {
                expires: tokio::time::Instant::now() + Duration::from_secs(3600),
                server: server.clone(),
                service: Service::Imap,
                user: format!("user{i}@example.com").into_boxed_str(),
                reporter: reporter.clone(),
                host: reporter.clone(),
            },
        );
    }
    let after = rss_kib();
    println!("grants={n} rss_before_kib={before} rss_after_kib={after}");
    println!(
        "table_bytes_per_grant={:.0}",
        ((after - before) * 1024) as f64 / f64::from(n)
    );
    println!("len={}", table.len());
}
