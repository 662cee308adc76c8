//! Login matchers: a syslog [`Record`] becomes a [`Login`] when, and only
//! when, a pattern says it is a successful POP3 or IMAP authentication.
//!
//! Consumes: [`Record`]s (program name and message text).
//! Produces: [`Login`]s: client address, server, service, user, and the id of
//! the pattern that recognised the line.
//! Trusts: nothing in the message beyond what a pattern anchors on. Every
//! pattern names the programs it applies to and is anchored over the whole
//! message (`^...$`) on text the mail server itself writes; the address is
//! taken from a position that user-controlled text (a user name, a reverse
//! DNS name) cannot reach. Whether the record may speak for that program at
//! all (transport, attestation) is decided before and after this stage.
//!
//! Ambiguity. A pattern only says where the server's fields are if the
//! user's text cannot pose as one of them. After a pattern matched, the
//! line grants nothing ([`Outcome::Ambiguous`]) when
//! - a server-written field (every `name=` of the regex's literal text,
//!   and any the pattern adds with `fields`) appears twice: the server
//!   writes each once, so the user wrote one of them, perhaps in place of
//!   one the server left out (Dovecot omits `rip=` on a unix socket);
//! - such a field appears inside a user-controlled capture (`user`,
//!   `host`);
//! - the literal text that ends a user-controlled capture in the regex
//!   (`>` after Dovecot's `user=<...`, `' logged in from ` after
//!   vm-pop3d's user) appears inside it, so the capture could end in more
//!   than one place.
//!
//! These checks run on matched lines only, a few substring searches each.
//!
//! The built-in patterns live in `patterns.toml` beside this file, in the
//! same form administrators use for their own `[[pattern]]` tables, so one
//! loader checks both. Records are looked up by program name first, which is
//! the prefilter: lines from programs no pattern names cost one hash lookup.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use tokio::time::Instant;

use crate::ingest::attest::Speakers;
use crate::ingest::record::Record;

/// The built-in patterns, in the configuration file's `[[pattern]]` form.
pub const BUILTIN_PATTERNS: &str = include_str!("patterns.toml");

/// The mail service a login was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// POP3 (including POP3S).
    Pop3,
    /// IMAP (including IMAPS).
    Imap,
}

impl Service {
    /// Reads a service from text such as `pop3`, `POP3`, `imaps`, `imapd`.
    pub fn from_text(s: &str) -> Option<Service> {
        let lower = s.to_ascii_lowercase();
        let base = lower.rsplit('/').next().unwrap_or(&lower);
        if base.starts_with("pop") || base.starts_with("ipop") || base.contains("pop3") {
            Some(Service::Pop3)
        } else if base.starts_with("imap") || base.contains("imap") {
            Some(Service::Imap)
        } else {
            None
        }
    }

    /// `pop3` or `imap`.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Pop3 => "pop3",
            Service::Imap => "imap",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A successful login, as a matcher read it from one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// The client address as written in the line (not yet canonical).
    pub ip: IpAddr,
    /// The mail server software, e.g. `dovecot`.
    pub server: Arc<str>,
    /// POP3 or IMAP.
    pub service: Service,
    /// The user name as the server wrote it (untrusted text).
    pub user: String,
    /// The id of the pattern that recognised the line.
    pub pattern: Arc<str>,
    /// Who may send lines for that pattern (see [`crate::ingest::attest`]).
    pub speakers: Arc<Speakers>,
    /// What pairs this login with its logout line (`--hold-while-connected`):
    /// the session id the server wrote, or the process id; `None` when the
    /// pattern's server has no logout lines we pair with.
    pub session: Option<String>,
    /// For the success line of a two-line server, the pattern of the
    /// address line the address came from.
    pub address_pattern: Option<Arc<str>>,
    /// For a line that names the client as a proxy reported it (Zimbra's
    /// `oip=`), the proxy's own address (the regex's `via` group): the
    /// daemon grants only if the proxy is one of `--trusted-proxy`.
    pub via: Option<IpAddr>,
}

/// What kind of line a pattern recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A successful login naming the client address.
    Login,
    /// The first line of a two-line server: the client address of a
    /// session, to be remembered for the success line of the same process.
    Address,
    /// The success line of a two-line server: no address of its own.
    LoginAfterAddress,
    /// The end of a session (`--hold-while-connected`).
    Logout,
    /// A successful login whose line carries no client address (old UW
    /// ipop3d, or a `host=` cut before the address): counted, never
    /// granted.
    Unaddressed,
}

/// How a login is paired with its logout line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldBy {
    /// The regex's `session` group.
    Session,
    /// The record's process id.
    Pid,
}

/// Where a pattern's service comes from.
#[derive(Clone, Copy, Debug)]
enum ServiceFrom {
    /// Always this service.
    Fixed(Service),
    /// The regex's `service` group.
    Group,
    /// The program name (`imapd` is IMAP, `ipop3d` is POP3).
    Program,
}

/// The capture groups whose text the client controls.
const USER_GROUPS: [&str; 2] = ["user", "host"];

/// Why a line a pattern matched grants nothing: its user-controlled text
/// could stand for a field the server writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ambiguity {
    /// A field the server writes once appears more than once.
    Repeated(String),
    /// A server-written field appears inside a user-controlled capture.
    Inside {
        /// The field.
        field: String,
        /// The capture group.
        group: &'static str,
    },
    /// The address follows a user-controlled capture with one character
    /// between (`USER@DOMAIN:IP`), and the text reads as a different
    /// address when split at another such character: the user's text may
    /// hold part of the address (`":2001:db8::bad` before `11.0.0.1`).
    Split {
        /// The character between the two.
        glue: char,
        /// The capture group before the address.
        group: &'static str,
    },
    /// The text that ends a user-controlled capture appears inside it.
    Undelimited {
        /// The text that ends the capture.
        delimiter: String,
        /// The capture group.
        group: &'static str,
    },
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = crate::logging::escape;
        match self {
            Ambiguity::Repeated(field) => write!(
                f,
                "the field \"{}\", which the server writes once, appears more than once",
                e(field)
            ),
            Ambiguity::Inside { field, group } => write!(
                f,
                "the {group} text holds the server's field \"{}\"",
                e(field)
            ),
            Ambiguity::Split { glue, group } => write!(
                f,
                "the {group} text and the address, joined by \"{}\", split into another address at another \"{}\"",
                e(&glue.to_string()),
                e(&glue.to_string())
            ),
            Ambiguity::Undelimited { delimiter, group } => write!(
                f,
                "the {group} text holds \"{}\", which ends it, so it cannot be told from the server's text",
                e(delimiter)
            ),
        }
    }
}

/// The `name=` fields in the literal text of a regex: each `=` preceded
/// by a name (`[A-Za-z][A-Za-z0-9_.-]*`) that is neither escaped nor part
/// of a larger run of name characters. `(?:method=[A-Za-z]+|rip=...)`
/// gives `method=` and `rip=`; `[A-Za-z]+=` gives nothing.
pub fn regex_fields(regex: &str) -> Vec<String> {
    let b = regex.as_bytes();
    let name = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-');
    let mut out: Vec<String> = Vec::new();
    // The start of the current run of literal name characters, outside
    // character classes and escapes.
    let mut run: Option<usize> = None;
    let mut in_class = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            run = None;
            i += 2;
            continue;
        }
        if in_class {
            in_class = c != b']';
        } else if c == b'[' {
            in_class = true;
            run = None;
        } else if c == b'=' {
            if let Some(j) = run.filter(|&j| b[j].is_ascii_alphabetic()) {
                let f = &regex[j..=i];
                if !out.iter().any(|o| o == f) {
                    out.push(f.to_string());
                }
            }
            run = None;
        } else if name(c) {
            run.get_or_insert(i);
        } else {
            run = None;
        }
        i += 1;
    }
    out
}

