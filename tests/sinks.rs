//! `follow::flush_all`, what the shutdown path calls once the receivers
//! are drained: every running sink (here the map, with the real `postmap`,
//! and the state file) holds what the table holds when it returns.
//! One test in its own binary: the running sinks are process-wide.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_after_popd::grants::state::StateWriter;
use smtp_after_popd::grants::table::{Grant, GrantTable};
use smtp_after_popd::postfix::map::{MapType, PostfixMap};
use smtp_after_popd::recognise::matcher::Service;

fn grant() -> Grant {
    Grant {
        expires: tokio::time::Instant::now() + Duration::from_secs(600),
        server: "dovecot".into(),
        service: Service::Imap,
        user: "alice".into(),
        reporter: "test".into(),
        host: "mail".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_returns_once_every_sink_holds_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let cf = dir.path().join("postfix");
    std::fs::create_dir(&cf).unwrap();
    std::fs::write(cf.join("main.cf"), "").unwrap();
    let map = PostfixMap {
        path: dir.path().join("authenticated_ips"),
        map_type: MapType::Hash,
        postmap: "postmap".into(),
        mail_config: Some(cf),
        incremental: true,
    };
    let table = Arc::new(GrantTable::new());
    let stats = Arc::new(smtp_after_popd::stats::Stats::default());
    let state = dir.path().join("state");
    let writer = StateWriter::start(state.clone(), table.clone()).unwrap();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(map.run(table.clone(), stats, Some(first_tx)));
    assert!(first_rx.await.unwrap().is_ok());

    // Changes the sinks have had no time to write yet.
    let ips: Vec<IpAddr> = (0..300u32)
        .map(|i| IpAddr::from([10, 9, (i >> 8) as u8, i as u8]))
        .collect();
    for ip in &ips {
        table.grant(*ip, grant());
    }
    table.revoke(ips[0]);
    assert!(smtp_after_popd::grants::follow::flush_all(Duration::from_secs(4)).await);

    let source = std::fs::read_to_string(dir.path().join("authenticated_ips")).unwrap();
    let in_map: Vec<&str> = source.lines().filter(|l| l.ends_with(" OK")).collect();
    assert_eq!(in_map.len(), ips.len() - 1);
    assert!(!source.contains(&format!("{} OK", ips[0])));
    let out = std::process::Command::new("postmap")
        .env("MAIL_CONFIG", dir.path().join("postfix"))
        .args(["-q", &ips[299].to_string()])
        .arg(format!(
            "hash:{}",
            dir.path().join("authenticated_ips").display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let lines = std::fs::read_to_string(&state).unwrap();
    assert!(lines.ends_with(&format!("revoke {}\n", ips[0])), "{lines}");
    task.abort();
    assert!(writer.stop(Duration::from_secs(4)));
}
