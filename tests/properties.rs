//! Property tests of the per-datagram path (parse, match, attest, address
//! rules, grant table), run through the same `Pipeline::handle` the daemon
//! uses, over EVERY built-in pattern: the lines are built from the positive
//! samples of `tests/samples/*.log` (one template per grant line, up to
//! three per pattern; a two-line server's template is its address line and
//! its success line), with the user's text and the client address replaced
//! by generated ones.
//!
//! - a plain user name on a success line grants exactly the address the
//!   server wrote, for every template: the granting share must be 100%;
//! - a hostile user name (addresses, brackets, `rip=`, quotes, spaces,
//!   whole success lines, in the user's and the host's field) grants the
//!   server's address or nothing, never another; every pattern must still
//!   grant for some of them (the share is reported), so the property
//!   cannot hold by granting nothing;
//! - injection lines (every `#= ... injection` sample, with its smuggled
//!   address replaced by a generated one; a two-line server's success line
//!   without its address line; failure lines of several formats) grant
//!   nothing;
//! - whatever is granted appears in the input (compared address by
//!   address, after parsing what the input holds), over random text and
//!   over success lines with random text spliced in, of which a share
//!   must grant;
//! - an address refused by the address rules is never granted nor written
//!   to the map, and every other address is (beside an address granted
//!   before, so the rendered map is never empty);
//! - arbitrary bytes never panic.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use smtp_after_popd::grants::addr::{AddressPolicy, Cidr, canonical};
use smtp_after_popd::grants::table::GrantTable;
use smtp_after_popd::ingest::receiver::Peer;
use smtp_after_popd::ingest::record::parse_str;
use smtp_after_popd::postfix::map::PostfixMap;
use smtp_after_popd::recognise::matcher::{Matchers, Outcome};
use smtp_after_popd::service::daemon::{Pipeline, Settings};
use smtp_after_popd::stats::Stats;

fn matchers() -> &'static Matchers {
    static MATCHERS: OnceLock<Matchers> = OnceLock::new();
    MATCHERS.get_or_init(Matchers::builtin)
}

/// A fresh pipeline per case; the patterns are compiled once (a clone
/// shares the compiled regexes), which makes a case cost microseconds.
fn pipeline(never: &[&str]) -> Pipeline {
    smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Fatal);
    Pipeline::new(
        Settings {
            matchers: matchers().clone(),
            policy: AddressPolicy::new(never.iter().map(|c| c.parse::<Cidr>().unwrap()).collect()),
            window: Duration::from_secs(60),
            require_attestation: false,
            trust_attestation_from: Vec::new(),
            // The proxy of the Zimbra samples (zimbra-login-proxied grants
            // oip= only behind a trusted proxy).
            trusted_proxy: vec!["198.51.100.31/32".parse().unwrap()],
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

/// Sends `lines` (syslog text without PRI) through a fresh pipeline, in
/// order, from one peer, and returns what it granted.
fn run(lines: &[String]) -> Vec<IpAddr> {
    let p = pipeline(&[]);
    for l in lines {
        p.handle(format!("<22>{l}").as_bytes(), &Peer::Unix("test".into()));
    }
    granted(&p)
}

/// How the server wrote its address in a template: IPv4, IPv6, or
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    V4,
    V6,
    Mapped,
}

/// A positive sample taken apart: `line` is the success line; `address`
/// the address line before it (two-line servers); the byte ranges, in the
/// line that holds each, of the user's text, the host's text, and the
/// address.
#[derive(Clone, Debug)]
struct Template {
    pattern: String,
    place: String,
    address: Option<String>,
    line: String,
    user: std::ops::Range<usize>,
    host: Option<std::ops::Range<usize>>,
    /// The address span is in `address` (two-line) or in `line`.
    ip: std::ops::Range<usize>,
    family: Family,
}

impl Template {
    /// The lines with the user's text, the host's text (if given and the
    /// line has a host field) and the address replaced.
    fn lines(&self, user: &str, host: Option<&str>, ip: &str) -> Vec<String> {
        let mut edits: Vec<(std::ops::Range<usize>, &str)> = vec![(self.user.clone(), user)];
        if let (Some(h), Some(r)) = (host, &self.host) {
            edits.push((r.clone(), h));
        }
        let mut out = Vec::new();
        match &self.address {
            Some(a) => {
                out.push(splice(a, vec![(self.ip.clone(), ip)]));
                out.push(splice(&self.line, edits));
            }
            None => {
                edits.push((self.ip.clone(), ip));
                out.push(splice(&self.line, edits));
            }
        }
        out
    }
}

/// `s` with each range replaced (ranges do not overlap).
fn splice(s: &str, mut edits: Vec<(std::ops::Range<usize>, &str)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut s = s.to_string();
    for (r, t) in edits {
        s.replace_range(r, t);
    }
    s
}

/// The offset of the message in `line` (a record parsed from it).
fn message_offset(line: &str, msg: &str) -> usize {
    msg.as_ptr() as usize - line.as_ptr() as usize
}

struct Samples {
    templates: Vec<Template>,
    /// `#= none|ambiguous|counted injection` lines, with the file and line
    /// they come from.
    injections: Vec<(String, String)>,
    /// The ids of the patterns that grant (kinds login and
    /// login-after-address).
    granting: Vec<String>,
}

fn samples() -> &'static Samples {
    static SAMPLES: OnceLock<Samples> = OnceLock::new();
    SAMPLES.get_or_init(load_samples)
}

