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
//! #= none injection dovecot-login
//! Nov 23 10:00:03 mail dovecot: pop3-login: Disconnected ...: user=<x, rip=203.0.113.9>...
//! ```
//!
//! The grammar of an annotation (see `parse_annotation`): `grant IP
//! SERVICE [USER]`, `address IP`, `logout [session ID | pid N]`, and
//! `none|counted|ambiguous [injection PATTERN-ID]`. Anything else is an
//! error naming the file and line. `injection PATTERN-ID` marks a line
//! built to attack that pattern (an address smuggled through a field the
//! user controls); `ambiguous injection P` must be refused by P itself,
//! `counted injection P` counted by P, `none injection P` must grant
//! nothing. Every annotated line must parse as a syslog record.
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
//! and logged by the daemon, never granted; `ambiguous` lines must be
//! recognised by a pattern and refused because their user's text could
//! stand for a field the server writes (a field twice, or a field or the
//! text that ends the user's field inside it; see the matcher's doc).
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
//! - an annotated line does not parse as a syslog record;
//! - a sample file has no `injection PATTERN-ID` sample;
//! - a pattern of `src/recognise/patterns.toml` has no `injection PATTERN-ID` sample
//!   naming it in a sample file of its server, or an `ambiguous` or
//!   `counted` injection is refused or counted by another pattern.
//!
//! A second test, `generated_injections_never_grant`, builds injections
//! from every positive sample: each server-written field of its pattern
//! (and the whole server text after the user's field), supplied through
//! each user-controlled field (the `user` and `host` captures), with the
//! real field present and, for the fields the server may leave out
//! (non-address fields, and those the pattern lists in `omitted`),
//! without it. None of them may grant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use smtp_after_popd::grants::addr::canonical;
use smtp_after_popd::ingest::record::parse_str;
use smtp_after_popd::recognise::matcher::{
    AddressMemory, CutKey, CutLines, Matchers, Outcome, ProcessKey,
};

#[derive(Debug)]
enum Expect {
    Grant {
        ip: String,
        service: String,
        user: String,
    },
    /// `#= none [injection PATTERN-ID]`.
    None { injection: Option<String> },
    /// The session id or pid expected, if given (`#= logout session ID`).
    Logout(Option<String>),
    /// A login recognised whose line carries no address: counted, nothing
    /// granted (`#= counted [injection PATTERN-ID]`).
    Counted(Option<String>),
    /// A line a pattern matched but refused as ambiguous (`#= ambiguous
    /// [injection PATTERN-ID]`): with an id, by that pattern.
    Ambiguous(Option<String>),
    /// The address line of a server that writes it before its login line
    /// (`#= address IP`): remembered, nothing granted by itself.
    Address(String),
}

struct Sample {
    file: String,
    line_no: usize,
    text: String,
    expect: Expect,
}

/// The annotation grammar (after `#= `):
///
/// ```text
/// grant IP SERVICE [USER]
/// address IP
/// logout [session ID | pid N]
/// none [injection PATTERN-ID]
/// counted [injection PATTERN-ID]
/// ambiguous [injection PATTERN-ID]
/// ```
///
/// Anything else (an unknown word, a word after `none` other than
/// `injection`, an `injection` without a known pattern id, or words after
/// it) is an error.
fn parse_annotation(ann: &str, ids: &BTreeSet<String>) -> Result<Expect, String> {
    let mut words = ann.split(' ');
    let kind = words.next().unwrap_or("");
    let injection = |words: &mut std::str::Split<'_, char>| -> Result<Option<String>, String> {
        match words.next() {
            None => Ok(None),
            Some("injection") => {
                let id = words
                    .next()
                    .ok_or("`injection` needs the PATTERN-ID the line attacks")?;
                if !ids.contains(id) {
                    return Err(format!("no built-in pattern has the id {id:?}"));
                }
                match words.next() {
                    None => Ok(Some(id.to_string())),
                    Some(w) => Err(format!("unexpected {w:?} after the pattern id")),
                }
            }
            Some(w) => Err(format!(
                "unexpected {w:?} after `{kind}` (only `injection PATTERN-ID` may follow)"
            )),
        }
    };
    Ok(match kind {
        "grant" => {
            let ip = words.next().ok_or("`grant` needs IP SERVICE [USER]")?;
            let service = words.next().ok_or("`grant` needs IP SERVICE [USER]")?;
            let user: Vec<&str> = words.collect();
            Expect::Grant {
                ip: ip.to_string(),
                service: service.to_string(),
                user: user.join(" "),
            }
        }
        "none" => Expect::None {
            injection: injection(&mut words)?,
        },
        "counted" => Expect::Counted(injection(&mut words)?),
        "ambiguous" => Expect::Ambiguous(injection(&mut words)?),
        "address" => {
            let ip = words.next().ok_or("`address` needs IP")?;
            if let Some(w) = words.next() {
                return Err(format!("unexpected {w:?} after `address IP`"));
            }
            Expect::Address(ip.to_string())
        }
        "logout" => {
            let rest: Vec<&str> = words.collect();
            match rest.as_slice() {
                [] => Expect::Logout(None),
                ["session" | "pid", _, ..] => Expect::Logout(Some(rest.join(" "))),
                _ => return Err("`logout` takes nothing, `session ID` or `pid N`".into()),
            }
        }
        other => return Err(format!("unknown annotation {other:?}")),
    })
}

