//! The whole per-datagram path: syslog parsing, login matching,
//! attestation (on listeners declared attested or not, from a unix socket
//! or a UDP peer), ambiguity, address rules and the grant table, on
//! arbitrary bytes: a sequence of datagrams to a fresh pipeline. Checks,
//! beyond "no panic", that an address granted appears in the input's text.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smtp_after_popd::grants::addr::AddressPolicy;
use smtp_after_popd::service::daemon::{Pipeline, Settings};
use smtp_after_popd::grants::table::GrantTable;
use smtp_after_popd::recognise::matcher::Matchers;
use smtp_after_popd::ingest::receiver::Peer;
use smtp_after_popd::stats::Stats;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Fatal);
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn matchers() -> &'static Matchers {
    static M: OnceLock<Matchers> = OnceLock::new();
    M.get_or_init(Matchers::builtin)
}

/// A fresh pipeline for each input (the patterns compiled once), so that
/// what one input leaves behind (a remembered address line of a two-line
/// server) cannot be granted by the next.
fn pipeline(require: bool, trust_udp: bool) -> Pipeline {
    Pipeline::new(
        Settings {
            matchers: matchers().clone(),
            policy: AddressPolicy::new(Vec::new()),
            window: Duration::from_secs(60),
            require_attestation: require,
            trust_attestation_from: if trust_udp {
                vec!["127.0.0.1".parse().expect("cidr")]
            } else {
                Vec::new()
            },
            trusted_proxy: Vec::new(),
            hold_while_connected: false,
            hold_max: Duration::from_secs(3600),
        },
        Arc::new(GrantTable::with_limit(1000)),
        Arc::new(Stats::default()),
    )
}

fuzz_target!(|data: &[u8]| {
    // The first byte: bit 0 require-attestation, bit 1 an attested
    // listener, bit 2 a UDP peer instead of a unix socket, bit 3 that peer
    // trusted for attestation. The rest: datagrams separated by 0xff (never
    // part of valid UTF-8), handled in order by one pipeline, so that the
    // two lines of a two-line server can meet.
    let (flags, bytes) = match data.split_first() {
        Some((b, rest)) => (*b, rest),
        None => (0, data),
    };
    let (require, attested, udp, trust) = (
        flags & 1 == 1,
        flags & 2 == 2,
        flags & 4 == 4,
        flags & 8 == 8,
    );
    let _guard = runtime().enter();
    let pipeline = pipeline(require, trust);
    let table = &pipeline.table;
    let peer = if udp {
        Peer::Udp("127.0.0.1:514".parse().expect("address"))
    } else {
        Peer::Unix("fuzz".into())
    };
    for datagram in bytes.split(|&b| b == 0xff) {
        pipeline.handle_on(datagram, &peer, attested);
    }
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    for (ip, _) in table.list() {
        let v4 = ip.to_string();
        let found = text.contains(&v4)
            || match ip {
                std::net::IpAddr::V6(_) => text.contains(':'),
                std::net::IpAddr::V4(_) => false,
            };
        assert!(found, "granted {ip} which is not in the input");
    }
});
