//! Property tests of the per-datagram path (parse, match, attest, address
//! rules, grant table), run through the same `Pipeline::handle` the daemon
//! uses:
//!
//! - no input grants an address that does not appear in it;
//! - a user name can never move the granted address: whatever it holds
//!   (addresses, fake `rip=` fields, whole success lines), the address
//!   granted is the one the server wrote;
//! - an address refused by the address rules is never granted, so never
//!   written to the map;
//! - arbitrary bytes never panic.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use smtp_after_popd::addr::{AddressPolicy, Cidr};
use smtp_after_popd::daemon::{Pipeline, Settings};
use smtp_after_popd::grants::GrantTable;
use smtp_after_popd::matcher::Matchers;
use smtp_after_popd::receiver::Peer;
use smtp_after_popd::sink::PostfixMap;
use smtp_after_popd::stats::Stats;

/// A fresh pipeline per case; the patterns are compiled once (a clone
/// shares the compiled regexes), which makes a case cost microseconds.
fn pipeline(never: &[&str]) -> Pipeline {
    static MATCHERS: std::sync::OnceLock<Matchers> = std::sync::OnceLock::new();
    smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Fatal);
    Pipeline::new(
        Settings {
            matchers: MATCHERS.get_or_init(Matchers::builtin).clone(),
            policy: AddressPolicy::new(never.iter().map(|c| c.parse::<Cidr>().unwrap()).collect()),
            window: Duration::from_secs(60),
            require_attestation: false,
            trust_attestation_from: Vec::new(),
            trusted_proxy: Vec::new(),
            hold_while_connected: false,
            hold_max: Duration::from_secs(3600),
        },
        Arc::new(GrantTable::new()),
        Arc::new(Stats::default()),
    )
}

fn granted(p: &Pipeline) -> Vec<IpAddr> {
    p.table.list().into_iter().map(|(ip, _)| ip).collect()
}

/// Text a user might type: anything printable, with a good chance of
/// holding addresses and pieces of real log lines.
fn user_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z0-9._@-]{0,12}",
        Just(", rip=203.0.113.9".to_string()),
        Just(">, method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, mpid=1, session=<abc".to_string()),
        Just(" host=x [203.0.113.9]".to_string()),
        Just("' logged in from 203.0.113.9, nmsgs=1".to_string()),
        Just("\" at (h) 203.0.113.9 [pop_log.c:244]".to_string()),
        Just(", ip=[203.0.113.9]".to_string()),
        Just(" [203.0.113.9] x PLAIN User logged in".to_string()),
        "[ -~]{0,20}",
    ];
    proptest::collection::vec(piece, 0..5).prop_map(|v| v.concat())
}

fn server_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
            .prop_map(|(a, b, c, d)| IpAddr::from([a, b, c, d])),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

/// A success line of each built-in format, with the user's text and the
/// address the server wrote.
fn success_line(user: &str, ip: IpAddr) -> Vec<String> {
    vec![
        format!(
            "<22>Nov 24 10:00:01 mail dovecot: pop3-login: Login: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid=4242, session=<abcdefgh>"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail imapd[1]: LOGIN, user={user}, ip=[{ip}], port=[4242], protocol=IMAP"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail imap[1]: login: client.example.net [{ip}] {user} PLAIN User logged in"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail ipop3d[1]: Login user={user} host=client.example.net [{ip}] nmsgs=1/1"
        ),
        format!("<22>Nov 24 10:00:01 mail vm-pop3d[1]: User '{user}' logged in from {ip}, nmsgs=3"),
        format!(
            "<22>Nov 24 10:00:01 mail in.qpopper[1]: (v4.0.9) POP login by user \"{user}\" at (client.example.net) {ip} [pop_log.c:244]"
        ),
    ]
}

/// The failure and other lines of each format, which must grant nothing.
fn failure_line(user: &str, ip: IpAddr) -> Vec<String> {
    vec![
        format!(
            "<22>Nov 24 10:00:01 mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, session=<abcdefgh>"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail dovecot: imap-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<{user}>, rip={ip}, lip=192.0.2.1"
        ),
        format!("<22>Nov 24 10:00:01 mail imapd[1]: LOGIN FAILED, user={user}, ip=[{ip}]"),
        format!(
            "<22>Nov 24 10:00:01 mail imapd[1]: Login failed user={user} auth={user} host=client.example.net [{ip}]"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 Relay access denied; from=<{user}> to=<x@example.org> proto=ESMTP helo=<{user}>"
        ),
        format!(
            "<22>Nov 24 10:00:01 mail in.qpopper[1]: {user} at client.example.net ({ip}): -ERR [AUTH] Password supplied for \"{user}\" is incorrect. [pop_pass.c:1064]"
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_user_name_never_moves_the_granted_address(user in user_text(), ip in server_ip()) {
        for line in success_line(&user, ip) {
            let p = pipeline(&["none"][..0]);
            p.handle(line.as_bytes(), &Peer::Unix("test".into()));
            for g in granted(&p) {
                prop_assert_eq!(g, smtp_after_popd::addr::canonical(ip), "line: {}", line);
            }
        }
    }

    #[test]
    fn failures_grant_nothing(user in user_text(), ip in server_ip()) {
        for line in failure_line(&user, ip) {
            let p = pipeline(&[]);
            p.handle(line.as_bytes(), &Peer::Unix("test".into()));
            prop_assert!(granted(&p).is_empty(), "line: {}", line);
        }
    }

    #[test]
    fn nothing_is_granted_that_is_not_in_the_input(input in "[ -~]{0,300}", prefix in prop_oneof![
        Just("<22>Nov 24 10:00:01 mail dovecot: "),
        Just("<22>Nov 24 10:00:01 mail imapd[1]: "),
        Just("<22>Nov 24 10:00:01 mail in.qpopper[1]: "),
        Just("<22>1 2026-11-24T10:00:01Z mail dovecot 1 - - "),
        Just(""),
    ]) {
        let line = format!("{prefix}{input}");
        let p = pipeline(&[]);
        p.handle(line.as_bytes(), &Peer::Unix("test".into()));
        let lower = line.to_ascii_lowercase();
        for g in granted(&p) {
            let shown = g.to_string();
            let in_input = lower.contains(&shown)
                || (g.is_ipv6() && lower.contains(':'));
            prop_assert!(in_input, "granted {} from {}", shown, line);
        }
    }

    #[test]
    fn refused_addresses_are_never_granted_nor_written(
        a in prop_oneof![Just(0u8), Just(10), Just(127), Just(224), Just(239), Just(255), 1u8..=223],
        b in any::<u8>(), c in any::<u8>(), d in any::<u8>(),
        mapped in any::<bool>(),
    ) {
        let ip = IpAddr::from([a, b, c, d]);
        let text = if mapped { format!("::ffff:{ip}") } else { ip.to_string() };
        let line = format!("<22>Nov 24 10:00:01 mail dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip={text}, lip=192.0.2.1");
        let never = ["127.0.0.0/8", "::1", "10.0.0.0/8"];
        let p = pipeline(&never);
        p.handle(line.as_bytes(), &Peer::Unix("test".into()));
        let refused = a == 0 || a == 10 || a == 127 || (224..=239).contains(&a)
            || ip == IpAddr::from([255, 255, 255, 255]) || ip.is_unspecified();
        let written = PostfixMap::render(&p.table.addresses().1);
        if refused {
            prop_assert!(granted(&p).is_empty(), "{} granted", ip);
            prop_assert!(!written.contains(&format!("{ip} OK")), "{} written", ip);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let p = pipeline(&[]);
        p.handle(&bytes, &Peer::Unix("test".into()));
    }
}
