//! Property tests of the forgery defences (issue 13), through the same
//! `Pipeline::handle_on` the daemon uses:
//!
//! - an attestation element anywhere but the attested header (in the text
//!   of an RFC 3164 record, in the message, as a second element, with a
//!   PROCID the rule does not write, on a listener not declared attested,
//!   from a peer not trusted) is never believed: nothing it carries is
//!   granted, and it is counted as a forgery;
//! - a duplicated server-written field never grants: any field of a
//!   pattern, copied once more into any place of a line the pattern
//!   grants, makes it grant nothing;
//! - an address embedding a never-granted IPv4 address (IPv4-mapped,
//!   IPv4-compatible, SIIT, NAT64 in every layout) is never granted, and a
//!   never-grant rule written IPv4-mapped means its IPv4 block.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use smtp_after_popd::grants::addr::{AddressPolicy, Cidr};
use smtp_after_popd::grants::table::GrantTable;
use smtp_after_popd::ingest::receiver::Peer;
use smtp_after_popd::ingest::record::parse_str;
use smtp_after_popd::recognise::matcher::{Matchers, Outcome};
use smtp_after_popd::service::daemon::{Pipeline, Settings};
use smtp_after_popd::stats::Stats;

fn matchers() -> &'static Matchers {
    static M: OnceLock<Matchers> = OnceLock::new();
    M.get_or_init(|| {
        smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Fatal);
        Matchers::builtin()
    })
}

fn pipeline(require: bool, trusted: &[&str]) -> Pipeline {
    Pipeline::new(
        Settings {
            matchers: matchers().clone(),
            policy: AddressPolicy::new(Vec::new()),
            window: Duration::from_secs(60),
            require_attestation: require,
            trust_attestation_from: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            trusted_proxy: Vec::new(),
            hold_while_connected: false,
            hold_max: Duration::from_secs(3600),
        },
        Arc::new(GrantTable::new()),
        Arc::new(Stats::default()),
    )
}

/// A login line of each kind whose speaker is root and Dovecot's log
/// process, which an element claiming those would let through.
const LOGINS: [(&str, &str); 3] = [
    (
        "dovecot",
        "pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.40, lip=192.0.2.1, mpid=1, session=<abc>",
    ),
    (
        "imap-login",
        "Login: user=<eve>, method=PLAIN, rip=198.51.100.40, lip=192.0.2.1",
    ),
    (
        "imapd",
        "LOGIN, user=eve, ip=[198.51.100.40], port=[4242], protocol=IMAP",
    ),
];

/// An element claiming the most trusted sender.
fn element() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/usr/lib/dovecot/log"),
        Just("/usr/lib/dovecot/imap-login"),
        Just("/usr/sbin/courierlogger"),
    ]
    .prop_map(|exe| format!("[attest@32473 exe=\"{exe}\" uid=\"0\" pid=\"1\"]"))
}