fn load_samples() -> Samples {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/samples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    let m = matchers();
    let mut templates = Vec::new();
    let mut injections = Vec::new();
    let mut per_pattern: BTreeMap<String, usize> = BTreeMap::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read sample");
        // The last address line of each (program, pid): the line and the
        // range of its address.
        let mut address_lines: BTreeMap<(String, u32), (String, std::ops::Range<usize>)> =
            BTreeMap::new();
        let mut ann = "";
        for (i, line) in text.lines().enumerate() {
            if let Some(a) = line.strip_prefix("#= ") {
                ann = a;
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let place = format!("{file}:{}", i + 1);
            let this = std::mem::take(&mut ann);
            let Ok(rec) = parse_str(line) else { continue };
            if ["none", "ambiguous", "counted"]
                .iter()
                .any(|k| this.starts_with(&format!("{k} injection ")))
            {
                injections.push((place.clone(), line.to_string()));
            }
            let outcome = m.match_record(&rec);
            let x = m.explain(&rec);
            let at = message_offset(line, rec.message);
            let span = |g: &str| {
                x.as_ref().and_then(|x| {
                    x.spans
                        .iter()
                        .find(|(n, _)| *n == g)
                        .map(|(_, r)| r.start + at..r.end + at)
                })
            };
            if let (Outcome::Address { .. }, Some(pid), Some(ip)) = (&outcome, rec.pid, span("ip"))
            {
                address_lines.insert((rec.program.to_string(), pid), (line.to_string(), ip));
                continue;
            }
            if !this.starts_with("grant ") {
                continue;
            }
            let (Some(x), Some(user)) = (&x, span("user")) else {
                continue;
            };
            let pattern = x.pattern.to_string();
            let n = per_pattern.entry(pattern.clone()).or_default();
            if *n >= 3 {
                continue;
            }
            let (address, ip, ip_text) = match span("ip") {
                Some(ip) => (None, ip.clone(), &line[ip]),
                None => {
                    let Some((a, ip)) = rec
                        .pid
                        .and_then(|pid| address_lines.get(&(rec.program.to_string(), pid)))
                    else {
                        continue;
                    };
                    (Some(a.clone()), ip.clone(), &a[ip.clone()])
                }
            };
            let family = if ip_text.to_ascii_lowercase().starts_with("::ffff:") {
                Family::Mapped
            } else if ip_text.contains(':') {
                Family::V6
            } else {
                Family::V4
            };
            *n += 1;
            templates.push(Template {
                pattern,
                place,
                address,
                line: line.to_string(),
                user,
                host: span("host"),
                ip,
                family,
            });
        }
    }
    let granting = smtp_after_popd::recognise::matcher::parse_pattern_specs(include_str!(
        "../src/recognise/patterns.toml"
    ))
    .expect("patterns.toml")
    .into_iter()
    .filter(|s| {
        matches!(
            s.kind.as_deref(),
            None | Some("login") | Some("login-after-address")
        )
    })
    .filter_map(|s| s.id)
    .collect();
    Samples {
        templates,
        injections,
        granting,
    }
}

