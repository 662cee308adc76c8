//! The sample harness: every built-in pattern against its annotated sample
//! logs in `tests/samples/SERVER.log`.
//!
//! Format of a sample file (fail2ban's idea, our syntax):
//!
//! ```text
//! # Free comment: where the line comes from.
//! #= grant IP SERVICE USER
//! Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<alice>, ...
//! #= none
//! Nov 23 10:00:02 mail dovecot: pop3-login: Disconnected (auth failed...
//! #= none injection
//! Nov 23 10:00:03 mail dovecot: pop3-login: Disconnected ...: user=<x, rip=203.0.113.9>...
//! ```
//!
//! `#= ` applies to the next line that is not a comment. `grant` lines must
//! yield exactly that login (address in the form Postfix looks up, service,
//! user) from a pattern of this file's server; `none` lines must grant
//! nothing; `logout` lines must be recognised as the end of a session (for
//! `--hold-while-connected`) by a pattern of this file's server, with the
//! session id or process id that pairs them with their login
//! (`#= logout session ID` or `#= logout pid N` names the one expected);
//! `counted` lines must be recognised as logins that carry no client
//! address (old UW ipop3d, a host name cut before the address): counted
//! and logged by the daemon, never granted.
//!
//! The lines of a file are fed in order through one stateful matcher, as
//! the daemon feeds them (a record after one that its server's logger cut
//! is believed in no way, `line_limit`): two-line servers (popa3d `Session from IP`, then
//! `Authentication passed for USER` from the same process) are annotated
//! `#= none` on the address line and `#= grant ...` on the success line,
//! which grants the address remembered for its process. A success line with
//! no address line of its own process before it grants nothing.
//!
//! The harness fails when:
//! - a line has no annotation, or an annotation has no line;
//! - a `grant` line yields another address, service or user, or nothing;
//! - a `none` line yields a login;
//! - two patterns claim one line;
//! - a built-in pattern is exercised by no positive sample (an address
//!   pattern is exercised when a grant takes its address; a logout pattern
//!   by a `logout` line);
//! - a sample file has no `none injection` sample.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use smtp_after_popd::addr::canonical;
use smtp_after_popd::matcher::{AddressMemory, CutKey, CutLines, Matchers, Outcome, ProcessKey};
use smtp_after_popd::record::parse_str;

#[derive(Debug)]
enum Expect {
    Grant {
        ip: String,
        service: String,
        user: String,
    },
    None {
        injection: bool,
    },
    /// The session id or pid expected, if given (`#= logout session ID`).
    Logout(Option<String>),
    /// A login recognised whose line carries no address: counted, nothing
    /// granted (`#= counted`).
    Counted,
}

struct Sample {
    file: String,
    line_no: usize,
    text: String,
    expect: Expect,
}

fn load(dir: &Path) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/samples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    for path in files {
        let file = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read sample");
        let mut pending: Option<(usize, Expect)> = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if let Some(ann) = line.strip_prefix("#= ") {
                assert!(
                    pending.is_none(),
                    "{file}.log:{n}: two annotations in a row"
                );
                let mut words = ann.splitn(4, ' ');
                let expect = match words.next() {
                    Some("grant") => Expect::Grant {
                        ip: words.next().expect("grant IP").to_string(),
                        service: words.next().expect("grant IP SERVICE").to_string(),
                        user: words.next().unwrap_or("").to_string(),
                    },
                    Some("none") => Expect::None {
                        injection: words.next() == Some("injection"),
                    },
                    Some("counted") => Expect::Counted,
                    Some("logout") => {
                        let rest: Vec<&str> = words.collect();
                        Expect::Logout((!rest.is_empty()).then(|| rest.join(" ")))
                    }
                    other => panic!("{file}.log:{n}: unknown annotation {other:?}"),
                };
                pending = Some((n, expect));
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let (_, expect) = pending
                    .take()
                    .unwrap_or_else(|| panic!("{file}.log:{n}: line without a #= annotation"));
                out.push(Sample {
                    file: file.clone(),
                    line_no: n,
                    text: line.to_string(),
                    expect,
                });
            }
        }
        assert!(
            pending.is_none(),
            "{file}.log: annotation at the end without a line"
        );
    }
    out
}

/// A sample file is named after the server its grants come from:
/// `SERVER.log`, or `SERVER` followed by a digit or `-` and more for a
/// further file of the same server (`dovecot24.log`).
fn file_is_for_server(file: &str, server: &str) -> bool {
    file.strip_prefix(server).is_some_and(|rest| {
        rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_digit() || c == '-')
    })
}