/// A record carrying `sd` somewhere other than the attested header.
fn misplaced(tag: &str, msg: &str, sd: &str, where_: u8) -> String {
    let header = |sd: &str| format!("<22>1 2026-12-01T18:30:00Z mail {tag} - - {sd}  {msg}");
    match where_ % 8 {
        // RFC 3164, the element where a parser reads structured data.
        0 => format!("<22>Dec  1 18:30:00 mail {tag}: {sd} {msg}"),
        1 => format!("<22>Dec  1 18:30:00 {tag}[42]: {sd} {msg}"),
        // RFC 5424 with a PROCID or MSGID the rule never writes.
        2 => format!("<22>1 2026-12-01T18:30:00Z mail {tag} 42 - {sd} {msg}"),
        3 => format!("<22>1 2026-12-01T18:30:00Z mail {tag} - ID {sd} {msg}"),
        // Two elements in the header.
        4 => header(&format!("{sd}{sd}")),
        // A second element in the message text.
        5 => format!("<22>1 2026-12-01T18:30:00Z mail {tag} - - {sd}  {sd} {msg}"),
        // In the middle of the message.
        6 => format!("<22>Dec  1 18:30:00 mail {tag}: {msg} {sd}"),
        // The rule's own form, where only the transport says it is not.
        _ => header(sd),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Law 1: an attestation element anywhere but the attested header (of
    /// a record on an attested listener from a trusted peer) is never
    /// believed.
    #[test]
    fn an_attestation_element_anywhere_but_the_attested_header_is_never_believed(
        which in 0usize..3,
        sd in element(),
        where_ in any::<u8>(),
        listener in 0u8..4,
        require in any::<bool>(),
    ) {
        let (tag, msg) = LOGINS[which];
        let text = misplaced(tag, msg, &sd, where_);
        let p = pipeline(require, &["192.0.2.25"]);
        // The rule's own form (where_ 7) only on a listener or from a peer
        // that does not make it believed.
        let (peer, attested) = match (where_ % 8 == 7, listener) {
            (true, 0 | 1) => (Peer::Unix("/run/plain.sock".into()), false),
            (true, _) => (Peer::Udp("198.51.100.7:514".parse().unwrap()), true),
            (false, 0) => (Peer::Unix("/run/attested.sock".into()), true),
            (false, 1) => (Peer::Unix("/run/plain.sock".into()), false),
            (false, 2) => (Peer::Udp("192.0.2.25:514".parse().unwrap()), true),
            (false, _) => (Peer::Udp("192.0.2.25:514".parse().unwrap()), false),
        };
        p.handle_on(text.as_bytes(), &peer, attested);
        prop_assert!(p.table.is_empty(), "granted {text:?} on {peer} (attested listener: {attested})");
        prop_assert_eq!(
            p.stats.forgeries.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "not counted as a forgery: {:?}",
            text
        );
    }
}

/// The lines the samples annotate as grants, with the pattern that grants
/// them and its server-written fields.
fn granted_samples() -> &'static Vec<(String, Vec<String>)> {
    static S: OnceLock<Vec<(String, Vec<String>)>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
        let mut out = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(f).unwrap();
            let mut grant = false;
            for line in text.lines() {
                if let Some(a) = line.strip_prefix("#= ") {
                    grant = a.starts_with("grant ");
                } else if !line.starts_with('#') && !line.trim().is_empty() {
                    if grant
                        && let Ok(rec) = parse_str(line)
                        && let Some(x) = matchers().explain(&rec)
                        && !x.fields.is_empty()
                        && matches!(matchers().match_record(&rec), Outcome::Login(_))
                    {
                        out.push((line.to_string(), x.fields));
                    }
                    grant = false;
                }
            }
        }
        assert!(out.len() > 20, "only {} samples with fields", out.len());
        out
    })
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Law 2: a server-written field of a pattern, appearing once more
    /// anywhere in a line the pattern grants (as a field: not glued to a
    /// name before it), makes the line grant nothing, whatever value it
    /// carries.
    #[test]
    fn a_duplicated_server_written_field_never_grants(
        sample in any::<prop::sample::Index>(),
        field in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        value in prop_oneof![
            Just("203.0.113.9".to_string()),
            Just("[203.0.113.9]".to_string()),
            Just("<x>".to_string()),
            "[ -~]{0,12}",
        ],
        // Something that ends the copy, so that the field after it is
        // still a field of its own.
        sep in prop_oneof![Just(", "), Just(" "), Just(";"), Just(">, "), Just("] ")],
    ) {
        let (line, fields) = sample.get(granted_samples());
        let rec = parse_str(line).unwrap();
        // A field the line holds: it is there once, and will be twice.
        let present: Vec<&String> = fields
            .iter()
            .filter(|f| {
                rec.message.match_indices(f.as_str()).any(|(i, _)| {
                    i == 0 || !is_name_char(rec.message.as_bytes()[i - 1])
                })
            })
            .collect();
        prop_assume!(!present.is_empty());
        let f = *field.get(&present);
        let start = rec.message.as_ptr() as usize - line.as_ptr() as usize;
        // A place in the message where a field may start.
        let places: Vec<usize> = (0..=rec.message.len())
            .filter(|&i| rec.message.is_char_boundary(i))
            .filter(|&i| i == 0 || !is_name_char(rec.message.as_bytes()[i - 1]))
            .collect();
        let i = *at.get(&places);
        let text = format!(
            "{}{}{f}{value}{sep}{}",
            &line[..start],
            &rec.message[..i],
            &rec.message[i..]
        );
        let r = parse_str(&text).unwrap();
        let outcome = matchers().match_record(&r);
        prop_assert!(
            !matches!(outcome, Outcome::Login(_)),
            "{text:?} granted: {outcome:?}"
        );
    }
}