/// Every pattern that grants has templates: the properties below cover
/// every format.
#[test]
fn every_granting_pattern_has_templates() {
    let s = samples();
    let missing: Vec<&String> = s
        .granting
        .iter()
        .filter(|id| !s.templates.iter().any(|t| &&t.pattern == id))
        .collect();
    assert!(
        missing.is_empty(),
        "patterns without a template: {missing:?}"
    );
    assert!(s.granting.len() > 21, "only {} patterns", s.granting.len());
    assert!(
        s.injections.len() > 100,
        "{} injections",
        s.injections.len()
    );
}

/// A client address the address rules do not refuse, as the server of
/// `family` writes it, and the address the map must hold.
fn server_ip(family: Family) -> BoxedStrategy<(String, IpAddr)> {
    let v4 = (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
        .prop_filter("not loopback or private", |(a, ..)| *a != 127 && *a != 10)
        .prop_map(|(a, b, c, d)| IpAddr::from([a, b, c, d]));
    match family {
        Family::V4 => v4.prop_map(|ip| (ip.to_string(), ip)).boxed(),
        Family::Mapped => v4.prop_map(|ip| (format!("::ffff:{ip}"), ip)).boxed(),
        Family::V6 => (0x2001u16..=0x3fff, any::<[u16; 7]>())
            .prop_map(|(a, r)| {
                let ip = IpAddr::from([a, r[0], r[1], r[2], r[3], r[4], r[5], r[6]]);
                (ip.to_string(), ip)
            })
            .boxed(),
    }
}

/// A user name any server accepts and writes as it is.
fn plain_user() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9._-]{0,15}",
        "[a-z][a-z0-9._-]{0,10}@[a-z]{1,8}\\.(org|net)",
    ]
}