/// The built-in patterns, as patterns.toml declares them.
fn specs() -> Vec<smtp_after_popd::recognise::matcher::PatternSpec> {
    smtp_after_popd::recognise::matcher::parse_pattern_specs(include_str!(
        "../src/recognise/patterns.toml"
    ))
    .expect("src/recognise/patterns.toml")
}

fn load(dir: &Path) -> Vec<Sample> {
    let ids: BTreeSet<String> = specs().into_iter().filter_map(|s| s.id).collect();
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
                let expect = parse_annotation(ann, &ids)
                    .unwrap_or_else(|e| panic!("{file}.log:{n}: {e}: {ann:?}"));
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
    // Injection samples per pattern id they attack, and their files.
    let mut injected: BTreeMap<String, usize> = BTreeMap::new();
    let mut injection_files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &samples {
        if let Expect::None { injection: Some(p) }
        | Expect::Counted(Some(p))
        | Expect::Ambiguous(Some(p)) = &s.expect
        {
            injection_files
                .entry(p.clone())
                .or_default()
                .insert(s.file.clone());
        }
    }

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
        // Every annotated line must be a syslog record: one that does not
        // parse would pass as "grants nothing" without testing anything.
        let rec = match parse_str(&s.text) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{place}: does not parse as syslog: {e}"));
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
        if let Expect::Address(want) = &s.expect {
            match &outcome {
                Outcome::Address { ip, pattern, .. } if &canonical(*ip).to_string() == want => {
                    exercised.insert(pattern.to_string());
                }
                other => failures.push(format!(
                    "{place}: expected the address line of {want}, got {other:?}"
                )),
            }
        }
        let key = ProcessKey::of("samples".to_string(), &rec, rec.pid);
        let (outcome, _) = memory.pair(key, outcome, tokio::time::Instant::now(), false);
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
            (Expect::Counted(want), Outcome::Unaddressed { server, pattern }) => {
                if let Some(want) = want {
                    if want.as_str() != &*pattern {
                        failures.push(format!(
                            "{place}: an injection into {want} must be counted by {want}, but {pattern} counted it"
                        ));
                    }
                    *injected.entry(want.clone()).or_default() += 1;
                    *injections.entry(s.file.clone()).or_default() += 1;
                }
                if !file_is_for_server(&s.file, &server) {
                    failures.push(format!(
                        "{place}: counted by pattern {pattern} of {server}, not of {}",
                        s.file
                    ));
                }
                exercised.insert(pattern.to_string());
            }
            (Expect::Address(_), Outcome::Remembered { .. }) => {}
            (Expect::Address(_), other) => {
                failures.push(format!("{place}: expected an address line, got {other:?}"));
            }
            (Expect::Ambiguous(want), Outcome::Ambiguous { pattern, .. }) => {
                if let Some(want) = want {
                    if want.as_str() != &*pattern {
                        failures.push(format!(
                            "{place}: an injection into {want} must be refused by {want}, but {pattern} refused it"
                        ));
                    }
                    *injected.entry(want.clone()).or_default() += 1;
                }
                *injections.entry(s.file.clone()).or_default() += 1;
            }
            (Expect::Ambiguous(_), other) => {
                failures.push(format!(
                    "{place}: expected a line refused as ambiguous, got {other:?}"
                ));
            }
            (Expect::Counted(_), other) => {
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
                    injection
                        .as_ref()
                        .map(|p| format!(" (injection into {p})"))
                        .unwrap_or_default(),
                    l.pattern,
                    l.ip
                ));
            }
            (Expect::None { injection }, _) => {
                if let Some(p) = injection {
                    *injected.entry(p.clone()).or_default() += 1;
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
            failures.push(format!(
                "{f}.log has no `#= none injection PATTERN-ID` or `#= ambiguous injection PATTERN-ID` sample"
            ));
        }
    }
    // Every pattern ships with injection samples of its own: lines, in a
    // sample file of its server, that attack it and grant nothing.
    for spec in specs() {
        let id = spec.id.clone().unwrap_or_default();
        let Some(n) = injected.get(&id) else {
            failures.push(format!(
                "pattern {id} has no `#= none injection {id}` (or ambiguous, counted) sample in tests/samples/{}*.log",
                spec.server
            ));
            continue;
        };
        assert!(*n > 0);
        if !injection_files
            .get(&id)
            .is_some_and(|fs| fs.iter().any(|f| file_is_for_server(f, &spec.server)))
        {
            failures.push(format!(
                "pattern {id}: its injection samples are in no sample file of its server {}",
                spec.server
            ));
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

/// The address every generated injection tries to get granted.
const FAKE: &str = "203.0.113.99";

/// Characters that open a field's value, and the ones that close them.
const OPENERS: [(char, char); 5] = [('<', '>'), ('[', ']'), ('(', ')'), ('"', '"'), ('\'', '\'')];

/// Whether `c` continues a field name (so `ip=` inside `oip=` is not a
/// field).
fn name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')
}

/// Where field `f` occurs in `msg` as a field of its own.
fn field_at(msg: &str, f: &str) -> Vec<usize> {
    msg.match_indices(f)
        .map(|(i, _)| i)
        .filter(|&i| i == 0 || !name_char(msg.as_bytes()[i - 1]))
        .collect()
}

/// The element of field `f` at `at`: the field and its value, a value in
/// `<>`, `[]`, `()` or quotes through its closer, any other up to the next
/// comma, semicolon or space.
fn element(msg: &str, f: &str, at: usize) -> std::ops::Range<usize> {
    let v = at + f.len();
    let rest = &msg[v..];
    let end = match rest
        .chars()
        .next()
        .and_then(|c| OPENERS.iter().find(|(o, _)| *o == c))
    {
        Some((_, close)) => rest[1..].find(*close).map_or(msg.len(), |e| v + 1 + e + 1),
        None => rest
            .find(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .map_or(msg.len(), |e| v + e),
    };
    at..end
}

/// Field `f` written as the server writes it, holding the fake address:
/// `rip=203.0.113.99`, `ip=[203.0.113.99]`.
fn fake_element(msg: &str, f: &str) -> String {
    let opener = field_at(msg, f)
        .first()
        .and_then(|&i| msg[i + f.len()..].chars().next())
        .and_then(|c| OPENERS.iter().find(|(o, _)| *o == c));
    match opener {
        Some((o, c)) => format!("{f}{o}{FAKE}{c}"),
        None => format!("{f}{FAKE}"),
    }
}

/// `msg` with the element at `r` removed, with the separator before it.
fn without(msg: &str, r: std::ops::Range<usize>) -> (String, std::ops::Range<usize>) {
    let mut start = r.start;
    for sep in [", ", "; ", " "] {
        if msg[..start].ends_with(sep) {
            start -= sep.len();
            break;
        }
    }
    if start == r.start && msg[r.end..].starts_with(", ") {
        return (
            format!("{}{}", &msg[..start], &msg[r.end + 2..]),
            start..r.end + 2,
        );
    }
    (format!("{}{}", &msg[..start], &msg[r.end..]), start..r.end)
}

/// The user's text, rewritten by an attacker who wants `element` read as
/// the server's: after it, before it, closing the user's field first, and
/// opening one of the server's bracketed fields after it to take the
/// server's closing character.
fn attempts(user: &str, closer: &str, element: &str, absorbers: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for sep in [", ", " ", "; ", ""] {
        out.push(format!("{user}{sep}{element}"));
        out.push(format!("{element}{sep}{user}"));
        out.push(format!("{user}{closer}{sep}{element}"));
        for a in absorbers {
            out.push(format!("{user}{closer}{sep}{element}{sep}{a}x"));
        }
    }
    out
}

#[test]
fn generated_injections_never_grant() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let matchers = Matchers::builtin();
    let mut failures = Vec::new();
    let mut tried = 0usize;
    let mut per_pattern: BTreeMap<String, usize> = BTreeMap::new();
    for s in load(&dir) {
        if !matches!(s.expect, Expect::Grant { .. }) {
            continue;
        }
        let Ok(rec) = parse_str(&s.text) else {
            continue;
        };
        let Some(x) = matchers.explain(&rec) else {
            continue;
        };
        // The success line of a two-line server carries no address: its
        // user's text cannot supply one.
        let Some(ip_span) = x
            .spans
            .iter()
            .find(|(g, _)| *g == "ip")
            .map(|(_, r)| r.clone())
        else {
            continue;
        };
        let msg = rec.message;
        let prefix = &s.text[..msg.as_ptr() as usize - s.text.as_ptr() as usize];
        let user_spans: Vec<std::ops::Range<usize>> = x
            .spans
            .iter()
            .filter(|(g, _)| *g != "ip")
            .map(|(_, r)| r.clone())
            .collect();
        // Fields followed by an opening bracket can take the server's
        // closing character after an injection.
        let absorbers: Vec<String> = x
            .fields
            .iter()
            .filter_map(|f| {
                let i = *field_at(msg, f).first()?;
                let c = msg[i + f.len()..].chars().next()?;
                OPENERS
                    .iter()
                    .any(|(o, _)| *o == c)
                    .then(|| format!("{f}{c}"))
            })
            .collect();
        // The lines to inject into: the sample itself, and the sample
        // without each field the server may leave out.
        let mut bases: Vec<(String, String, Vec<std::ops::Range<usize>>)> =
            vec![("with".to_string(), msg.to_string(), user_spans.clone())];
        for f in &x.fields {
            let Some(&at) = field_at(msg, f)
                .iter()
                .find(|&&i| !user_spans.iter().any(|u| u.contains(&i)))
            else {
                continue;
            };
            let r = element(msg, f, at);
            let carries_address = r.start <= ip_span.start && ip_span.end <= r.end;
            if carries_address && !x.omitted.contains(f) {
                continue;
            }
            if user_spans
                .iter()
                .any(|u| u.start < r.end && r.start < u.end)
            {
                continue;
            }
            let (cut, removed) = without(msg, r);
            let shift = removed.end - removed.start;
            let spans = user_spans
                .iter()
                .map(|u| {
                    if u.start >= removed.end {
                        u.start - shift..u.end - shift
                    } else {
                        u.clone()
                    }
                })
                .collect();
            bases.push((format!("without {f}"), cut, spans));
        }
        for (how, base, spans) in &bases {
            for u in spans {
                let user = &base[u.clone()];
                let closer: String = base[u.end..]
                    .chars()
                    .next()
                    .filter(|c| ">]')\"".contains(*c))
                    .map(String::from)
                    .unwrap_or_default();
                let tail = base[u.end..].replace(&msg[ip_span.clone()], FAKE);
                let mut elements: Vec<String> =
                    x.fields.iter().map(|f| fake_element(msg, f)).collect();
                elements.push(format!("[{FAKE}]"));
                // The server's own text after the user's field, copied into
                // it: the user's field then holds the text that ends it.
                let mut texts = vec![(format!("{user}{tail}"), true)];
                for e in &elements {
                    for t in attempts(user, &closer, e, &absorbers) {
                        // A server field in the user's text, standing as a
                        // field of its own: the line must grant nothing.
                        let holds_field = x.fields.iter().any(|f| !field_at(&t, f).is_empty());
                        texts.push((t, holds_field));
                    }
                }
                for (t, refuse) in texts {
                    let line = format!("{prefix}{}{t}{}", &base[..u.start], &base[u.end..]);
                    if line == s.text {
                        continue;
                    }
                    tried += 1;
                    let kind = if how == "with" { "with" } else { "without" };
                    *per_pattern
                        .entry(format!("{} {kind}", x.pattern))
                        .or_default() += 1;
                    let Ok(r) = parse_str(&line) else { continue };
                    if let Outcome::Login(l) = matchers.match_record(&r)
                        && (refuse || l.ip.to_string() == FAKE)
                    {
                        failures.push(format!(
                            "{}.log:{} ({how}): pattern {} granted {} to {line:?}",
                            s.file, s.line_no, l.pattern, l.ip
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{tried} generated injections: {per_pattern:?}");
    assert!(tried > 1000, "only {tried} injections generated");
    assert!(
        failures.is_empty(),
        "{} generated injection(s) granted:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