/// Law 1 is not vacuous: each login of LOGINS, with the element of its own
/// sender in the attested header, on an attested unix listener, is
/// believed and granted with attestation required (so the element, moved
/// anywhere else, is what the property refuses).
#[test]
fn the_element_in_the_attested_header_is_believed() {
    let own = [
        "/usr/lib/dovecot/log",
        "/usr/lib/dovecot/imap-login",
        "/usr/sbin/courierlogger",
    ];
    for ((tag, msg), exe) in LOGINS.iter().zip(own) {
        let sd = format!("[attest@32473 exe=\"{exe}\" uid=\"0\" pid=\"1\"]");
        let text = misplaced(tag, msg, &sd, 7);
        let p = pipeline(true, &[]);
        p.handle_on(
            text.as_bytes(),
            &Peer::Unix("/run/attested.sock".into()),
            true,
        );
        let got: Vec<IpAddr> = p.table.list().into_iter().map(|(ip, _)| ip).collect();
        assert_eq!(
            got,
            vec![IpAddr::from([198, 51, 100, 40])],
            "{text:?} not believed where it belongs"
        );
        assert_eq!(
            p.stats.forgeries.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}

/// An IPv4 address inside a block of `prefix` bits around `net`.
fn inside(net: u32, prefix: u8, host: u32) -> (Cidr, Ipv4Addr) {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    let base = net & mask;
    let a = Ipv4Addr::from(base | (host & !mask));
    let c: Cidr = format!("{}/{prefix}", Ipv4Addr::from(base))
        .parse()
        .unwrap();
    (c, a)
}

/// Every IPv6 form that carries `v4`.
fn carriers(v4: Ipv4Addr, noise: u16) -> Vec<IpAddr> {
    let [a, b, c, d] = v4.octets();
    let w = |x: u8, y: u8| u16::from(x) << 8 | u16::from(y);
    vec![
        IpAddr::V6(v4.to_ipv6_mapped()),
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, w(a, b), w(c, d))),
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, w(a, b), w(c, d))),
        IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, w(a, b), w(c, d))),
        // 64:ff9b:1::/48 in the /96, /64, /56 and /48 layouts of RFC 6052.
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            1,
            noise,
            0,
            0,
            w(a, b),
            w(c, d),
        )),
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            1,
            noise,
            w(0, a),
            w(b, c),
            w(d, 0),
            0,
        )),
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            1,
            noise & 0xff00 | u16::from(a),
            w(0, b),
            w(c, d),
            0,
            0,
        )),
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            1,
            w(a, b),
            w(0, c),
            w(d, 0),
            0,
            0,
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Class 6: a never-granted IPv4 address is never granted in any
    /// IPv6 clothing, and a rule written IPv4-mapped refuses the IPv4
    /// addresses it names.
    #[test]
    fn an_embedded_never_granted_ipv4_address_is_never_granted(
        net in any::<u32>(),
        prefix in 8u8..=32,
        host in any::<u32>(),
        noise in any::<u16>(),
        mapped_rule in any::<bool>(),
    ) {
        let (block, v4) = inside(net, prefix, host);
        let rule: Cidr = if mapped_rule {
            let Ok(IpAddr::V4(b)) = block.to_string().split('/').next().unwrap().parse::<IpAddr>() else {
                unreachable!()
            };
            format!("{}/{}", b.to_ipv6_mapped(), u16::from(prefix) + 96).parse().unwrap()
        } else {
            block
        };
        prop_assert_eq!(rule.to_string(), block.to_string());
        let policy = AddressPolicy::new(vec![rule]);
        prop_assert!(policy.check(IpAddr::V4(v4)).is_err(), "{} granted under {}", v4, rule);
        for ip in carriers(v4, noise) {
            prop_assert!(policy.check(ip).is_err(), "{} (carrying {}) granted under {}", ip, v4, rule);
        }
    }
}