/// Text an attacker chooses as a user (or host) name: pieces that hold
/// addresses, brackets, fake fields, quotes and spaces, and pieces of each
/// template's own line with another address in it.
fn hostile_user() -> impl Strategy<Value = String> {
    let fake = prop_oneof![
        Just("203.0.113.9".to_string()),
        Just("2001:db8::bad".to_string()),
        Just("::ffff:203.0.113.9".to_string()),
    ];
    let piece = prop_oneof![
        "[a-z0-9._@-]{1,12}",
        fake.clone(),
        fake.clone().prop_map(|f| format!(", rip={f}")),
        fake.clone().prop_map(|f| format!("rip={f}, lip=192.0.2.1")),
        fake.clone()
            .prop_map(|f| format!(">, method=PLAIN, rip={f}, lip=192.0.2.1, mpid=1, session=<abc")),
        fake.clone().prop_map(|f| format!(" host=x [{f}]")),
        fake.clone().prop_map(|f| format!("[{f}]")),
        fake.clone().prop_map(|f| format!("({f})")),
        fake.clone()
            .prop_map(|f| format!("' logged in from {f}, nmsgs=1")),
        fake.clone()
            .prop_map(|f| format!("\" at (h) {f} [pop_log.c:244]")),
        fake.clone().prop_map(|f| format!(", ip=[{f}]")),
        fake.clone()
            .prop_map(|f| format!(" [{f}] x PLAIN User logged in")),
        fake.clone().prop_map(|f| format!(" - {f}")),
        fake.clone().prop_map(|f| format!(":{f}")),
        fake.prop_map(|f| format!(" from {f}")),
        Just(" ".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        Just("<>[]()".to_string()),
        "[ -~]{0,12}",
    ];
    proptest::collection::vec(piece, 1..5).prop_map(|v| v.concat())
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A plain user name on a success line grants exactly the address the
/// server wrote, in every template (a share of 100%).
#[test]
fn a_plain_login_grants_exactly_the_servers_address() {
    let s = samples();
    let tried = RefCell::new(0usize);
    for t in &s.templates {
        let strategy = (plain_user(), server_ip(t.family));
        TestRunner::new(config(32))
            .run(&strategy, |(user, (text, ip))| {
                *tried.borrow_mut() += 1;
                let lines = t.lines(&user, None, &text);
                let got = run(&lines);
                prop_assert_eq!(
                    got,
                    vec![canonical(ip)],
                    "{} ({}): {:?}",
                    t.place,
                    t.pattern,
                    lines
                );
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let tried = tried.into_inner();
    assert!(
        tried >= s.templates.len() * 32,
        "{tried} cases for {} templates",
        s.templates.len()
    );
}

/// A hostile user (or host) name grants the server's address or nothing,
/// never another; each pattern grants for a share of them that is not 0.
#[test]
fn a_hostile_name_never_moves_the_granted_address() {
    let s = samples();
    let shares: RefCell<BTreeMap<String, (usize, usize)>> = RefCell::new(BTreeMap::new());
    for t in &s.templates {
        let strategy = (
            hostile_user(),
            proptest::option::of(hostile_user()),
            server_ip(t.family),
        );
        TestRunner::new(config(100))
            .run(&strategy, |(user, host, (text, ip))| {
                let lines = t.lines(&user, host.as_deref(), &text);
                let got = run(&lines);
                let mut shares = shares.borrow_mut();
                let e = shares.entry(t.pattern.clone()).or_default();
                e.1 += 1;
                if !got.is_empty() {
                    e.0 += 1;
                }
                prop_assert!(
                    got.is_empty() || got == vec![canonical(ip)],
                    "{} ({}): granted {:?} instead of {}: {:?}",
                    t.place,
                    t.pattern,
                    got,
                    ip,
                    lines
                );
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let shares = shares.into_inner();
    eprintln!("granting share per pattern (hostile names): {shares:?}");
    let never: Vec<&String> = shares
        .iter()
        .filter(|(_, (g, _))| *g == 0)
        .map(|(p, _)| p)
        .collect();
    assert!(
        never.is_empty(),
        "patterns that granted no hostile case (the property would hold by granting nothing): {never:?}"
    );
}

/// Injection lines grant nothing: every `#= ... injection` sample with
/// its smuggled address (203.0.113.9) replaced by a generated one, each
/// two-line server's success line alone with a user name holding an
/// address, and failure lines of several formats.
#[test]
fn injections_grant_nothing() {
    let s = samples();
    for (place, line) in &s.injections {
        TestRunner::new(config(16))
            .run(&server_ip(Family::V4), |(text, _)| {
                let l = line.replace("203.0.113.9", &text);
                prop_assert!(run(std::slice::from_ref(&l)).is_empty(), "{}: {}", place, l);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut two_line = 0;
    for t in s.templates.iter().filter(|t| t.address.is_some()) {
        two_line += 1;
        TestRunner::new(config(16))
            .run(
                &(hostile_user(), server_ip(t.family)),
                |(user, (text, _))| {
                    let lines = t.lines(&user, None, &text);
                    let alone = vec![lines[1].replace(&*user, &format!("{user} from {text}"))];
                    prop_assert!(run(&alone).is_empty(), "{}: {:?}", t.place, alone);
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(two_line > 0);
    TestRunner::new(config(200))
        .run(
            &(hostile_user(), server_ip(Family::V4)),
            |(user, (ip, _))| {
                for line in failure_lines(&user, &ip) {
                    prop_assert!(
                        run(std::slice::from_ref(&line)).is_empty(),
                        "line: {}",
                        line
                    );
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The failure and other lines of several formats, which must grant
/// nothing.
fn failure_lines(user: &str, ip: &str) -> Vec<String> {
    vec![
        format!(
            "Nov 24 10:00:01 mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.1, session=<abcdefgh>"
        ),
        format!(
            "Nov 24 10:00:01 mail dovecot: imap-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<{user}>, rip={ip}, lip=192.0.2.1"
        ),
        format!("Nov 24 10:00:01 mail imapd[1]: LOGIN FAILED, user={user}, ip=[{ip}]"),
        format!(
            "Nov 24 10:00:01 mail imapd[1]: Login failed user={user} auth={user} host=client.example.net [{ip}]"
        ),
        format!(
            "Nov 24 10:00:01 mail postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 Relay access denied; from=<{user}> to=<x@example.org> proto=ESMTP helo=<{user}>"
        ),
        format!(
            "Nov 24 10:00:01 mail in.qpopper[1]: {user} at client.example.net ({ip}): -ERR [AUTH] Password supplied for \"{user}\" is incorrect. [pop_pass.c:1064]"
        ),
    ]
}

/// Every address the input holds, in any textual form (runs of address
/// characters, and their parts after `::ffff:`), parsed and canonical.
fn addresses_in(input: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for run in input.split(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.')) {
        // Every substring of the run, so that "a1.2.3.4" and "::1.2.3.4."
        // count what they hold.
        for i in 0..run.len() {
            for j in i + 1..=run.len() {
                if let Ok(ip) = run[i..j].parse::<IpAddr>() {
                    out.push(canonical(ip));
                }
            }
        }
    }
    out
}

/// Whatever is granted appears in the input, address by address: over
/// random text after the prefixes of several servers, and over success
/// lines with random text spliced in, of which a share must grant.
#[test]
fn nothing_is_granted_that_is_not_in_the_input() {
    let s = samples();
    let prefix = prop_oneof![
        Just("Nov 24 10:00:01 mail dovecot: "),
        Just("Nov 24 10:00:01 mail imapd[1]: "),
        Just("Nov 24 10:00:01 mail in.qpopper[1]: "),
        Just("1 2026-11-24T10:00:01Z mail dovecot 1 - - "),
        Just(""),
    ];
    TestRunner::new(config(2000))
        .run(&(prefix, "[ -~]{0,300}"), |(prefix, input)| {
            let line = format!("{prefix}{input}");
            let held = addresses_in(&line);
            for g in run(std::slice::from_ref(&line)) {
                prop_assert!(held.contains(&g), "granted {} from {}", g, line);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Success lines of every template, with random text spliced in at a
    // random place.
    let granted_cases = RefCell::new(0usize);
    let cases = RefCell::new(0usize);
    for t in &s.templates {
        let strategy = (
            plain_user(),
            server_ip(t.family),
            any::<prop::sample::Index>(),
            prop_oneof!["[ -~]{0,8}", hostile_user()],
        );
        TestRunner::new(config(24))
            .run(&strategy, |(user, (text, _), at, junk)| {
                let mut lines = t.lines(&user, None, &text);
                let last = lines.len() - 1;
                let l = &mut lines[last];
                let mut i = at.index(l.len() + 1);
                while !l.is_char_boundary(i) {
                    i -= 1;
                }
                l.insert_str(i, &junk);
                let held: Vec<IpAddr> = lines.iter().flat_map(|l| addresses_in(l)).collect();
                let got = run(&lines);
                *cases.borrow_mut() += 1;
                if !got.is_empty() {
                    *granted_cases.borrow_mut() += 1;
                }
                for g in got {
                    prop_assert!(held.contains(&g), "granted {} from {:?}", g, lines);
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (g, n) = (granted_cases.into_inner(), cases.into_inner());
    eprintln!("{g} of {n} spliced success lines granted");
    assert!(g * 4 > n, "only {g} of {n} spliced success lines granted");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// An address the rules refuse is never granted nor written; any other
    /// is granted and written; an address granted before stays written.
    #[test]
    fn refused_addresses_are_never_granted_nor_written(
        a in prop_oneof![Just(0u8), Just(10), Just(127), Just(224), Just(239), Just(255), 1u8..=223],
        b in any::<u8>(), c in any::<u8>(), d in any::<u8>(),
        mapped in any::<bool>(),
    ) {
        let ip = IpAddr::from([a, b, c, d]);
        let text = if mapped { format!("::ffff:{ip}") } else { ip.to_string() };
        let before = "198.51.100.77";
        let never = ["127.0.0.0/8", "::1", "10.0.0.0/8"];
        let p = pipeline(&never);
        for addr in [before, &text] {
            let line = format!("<22>Nov 24 10:00:01 mail dovecot: pop3-login: Login: user=<u>, method=PLAIN, rip={addr}, lip=192.0.2.1");
            p.handle(line.as_bytes(), &Peer::Unix("test".into()));
        }
        let refused = a == 0 || a == 10 || a == 127 || (224..=239).contains(&a)
            || ip == IpAddr::from([255, 255, 255, 255]) || ip.is_unspecified();
        let written = PostfixMap::render(&p.table.addresses().1);
        prop_assert!(written.contains(&format!("{before} OK")), "{}", written);
        let listed = written.lines().any(|l| l == format!("{ip} OK"));
        if refused {
            prop_assert!(!granted(&p).contains(&ip), "{} granted", ip);
            prop_assert!(!listed, "{} written", ip);
        } else {
            prop_assert!(granted(&p).contains(&ip), "{} not granted", ip);
            prop_assert!(listed, "{} not written: {}", ip, written);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let p = pipeline(&[]);
        p.handle(&bytes, &Peer::Unix("test".into()));
    }
}
