//! The whole per-datagram path: syslog parsing, login matching,
//! attestation (on listeners declared attested or not, from a unix socket
//! or a UDP peer), ambiguity, address rules and the grant table, on
//! arbitrary bytes. Checks, beyond "no panic", that an address granted
//! appears in the datagram's text.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smtp_after_popd::addr::AddressPolicy;
use smtp_after_popd::daemon::{Pipeline, Settings};
use smtp_after_popd::grants::GrantTable;
use smtp_after_popd::matcher::Matchers;
use smtp_after_popd::receiver::Peer;
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

fn pipeline(require: bool) -> &'static Pipeline {
    static P: [OnceLock<Pipeline>; 2] = [OnceLock::new(), OnceLock::new()];
    P[usize::from(require)].get_or_init(|| {
        Pipeline::new(
            Settings {
                matchers: Matchers::builtin(),
                policy: AddressPolicy::new(Vec::new()),
                window: Duration::from_secs(60),
                require_attestation: require,
                trust_attestation_from: Vec::new(),
                trusted_proxy: Vec::new(),
                hold_while_connected: false,
                hold_max: Duration::from_secs(3600),
            },
            Arc::new(GrantTable::with_limit(1000)),
            Arc::new(Stats::default()),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte: bit 0 require-attestation, bit 1 an attested
    // listener, bit 2 a UDP peer instead of a unix socket.
    let (flags, bytes) = match data.split_first() {
        Some((b, rest)) => (*b, rest),
        None => (0, data),
    };
    let (require, attested, udp) = (flags & 1 == 1, flags & 2 == 2, flags & 4 == 4);
    let _guard = runtime().enter();
    let pipeline = pipeline(require);
    let table = &pipeline.table;
    let peer = if udp {
        Peer::Udp("127.0.0.1:514".parse().expect("address"))
    } else {
        Peer::Unix("fuzz".into())
    };
    pipeline.handle_on(bytes, &peer, attested);
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    for (ip, _) in table.list() {
        let v4 = ip.to_string();
        let found = text.contains(&v4)
            || match ip {
                std::net::IpAddr::V6(_) => text.contains(':'),
                std::net::IpAddr::V4(_) => false,
            };
        assert!(found, "granted {ip} which is not in the datagram");
        table.revoke(ip);
    }
});