/// The byte offset of the parenthesis that closes group `name` in a regex.
fn group_end(regex: &str, name: &str) -> Option<usize> {
    let start = regex
        .find(&format!("(?P<{name}>"))
        .or_else(|| regex.find(&format!("(?<{name}>")))?;
    let b = regex.as_bytes();
    let mut depth = 0usize;
    let mut i = start;
    let mut in_class = false;
    loop {
        let c = *b.get(i)?;
        match c {
            b'\\' => i += 1,
            b'[' if !in_class => in_class = true,
            b']' if in_class => in_class = false,
            b'(' if !in_class => depth += 1,
            b')' if !in_class => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
}

/// The one character (`:` or a space) between a user-controlled group
/// and the `ip` group that directly follows it, as in vchkpw's
/// `USER@DOMAIN:IP`: the address might begin at any such character of
/// the user's text (see [`Ambiguity::Split`]).
pub fn regex_glue(regex: &str) -> Option<(&'static str, char)> {
    USER_GROUPS.iter().find_map(|&g| {
        let rest = &regex[group_end(regex, g)? + 1..];
        [':', ' '].into_iter().find_map(|c| {
            let after = rest.strip_prefix(c)?;
            (after.starts_with("(?P<ip>") || after.starts_with("(?<ip>")).then_some((g, c))
        })
    })
}

/// The literal text that follows group `name` in a regex, up to the first
/// construct that is not a literal character (escaped punctuation counts
/// as literal); a character made optional by a quantifier is left out.
/// `user=<(?P<user>.*)>(?:, ...` gives `>`; `'(?P<user>[^']*)' logged in
/// from (?P<ip>...)` gives `' logged in from `.
pub fn regex_delimiter(regex: &str, name: &str) -> Option<String> {
    let b = regex.as_bytes();
    let end = group_end(regex, name)?;
    let mut out = String::new();
    let mut i = end + 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'?' | b'*' | b'{' => {
                out.pop();
                break;
            }
            b'+' => i += 1,
            b'\\' => match b.get(i + 1) {
                Some(&e) if e.is_ascii_punctuation() => {
                    out.push(e as char);
                    i += 2;
                }
                _ => break,
            },
            b'(' | b')' | b'[' | b'.' | b'|' | b'^' | b'$' => break,
            _ => {
                // Multi-byte characters are literal too.
                let ch = regex[i..].chars().next()?;
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Occurrences of field `f` in `text` that do not continue a name (so
/// `ip=` is not counted inside `oip=` or `rip=`).
fn field_count(text: &str, f: &str) -> usize {
    let b = text.as_bytes();
    let name = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-');
    text.match_indices(f)
        .filter(|(i, _)| *i == 0 || !name(b[*i - 1]))
        .count()
}

/// Literal text of which every message the regex `anchored` matches holds
/// one: the literal prefixes (or suffixes, if they are longer) of every
/// match, found by the regex parser's literal extraction. `None` when there
/// is no such finite set, or when one of its strings is shorter than three
/// bytes (it would let nearly every line through).
fn required_literals(anchored: &str) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let hir = regex_syntax::Parser::new().parse(anchored).ok()?;
    let of = |prefix: bool| {
        let kind = if prefix {
            ExtractKind::Prefix
        } else {
            ExtractKind::Suffix
        };
        let mut seq = Extractor::new().kind(kind).extract(&hir);
        if prefix {
            seq.optimize_for_prefix_by_preference();
        } else {
            seq.optimize_for_suffix_by_preference();
        }
        let lits: Vec<Vec<u8>> = seq
            .literals()?
            .iter()
            .map(|l| l.as_bytes().to_vec())
            .collect();
        let shortest = lits.iter().map(Vec::len).min()?;
        (shortest >= 3).then_some((shortest, lits))
    };
    match (of(true), of(false)) {
        (Some((a, p)), Some((b, q))) => Some(if b > a { q } else { p }),
        (Some((_, p)), None) | (None, Some((_, p))) => Some(p),
        (None, None) => None,
    }
}

/// One compiled pattern.
#[derive(Clone, Debug)]
struct Pattern {
    /// Unique id, reported with each login and used by the sample harness.
    id: Arc<str>,
    /// Server software name reported with each login.
    server: Arc<str>,
    /// The regex over the whole message.
    regex: Regex,
    /// How to tell POP3 from IMAP.
    service: ServiceFrom,
    /// Who may send lines for this pattern.
    speakers: Arc<Speakers>,
    /// What the line is.
    kind: Kind,
    /// How logins and logouts are paired, if they are.
    hold: Option<HoldBy>,
    /// The fields the server writes once (see [`Ambiguity`]).
    fields: Vec<String>,
    /// For each user-controlled group, the literal text that ends it.
    delimiters: Vec<(&'static str, String)>,
    /// The group and character that join a user-controlled capture to the
    /// address ([`regex_glue`]).
    glue: Option<(&'static str, char)>,
    /// The fields the server leaves out of some lines (sample harness).
    omitted: Vec<String>,
    /// Literal text of which every message the regex matches holds one
    /// (see [`required_literals`]); `None` when the regex has no such set.
    literals: Option<Vec<Vec<u8>>>,
    /// The program names the pattern applies to, as looked up.
    programs: Vec<String>,
}

impl Pattern {
    /// What a match of this pattern is, its addresses parsed.
    fn outcome(
        &self,
        rec: &Record<'_>,
        caps: &regex::Captures<'_>,
        ip: Option<IpAddr>,
        via: Option<IpAddr>,
    ) -> Outcome {
        let service = match self.service {
            ServiceFrom::Fixed(s) => Some(s),
            ServiceFrom::Group => caps
                .name("service")
                .and_then(|m| Service::from_text(m.as_str())),
            ServiceFrom::Program => Service::from_text(rec.program),
        };
        let user = caps.name("user").map_or("", |m| m.as_str()).to_string();
        let session = match self.hold {
            None => None,
            Some(HoldBy::Session) => caps
                .name("session")
                .map(|m| format!("session {}", m.as_str())),
            Some(HoldBy::Pid) => rec.pid.map(|n| format!("pid {n}")),
        };
        let bad = || Outcome::BadAddress {
            pattern: self.id.clone(),
            text: caps.name("ip").map_or("", |m| m.as_str()).to_string(),
        };
        match self.kind {
            Kind::Login => {
                let (Some(ip), Some(service)) = (ip, service) else {
                    return bad();
                };
                Outcome::Login(Login {
                    ip,
                    server: self.server.clone(),
                    service,
                    user,
                    pattern: self.id.clone(),
                    speakers: self.speakers.clone(),
                    session,
                    address_pattern: None,
                    via,
                })
            }
            Kind::Address => {
                let Some(ip) = ip else { return bad() };
                Outcome::Address {
                    ip,
                    server: self.server.clone(),
                    pattern: self.id.clone(),
                    speakers: self.speakers.clone(),
                }
            }
            Kind::LoginAfterAddress => {
                let Some(service) = service else { return bad() };
                Outcome::LoginWithoutAddress {
                    server: self.server.clone(),
                    service,
                    user,
                    pattern: self.id.clone(),
                    speakers: self.speakers.clone(),
                }
            }
            Kind::Unaddressed => Outcome::Unaddressed {
                server: self.server.clone(),
                pattern: self.id.clone(),
            },
            Kind::Logout => Outcome::Logout {
                ip,
                server: self.server.clone(),
                session,
                user,
                pattern: self.id.clone(),
                speakers: self.speakers.clone(),
            },
        }
    }

    /// Whether the user's text and the address it is joined to
    /// ([`regex_glue`]) read as another address when split at another
    /// joining character: `":2001:db8::bad:11.0.0.1` is the address
    /// 2001:db8::bad:b00:1 after the first ':' and 11.0.0.1 after the last.
    /// Addresses that differ only as IPv4 and IPv4-mapped IPv6 are one.
    fn split(&self, message: &str, caps: &regex::Captures<'_>) -> Option<Ambiguity> {
        let (group, glue) = self.glue?;
        let (user, ip) = (caps.name(group)?, caps.name("ip")?);
        let chosen = parse_ip(ip.as_str()).ok().map(|a| a.to_canonical());
        let joined = &message[user.start()..ip.end()];
        let at = ip.start() - user.start() - 1;
        joined
            .match_indices(glue)
            .filter(|&(i, _)| i != at)
            .filter_map(|(i, _)| parse_ip(&joined[i + 1..]).ok())
            .any(|a| Some(a.to_canonical()) != chosen)
            .then_some(Ambiguity::Split { glue, group })
    }

    /// Whether the match `caps` of `message` is ambiguous, and why.
    fn ambiguity(&self, message: &str, caps: &regex::Captures<'_>) -> Option<Ambiguity> {
        for f in &self.fields {
            if field_count(message, f) > 1 {
                return Some(Ambiguity::Repeated(f.clone()));
            }
        }
        if let Some(why) = self.split(message, caps) {
            return Some(why);
        }
        for group in USER_GROUPS {
            let Some(m) = caps.name(group) else { continue };
            let text = m.as_str();
            if let Some(f) = self.fields.iter().find(|f| field_count(text, f) > 0) {
                return Some(Ambiguity::Inside {
                    field: f.clone(),
                    group,
                });
            }
            if let Some((_, d)) = self
                .delimiters
                .iter()
                .find(|(g, d)| *g == group && text.contains(d.as_str()))
            {
                return Some(Ambiguity::Undelimited {
                    delimiter: d.clone(),
                    group,
                });
            }
        }
        None
    }
}

/// One `[[pattern]]` table as written in a configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    /// Unique id; defaults to `SERVER-N`.
    pub id: Option<String>,
    /// Server software name reported with each login.
    pub server: String,
    /// Syslog program names (tags) the pattern applies to. A tag with a
    /// prefix, such as `cyrus/imap`, also matches the name after the last `/`.
    pub program: Vec<String>,
    /// `pop3`, `imap`, `program` (from the program name), or absent to use
    /// the regex's `service` group.
    pub service: Option<String>,
    /// A regex over the whole message (after `program[pid]: `) with a named
    /// group `ip`, and `user` if the line names one. Implicitly anchored.
    pub regex: toml::Spanned<String>,
    /// Executables (absolute paths) allowed to send lines for this pattern,
    /// checked against the sender attestation (see `require-attestation`).
    #[serde(default)]
    pub executables: Vec<String>,
    /// The accounts whose processes write the pattern's lines: uids, or
    /// account names resolved at start (`[0]`, `["cyrus"]`). The attested
    /// uid must be one of them: it is the credential, the executable only a
    /// second check. Empty, or naming only accounts that do not exist
    /// here: no attested line is accepted (so with require-attestation the
    /// pattern grants nothing).
    #[serde(default)]
    pub uids: Vec<Account>,
    /// `uid` (the default): the attested uid must be one of `uids`.
    /// `process`: the server writes the line after switching to the user
    /// who logged in, so its uid proves nothing; an attested line is
    /// believed only when an attested address line (`kind = "address"`)
    /// of the same server came before it from the same process (the same
    /// attested pid), naming the same address. The only choice, and the
    /// default, for `login-after-address`.
    #[serde(default)]
    pub credential: Option<String>,
    /// What the line is: `login` (the default), `address` (the first line
    /// of a two-line server, whose address the `login-after-address` line
    /// of the same process grants), `login-after-address`,
    /// `login-without-address` (a success line that carries no address:
    /// counted, never granted), or `logout` (the end of a session, for
    /// `hold-while-connected`).
    #[serde(default)]
    pub kind: Option<String>,
    /// For `login` and `logout` patterns: how a login is paired with its
    /// logout line, `session` (the regex's `(?P<session>...)` group, the
    /// same text in both lines) or `pid` (the syslog process id). Absent:
    /// logins of this pattern are never held.
    #[serde(default)]
    pub hold: Option<String>,
    /// Server-written fields the line holds once, besides the `name=`
    /// fields of the regex, which are found by themselves: a line in which
    /// one appears twice, or inside the user's text, is ambiguous and
    /// grants nothing.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Fields the server leaves out of some of its lines (Dovecot omits
    /// empty elements, such as `rip=` on a unix socket). The sample
    /// harness removes each and supplies it through the user's text: such
    /// lines must grant nothing. Documentation and tests only.
    #[serde(default)]
    pub omitted: Vec<String>,
    /// For servers whose logger cuts long lines into several records
    /// (courierlogger: a 512-byte buffer): a record of one of this
    /// pattern's programs at least this many bytes long is taken to be
    /// cut, and the record after it from the same reporter, host and
    /// program, which continues it, is believed in no way.
    #[serde(default)]
    pub line_limit: Option<usize>,
}

/// An account in a pattern's `uids`: a uid, or a name looked up at start.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Account {
    /// A uid.
    Uid(u32),
    /// An account name (getpwnam).
    Name(String),
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Uid(n) => write!(f, "{n}"),
            Account::Name(n) => f.write_str(n),
        }
    }
}

/// Patterns in a configuration file, for deserialising `[[pattern]]`.
#[derive(Debug, Default, Deserialize)]
struct PatternFile {
    #[serde(default)]
    pattern: Vec<PatternSpec>,
}

/// A pattern that failed to load: which one and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    /// 1-based line of the regex (or the table) in its file, when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// Two literal searches a record must pass to be parsed at all: the text
/// the patterns require, and the patterns' program names (each a
/// multi-substring search).
#[derive(Clone, Debug)]
struct Prefilter {
    /// Each pattern's [`required_literals`], else its program names.
    literals: Needles,
    /// The patterns' program names (the part after the last '/' too).
    programs: Needles,
}

/// A search for any of a few strings: SIMD (Teddy) where the processor
/// allows, else one literal alternation of the regex crate.
#[derive(Clone, Debug)]
enum Needles {
    Packed(aho_corasick::packed::Searcher),
    Regex(regex::bytes::Regex),
}

impl Needles {
    fn is_match(&self, bytes: &[u8]) -> bool {
        match self {
            Needles::Packed(s) => s.find(bytes).is_some(),
            Needles::Regex(r) => r.is_match(bytes),
        }
    }

    /// Where the first of the needles stands in `bytes`.
    fn find(&self, bytes: &[u8]) -> Option<std::ops::Range<usize>> {
        match self {
            Needles::Packed(s) => s.find(bytes).map(|m| m.start()..m.end()),
            Needles::Regex(r) => r.find(bytes).map(|m| m.range()),
        }
    }
}

/// A search for any of `needles`, byte for byte.
fn any_of(mut needles: Vec<Vec<u8>>) -> Option<Needles> {
    needles.sort();
    needles.dedup();
    // A needle that holds another is found whenever that one is.
    let kept: Vec<&Vec<u8>> = needles
        .iter()
        .filter(|n| {
            !needles
                .iter()
                .any(|o| o.len() < n.len() && n.windows(o.len()).any(|w| w == o.as_slice()))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    if let Some(s) = aho_corasick::packed::Config::new()
        .builder()
        .extend(&kept)
        .build()
    {
        return Some(Needles::Packed(s));
    }
    let alternation: Vec<String> = kept
        .iter()
        .map(|n| {
            n.iter()
                .map(|&b| {
                    if b.is_ascii_alphanumeric() || b == b' ' {
                        (b as char).to_string()
                    } else {
                        format!("\\x{b:02x}")
                    }
                })
                .collect::<String>()
        })
        .collect();
    regex::bytes::RegexBuilder::new(&format!("(?-u:{})", alternation.join("|")))
        .unicode(false)
        .build()
        .ok()
        .map(Needles::Regex)
}

/// The set of patterns, indexed by program name. Cloning is cheap (the
/// compiled regexes are shared).
#[derive(Clone, Debug)]
pub struct Matchers {
    /// All patterns, built-in first.
    patterns: Vec<Pattern>,
    /// Program name to indexes into `patterns`.
    by_program: HashMap<String, Vec<usize>>,
    /// Matches the text one of which every line any pattern matches holds
    /// (each pattern's [`required_literals`], else its program names): a
    /// record whose bytes hold none of it cannot be a login, and is not
    /// even parsed.
    prefilter: Option<Prefilter>,
    /// The same without the logout patterns, for when logout lines do not
    /// matter (no `--hold-while-connected`, the `match` command).
    prefilter_logins: Option<Prefilter>,
    /// Each pattern's accounts, for the start-up notes.
    accounts: Vec<PatternAccounts>,
    /// Program name to the length at which its logger cuts lines.
    line_limits: HashMap<String, usize>,
}

/// The accounts of one pattern as written and as resolved.
#[derive(Clone, Debug)]
struct PatternAccounts {
    /// The pattern's id.
    pattern: Arc<str>,
    /// Its server.
    server: Arc<str>,
    /// Whether lines of the pattern can grant (not login-without-address).
    kind_grants: bool,
    /// The pattern is a one-line login (kind login).
    kind_login: bool,
    /// The accounts as written.
    named: Vec<Account>,
    /// The uids they resolved to.
    uids: Vec<u32>,
    /// The names that did not resolve.
    missing: Vec<String>,
    /// Its credential is its process.
    process: bool,
}

/// What [`Matchers::explain`] tells the sample harness about a match.
#[derive(Clone, Debug)]
pub struct Explained {
    /// The pattern.
    pub pattern: Arc<str>,
    /// Its server-written fields.
    pub fields: Vec<String>,
    /// The fields its `omitted` says the server leaves out of some lines.
    pub omitted: Vec<String>,
    /// Byte ranges of the message captured by `user`, `host` and `ip`.
    pub spans: Vec<(&'static str, std::ops::Range<usize>)>,
}

/// The result of trying a record against the patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No pattern recognised the line: not a login.
    NoMatch,
    /// A successful login.
    Login(Login),
    /// A pattern matched, but the user's text could stand for a field the
    /// server writes ([`Ambiguity`]): nothing granted.
    Ambiguous {
        /// The pattern that matched.
        pattern: Arc<str>,
        /// Why the line cannot be read without doubt.
        why: Ambiguity,
    },
    /// A pattern matched but its address did not parse; nothing is granted.
    BadAddress {
        /// The pattern that matched.
        pattern: Arc<str>,
        /// The text its `ip` group captured.
        text: String,
    },
    /// The first line of a two-line server (popa3d `Session from IP`): an
    /// address to remember for the success line of the same process.
    /// [`AddressMemory::pair`] turns it into [`Outcome::Remembered`].
    Address {
        /// The client address, as the server wrote it.
        ip: IpAddr,
        /// The server software.
        server: Arc<str>,
        /// The pattern that matched.
        pattern: Arc<str>,
        /// Who may send lines for that pattern.
        speakers: Arc<Speakers>,
    },
    /// The success line of a two-line server (popa3d `Authentication
    /// passed for USER`): a login without an address of its own.
    /// [`AddressMemory::pair`] turns it into a [`Outcome::Login`] with the
    /// remembered address, or [`Outcome::NoAddress`].
    LoginWithoutAddress {
        /// The server software.
        server: Arc<str>,
        /// POP3 or IMAP.
        service: Service,
        /// The user name (untrusted text).
        user: String,
        /// The pattern that matched.
        pattern: Arc<str>,
        /// Who may send lines for that pattern.
        speakers: Arc<Speakers>,
    },
    /// An address line, remembered.
    Remembered {
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// A success line with no address remembered for its process, or an
    /// address line without a process id: nothing granted.
    NoAddress {
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// A successful login whose line carries no client address: counted,
    /// nothing granted.
    Unaddressed {
        /// The server software.
        server: Arc<str>,
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// The end of a session (`--hold-while-connected`).
    Logout {
        /// The client address, if the line names one.
        ip: Option<IpAddr>,
        /// The server software.
        server: Arc<str>,
        /// The session id or process id the login was paired by; `None`
        /// when the line has none.
        session: Option<String>,
        /// The user name (untrusted text).
        user: String,
        /// The pattern that matched.
        pattern: Arc<str>,
        /// Who may send lines for that pattern.
        speakers: Arc<Speakers>,
    },
}

/// The line (from 1) of byte `offset` in `source`: where a value came
/// from, for messages about a configuration or patterns file.
pub(crate) fn line_of(source: &str, offset: usize) -> usize {
    source.as_bytes()[..offset.min(source.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses the `[[pattern]]` tables of a TOML document.
pub fn parse_pattern_specs(source: &str) -> Result<Vec<PatternSpec>, PatternError> {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default)]
        pattern: Vec<PatternSpec>,
    }
    let doc: Only = toml::from_str(source).map_err(|e| PatternError {
        line: e.span().map(|s| line_of(source, s.start)),
        message: e.message().to_string(),
    })?;
    Ok(doc.pattern)
}

impl Matchers {
    /// The built-in patterns only.
    pub fn builtin() -> Matchers {
        match Matchers::new(&[]) {
            Ok(m) => m,
            // The built-in file is part of the program and covered by tests.
            Err((_, e)) => panic!("built-in pattern, line {:?}: {}", e.line, e.message),
        }
    }

    /// The built-in patterns plus the administrator's, whose source text is
    /// given for error line numbers.
    pub fn new(custom: &[(PatternSpec, &str)]) -> Result<Matchers, (bool, PatternError)> {
        let builtin: PatternFile = toml::from_str(BUILTIN_PATTERNS).map_err(|e| {
            (
                true,
                PatternError {
                    line: e.span().map(|s| line_of(BUILTIN_PATTERNS, s.start)),
                    message: e.message().to_string(),
                },
            )
        })?;
        let mut m = Matchers {
            patterns: Vec::new(),
            by_program: HashMap::new(),
            prefilter: None,
            prefilter_logins: None,
            accounts: Vec::new(),
            line_limits: HashMap::new(),
        };
        for spec in &builtin.pattern {
            m.add(spec, BUILTIN_PATTERNS).map_err(|e| (true, e))?;
        }
        for (spec, source) in custom {
            m.add(spec, source).map_err(|e| (false, e))?;
        }
        // A one-line login whose credential is its process needs an
        // address line of its server to be believed when attested.
        for (i, a) in m.accounts.iter().enumerate() {
            if a.process
                && a.kind_login
                && !m
                    .patterns
                    .iter()
                    .any(|p| p.kind == Kind::Address && p.server == a.server)
            {
                return Err((
                    i < builtin.pattern.len(),
                    PatternError {
                        line: None,
                        message: format!(
                            "pattern \"{}\": credential = \"process\" needs an address pattern (kind = \"address\") of server \"{}\", the line its process writes before it switches to the user",
                            a.pattern, a.server
                        ),
                    },
                ));
            }
        }
        m.prefilter = m.build_prefilter(true);
        m.prefilter_logins = m.build_prefilter(false);
        Ok(m)
    }

    fn add(&mut self, spec: &PatternSpec, source: &str) -> Result<(), PatternError> {
        let line = Some(line_of(source, spec.regex.span().start));
        let err = |message: String| PatternError { line, message };
        let n = self.patterns.len() + 1;
        let id: Arc<str> = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("{}-{n}", spec.server))
            .into();
        if self.patterns.iter().any(|p| p.id == id) {
            return Err(err(format!(
                "pattern id \"{id}\" is used twice: give each [[pattern]] its own id"
            )));
        }
        if spec.program.is_empty() || spec.program.iter().any(|p| p.is_empty()) {
            return Err(err(format!(
                "pattern \"{id}\": program must list the syslog tags it applies to, e.g. program = [\"dovecot\"]"
            )));
        }
        let text = spec.regex.get_ref();
        let anchored = format!(
            "^(?:{})$",
            text.trim_start_matches('^').trim_end_matches('$')
        );
        let regex =
            Regex::new(&anchored).map_err(|e| err(format!("pattern \"{id}\": bad regex: {e}")))?;
        let names: Vec<&str> = regex.capture_names().flatten().collect();
        let kind = kind_of(spec, &id, &names).map_err(err)?;
        let hold = hold_of(spec, &id, &names, kind).map_err(err)?;
        let service = service_of(spec, &id, &names, kind).map_err(err)?;
        if let Some(e) = spec.executables.iter().find(|e| !e.starts_with('/')) {
            return Err(err(format!(
                "pattern \"{id}\": executables = [\"{e}\"]: expected absolute paths, e.g. \"/usr/lib/dovecot/log\""
            )));
        }
        let mut fields = regex_fields(text);
        for f in &spec.fields {
            if f.is_empty() {
                return Err(err(format!(
                    "pattern \"{id}\": fields = [\"\"]: a field must not be empty"
                )));
            }
            if !fields.contains(f) {
                fields.push(f.clone());
            }
        }
        let delimiters = USER_GROUPS
            .iter()
            .filter(|g| names.contains(g))
            .filter_map(|g| regex_delimiter(text, g).map(|d| (*g, d)))
            .collect();
        let process = process_of(spec, &id, kind, hold).map_err(err)?;
        let (uids, missing) = resolve(&spec.uids);
        if spec.line_limit == Some(0) {
            return Err(err(format!(
                "pattern \"{id}\": line_limit = 0: give the length in bytes at which the server's logger cuts a line, e.g. line_limit = 500"
            )));
        }
        let index = self.patterns.len();
        self.accounts.push(PatternAccounts {
            pattern: id.clone(),
            server: spec.server.as_str().into(),
            kind_grants: !matches!(kind, Kind::Unaddressed),
            named: spec.uids.clone(),
            uids: uids.clone(),
            missing,
            process,
            kind_login: matches!(kind, Kind::Login),
        });
        self.patterns.push(Pattern {
            id,
            server: spec.server.as_str().into(),
            regex,
            service,
            speakers: Arc::new(Speakers {
                executables: spec.executables.clone(),
                uids,
                process,
            }),
            kind,
            hold,
            fields,
            delimiters,
            glue: regex_glue(text),
            omitted: spec.omitted.clone(),
            literals: required_literals(&anchored),
            programs: spec.program.clone(),
        });
        for p in &spec.program {
            self.by_program.entry(p.clone()).or_default().push(index);
        }
        if let Some(limit) = spec.line_limit {
            for p in &spec.program {
                let l = self.line_limits.entry(p.clone()).or_insert(limit);
                *l = (*l).min(limit);
            }
        }
        Ok(())
    }

    /// The prefilter over the patterns (logout patterns only if
    /// `logouts`). A record a pattern matches holds the pattern's program
    /// name in its tag (the whole tag or the part after the last '/', which
    /// is how tags such as "cyrus/imap" are looked up) and one of the
    /// pattern's [`required_literals`] in its message. A pattern without
    /// such literals contributes its program names instead, and so does
    /// every pattern of a program whose logger cuts lines (`line_limit`):
    /// every record of such a program must be seen, to know whether the
    /// next one continues a cut line.
    fn build_prefilter(&self, logouts: bool) -> Option<Prefilter> {
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut programs: Vec<Vec<u8>> = Vec::new();
        for p in &self.patterns {
            if !logouts && p.kind == Kind::Logout {
                continue;
            }
            let names = p
                .programs
                .iter()
                .map(|n| n.rsplit('/').next().unwrap_or(n).as_bytes().to_vec());
            programs.extend(names.clone());
            let cut = p.programs.iter().any(|n| self.line_limit(n).is_some());
            match &p.literals {
                Some(lits) if !cut => literals.extend(lits.iter().cloned()),
                _ => literals.extend(names),
            }
        }
        // No patterns of this kind: no prefilter (every record is parsed,
        // as it would be without one).
        Some(Prefilter {
            literals: any_of(literals)?,
            programs: any_of(programs)?,
        })
    }

    /// The pattern indexes that apply to a program name.
    fn candidates(&self, program: &str) -> &[usize] {
        if let Some(v) = self.by_program.get(program) {
            return v;
        }
        if let Some((_, base)) = program.rsplit_once('/')
            && let Some(v) = self.by_program.get(base)
        {
            return v;
        }
        &[]
    }

    /// Tries the record against the patterns for its program.
    pub fn match_record(&self, rec: &Record<'_>) -> Outcome {
        self.match_record_with(rec, true)
    }

    /// Tries the record against the patterns for its program, logout
    /// patterns only if `logouts` (they matter only with
    /// `--hold-while-connected`, and a mail log is full of logout lines).
    pub fn match_record_with(&self, rec: &Record<'_>, logouts: bool) -> Outcome {
        for &i in self.candidates(rec.program) {
            let p = &self.patterns[i];
            if !logouts && p.kind == Kind::Logout {
                continue;
            }
            // Most lines match none of the patterns: a plain search first
            // (no capture slots allocated), the captures only on a match.
            if !p.regex.is_match(rec.message) {
                continue;
            }
            let Some(caps) = p.regex.captures(rec.message) else {
                continue;
            };
            if let Some(why) = p.ambiguity(rec.message, &caps) {
                return Outcome::Ambiguous {
                    pattern: p.id.clone(),
                    why,
                };
            }
            // The `ip` and `via` groups, if present, must be addresses.
            let address = |group: &str| match caps.name(group) {
                None => Ok(None),
                Some(m) => parse_ip(m.as_str()).map(Some).map_err(|_| m.as_str()),
            };
            let (ip, via) = match (address("ip"), address("via")) {
                (Ok(ip), Ok(via)) => (ip, via),
                (Err(text), _) | (_, Err(text)) => {
                    return Outcome::BadAddress {
                        pattern: p.id.clone(),
                        text: text.to_string(),
                    };
                }
            };
            return p.outcome(rec, &caps, ip, via);
        }
        Outcome::NoMatch
    }

    /// Whether a datagram may hold a login, address or logout line at
    /// all: false when it holds none of the text the patterns require
    /// ([`required_literals`], else their program names), so that it need
    /// not be parsed. Never false for a record a pattern would match (its
    /// message is part of its bytes), nor for a record of a program whose
    /// logger cuts lines.
    pub fn may_match(&self, bytes: &[u8]) -> bool {
        self.may_match_with(bytes, true)
    }

    /// [`Matchers::may_match`] for [`Matchers::match_record_with`]: the
    /// logout patterns count only if `logouts`.
    pub fn may_match_with(&self, bytes: &[u8], logouts: bool) -> bool {
        let p = if logouts {
            &self.prefilter
        } else {
            &self.prefilter_logins
        };
        p.as_ref()
            .is_none_or(|p| p.literals.is_match(bytes) && p.programs.is_match(bytes))
    }

    /// The length at which the logger of `program` cuts lines, if a
    /// pattern says it does (looked up like the patterns: the whole tag,
    /// then the part after the last "/").
    pub fn line_limit(&self, program: &str) -> Option<usize> {
        self.line_limits.get(program).copied().or_else(|| {
            program
                .rsplit_once('/')
                .and_then(|(_, base)| self.line_limits.get(base).copied())
        })
    }

    /// Tries every pattern on the record whatever its program: the naive
    /// approach the benchmarks compare the program index against. Not used
    /// by the daemon (a pattern must only apply to its programs).
    pub fn match_every_pattern(&self, rec: &Record<'_>) -> bool {
        self.patterns
            .iter()
            .any(|p| p.regex.captures(rec.message).is_some())
    }

    /// What the daemon says at start about who may speak for the patterns
    /// (when attestation is in use): accounts named by patterns that do not
    /// exist on this host, patterns that can accept no attested line (and
    /// so, with `required`, grant nothing), and patterns that accept lines
    /// from the account `nobody`, which anything running as nobody could
    /// write. At most one line each, with whether it is a warning.
    pub fn attestation_notes(&self, required: bool) -> Vec<(bool, String)> {
        let mut notes = Vec::new();
        let mut missing: Vec<(String, Vec<&str>)> = Vec::new();
        for a in &self.accounts {
            for name in &a.missing {
                match missing.iter_mut().find(|(n, _)| n == name) {
                    Some((_, v)) => v.push(&a.pattern),
                    None => missing.push((name.clone(), vec![&a.pattern])),
                }
            }
        }
        if !missing.is_empty() {
            let list: Vec<String> = missing
                .iter()
                .map(|(n, p)| format!("{n} ({})", p.join(", ")))
                .collect();
            let mute: Vec<&str> = self
                .accounts
                .iter()
                .filter(|a| a.kind_grants && !a.process && !a.named.is_empty() && a.uids.is_empty())
                .map(|a| &*a.pattern)
                .collect();
            let mut note = format!(
                "accounts named by patterns that do not exist on this host: {}; those patterns accept no attested line from them",
                list.join("; ")
            );
            if required && !mute.is_empty() {
                let _ = write!(
                    note,
                    ", so with require-attestation {} grant nothing",
                    mute.join(", ")
                );
            }
            notes.push((false, note));
        }
        let unnamed: Vec<&str> = self
            .accounts
            .iter()
            .filter(|a| a.kind_grants && !a.process && a.named.is_empty())
            .map(|a| &*a.pattern)
            .collect();
        if !unnamed.is_empty() {
            notes.push((
                false,
                format!(
                    "patterns that name no uids accept no attested line{}: {}; the uid is the credential: give a pattern the uids (or account names) of the processes that write its lines",
                    if required {
                        ", so with require-attestation they grant nothing"
                    } else {
                        ""
                    },
                    unnamed.join(", ")
                ),
            ));
        }
        let nobody = crate::service::privilege::user("nobody").map_or(65534, |u| u.uid);
        let shared: Vec<&str> = self
            .accounts
            .iter()
            .filter(|a| a.uids.contains(&nobody))
            .map(|a| &*a.pattern)
            .collect();
        if !shared.is_empty() {
            notes.push((
                true,
                format!(
                    "patterns {} accept lines from the account nobody (uid {nobody}): anything else running as nobody could speak for them; run the server as an account of its own (perdition runs as nobody when none exists: adduser --system perdition, then perdition -u perdition) and name that account instead",
                    shared.join(", ")
                ),
            ));
        }
        notes
    }

    /// What the sample harness needs to build injections for the pattern
    /// that matches `rec`: its id, its server-written fields, the fields it
    /// says the server may leave out, and the byte ranges of the message
    /// that user-controlled groups captured (and of the `ip` group).
    /// `None` when no pattern matches.
    pub fn explain(&self, rec: &Record<'_>) -> Option<Explained> {
        self.candidates(rec.program).iter().find_map(|&i| {
            let p = &self.patterns[i];
            let caps = p.regex.captures(rec.message)?;
            let spans = USER_GROUPS
                .iter()
                .chain(["ip"].iter())
                .filter_map(|g| caps.name(g).map(|m| (*g, m.range())))
                .collect();
            Some(Explained {
                pattern: p.id.clone(),
                fields: p.fields.clone(),
                omitted: p.omitted.clone(),
                spans,
            })
        })
    }

    /// The ids of all patterns, for the sample harness.
    pub fn pattern_ids(&self) -> Vec<Arc<str>> {
        self.patterns.iter().map(|p| p.id.clone()).collect()
    }

    /// The ids of every pattern for this program whose regex matches the
    /// message: the sample harness checks that at most one does.
    pub fn all_matching(&self, rec: &Record<'_>) -> Vec<Arc<str>> {
        self.candidates(rec.program)
            .iter()
            .filter(|&&i| self.patterns[i].regex.is_match(rec.message))
            .map(|&i| self.patterns[i].id.clone())
            .collect()
    }

    /// Whether a pattern is written for this program (`match` sums up the
    /// lines of known programs that no pattern recognised).
    pub fn knows_program(&self, program: &str) -> bool {
        !self.candidates(program).is_empty()
    }

    /// Whether the line may name a program some pattern is written for
    /// (the prefilter's program half): a line the prefilter skipped that
    /// does may still be a known program's line that no pattern matched.
    pub fn may_name_program(&self, bytes: &[u8]) -> bool {
        self.prefilter
            .as_ref()
            .is_none_or(|p| p.programs.is_match(bytes))
    }

    /// The program of a known program's line, when the first program name
    /// in it stands where a syslog tag does (after a space, before `:` or
    /// `[`): without parsing the record. None when that cannot be told so
    /// (parse the record then).
    pub fn program_at_tag<'a>(&self, bytes: &'a [u8]) -> Option<&'a str> {
        let at = self.prefilter.as_ref()?.programs.find(bytes)?;
        let before = at.start.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at.end).copied();
        if before != Some(b' ') || !matches!(after, Some(b':' | b'[')) {
            return None;
        }
        let name = std::str::from_utf8(&bytes[at]).ok()?;
        self.knows_program(name).then_some(name)
    }
}

/// The process a line of a two-line server comes from: who reported it,
/// the host name in the record, the syslog tag and the process id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    /// The reporting peer (socket path or address).
    pub reporter: String,
    /// The host name in the record (`-` when it has none).
    pub host: String,
    /// The syslog tag.
    pub program: String,
    /// The process id: the attested one when the record carries a believed
    /// attestation, else the one in the tag.
    pub pid: u32,
}

impl ProcessKey {
    /// The key of a record from `reporter` written by process `pid` (the
    /// attested pid, or the record's own); `None` without a pid.
    pub fn of(reporter: String, rec: &Record<'_>, pid: Option<u32>) -> Option<ProcessKey> {
        Some(ProcessKey {
            reporter,
            host: rec.hostname.unwrap_or("-").to_string(),
            program: rec.program.to_string(),
            pid: pid?,
        })
    }
}

/// Most addresses remembered at once for two-line servers.
pub const MEMORY_ENTRIES: usize = 4096;
/// How long an address line is remembered for its success line.
pub const MEMORY_TTL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct RememberedAddress {
    ip: IpAddr,
    server: Arc<str>,
    pattern: Arc<str>,
    at: Instant,
    /// Whether the address line came with a believed attestation that its
    /// pattern accepted.
    attested: bool,
}

#[derive(Debug, Default)]
struct MemoryInner {
    map: HashMap<ProcessKey, RememberedAddress>,
    /// Insertion order, for expiry and eviction; entries whose time no
    /// longer matches the map's are stale and skipped.
    order: VecDeque<(Instant, ProcessKey)>,
}

/// The small, bounded, expiring memory of address lines of two-line
/// servers (popa3d, old vm-pop3d, Solid POP3 without LOG_EXTEND): the
/// address a process wrote in its first line, until the success line of
/// the same process comes ([`MEMORY_TTL`], at most [`MEMORY_ENTRIES`]; when
/// full, the oldest is dropped). The address is only ever taken from the
/// server's address line, never from the success line, which holds the
/// user name.
#[derive(Debug, Default)]
pub struct AddressMemory {
    inner: Mutex<MemoryInner>,
}

impl AddressMemory {
    /// An empty memory.
    pub fn new() -> AddressMemory {
        AddressMemory::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Drops expired entries; returns how many were dropped.
    fn expire(inner: &mut MemoryInner, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some((t, _)) = inner.order.front() {
            if *t + MEMORY_TTL > now {
                break;
            }
            let Some((t, key)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&key).is_some_and(|e| e.at == t) {
                inner.map.remove(&key);
                dropped += 1;
            }
        }
        dropped
    }

    /// How many addresses are remembered.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pairs a line with the memory: an [`Outcome::Address`] is remembered
    /// for its process ([`Outcome::Remembered`]); an
    /// [`Outcome::LoginWithoutAddress`] takes the address remembered for its
    /// process by a pattern of the same server ([`Outcome::Login`]), or
    /// grants nothing ([`Outcome::NoAddress`]). Other outcomes pass
    /// unchanged. `key` is `None` when the record has no process id.
    /// `attested`: the line came with a believed attestation its pattern
    /// accepted; an attested success line takes only an attested address.
    /// Also returns how many remembered addresses were dropped unused.
    pub fn pair(
        &self,
        key: Option<ProcessKey>,
        outcome: Outcome,
        now: Instant,
        attested: bool,
    ) -> (Outcome, usize) {
        match outcome {
            Outcome::Address {
                ip,
                server,
                pattern,
                ..
            } => {
                let Some(key) = key else {
                    return (Outcome::NoAddress { pattern }, 0);
                };
                let mut inner = self.lock();
                let mut dropped = Self::expire(&mut inner, now);
                while inner.map.len() >= MEMORY_ENTRIES && !inner.map.contains_key(&key) {
                    let Some((t, old)) = inner.order.pop_front() else {
                        break;
                    };
                    if inner.map.get(&old).is_some_and(|e| e.at == t) {
                        inner.map.remove(&old);
                        dropped += 1;
                    }
                }
                if inner.order.len() > 4 * MEMORY_ENTRIES {
                    // Stale order entries from keys remembered again and
                    // again: rebuild the order from the map.
                    let mut v: Vec<(Instant, ProcessKey)> =
                        inner.map.iter().map(|(k, e)| (e.at, k.clone())).collect();
                    v.sort_by_key(|(t, _)| *t);
                    inner.order = v.into();
                }
                inner.order.push_back((now, key.clone()));
                if inner
                    .map
                    .insert(
                        key,
                        RememberedAddress {
                            ip,
                            server,
                            pattern: pattern.clone(),
                            at: now,
                            attested,
                        },
                    )
                    .is_some()
                {
                    dropped += 1;
                }
                (Outcome::Remembered { pattern }, dropped)
            }
            Outcome::LoginWithoutAddress {
                server,
                service,
                user,
                pattern,
                speakers,
            } => {
                let Some(key) = key else {
                    return (Outcome::NoAddress { pattern }, 0);
                };
                let mut inner = self.lock();
                let dropped = Self::expire(&mut inner, now);
                let found = inner
                    .map
                    .get(&key)
                    .is_some_and(|e| e.server == server && (e.attested || !attested));
                let entry = if found { inner.map.remove(&key) } else { None };
                match entry {
                    Some(e) => (
                        Outcome::Login(Login {
                            ip: e.ip,
                            server,
                            service,
                            user,
                            pattern,
                            speakers,
                            session: None,
                            address_pattern: Some(e.pattern),
                            via: None,
                        }),
                        dropped,
                    ),
                    None => (Outcome::NoAddress { pattern }, dropped),
                }
            }
            other => (other, 0),
        }
    }

    /// For a one-line login whose credential is its process (`credential =
    /// "process"`): takes the address remembered for its process if it is
    /// of the same server and the same address (and attested, if
    /// `attested`); whether there was one.
    pub fn take(
        &self,
        key: Option<ProcessKey>,
        server: &str,
        ip: IpAddr,
        now: Instant,
        attested: bool,
    ) -> bool {
        let Some(key) = key else { return false };
        let mut inner = self.lock();
        Self::expire(&mut inner, now);
        let ok = inner.map.get(&key).is_some_and(|e| {
            &*e.server == server
                && crate::grants::addr::canonical(e.ip) == crate::grants::addr::canonical(ip)
                && (e.attested || !attested)
        });
        if ok {
            inner.map.remove(&key);
        }
        ok
    }
}

/// The pattern's `kind`, checked against its `ip` group.
fn kind_of(spec: &PatternSpec, id: &str, names: &[&str]) -> Result<Kind, String> {
    let kind = match spec.kind.as_deref() {
        None | Some("login") => Kind::Login,
        Some("address") => Kind::Address,
        Some("login-after-address") => Kind::LoginAfterAddress,
        Some("logout") => Kind::Logout,
        Some("login-without-address") => Kind::Unaddressed,
        Some(other) => {
            return Err(format!(
                "pattern \"{id}\": kind = \"{other}\" is not known: expected \"login\", \"address\", \"login-after-address\", \"login-without-address\" or \"logout\""
            ));
        }
    };
    match kind {
        Kind::Login | Kind::Address if !names.contains(&"ip") => {
            return Err(format!(
                "pattern \"{id}\": the regex has no named group \"ip\": capture the client address with (?P<ip>...)"
            ));
        }
        Kind::Unaddressed if names.contains(&"ip") => {
            return Err(format!(
                "pattern \"{id}\": a login-without-address pattern recognises lines that carry no address and must not capture (?P<ip>...)"
            ));
        }
        Kind::LoginAfterAddress if names.contains(&"ip") => {
            return Err(format!(
                "pattern \"{id}\": a login-after-address pattern grants the address of its process's address line and must not capture (?P<ip>...) itself"
            ));
        }
        _ => {}
    }
    Ok(kind)
}

/// How the pattern's logins are held (`hold`), checked against its kind.
fn hold_of(
    spec: &PatternSpec,
    id: &str,
    names: &[&str],
    kind: Kind,
) -> Result<Option<HoldBy>, String> {
    let hold = match spec.hold.as_deref() {
        None => None,
        Some(_)
            if matches!(
                kind,
                Kind::Address | Kind::LoginAfterAddress | Kind::Unaddressed
            ) =>
        {
            return Err(format!(
                "pattern \"{id}\": hold is only for login and logout patterns"
            ));
        }
        Some("session") if names.contains(&"session") => Some(HoldBy::Session),
        Some("session") => {
            return Err(format!(
                "pattern \"{id}\": hold = \"session\" but the regex has no named group \"session\": capture the session id with (?P<session>...)"
            ));
        }
        Some("pid") => Some(HoldBy::Pid),
        Some(other) => {
            return Err(format!(
                "pattern \"{id}\": hold = \"{other}\" is not known: expected \"session\" or \"pid\""
            ));
        }
    };
    if kind == Kind::Logout && hold.is_none() {
        return Err(format!(
            "pattern \"{id}\": a logout pattern needs hold = \"session\" or \"pid\" to say which login it ends"
        ));
    }
    Ok(hold)
}

/// Where the pattern's service comes from.
fn service_of(
    spec: &PatternSpec,
    id: &str,
    names: &[&str],
    kind: Kind,
) -> Result<ServiceFrom, String> {
    let service = match spec.service.as_deref() {
        None if matches!(kind, Kind::Address | Kind::Logout | Kind::Unaddressed) => {
            ServiceFrom::Fixed(Service::Pop3)
        }
        None if names.contains(&"service") => ServiceFrom::Group,
        None => {
            return Err(format!(
                "pattern \"{id}\": say which service it is: service = \"pop3\", \"imap\" or \"program\", or capture (?P<service>...)"
            ));
        }
        Some("program") => ServiceFrom::Program,
        Some(s) => match s {
            "pop3" => ServiceFrom::Fixed(Service::Pop3),
            "imap" => ServiceFrom::Fixed(Service::Imap),
            other => {
                return Err(format!(
                    "pattern \"{id}\": service = \"{other}\" is not known: expected \"pop3\", \"imap\" or \"program\""
                ));
            }
        },
    };
    if let ServiceFrom::Program = service
        && let Some(p) = spec
            .program
            .iter()
            .find(|p| Service::from_text(p).is_none())
    {
        return Err(format!(
            "pattern \"{id}\": service = \"program\" but program \"{p}\" names neither pop3 nor imap: set service = \"pop3\" or \"imap\""
        ));
    }
    Ok(service)
}

/// Whether the pattern's credential is its process (`credential`).
fn process_of(
    spec: &PatternSpec,
    id: &str,
    kind: Kind,
    hold: Option<HoldBy>,
) -> Result<bool, String> {
    let process = match spec.credential.as_deref() {
        None => kind == Kind::LoginAfterAddress,
        Some("uid") if kind == Kind::LoginAfterAddress => {
            return Err(format!(
                "pattern \"{id}\": a login-after-address line may be written by the user who logged in, so its uid is no credential: leave out credential (it is \"process\")"
            ));
        }
        Some("uid") => false,
        Some("process") => true,
        Some(other) => {
            return Err(format!(
                "pattern \"{id}\": credential = \"{other}\" is not known: expected \"uid\" or \"process\""
            ));
        }
    };
    if process && !spec.uids.is_empty() {
        return Err(format!(
            "pattern \"{id}\": its credential is the process (the line may be written as the user who logged in), so uids are not checked: leave them out, and name them on the server's address pattern"
        ));
    }
    if process && kind == Kind::Logout && hold != Some(HoldBy::Pid) {
        return Err(format!(
            "pattern \"{id}\": a logout line whose credential is its process must be paired by it: hold = \"pid\" (the attested pid, which only that process can send)"
        ));
    }
    if process && matches!(kind, Kind::Address | Kind::Unaddressed) {
        return Err(format!(
            "pattern \"{id}\": credential = \"process\" is for lines written after the server switched users (login, login-after-address, logout); an address line's uid is its credential"
        ));
    }
    Ok(process)
}

/// The uids of `accounts`, and the names that do not exist here.
fn resolve(accounts: &[Account]) -> (Vec<u32>, Vec<String>) {
    let mut uids = Vec::new();
    let mut missing = Vec::new();
    for a in accounts {
        match a {
            Account::Uid(n) => uids.push(*n),
            Account::Name(name) => match crate::service::privilege::user(name) {
                Ok(u) => uids.push(u.uid),
                Err(_) => missing.push(name.clone()),
            },
        }
    }
    (uids, missing)
}

/// Parses an address as servers write it: brackets around it are allowed,
/// IPv6 in any case, IPv4-mapped IPv6 kept (the address policy folds it).
fn parse_ip(text: &str) -> Result<IpAddr, std::net::AddrParseError> {
    text.trim_start_matches('[').trim_end_matches(']').parse()
}

/// Where a continuation record is looked for: who reported it, the host
/// name in the record and the syslog tag (no process id: courierlogger's
/// lines carry none in the tag, and one logger serves every session).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CutKey {
    /// The reporting peer (socket path or address).
    pub reporter: String,
    /// The host name in the record (`-` when it has none).
    pub host: String,
    /// The syslog tag.
    pub program: String,
}

/// The most loggers with a cut line waiting for its continuation; when
/// full, every record of a program whose logger cuts lines is taken as a
/// continuation (nothing believed) until the waiting ones are seen.
pub const CUT_ENTRIES: usize = 4096;

/// Lines a server's logger cut. courierlogger reads a daemon's standard
/// error into a 512-byte buffer and logs a longer line as several records,
/// one after the other: the later ones begin wherever the cut fell, in the
/// middle of the user's text, so a failed login's user name can be made to
/// continue as "LOGIN, user=a" followed by the server's real
/// ", ip=[CLIENT], port=[P]": a success line that no server wrote. A
/// record that comes after a cut one from the same logger continues it,
/// and nothing in it is believed.
#[derive(Debug, Default)]
pub struct CutLines {
    waiting: Mutex<std::collections::HashSet<CutKey>>,
}

impl CutLines {
    /// An empty set.
    pub fn new() -> CutLines {
        CutLines::default()
    }

    /// Notes a record of a program whose logger cuts lines, `cut` when it
    /// is as long as the cut; returns true when it continues a cut line
    /// (the logger's last record was cut).
    pub fn continues(&self, key: CutKey, cut: bool) -> bool {
        let mut w = match self.waiting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let was_cut = w.remove(&key);
        let full = w.len() >= CUT_ENTRIES;
        if cut && !full {
            w.insert(key);
        }
        was_cut || full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::record::parse_str;

    #[test]
    fn builtin_patterns_load() {
        let m = Matchers::builtin();
        assert!(m.pattern_ids().len() >= 4);
    }

    #[test]
    fn dovecot_login_matches() {
        let m = Matchers::builtin();
        let r = parse_str("Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1234, session=<abcDEF12>").unwrap();
        match m.match_record(&r) {
            Outcome::Login(l) => {
                assert_eq!(l.ip.to_string(), "192.0.2.7");
                assert_eq!(l.service, Service::Pop3);
                assert_eq!(l.user, "alice");
                assert_eq!(&*l.server, "dovecot");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn server_fields_and_delimiters_come_from_the_regex() {
        assert_eq!(
            regex_fields(r"(?:method=[A-Za-z]+|lip=\S+), user=<(?P<user>.*)>, rip=(?P<ip>x)"),
            ["method=", "lip=", "user=", "rip="]
        );
        assert!(regex_fields(r"[A-Za-z]+=(?:[^;]|;;)*;[a-z=]\w=").is_empty());
        assert_eq!(regex_fields(r"\[(?:[A-Za-z]+=x;)*ip=(?P<ip>y);"), ["ip="]);
        assert_eq!(
            regex_delimiter(r"user=<(?P<user>.*)>(?:, x)", "user").as_deref(),
            Some(">")
        );
        assert_eq!(
            regex_delimiter(r"User '(?P<user>[^']*)' logged in from (?P<ip>.+)", "user").as_deref(),
            Some("' logged in from ")
        );
        assert_eq!(
            regex_delimiter(r"\((?P<user>.*)\)<\d+>", "user").as_deref(),
            Some(")<")
        );
        assert_eq!(
            regex_delimiter(r"user=(?P<user>.{1,100}), ip=\[(?P<ip>x)\]", "user").as_deref(),
            Some(", ip=[")
        );
        assert_eq!(regex_delimiter(r"for (?P<user>.*)", "user"), None);
        assert_eq!(
            regex_delimiter(r"(?P<user>a(?:b)c) xy?z", "user").as_deref(),
            Some(" x")
        );
        assert_eq!(field_count("rip=1, lip=2, oip=3, xrip=4", "rip="), 1);
        assert_eq!(field_count("[ip=1;oip=2;ua=x;;ip=3;]", "ip="), 2);
    }

    #[test]
    fn a_field_the_server_left_out_cannot_be_supplied_by_the_user() {
        // Issue 13, class 3: Dovecot wrote no rip= (a unix socket), the
        // user name "eve>, rip=203.0.113.9, lip=10.0.0.1, mpid=1,
        // session=<abc" supplied one. This line was granted 203.0.113.9.
        let m = Matchers::builtin();
        let r = parse_str("<22>Dec  1 18:30:00 dovecot: imap-login: Login: user=<eve>, rip=203.0.113.9, lip=10.0.0.1, mpid=1, session=<abc>, method=PLAIN, mpid=4242, session=<Rb0F8x8s4NzAAAAB>").unwrap();
        let Outcome::Ambiguous { pattern, why } = m.match_record(&r) else {
            panic!("{:?}", m.match_record(&r))
        };
        assert_eq!(&*pattern, "dovecot-login");
        assert_eq!(why, Ambiguity::Repeated("mpid=".into()));
        assert_eq!(
            why.to_string(),
            "the field \"mpid=\", which the server writes once, appears more than once"
        );
        // A field inside the user's text, and the text that ends it.
        let r = parse_str("<22>Nov 23 10:00:01 mail imapd: LOGIN, user=a, port=[1], ip=[192.0.2.7], protocol=IMAP").unwrap();
        assert!(matches!(
            m.match_record(&r),
            Outcome::Ambiguous {
                why: Ambiguity::Inside { group: "user", .. },
                ..
            }
        ));
        let r = parse_str("<22>Mar 10 09:03:03 mail solid-pop3d[813]: user x authenticated - 1.2.3.4 authenticated - 192.0.2.72").unwrap();
        assert!(matches!(
            m.match_record(&r),
            Outcome::Ambiguous {
                why: Ambiguity::Undelimited { group: "user", .. },
                ..
            }
        ));
    }

    #[test]
    fn an_address_joined_to_the_user_by_one_character_must_split_one_way() {
        assert_eq!(
            regex_glue("success (?P<user>[^\\s:]+):(?P<ip>[0-9.:]+)"),
            Some(("user", ':'))
        );
        assert_eq!(
            regex_glue("(?P<user>\\S+) (?P<ip>[0-9.]{7,15}) \\d+"),
            Some(("user", ' '))
        );
        assert_eq!(
            regex_glue("user=(?P<user>.*) host=\\[(?P<ip>[0-9.]+)\\]"),
            None
        );
        let m = Matchers::builtin();
        let line = |tail: &str| {
            format!(
                "<22>Nov 24 10:00:01 mail vpopmail[1]: vchkpw-pop3: (PLAIN) login success {tail}"
            )
        };
        for tail in [
            "\":2001:db8::bad:11.0.0.1",
            "a@b:1:192.0.2.7",
            "a@b:2001:db8::1",
        ] {
            let text = line(tail);
            let r = parse_str(&text).unwrap();
            let Outcome::Ambiguous { why, .. } = m.match_record(&r) else {
                panic!("{tail}: {:?}", m.match_record(&r))
            };
            assert_eq!(
                why,
                Ambiguity::Split {
                    glue: ':',
                    group: "user"
                }
            );
            assert_eq!(
                why.to_string(),
                "the user text and the address, joined by \":\", split into another address at another \":\""
            );
        }
        // One address however it is split: IPv4, IPv4-mapped, full IPv6.
        for (tail, ip) in [
            ("a@b:192.0.2.7", "192.0.2.7"),
            ("a@b:::ffff:192.0.2.7", "::ffff:192.0.2.7"),
            ("a@b:2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ] {
            let text = line(tail);
            let r = parse_str(&text).unwrap();
            let Outcome::Login(l) = m.match_record(&r) else {
                panic!("{tail}: {:?}", m.match_record(&r))
            };
            assert_eq!(l.ip, ip.parse::<IpAddr>().unwrap(), "{tail}");
        }
    }

    fn custom(src: &str) -> Result<Matchers, (bool, PatternError)> {
        let specs = parse_pattern_specs(src).unwrap();
        let pairs: Vec<_> = specs.into_iter().map(|s| (s, src)).collect();
        Matchers::new(&pairs)
    }

    #[test]
    fn accounts_are_resolved_and_named_at_start() {
        let base = "[[pattern]]\nid = \"mine\"\nserver = \"myserver\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nexecutables = [\"/usr/sbin/mypop\"]\nregex = 'OK (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n";
        let m = custom(&format!(
            "{base}uids = [\"root\", 7, \"no-such-account-here\"]\n"
        ))
        .unwrap();
        let p = m.patterns.iter().find(|p| &*p.id == "mine").unwrap();
        assert_eq!(p.speakers.uids, [0, 7]);
        let notes = m.attestation_notes(true);
        assert!(
            notes[0].1.contains("no-such-account-here (mine)"),
            "{notes:?}"
        );
        // nobody: a warning.
        let m = custom(&format!("{base}uids = [\"nobody\"]\n")).unwrap();
        let notes = m.attestation_notes(true);
        assert!(
            notes.iter().any(|(warn, n)| *warn
                && n.starts_with("patterns mine accept lines from the account nobody")),
            "{notes:?}"
        );
        // No uids at all.
        let m = custom(base).unwrap();
        let notes = m.attestation_notes(true);
        assert!(
            notes.iter().any(|(_, n)| n
                .contains("with require-attestation they grant nothing: gnu-pop3d-login, cucipop-session, qpopper-stats, mine")),
            "{notes:?}"
        );
        // A process credential needs an address pattern of its server, and
        // takes no uids.
        let e = custom(&format!("{base}credential = \"process\"\n"))
            .unwrap_err()
            .1;
        assert!(
            e.message.contains("needs an address pattern"),
            "{}",
            e.message
        );
        let e = custom(&format!("{base}credential = \"process\"\nuids = [0]\n"))
            .unwrap_err()
            .1;
        assert!(e.message.contains("uids are not checked"), "{}", e.message);
        let e = custom(&format!("{base}credential = \"uidd\"\n"))
            .unwrap_err()
            .1;
        assert!(e.message.contains("is not known"), "{}", e.message);
    }

    #[test]
    fn custom_pattern_errors_are_precise() {
        let src = "[[pattern]]\nserver = \"x\"\nprogram = [\"x\"]\nservice = \"imap\"\nregex = 'login from (?P<addr>\\S+)'\n";
        let specs = parse_pattern_specs(src).unwrap();
        let pairs: Vec<_> = specs.into_iter().map(|s| (s, src)).collect();
        let (builtin, e) = Matchers::new(&pairs).unwrap_err();
        assert!(!builtin);
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("no named group \"ip\""), "{}", e.message);

        let src = "[[pattern]]\nserver = \"x\"\nprogram = [\"x\"]\nregex = '(?P<ip>\\S+'\n";
        let specs = parse_pattern_specs(src).unwrap();
        let pairs: Vec<_> = specs.into_iter().map(|s| (s, src)).collect();
        let (_, e) = Matchers::new(&pairs).unwrap_err();
        assert!(e.message.contains("bad regex"), "{}", e.message);
    }

    #[test]
    fn custom_pattern_grants() {
        let src = "[[pattern]]\nid = \"mine\"\nserver = \"myserver\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n";
        let specs = parse_pattern_specs(src).unwrap();
        let pairs: Vec<_> = specs.into_iter().map(|s| (s, src)).collect();
        let m = Matchers::new(&pairs).unwrap();
        let r = parse_str("<22>Nov 23 10:00:01 mypop[3]: OK login bob from 198.51.100.4").unwrap();
        let Outcome::Login(l) = m.match_record(&r) else {
            panic!()
        };
        assert_eq!(&*l.pattern, "mine");
        assert_eq!(l.ip.to_string(), "198.51.100.4");
        // Anchored: trailing text defeats the match.
        let r =
            parse_str("<22>Nov 23 10:00:01 mypop[3]: OK login bob from 198.51.100.4 x").unwrap();
        assert_eq!(m.match_record(&r), Outcome::NoMatch);
    }
}

#[cfg(test)]
mod prefilter_tests {
    use super::*;
    use crate::ingest::record::parse_str;

    /// Every line of every sample file (its annotation aside) that any
    /// pattern recognises, in any way, passes the prefilter; with logout
    /// patterns off, every line the other patterns recognise does.
    #[test]
    fn the_prefilter_lets_every_recognised_sample_line_through() {
        let m = Matchers::builtin();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("tests/samples") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("sample");
            for (i, line) in text.lines().enumerate() {
                if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                }
                let Ok(rec) = parse_str(line) else { continue };
                let at = format!("{}:{}", path.display(), i + 1);
                if m.match_record_with(&rec, true) != Outcome::NoMatch {
                    assert!(m.may_match_with(line.as_bytes(), true), "{at}");
                    assert!(m.may_match(line.as_bytes()), "{at}");
                    seen += 1;
                }
                if m.match_record_with(&rec, false) != Outcome::NoMatch {
                    assert!(m.may_match_with(line.as_bytes(), false), "{at}");
                }
                // A program whose logger cuts lines is always seen.
                if m.line_limit(rec.program).is_some() {
                    assert!(m.may_match_with(line.as_bytes(), false), "{at}");
                }
            }
        }
        assert!(seen > 200, "only {seen} recognised sample lines");
    }

    #[test]
    fn the_prefilter_stops_common_noise() {
        let m = Matchers::builtin();
        for line in [
            "Dec  2 01:00:01 mail1 postfix/smtpd[1234]: connect from unknown[198.51.1.2]",
            "Dec  2 01:00:01 mail1 postfix/qmgr[345]: 0000ABCDE: from=<alice@example.net>, size=1234, nrcpt=1 (queue active)",
            "<30>Nov 24 10:00:01 mail1 systemd[1]: Started session 42 of user alice.",
        ] {
            assert!(!m.may_match_with(line.as_bytes(), true), "{line}");
        }
        // A Dovecot mail process's logout line matters only for holds.
        let logout = "Dec  2 01:00:01 mail1 dovecot: imap(alice)<7002><k0000abcd>: Disconnected: Logged out in=12 out=477";
        assert!(m.may_match_with(logout.as_bytes(), true));
        assert!(!m.may_match_with(logout.as_bytes(), false));
        let login = "Dec  2 01:00:01 mail1 dovecot: imap-login: Login: user=<u1>, method=PLAIN, rip=10.0.0.1, lip=192.0.2.1, mpid=7001, TLS, session=<k00000001>";
        assert!(m.may_match_with(login.as_bytes(), false));
    }

    #[test]
    fn required_literals_are_found_or_refused() {
        let lits = required_literals("^(?:(?:imap|pop3)-login: Login: user=<(?P<user>.*)>)$")
            .expect("literals");
        assert!(lits.iter().all(|l| l.len() >= 3), "{lits:?}");
        assert!(required_literals("^(?:.*x)$").is_none());
        assert!(required_literals("^(?:(?P<ip>[0-9.]+))$").is_none());
    }

    #[test]
    fn a_custom_pattern_without_literals_falls_back_to_its_program() {
        let src = "[[pattern]]\nid = \"mine\"\nserver = \"mine\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nregex = '''(?P<ip>[0-9.]+) (?P<user>\\S+)'''\n";
        let specs = parse_pattern_specs(src).expect("spec");
        let m = Matchers::new(&[(specs[0].clone(), src)]).expect("matchers");
        let line = "<22>Nov 23 10:00:01 mail mypop[3]: 198.51.100.4 bob";
        assert!(m.may_match_with(line.as_bytes(), false));
        let rec = parse_str(line).unwrap();
        assert!(matches!(m.match_record(&rec), Outcome::Login(_)));
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// Of the required prefixes and suffixes, the prefilter takes the set
    /// whose shortest literal is longer (the more selective one).
    #[test]
    fn the_prefilter_takes_the_longer_of_prefix_and_suffix_literals() {
        assert_eq!(
            required_literals("^(?:abc.*defgh)$"),
            Some(vec![b"defgh".to_vec()])
        );
        assert_eq!(
            required_literals("^(?:abcdefg.*xyz)$"),
            Some(vec![b"abcdefg".to_vec()])
        );
        // A tie keeps the prefixes.
        assert_eq!(
            required_literals("^(?:abc.*xyz)$"),
            Some(vec![b"abc".to_vec()])
        );
    }

    /// The same process remembered again and again leaves stale order
    /// entries; the order is rebuilt from the map when it holds more than
    /// four times `MEMORY_ENTRIES`, and not before.
    #[tokio::test(start_paused = true)]
    async fn stale_memory_order_entries_are_dropped_exactly_past_the_bound() {
        let m = Matchers::builtin();
        let memory = AddressMemory::new();
        let now = Instant::now();
        let line = "<22>Dec  1 21:33:29 mail popa3d[7]: Session from 192.0.2.1";
        let rec = crate::ingest::record::parse_str(line).unwrap();
        let remember = || {
            let key = ProcessKey::of("127.0.0.1".to_string(), &rec, rec.pid);
            memory.pair(key, m.match_record(&rec), now, false);
        };
        for _ in 0..4 * MEMORY_ENTRIES + 1 {
            remember();
        }
        assert_eq!(memory.lock().order.len(), 4 * MEMORY_ENTRIES + 1);
        remember();
        assert_eq!(memory.lock().order.len(), 2);
        assert_eq!(memory.len(), 1);
    }
}