#[test]
fn samples_match_their_annotations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let samples = load(&dir);
    let matchers = Matchers::builtin();
    let mut failures = Vec::new();
    let mut exercised: BTreeSet<String> = BTreeSet::new();
    let mut injections: BTreeMap<String, usize> = BTreeMap::new();
    let mut files: BTreeSet<String> = BTreeSet::new();

    let mut memory = AddressMemory::new();
    let mut cut = CutLines::new();
    let mut current_file = String::new();
    for s in &samples {
        if s.file != current_file {
            // Each file is a log of its own.
            memory = AddressMemory::new();
            cut = CutLines::new();
            current_file = s.file.clone();
        }
        files.insert(s.file.clone());
        let place = format!("{}.log:{}", s.file, s.line_no);
        let rec = match parse_str(&s.text) {
            Ok(r) => r,
            Err(e) => {
                if let Expect::Grant { .. } = s.expect {
                    failures.push(format!("{place}: does not parse as syslog: {e}"));
                }
                continue;
            }
        };
        let claims = matchers.all_matching(&rec);
        if claims.len() > 1 {
            failures.push(format!("{place}: claimed by several patterns: {claims:?}"));
        }
        // The rest of a line the server's logger cut is believed in no way,
        // as in the daemon.
        let continues = matchers.line_limit(rec.program).is_some_and(|limit| {
            cut.continues(
                CutKey {
                    reporter: "samples".to_string(),
                    host: rec.hostname.unwrap_or("-").to_string(),
                    program: rec.program.to_string(),
                },
                rec.message.len() >= limit,
            )
        });
        let outcome = if continues {
            Outcome::NoMatch
        } else {
            matchers.match_record(&rec)
        };
        let key = ProcessKey::of("samples".to_string(), &rec, rec.pid);
        let (outcome, _) = memory.pair(key, outcome, tokio::time::Instant::now());
        match (&s.expect, outcome) {
            (
                Expect::Logout(want),
                Outcome::Logout {
                    server,
                    session,
                    pattern,
                    ..
                },
            ) => {
                if !file_is_for_server(&s.file, &server)
                    || session.is_none()
                    || want.as_ref().is_some_and(|w| Some(w) != session.as_ref())
                {
                    failures.push(format!(
                        "{place}: expected a logout of {} with a session, got one of {server} with session {session:?} (pattern {pattern})",
                        s.file
                    ));
                }
                exercised.insert(pattern.to_string());
            }
            (Expect::Counted, Outcome::Unaddressed { server, pattern }) => {
                if !file_is_for_server(&s.file, &server) {
                    failures.push(format!(
                        "{place}: counted by pattern {pattern} of {server}, not of {}",
                        s.file
                    ));
                }
                exercised.insert(pattern.to_string());
            }
            (Expect::Counted, other) => {
                failures.push(format!(
                    "{place}: expected a login without an address (counted), got {other:?}"
                ));
            }
            (Expect::Logout(_), other) => {
                failures.push(format!("{place}: expected a logout, got {other:?}"));
            }
            (Expect::Grant { ip, service, user }, Outcome::Login(l)) => {
                let got_ip = canonical(l.ip).to_string();
                if &got_ip != ip
                    || l.service.as_str() != service
                    || &l.user != user
                    || !file_is_for_server(&s.file, &l.server)
                {
                    failures.push(format!(
                        "{place}: expected grant {ip} {service} {user:?} by {}, got {got_ip} {} {:?} by {} (pattern {})",
                        s.file, l.service, l.user, l.server, l.pattern
                    ));
                }
                exercised.insert(l.pattern.to_string());
                if let Some(a) = &l.address_pattern {
                    exercised.insert(a.to_string());
                }
            }
            (Expect::Grant { ip, .. }, other) => {
                failures.push(format!("{place}: expected grant {ip}, got {other:?}"));
            }
            (Expect::None { injection }, Outcome::Login(l)) => {
                failures.push(format!(
                    "{place}: must grant nothing{}, but pattern {} granted {}",
                    if *injection { " (injection)" } else { "" },
                    l.pattern,
                    l.ip
                ));
            }
            (Expect::None { injection }, _) => {
                if *injection {
                    *injections.entry(s.file.clone()).or_default() += 1;
                }
            }
        }
    }
    for id in matchers.pattern_ids() {
        if !exercised.contains(&*id) {
            failures.push(format!(
                "pattern {id} has no positive sample in tests/samples/"
            ));
        }
    }
    for f in &files {
        if !injections.contains_key(f) {
            failures.push(format!("{f}.log has no `#= none injection` sample"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} sample failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(samples.len() > 20);
}
