//! The per-datagram stage: parse, match, attest, check the address, grant.
//!
//! Consumes: one datagram's bytes and the [`Peer`] the kernel reported;
//! or a login another input reported, already typed ([`Reported`], from
//! [`crate::ingest::authpolicy`]), which joins at the address rules.
//! Produces: a grant, renewal or hold in the table, or a counted and logged
//! refusal; one log line per decision. Two steps: [`decide`] turns the
//! bytes and their [`Transport`] into one [`Decision`] (a grant, or a
//! [`Refusal`] with its reason), changing only the two-line and cut-line
//! memories; [`Pipeline::apply`] carries it out (table, counters, log).
//! `smtp-after-popd match` ([`crate::service::inspect`]) prints the same
//! decisions.
//! Trusts: what each stage's module doc says it trusts (the attestation is
//! believed only on listeners declared `?attested=yes`, from unix sockets
//! and `--trust-attestation-from` peers, in the attested rule's exact
//! form; a line whose credential is its process only after an attested
//! address line of the same process); this module adds no trust of its
//! own.
//! Its settings ([`Settings`]) are replaced as a whole by a reload; the
//! table, the two-line memory and the open sessions stay.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::grants::addr::{AddressPolicy, Cidr};
use crate::grants::table::{Grant, GrantResult, GrantTable, Names};
use crate::ingest::attest::{self, Verdict};
use crate::ingest::receiver::Peer;
use crate::ingest::record::{self, ParseError};
use crate::logging::{RateLimit, escape};
use crate::recognise::hold::{Closed, Holds, SessionKey};
use crate::recognise::matcher::{
    AddressMemory, Ambiguity, CutKey, CutLines, Login, Matchers, Outcome, ProcessKey,
};
use crate::service::config::{Config, format_duration};
use crate::stats::Stats;
use crate::swap::Swap;

/// The settings a reload (SIGHUP) may change, read by each datagram.
pub struct Settings {
    /// The login patterns.
    pub matchers: Matchers,
    /// The never-grant rules.
    pub policy: AddressPolicy,
    /// The window after each login.
    pub window: Duration,
    /// Whether a login needs an attested sender.
    pub require_attestation: bool,
    /// Network peers whose attestation is believed (unix sockets always).
    pub trust_attestation_from: Vec<Cidr>,
    /// Proxies whose report of a client's address is believed.
    pub trusted_proxy: Vec<Cidr>,
    /// Whether open sessions hold their address's grant.
    pub hold_while_connected: bool,
    /// The longest a session holds its grant after its login.
    pub hold_max: Duration,
}

impl Settings {
    /// The reloadable part of a configuration.
    pub fn of(config: &Config) -> Settings {
        Settings {
            matchers: config.matchers.clone(),
            policy: AddressPolicy::new(config.never_and_proxies()).with_ipv6_prefix(
                config.ipv6_prefix,
                config.map.is_some() || !config.memcache.is_empty(),
            ),
            window: config.window,
            require_attestation: config.require_attestation,
            trust_attestation_from: config.trust_attestation_from.clone(),
            trusted_proxy: config.trusted_proxy.clone(),
            hold_while_connected: config.hold_while_connected,
            hold_max: config.hold_max,
        }
    }
}

/// What happens to one datagram: parse, match, check, grant.
pub struct Pipeline {
    /// Patterns, rules and window, replaced as a whole by a reload.
    pub settings: Swap<Settings>,
    /// Where grants go.
    pub table: Arc<GrantTable>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Reporter and host names shared by the grants they made.
    pub names: Names,
    /// Address lines of two-line servers, waiting for their success line
    /// (kept across reloads).
    pub memory: AddressMemory,
    /// Sessions still open (`--hold-while-connected`; kept across reloads).
    pub holds: Holds,
    /// Logins refused because the table was full since the last summary
    /// ([`Pipeline::full_summary`]).
    refused_full: AtomicU64,
    /// Loggers whose last record was cut (kept across reloads).
    pub cut: CutLines,
}

/// How often a full table's refusals are summed up in the log.
pub const FULL_SUMMARY_EVERY: Duration = Duration::from_secs(60);

static INPUT_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);
static REFUSAL_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 20);

impl Pipeline {
    /// A pipeline with these settings, granting into `table`.
    pub fn new(settings: Settings, table: Arc<GrantTable>, stats: Arc<Stats>) -> Pipeline {
        Pipeline {
            settings: Swap::new(settings),
            table,
            stats,
            names: Default::default(),
            memory: AddressMemory::new(),
            holds: Holds::new(),
            cut: CutLines::new(),
            refused_full: AtomicU64::new(0),
        }
    }

    /// The line that says how many logins the full table refused since the
    /// last call, while it is full or if it refused any; `None` otherwise.
    /// The per-refusal lines are rate-limited with every other refusal
    /// (20 a minute), so under a flood of forgeries a real user's refusal
    /// may not be among them: this summary, written once a minute by
    /// [`Pipeline::run_full_summary`], is not.
    pub fn full_summary(&self) -> Option<String> {
        let refused = self.refused_full.swap(0, Ordering::Relaxed);
        let (len, limit) = (self.table.len(), self.table.limit());
        let full = len >= limit;
        if refused == 0 && !full {
            return None;
        }
        Some(format!(
            "the grant table {} ({len} grants, --max-grants {limit}): {refused} login(s) from new addresses refused in the last minute (refused_full counts them all); raise --max-grants or shorten --window",
            if full { "is full" } else { "was full" }
        ))
    }

    /// Writes [`Pipeline::full_summary`] through `emit` once a minute, for
    /// ever.
    pub async fn run_full_summary(self: Arc<Self>, emit: impl Fn(&str) + Send + 'static) {
        let start = tokio::time::Instant::now() + FULL_SUMMARY_EVERY;
        let mut tick = tokio::time::interval_at(start, FULL_SUMMARY_EVERY);
        loop {
            tick.tick().await;
            if let Some(line) = self.full_summary() {
                emit(&line);
            }
        }
    }

    /// The shared copy of a name.
    fn shared(&self, name: &str) -> Arc<str> {
        self.names.get(name)
    }

    /// Handles one datagram from `peer`, on a listener not declared to
    /// carry the attested rule.
    pub fn handle(&self, bytes: &[u8], peer: &Peer) {
        self.handle_on(bytes, peer, false);
    }

    /// Handles one datagram from `peer`, on a listener declared to carry
    /// the attested rule (`?attested=yes`) if `attested`: [`decide`], then
    /// [`Pipeline::apply`].
    pub fn handle_on(&self, bytes: &[u8], peer: &Peer, attested: bool) {
        let settings = self.settings.load();
        // The common case first, without reading the clock.
        if skippable(&settings, bytes) {
            Stats::bump(&self.stats.skipped);
            return;
        }
        let now = tokio::time::Instant::now();
        let transport = Transport { peer, attested };
        let decided = decide(&settings, &self.memory, &self.cut, bytes, transport, now);
        self.apply(&settings, decided, bytes, peer, now);
    }

    /// Carries out a decision: the grant table, the counters and the
    /// (rate-limited) log line.
    fn apply(
        &self,
        s: &Settings,
        d: Decided<'_>,
        bytes: &[u8],
        peer: &Peer,
        now: tokio::time::Instant,
    ) {
        if d.addresses_dropped > 0 {
            self.stats
                .addresses_dropped
                .fetch_add(d.addresses_dropped as u64, Ordering::Relaxed);
        }
        let by = By::Record(peer, &d.sender);
        let host = d.rec.as_ref().and_then(|r| r.hostname).unwrap_or("-");
        match d.decision {
            Decision::Skipped => Stats::bump(&self.stats.skipped),
            Decision::Dropped(e) => {
                Stats::bump(match e {
                    ParseError::TooLong => &self.stats.dropped_too_long,
                    ParseError::InvalidUtf8 => &self.stats.dropped_invalid_utf8,
                    ParseError::NoProgram => &self.stats.dropped_unparsed,
                });
                crate::log_warning_limited!(INPUT_WARNINGS, "datagram from {peer} dropped: {e}");
            }
            Decision::NoMatch => {
                if let Some(rec) = &d.rec {
                    crate::log_debug!(
                        "no login in record from {peer}: program \"{}\", message \"{}\"",
                        escape(rec.program),
                        escape(rec.message)
                    );
                }
            }
            Decision::Remembered { pattern } => {
                Stats::bump(&self.stats.addresses_remembered);
                crate::log_debug!(
                    "address remembered for the success line of the same process (pattern {pattern}, reported by {peer})"
                );
            }
            Decision::Logout(l) => self.logout(s, l, host, &d.sender, peer, now),
            Decision::Grant(a) => {
                Stats::bump(&self.stats.logins);
                self.grant(s, a, by, host, now);
            }
            Decision::Refused(r) => {
                if r.login().is_some() {
                    Stats::bump(&self.stats.logins);
                }
                Stats::bump(r.counter(&self.stats));
                self.log_refusal(&r, &by, d.rec.as_ref(), bytes);
            }
        }
    }

    /// The log line of a refusal, rate-limited with the others of its
    /// kind.
    fn log_refusal(
        &self,
        r: &Refusal,
        by: &By<'_>,
        rec: Option<&record::Record<'_>>,
        bytes: &[u8],
    ) {
        let message = rec.map_or("", |r| r.message);
        match r {
            Refusal::Forged { why } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "record from {by} refused: forgery: {why} (\"{}\")",
                escape(&String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))
            ),
            Refusal::Continuation { limit } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "record from {by} continues a line that the logger of \"{}\" cut (its last record was {limit} bytes or more): nothing in it is believed: \"{}\"",
                escape(rec.map_or("", |r| r.program)),
                escape(message)
            ),
            Refusal::Ambiguous { pattern, why } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "line from {by} matched pattern {pattern} but is ambiguous: {why}; a user name or other client text may stand for the server's own: nothing granted (message \"{}\")",
                escape(message)
            ),
            Refusal::BadAddress { .. }
            | Refusal::Unaddressed { .. }
            | Refusal::NoAddress { .. } => crate::log_warning_limited!(
                INPUT_WARNINGS,
                "line from {by} {}: nothing granted",
                r.detail()
            ),
            Refusal::ForgedLine { what, why, pattern } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "{what}: forgery: {why} (pattern {pattern}, reported by {by})"
            ),
            Refusal::UntrustedProxy { login, via } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "refuse {}: the address was reported by the proxy {via}, which is not a --trusted-proxy ({}); add the proxy's address to trusted-proxy if it is yours",
                login.ip,
                About(login, by)
            ),
            Refusal::ForgedLogin { login, .. }
            | Refusal::ForgedProcessLine { login }
            | Refusal::Address { login, .. } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "refuse {}: {} ({})",
                login.ip,
                r.detail(),
                About(login, by)
            ),
            Refusal::ProxyOwn { login, client, .. } => crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "refuse {client}: {} ({})",
                r.detail(),
                About(login, by)
            ),
        }
    }

    /// A login reported by an input other than a syslog record (Dovecot's
    /// auth-policy client, [`crate::ingest::authpolicy`]): typed, so nothing is
    /// parsed or attested here; it goes through the same address rules,
    /// table and log line as a logged login, and the same login from both
    /// inputs is one grant (the second renews it).
    pub fn reported(&self, r: &Reported<'_>) {
        let settings = self.settings.load();
        Stats::bump(&self.stats.logins);
        let login = Login {
            ip: r.ip,
            server: self.shared(r.server),
            service: r.service,
            user: r.user.to_string(),
            pattern: self.shared(r.input),
            speakers: Default::default(),
            // Logout lines pair with the sessions syslog opened; a report
            // opens none, and does not cut one short.
            session: None,
            address_pattern: None,
            via: None,
        };
        let by = By::Input(r.input, r.peer);
        let now = tokio::time::Instant::now();
        match admit(&settings, login) {
            Decision::Grant(a) => self.grant(&settings, a, by, "-", now),
            Decision::Refused(r) => {
                Stats::bump(r.counter(&self.stats));
                self.log_refusal(&r, &by, None, b"");
            }
            _ => {}
        }
    }

    /// A login the address rules admitted: into the table, and the log
    /// line.
    fn grant(
        &self,
        s: &Settings,
        a: Admitted,
        peer: By<'_>,
        host: &str,
        now: tokio::time::Instant,
    ) {
        let Admitted {
            login,
            block: key,
            ip: login_ip,
            narrowed,
        } = a;
        // The open sessions are held by the block's network address.
        let ip = key.addr();
        let reporter = self.shared(&peer.to_string());
        let (expires, held) = self.hold(s, &login, ip, &peer, host, now);
        let grant = Grant {
            expires,
            server: login.server.clone(),
            service: login.service,
            user: login.user.as_str().into(),
            reporter: reporter.clone(),
            host: self.shared(host),
        };
        let verb = match self.table.grant_block(key, grant) {
            GrantResult::New => {
                Stats::bump(&self.stats.granted);
                "grant"
            }
            GrantResult::Renewed => {
                Stats::bump(&self.stats.renewed);
                "renew"
            }
            GrantResult::Full => {
                Stats::bump(&self.stats.refused_full);
                self.refused_full.fetch_add(1, Ordering::Relaxed);
                if let Some(key) = held {
                    self.holds.close(&key, Some(ip), now, s.hold_max);
                }
                crate::log_warning_limited!(
                    REFUSAL_WARNINGS,
                    "refuse {}: the table is full ({} grants, --max-grants) ({})",
                    key.shown(),
                    self.table.len(),
                    About(&login, &peer)
                );
                return;
            }
        };
        let how_long = if held.is_some() {
            format!(
                "{} after the session ends (held while it is open, at most {})",
                format_duration(s.window),
                format_duration(s.hold_max)
            )
        } else if expires > now + s.window {
            format!("{} (held by open sessions)", format_duration(s.window))
        } else {
            format_duration(s.window)
        };
        let what = match &narrowed {
            Some(why) => format!("{login_ip} alone ({why})"),
            None if !key.is_host() => format!("{} (login from {login_ip})", key.shown()),
            None => login_ip.to_string(),
        };
        crate::log_info!(
            "{verb} {what} for {how_long}: {} {} login of user \"{}\" (pattern {}, host {}, reported by {peer})",
            login.server,
            login.service,
            escape(&login.user),
            login.pattern,
            escape(host)
        );
    }

    /// When a grant for `login` ends, and the session it holds
    /// (`--hold-while-connected`): a login with a session id holds its
    /// address while the session is open; one without does not cut short
    /// a hold that another session has.
    fn hold(
        &self,
        s: &Settings,
        login: &Login,
        ip: std::net::IpAddr,
        peer: &By<'_>,
        host: &str,
        now: tokio::time::Instant,
    ) -> (tokio::time::Instant, Option<SessionKey>) {
        let mut expires = now + s.window;
        let mut held = None;
        if s.hold_while_connected {
            let until = match &login.session {
                Some(id) => {
                    let key = SessionKey {
                        reporter: self.shared(&peer.sender()),
                        host: host.to_string(),
                        server: login.server.clone(),
                        id: id.clone(),
                    };
                    let until = self.holds.open(key.clone(), ip, now, s.hold_max);
                    match until {
                        Some(_) => {
                            Stats::bump(&self.stats.holds_opened);
                            held = Some(key);
                        }
                        None => {
                            Stats::bump(&self.stats.holds_refused);
                            crate::log_warning_limited!(
                                REFUSAL_WARNINGS,
                                "{ip}: session not held, too many open ({} per address at most, {} in all); the window alone applies",
                                crate::recognise::hold::MAX_PER_ADDRESS,
                                crate::recognise::hold::MAX_SESSIONS
                            );
                        }
                    }
                    until
                }
                // A login that is not paired (another server, POP3 without
                // a session id) does not cut short a hold.
                None => self.holds.held_until(ip, now, s.hold_max),
            };
            if let Some(t) = until {
                expires = expires.max(t);
            }
        }
        (expires, held)
    }

    /// A logout line, attested: closes its session; the last one from an
    /// address lets the window run from now.
    fn logout(
        &self,
        s: &Settings,
        l: LogoutLine,
        host: &str,
        sender: &str,
        peer: &Peer,
        now: tokio::time::Instant,
    ) {
        let LogoutLine {
            ip,
            server,
            session,
            user,
            pattern,
        } = l;
        let ip = ip.and_then(|ip| {
            s.policy
                .check(ip)
                .ok()
                .map(|ip| s.policy.scope(ip).0.addr())
        });
        let closed = match session {
            None => Closed::Unknown,
            Some(id) => {
                let key = SessionKey {
                    reporter: self.shared(sender),
                    host: host.to_string(),
                    server,
                    id,
                };
                self.holds.close(&key, ip, now, s.hold_max)
            }
        };
        match closed {
            Closed::Unknown => {
                Stats::bump(&self.stats.logouts_unpaired);
                crate::log_debug!(
                    "logout of user \"{}\" closes no held session (pattern {pattern}, reported by {peer})",
                    escape(&user)
                );
            }
            Closed::StillOpen(ip, n) => {
                Stats::bump(&self.stats.holds_closed);
                crate::log_info!(
                    "logout from {ip} of user \"{}\": {n} session(s) still open, grant still held (pattern {pattern}, reported by {peer})",
                    escape(&user)
                );
            }
            Closed::Last(ip) => {
                Stats::bump(&self.stats.holds_closed);
                if self
                    .table
                    .set_block_expiry(s.policy.scope(ip).0, now + s.window)
                {
                    crate::log_info!(
                        "logout from {ip} of user \"{}\": last session closed, grant ends in {} (pattern {pattern}, reported by {peer})",
                        escape(&user),
                        format_duration(s.window)
                    );
                }
            }
        }
    }
}

/// A login reported by an input other than a syslog record
/// ([`Pipeline::reported`]).
#[derive(Clone, Copy, Debug)]
pub struct Reported<'a> {
    /// The client address, as the input gave it.
    pub ip: std::net::IpAddr,
    /// The server software, e.g. `dovecot`.
    pub server: &'a str,
    /// POP3 or IMAP.
    pub service: crate::recognise::matcher::Service,
    /// The user name (untrusted text).
    pub user: &'a str,
    /// The input, as the log names it: `auth-policy`.
    pub input: &'static str,
    /// Its peer, as the network layer names it (`tcp:192.0.2.1:40000`).
    pub peer: &'a str,
}

/// Who reported a login: a syslog record's sender, or another input and
/// its peer.
#[derive(Clone, Copy)]
enum By<'a> {
    /// The peer, and who sent it as [`sender_of`] names it.
    Record(&'a Peer, &'a str),
    Input(&'static str, &'a str),
}

impl By<'_> {
    /// Who sent it, for pairing a session with its logout line.
    fn sender(&self) -> String {
        match self {
            By::Record(_, sender) => sender.to_string(),
            By::Input(..) => self.to_string(),
        }
    }
}

impl std::fmt::Display for By<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            By::Record(peer, _) => write!(f, "{peer}"),
            By::Input(input, peer) => write!(f, "{input} {peer}"),
        }
    }
}

/// A login as refusal lines describe it: `dovecot imap login of user
/// "alice", pattern dovecot-login, reported by unix:/run/...`.
struct About<'a>(&'a Login, &'a dyn std::fmt::Display);

impl std::fmt::Display for About<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let About(l, peer) = self;
        write!(
            f,
            "{} {} login of user \"{}\", pattern {}, reported by {peer}",
            l.server,
            l.service,
            escape(&l.user),
            l.pattern
        )
    }
}

/// What a datagram comes with besides its bytes: the transport facts
/// trust is drawn from.
#[derive(Clone, Copy, Debug)]
pub struct Transport<'a> {
    /// Who sent it, as the kernel reported.
    pub peer: &'a Peer,
    /// Whether its listener is declared to carry the attested rule
    /// (`?attested=yes`).
    pub attested: bool,
}

/// What [`decide`] made of one datagram.
#[derive(Debug)]
pub struct Decided<'a> {
    /// The record, once parsed.
    pub rec: Option<record::Record<'a>>,
    /// Who sent it, as the two-line memory and the sessions name senders
    /// (empty before the record is parsed).
    pub sender: String,
    /// Remembered addresses dropped unused while pairing (counted).
    pub addresses_dropped: usize,
    /// What the daemon does with it.
    pub decision: Decision,
}

/// The one outcome of a datagram.
#[derive(Debug)]
pub enum Decision {
    /// It names none of the patterns' programs: not even parsed.
    Skipped,
    /// It is not a syslog record.
    Dropped(ParseError),
    /// No pattern recognised it.
    NoMatch,
    /// An address line of a two-line server, remembered for the success
    /// line of its process.
    Remembered {
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// A logout line whose sender may speak for its pattern.
    Logout(LogoutLine),
    /// A login that passed every check: granted (unless the table is
    /// full).
    Grant(Admitted),
    /// Refused, and why.
    Refused(Refusal),
}

/// A logout line ([`Decision::Logout`]).
#[derive(Debug)]
pub struct LogoutLine {
    /// The client address, if the line names one.
    pub ip: Option<IpAddr>,
    /// The server software.
    pub server: Arc<str>,
    /// The session id or process id its login was paired by.
    pub session: Option<String>,
    /// The user name (untrusted text).
    pub user: String,
    /// The pattern that matched.
    pub pattern: Arc<str>,
}

/// A login the address rules admitted ([`Decision::Grant`]).
#[derive(Debug)]
pub struct Admitted {
    /// The login.
    pub login: Login,
    /// The block it grants (its IPv6 prefix with `--ipv6-prefix`).
    pub block: Cidr,
    /// The client address, canonical.
    pub ip: IpAddr,
    /// Why the block is the address alone, when a prefix was asked for.
    pub narrowed: Option<String>,
}

/// Why nothing is granted for a record a pattern (or the attestation
/// rules) recognised; each has its counter ([`Refusal::counter`]), its
/// name ([`Refusal::reason`]) and its text ([`Refusal::detail`]).
#[derive(Debug)]
pub enum Refusal {
    /// An attestation element where none is believed, or an attested
    /// record not in the attested rule's form.
    Forged {
        /// What was wrong.
        why: String,
    },
    /// The rest of a line its logger cut.
    Continuation {
        /// The logger's line limit.
        limit: usize,
    },
    /// Client text may stand for a field the server writes.
    Ambiguous {
        /// The pattern that matched.
        pattern: Arc<str>,
        /// Why.
        why: Ambiguity,
    },
    /// The captured address is not an IP address.
    BadAddress {
        /// The pattern that matched.
        pattern: Arc<str>,
        /// The captured text.
        text: String,
    },
    /// A login whose line carries no client address.
    Unaddressed {
        /// The server software.
        server: Arc<str>,
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// A success line with no address line of its process before it.
    NoAddress {
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// An address or logout line whose sender may not speak for its
    /// pattern.
    ForgedLine {
        /// What was not done.
        what: String,
        /// Why the sender may not.
        why: String,
        /// The pattern that matched.
        pattern: Arc<str>,
    },
    /// A login whose sender may not speak for its pattern.
    ForgedLogin {
        /// The login.
        login: Login,
        /// Why.
        why: String,
    },
    /// An attested line whose credential is its process, with no attested
    /// address line of that process before it.
    ForgedProcessLine {
        /// The login.
        login: Login,
    },
    /// The address was reported by a proxy that is not trusted.
    UntrustedProxy {
        /// The login.
        login: Login,
        /// The proxy.
        via: IpAddr,
    },
    /// The client is one of the trusted proxies.
    ProxyOwn {
        /// The login.
        login: Login,
        /// The client address, canonical.
        client: IpAddr,
        /// The trusted-proxy entry it is in.
        proxy: Cidr,
    },
    /// The address rules refuse the address (never-grant, unspecified, ...).
    Address {
        /// The login.
        login: Login,
        /// Why.
        why: crate::grants::addr::Refusal,
    },
}

impl Refusal {
    /// The counter it bumps.
    pub fn counter<'s>(&self, stats: &'s Stats) -> &'s AtomicU64 {
        match self {
            Refusal::Forged { .. }
            | Refusal::ForgedLine { .. }
            | Refusal::ForgedLogin { .. }
            | Refusal::ForgedProcessLine { .. } => &stats.forgeries,
            Refusal::Continuation { .. } => &stats.refused_continuation,
            Refusal::Ambiguous { .. } => &stats.refused_ambiguous,
            Refusal::BadAddress { .. } => &stats.bad_address,
            Refusal::Unaddressed { .. } => &stats.logins_unaddressed,
            Refusal::NoAddress { .. } => &stats.logins_without_address,
            Refusal::UntrustedProxy { .. } => &stats.refused_proxy,
            Refusal::ProxyOwn { .. } => &stats.refused_proxy_own,
            Refusal::Address { .. } => &stats.refused,
        }
    }

    /// Its name, as `smtp-after-popd match` prints and sums it up.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Forged { .. }
            | Refusal::ForgedLine { .. }
            | Refusal::ForgedLogin { .. }
            | Refusal::ForgedProcessLine { .. } => "forgery",
            Refusal::Continuation { .. } => "cut-line",
            Refusal::Ambiguous { .. } => "ambiguous",
            Refusal::BadAddress { .. } => "bad-address",
            Refusal::Unaddressed { .. } => "unaddressed",
            Refusal::NoAddress { .. } => "no-address-line",
            Refusal::UntrustedProxy { .. } => "untrusted-proxy",
            Refusal::ProxyOwn { .. } => "proxy-own-address",
            Refusal::Address { why, .. } => match why {
                crate::grants::addr::Refusal::Unspecified => "unspecified-address",
                crate::grants::addr::Refusal::Multicast => "multicast",
                crate::grants::addr::Refusal::Broadcast => "broadcast",
                crate::grants::addr::Refusal::Never(_)
                | crate::grants::addr::Refusal::Embedded { .. } => "never-grant",
            },
        }
    }

    /// The login it refuses, if it got that far.
    pub fn login(&self) -> Option<&Login> {
        match self {
            Refusal::ForgedLogin { login, .. }
            | Refusal::ForgedProcessLine { login }
            | Refusal::UntrustedProxy { login, .. }
            | Refusal::ProxyOwn { login, .. }
            | Refusal::Address { login, .. } => Some(login),
            _ => None,
        }
    }

    /// The pattern that recognised the line, if one did.
    pub fn pattern(&self) -> Option<&str> {
        match self {
            Refusal::Forged { .. } | Refusal::Continuation { .. } => None,
            Refusal::Ambiguous { pattern, .. }
            | Refusal::BadAddress { pattern, .. }
            | Refusal::Unaddressed { pattern, .. }
            | Refusal::NoAddress { pattern }
            | Refusal::ForgedLine { pattern, .. } => Some(pattern),
            _ => self.login().map(|l| &*l.pattern),
        }
    }

    /// What was wrong, in words.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Forged { why } => format!("forgery: {why}"),
            Refusal::Continuation { limit } => format!(
                "continues a line that its logger cut (its last record was {limit} bytes or more): nothing in it is believed"
            ),
            Refusal::Ambiguous { why, .. } => format!(
                "ambiguous: {why}; a user name or other client text may stand for the server's own"
            ),
            Refusal::BadAddress { pattern, text } => format!(
                "matched pattern {pattern} but \"{}\" is not an IP address",
                escape(text)
            ),
            Refusal::Unaddressed { server, pattern } => format!(
                "is a {server} login (pattern {pattern}) that carries no client address (an old server release, or a host name cut before the address)"
            ),
            Refusal::NoAddress { pattern } => format!(
                "matched pattern {pattern}, but no address line of the same process came before it (within {}s)",
                crate::recognise::matcher::MEMORY_TTL.as_secs()
            ),
            Refusal::ForgedLine { what, why, .. } => format!("{what}: forgery: {why}"),
            Refusal::ForgedLogin { why, .. } => format!("forgery: {why}"),
            Refusal::ForgedProcessLine { login } => format!(
                "forgery: pattern {} lines are written after the server switched to the user who logged in, so their uid proves nothing; such a line is believed only after an attested address line of the same process naming the same address, and none came within {}s",
                login.pattern,
                crate::recognise::matcher::MEMORY_TTL.as_secs()
            ),
            Refusal::UntrustedProxy { via, .. } => format!(
                "the address was reported by the proxy {via}, which is not a --trusted-proxy"
            ),
            Refusal::ProxyOwn { proxy, .. } => format!(
                "it is a --trusted-proxy ({proxy}): this is the proxy's own connection, which names none of the clients behind it"
            ),
            Refusal::Address { why, .. } => why.to_string(),
        }
    }
}

/// Most of a mail log is not a login: a record that holds none of the text
/// the patterns need is counted and not even parsed. (Records too long or
/// not UTF-8 go on, to be counted as such.)
fn skippable(s: &Settings, bytes: &[u8]) -> bool {
    bytes.len() <= record::MAX_RECORD
        && !s.matchers.may_match_with(bytes, s.hold_while_connected)
        && std::str::from_utf8(bytes).is_ok()
}

/// Decides what the daemon does with one datagram, from its bytes, its
/// transport facts and the settings: the prefilter, parsing, the cut-line
/// rule, the patterns, the sender check (in one place, [`Credentials`]),
/// two-line pairing and the address rules. It changes nothing but the
/// two-line memory (`memory`) and the cut-line memory (`cut`); the table,
/// the counters and the log are [`Pipeline::apply`]'s.
pub fn decide<'a>(
    s: &Settings,
    memory: &AddressMemory,
    cut: &CutLines,
    bytes: &'a [u8],
    t: Transport<'_>,
    now: tokio::time::Instant,
) -> Decided<'a> {
    let bare = |decision| Decided {
        rec: None,
        sender: String::new(),
        addresses_dropped: 0,
        decision,
    };
    if skippable(s, bytes) {
        return bare(Decision::Skipped);
    }
    let trusted_peer = match t.peer {
        Peer::Unix(_) => true,
        Peer::Udp(a) | Peer::Tcp(a) => s.trust_attestation_from.iter().any(|c| c.contains(a.ip())),
    };
    // Attestation is believed on a listener declared to carry the
    // attested rule, from a peer trusted to speak for it, and in the exact
    // form of the rule; anywhere else our SD-ID is a forgery.
    let believed = t.attested && trusted_peer;
    let rec = match parse(bytes, t, believed, trusted_peer) {
        Ok(rec) => rec,
        Err(Err(e)) => return bare(Decision::Dropped(e)),
        Err(Ok(why)) => return bare(Decision::Refused(Refusal::Forged { why })),
    };
    let sender = sender_of(t.peer);
    let mut d = Decided {
        decision: Decision::NoMatch,
        addresses_dropped: 0,
        sender,
        rec: None,
    };
    // A record that continues a line the server's logger cut begins in
    // the middle of the user's text: it may look like anything, a success
    // line included.
    if let Some(limit) = s.matchers.line_limit(rec.program) {
        let key = CutKey {
            reporter: d.sender.clone(),
            host: rec.hostname.unwrap_or("-").to_string(),
            program: rec.program.to_string(),
        };
        if cut.continues(key, rec.message.len() >= limit) {
            d.decision = Decision::Refused(Refusal::Continuation { limit });
            d.rec = Some(rec);
            return d;
        }
    }
    let creds = Credentials::of(&rec, believed, t.attested, s.require_attestation);
    let outcome = s.matchers.match_record_with(&rec, s.hold_while_connected);
    let line = Line {
        s,
        memory,
        creds: &creds,
        rec: &rec,
        sender: &d.sender,
        now,
    };
    let (decision, dropped) = line.judge(outcome);
    drop(creds);
    d.decision = decision;
    d.addresses_dropped = dropped;
    d.rec = Some(rec);
    d
}

/// Parses a datagram: the attested rule's exact form where attestation is
/// believed, else any syslog format without our SD-ID. Fails with why it
/// is a forgery, or why it is no record.
fn parse<'a>(
    bytes: &'a [u8],
    t: Transport<'_>,
    believed: bool,
    trusted_peer: bool,
) -> Result<record::Record<'a>, Result<String, ParseError>> {
    let forged = Ok;
    match std::str::from_utf8(bytes) {
        Ok(text) if believed && bytes.len() <= record::MAX_RECORD => {
            attest::attested_record(text).map_err(forged)
        }
        _ => match record::parse(bytes) {
            Ok(_) if std::str::from_utf8(bytes).is_ok_and(attest::names_sd_id) => {
                Err(forged(if t.attested {
                    "an attestation element from a network peer that is not trusted for it (trust-attestation-from): any local user of that host could have written it".to_string()
                } else if trusted_peer && matches!(t.peer, Peer::Udp(_) | Peer::Tcp(_)) {
                    "an attestation element on a listener not declared attested: attestation from trust-attestation-from peers is believed only on a listener with ?attested=yes".to_string()
                } else {
                    "an attestation element on a listener not declared attested: only a listener with ?attested=yes, fed by rsyslog/smtp-after-popd-attested.conf, carries attestation (add ?attested=yes to its listen URL if it is)".to_string()
                }))
            }
            Ok(rec) => Ok(rec),
            Err(e) => Err(Err(e)),
        },
    }
}

/// Who sent a record, as far as the transport says: the one place its
/// sender is judged against a pattern's speakers.
struct Credentials<'r> {
    /// The attested sender, if attestation is believed (an error if its
    /// element is malformed).
    sender: Result<Option<attest::Sender<'r>>, String>,
    /// Whether attestation must be there.
    required: bool,
    /// Why no attestation is believed, for the refusal text.
    missing: &'static str,
}

impl<'r> Credentials<'r> {
    fn of(rec: &'r record::Record<'_>, believed: bool, attested: bool, required: bool) -> Self {
        // The attested values are read only for records a pattern
        // matched: a line of an exited sender (exe "0") that is no login
        // is no forgery.
        Credentials {
            sender: if believed {
                attest::sender(rec)
            } else {
                Ok(None)
            },
            required,
            missing: if attested {
                "attestation from a network peer is believed only from trust-attestation-from peers"
            } else {
                "this listener is not declared attested: forward with rsyslog/smtp-after-popd-attested.conf to a listener with ?attested=yes"
            },
        }
    }

    /// Whether the sender may speak for `pattern`.
    fn check(&self, pattern: &str, speakers: &attest::Speakers) -> Verdict {
        match &self.sender {
            Ok(sender) => attest::check(
                sender.as_ref(),
                pattern,
                speakers,
                self.required,
                self.missing,
            ),
            Err(why) => Verdict::Forgery(why.clone()),
        }
    }

    /// Whether the record came with a believed attestation.
    fn attested(&self) -> bool {
        matches!(self.sender, Ok(Some(_)))
    }
}

/// One parsed record on its way through [`decide`].
struct Line<'l, 'r> {
    s: &'l Settings,
    memory: &'l AddressMemory,
    creds: &'l Credentials<'r>,
    rec: &'l record::Record<'r>,
    sender: &'l str,
    now: tokio::time::Instant,
}

impl Line<'_, '_> {
    /// The process the record comes from, for pairing the lines of a
    /// two-line server: the attested pid on an attested listener (the
    /// record's pid is the attested one there), else the pid of its tag.
    fn process(&self) -> Option<ProcessKey> {
        ProcessKey::of(self.sender.to_string(), self.rec, self.rec.pid)
    }

    /// What a pattern's outcome comes to: the sender check, pairing, the
    /// address rules. Also returns how many remembered addresses pairing
    /// dropped.
    fn judge(&self, outcome: Outcome) -> (Decision, usize) {
        // Address lines of two-line servers and logout lines are trusted
        // as login lines are: their sender must be allowed to speak for
        // the pattern.
        let mut line_attested = false;
        let unattested = match &outcome {
            Outcome::Address {
                ip,
                pattern,
                speakers,
                ..
            } => Some((
                format!("address line for {ip} not remembered"),
                pattern,
                speakers,
            )),
            Outcome::Logout {
                pattern, speakers, ..
            } => Some(("logout line ignored".to_string(), pattern, speakers)),
            // A success line of a two-line server is paired by its
            // process; an attested one takes only an address line that
            // was attested too.
            Outcome::LoginWithoutAddress { .. } => {
                line_attested = self.creds.attested();
                None
            }
            _ => None,
        };
        if let Some((what, pattern, speakers)) = unattested {
            match self.creds.check(pattern, speakers) {
                Verdict::Forgery(why) => {
                    let pattern = pattern.clone();
                    return (
                        Decision::Refused(Refusal::ForgedLine { what, why, pattern }),
                        0,
                    );
                }
                Verdict::Attested => line_attested = true,
                Verdict::Unattested => {}
            }
        }
        let (outcome, dropped) = match outcome {
            Outcome::Address { .. } | Outcome::LoginWithoutAddress { .. } => {
                self.memory
                    .pair(self.process(), outcome, self.now, line_attested)
            }
            other => (other, 0),
        };
        (self.decision(outcome), dropped)
    }

    /// The decision for a paired outcome.
    fn decision(&self, outcome: Outcome) -> Decision {
        let refused = Decision::Refused;
        match outcome {
            Outcome::NoMatch => Decision::NoMatch,
            Outcome::Ambiguous { pattern, why } => refused(Refusal::Ambiguous { pattern, why }),
            Outcome::BadAddress { pattern, text } => refused(Refusal::BadAddress { pattern, text }),
            Outcome::Remembered { pattern } => Decision::Remembered { pattern },
            Outcome::Unaddressed { server, pattern } => {
                refused(Refusal::Unaddressed { server, pattern })
            }
            Outcome::NoAddress { pattern } => refused(Refusal::NoAddress { pattern }),
            Outcome::Logout {
                ip,
                server,
                session,
                user,
                pattern,
                ..
            } => Decision::Logout(LogoutLine {
                ip,
                server,
                session,
                user,
                pattern,
            }),
            // Paired in judge.
            Outcome::Address { pattern, .. } | Outcome::LoginWithoutAddress { pattern, .. } => {
                refused(Refusal::NoAddress { pattern })
            }
            Outcome::Login(l) => self.login(l),
        }
    }

    /// A login line: its sender, its process, then the address rules.
    fn login(&self, login: Login) -> Decision {
        if let Verdict::Forgery(why) = self.creds.check(&login.pattern, &login.speakers) {
            return Decision::Refused(Refusal::ForgedLogin { login, why });
        }
        // A one-line login written after the server switched to the user
        // (credential "process"): believed, when attested, only after an
        // attested address line of the same process naming the same
        // address. (Paired lines of two-line servers were checked above.)
        if login.speakers.process && login.address_pattern.is_none() {
            let attested = self.creds.attested();
            let found =
                self.memory
                    .take(self.process(), &login.server, login.ip, self.now, attested);
            if attested && !found {
                return Decision::Refused(Refusal::ForgedProcessLine { login });
            }
        }
        admit(self.s, login)
    }
}

/// The address rules (trusted proxies, never-grant) every login goes
/// through, whichever input reported it: [`Decision::Grant`] or
/// [`Decision::Refused`].
pub fn admit(s: &Settings, login: Login) -> Decision {
    if let Some(via) = login.via {
        let via = crate::grants::addr::canonical(via);
        if !s.trusted_proxy.iter().any(|c| c.contains(via)) {
            return Decision::Refused(Refusal::UntrustedProxy { login, via });
        }
    }
    // A login from one of our own proxies (perdition, a Dovecot proxy that
    // does not pass the client on, nginx in front of Zimbra) is the
    // proxy's own connection: granting it would open the relay to
    // everyone the proxy serves.
    let client = crate::grants::addr::canonical(login.ip);
    if let Some(proxy) = s.trusted_proxy.iter().find(|c| c.contains(client)) {
        let proxy = *proxy;
        return Decision::Refused(Refusal::ProxyOwn {
            login,
            client,
            proxy,
        });
    }
    match s.policy.check(login.ip) {
        Ok(ip) => {
            let (block, narrowed) = s.policy.scope(ip);
            Decision::Grant(Admitted {
                login,
                block,
                ip,
                narrowed,
            })
        }
        Err(why) => Decision::Refused(Refusal::Address { login, why }),
    }
}

/// Who sent a record, for pairing its lines: the socket path, or the
/// network peer's address without its port (a UDP sender may use a new
/// port for each datagram, a TCP one for each connection).
fn sender_of(peer: &Peer) -> String {
    match peer {
        Peer::Unix(p) => format!("unix:{p}"),
        Peer::Udp(a) | Peer::Tcp(a) => a.ip().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn pipeline(hold: bool) -> Pipeline {
        pipeline_with(hold, false)
    }

    fn pipeline_with(hold: bool, require_attestation: bool) -> Pipeline {
        Pipeline::new(
            settings(hold, require_attestation, &[]),
            Arc::new(GrantTable::new()),
            Arc::new(Stats::default()),
        )
    }

    /// A two-minute window, hold-max one hour, no never-grant rules.
    fn settings(hold: bool, require_attestation: bool, trusted_proxy: &[&str]) -> Settings {
        Settings {
            matchers: Matchers::builtin(),
            policy: AddressPolicy::new(Vec::new()),
            window: Duration::from_secs(120),
            require_attestation,
            trust_attestation_from: Vec::new(),
            trusted_proxy: trusted_proxy.iter().map(|c| c.parse().unwrap()).collect(),
            hold_while_connected: hold,
            hold_max: Duration::from_secs(3600),
        }
    }

    fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn peer() -> Peer {
        Peer::Unix("/run/test.sock".into())
    }

    #[tokio::test]
    async fn decide_gives_one_outcome_with_its_reason() {
        let mut s = settings(false, true, &["198.51.100.31"]);
        s.policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let (memory, cut) = (AddressMemory::new(), CutLines::new());
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = |attested| Transport { peer: &p, attested };
        let reason = |line: &str, attested| match decide(
            &s,
            &memory,
            &cut,
            line.as_bytes(),
            on(attested),
            now,
        )
        .decision
        {
            Decision::Grant(a) => format!("grant {}", a.ip),
            Decision::Refused(r) => r.reason().to_string(),
            Decision::Skipped => "skipped".into(),
            Decision::NoMatch => "no match".into(),
            other => format!("{other:?}"),
        };
        let dovecot = |ip: &str| LOGIN.replace("192.0.2.6", ip);
        // The sender check, on the one attested listener.
        assert_eq!(reason(&dovecot("192.0.2.6"), false), "forgery");
        let good = attested(
            "/usr/lib/dovecot/log",
            0,
            1,
            "dovecot",
            &DOVECOT.replace("198.51.100.40", "192.0.2.6"),
        );
        assert_eq!(reason(&good, true), "grant 192.0.2.6");
        let bad = attested("/usr/bin/logger", 1000, 1, "dovecot", DOVECOT);
        assert_eq!(reason(&bad, true), "forgery");
        // The address rules.
        let loopback = good.replace("192.0.2.6", "127.0.0.9");
        assert_eq!(reason(&loopback, true), "never-grant");
        assert_eq!(
            reason(&good.replace("192.0.2.6", "0.0.0.0"), true),
            "unspecified-address"
        );
        assert_eq!(
            reason(&good.replace("192.0.2.6", "198.51.100.31"), true),
            "proxy-own-address"
        );
        // Not a login.
        assert_eq!(
            reason(
                "<22>Nov 24 15:36:30 vm postfix/smtpd[1]: connect from x",
                false
            ),
            "skipped"
        );
    }

    const LOGIN: &str = "<22>Nov 24 15:36:30 vm dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1, mpid=24472, session=<jm1xeQdhf8N/AAAG>";
    const LOGIN2: &str = "<22>Nov 24 15:36:31 vm dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1, mpid=24473, session=<km1xeQdhf8N/AAAH>";
    const LOGOUT: &str = "<22>Nov 24 15:40:30 vm dovecot: imap(bob)<24472><jm1xeQdhf8N/AAAG>: Disconnected: Logged out in=8 out=468 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0";
    const LOGOUT2: &str = "<22>Nov 24 15:40:31 vm dovecot: imap(bob)<24473><km1xeQdhf8N/AAAH>: Disconnected: Connection closed (IDLE running for 0.001 secs) in=8 out=468";

    fn ip() -> IpAddr {
        "192.0.2.6".parse().unwrap()
    }

    async fn step(secs: u64) {
        tokio::time::advance(Duration::from_secs(secs)).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_session_holds_its_grant_and_the_window_runs_from_the_last_logout() {
        let p = pipeline(true);
        let purge = tokio::spawn(p.table.clone().run_purge(p.stats.clone()));
        p.handle(LOGIN.as_bytes(), &peer());
        p.handle(LOGIN2.as_bytes(), &peer());
        assert_eq!(p.holds.len(), 2);
        // Long past the window, both sessions open: still granted.
        step(1800).await;
        assert!(p.table.get(ip()).is_some());
        // One closes: still held by the other.
        p.handle(LOGOUT.as_bytes(), &peer());
        step(600).await;
        assert!(p.table.get(ip()).is_some());
        // The last closes: the window runs from now.
        p.handle(LOGOUT2.as_bytes(), &peer());
        assert!(p.holds.is_empty());
        step(119).await;
        assert!(p.table.get(ip()).is_some());
        step(2).await;
        assert!(p.table.get(ip()).is_none());
        assert_eq!(count(&p.stats.holds_opened), 2);
        assert_eq!(count(&p.stats.holds_closed), 2);
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_logout_holds_at_most_hold_max() {
        let p = pipeline(true);
        let purge = tokio::spawn(p.table.clone().run_purge(p.stats.clone()));
        p.handle(LOGIN.as_bytes(), &peer());
        step(3599).await;
        assert!(p.table.get(ip()).is_some());
        step(2).await;
        assert!(p.table.get(ip()).is_none());
        // The logout line coming late changes nothing.
        p.handle(LOGOUT.as_bytes(), &peer());
        assert!(p.table.get(ip()).is_none());
        assert!(p.holds.is_empty());
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_option_logins_get_the_window_and_logouts_are_ignored() {
        let p = pipeline(false);
        let purge = tokio::spawn(p.table.clone().run_purge(p.stats.clone()));
        p.handle(LOGIN.as_bytes(), &peer());
        assert!(p.holds.is_empty());
        step(121).await;
        assert!(p.table.get(ip()).is_none());
        p.handle(LOGOUT.as_bytes(), &peer());
        assert_eq!(count(&p.stats.logouts_unpaired), 0);
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_without_a_session_does_not_cut_a_hold_short() {
        let p = pipeline(true);
        let purge = tokio::spawn(p.table.clone().run_purge(p.stats.clone()));
        p.handle(LOGIN.as_bytes(), &peer());
        step(60).await;
        // A Courier-less, session-less login (Cyrus) from the same address.
        p.handle(
            b"<22>Nov 24 15:37:30 vm imap[99]: login: client.example.net [192.0.2.6] bob PLAIN User logged in",
            &peer(),
        );
        step(600).await;
        assert!(p.table.get(ip()).is_some());
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_logout_from_another_reporter_closes_nothing() {
        let p = pipeline(true);
        let purge = tokio::spawn(p.table.clone().run_purge(p.stats.clone()));
        p.handle(LOGIN.as_bytes(), &peer());
        p.handle(LOGOUT.as_bytes(), &Peer::Unix("/run/other.sock".into()));
        assert_eq!(p.holds.len(), 1);
        assert_eq!(count(&p.stats.logouts_unpaired), 1);
        step(600).await;
        assert!(p.table.get(ip()).is_some());
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn two_line_servers_grant_the_address_of_their_own_process() {
        let p = pipeline(false);
        p.handle(
            b"<22>Mar 11 08:00:01 mail popa3d[3101]: Session from 192.0.2.100",
            &peer(),
        );
        p.handle(
            b"<22>Mar 11 08:00:01 mail popa3d[3102]: Session from 192.0.2.101",
            &peer(),
        );
        assert_eq!(p.memory.len(), 2);
        p.handle(
            b"<22>Mar 11 08:00:02 mail popa3d[3102]: Authentication passed for bob",
            &peer(),
        );
        assert!(p.table.get("192.0.2.101".parse().unwrap()).is_some());
        assert!(p.table.get("192.0.2.100".parse().unwrap()).is_none());
        // Without an address line of its own: nothing, counted.
        p.handle(
            b"<22>Mar 11 08:00:03 mail popa3d[3103]: Authentication passed for 192.0.2.9",
            &peer(),
        );
        assert_eq!(p.table.len(), 1);
        assert_eq!(count(&p.stats.logins_without_address), 1);
        // The remembered address expires after a minute.
        tokio::time::advance(Duration::from_secs(61)).await;
        p.handle(
            b"<22>Mar 11 08:01:03 mail popa3d[3101]: Authentication passed for alice",
            &peer(),
        );
        assert!(p.table.get("192.0.2.100".parse().unwrap()).is_none());
        assert_eq!(count(&p.stats.logins_without_address), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_line_forged_over_udp_with_attestation_required_is_not_remembered() {
        let p = pipeline_with(false, true);
        let udp = Peer::Udp("127.0.0.1:9".parse().unwrap());
        p.handle(
            b"<22>Mar 11 08:00:01 mail popa3d[3101]: Session from 192.0.2.100",
            &udp,
        );
        assert!(p.memory.is_empty());
        assert_eq!(count(&p.stats.forgeries), 1);
    }

    /// What the attested rule writes for a sender.
    /// Feeds an attested record ([`attested`]) from [`peer`] to `p`.
    fn feed(p: &Pipeline, exe: &str, uid: u32, pid: u32, tag: &str, msg: &str) {
        p.handle_on(attested(exe, uid, pid, tag, msg).as_bytes(), &peer(), true);
    }

    /// Whether `p`'s table holds a grant of `ip`.
    fn granted(p: &Pipeline, ip: &str) -> bool {
        p.table.get(ip.parse().unwrap()).is_some()
    }

    fn attested(exe: &str, uid: u32, pid: u32, tag: &str, msg: &str) -> String {
        format!(
            "<22>1 2026-12-01T18:30:00.000000+00:00 mail {tag} - - [attest@32473 exe=\"{exe}\" uid=\"{uid}\" pid=\"{pid}\"]  {msg}"
        )
    }

    const DOVECOT: &str = "pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.40, lip=192.0.2.1, mpid=1, session=<abc>";

    #[tokio::test]
    async fn attestation_is_believed_only_on_attested_listeners_in_the_rules_form() {
        let p = pipeline_with(false, true);
        let ip: IpAddr = "198.51.100.40".parse().unwrap();
        // Issue 13, class 2: through the plain rule, a [...] at the start
        // of an RFC 3164 message reads as structured data.
        let plain = format!(
            "<22>Dec  1 18:30:00 mail dovecot: [attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"1\"] {DOVECOT}"
        );
        p.handle(plain.as_bytes(), &peer());
        p.handle_on(plain.as_bytes(), &peer(), true);
        // The rule's own form, on a listener not declared attested.
        let real = attested("/usr/lib/dovecot/log", 0, 7, "dovecot", DOVECOT);
        p.handle(real.as_bytes(), &peer());
        // From a network peer not trusted for it, on an attested listener.
        p.handle_on(
            real.as_bytes(),
            &Peer::Udp("192.0.2.25:514".parse().unwrap()),
            true,
        );
        // A second element in the message text.
        let second = attested(
            "/usr/lib/dovecot/log",
            0,
            7,
            "dovecot",
            &format!("[attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"1\"] {DOVECOT}"),
        );
        p.handle_on(second.as_bytes(), &peer(), true);
        assert!(p.table.get(ip).is_none());
        assert_eq!(count(&p.stats.forgeries), 5);
        // The real thing, where it belongs.
        p.handle_on(real.as_bytes(), &peer(), true);
        assert!(p.table.get(ip).is_some());
        // Trusted network peers, on an attested listener.
        let mut s = settings(false, true, &[]);
        s.trust_attestation_from = vec!["192.0.2.25".parse().unwrap()];
        p.settings.store(s);
        let other = real.replace("198.51.100.40", "198.51.100.41");
        let udp = Peer::Udp("192.0.2.25:514".parse().unwrap());
        p.handle(other.as_bytes(), &udp);
        assert!(p.table.get("198.51.100.41".parse().unwrap()).is_none());
        p.handle_on(other.as_bytes(), &udp, true);
        assert!(p.table.get("198.51.100.41".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn the_uid_is_the_credential() {
        let p = pipeline_with(false, true);
        // Issue 13, class 1: a local user runs imap-login with a preloaded
        // library; rsyslog attests the server's binary and the user's uid.
        let line = attested(
            "/usr/lib/dovecot/imap-login",
            1000,
            4242,
            "imap-login",
            "Login: user=<eve>, method=PLAIN, rip=198.51.100.20, lip=192.0.2.1",
        );
        p.handle_on(line.as_bytes(), &peer(), true);
        assert!(p.table.is_empty());
        assert_eq!(count(&p.stats.forgeries), 1);
        // Root, with the right executable, may speak for it.
        p.handle_on(
            line.replace("uid=\"1000\"", "uid=\"0\"").as_bytes(),
            &peer(),
            true,
        );
        assert_eq!(p.table.len(), 1);
    }

    #[tokio::test]
    async fn a_line_written_as_the_user_is_believed_only_after_its_processs_attested_address_line()
    {
        let p = pipeline_with(false, true);
        let session = |uid: u32, pid: u32, ip: &str| {
            attested(
                "/usr/sbin/popa3d",
                uid,
                pid,
                "popa3d",
                &format!("Session from {ip}"),
            )
        };
        let passed = |uid: u32, pid: u32| {
            attested(
                "/usr/sbin/popa3d",
                uid,
                pid,
                "popa3d",
                "Authentication passed for bob",
            )
        };
        // The real two lines: root, then the user, from one process.
        p.handle_on(session(0, 100, "192.0.2.100").as_bytes(), &peer(), true);
        p.handle_on(passed(1000, 100).as_bytes(), &peer(), true);
        assert!(p.table.get("192.0.2.100".parse().unwrap()).is_some());
        // A user's forged address line is refused; a success line of
        // another process takes nothing.
        p.handle_on(session(1000, 101, "203.0.113.1").as_bytes(), &peer(), true);
        assert!(p.memory.is_empty());
        p.handle_on(session(0, 102, "192.0.2.102").as_bytes(), &peer(), true);
        p.handle_on(passed(1000, 103).as_bytes(), &peer(), true);
        assert!(p.table.get("192.0.2.102".parse().unwrap()).is_none());
        // UW: a one-line login written as the user, believed only after the
        // service-init line of its process naming the same address.
        let init = |pid: u32, ip: &str| {
            attested(
                "/usr/sbin/ipop3d",
                0,
                pid,
                "ipop3d",
                &format!("pop3 service init from {ip}"),
            )
        };
        let login = |pid: u32, ip: &str| {
            attested(
                "/usr/sbin/ipop3d",
                1000,
                pid,
                "ipop3d",
                &format!("Login user=bob host=client.example.net [{ip}] nmsgs=1/1"),
            )
        };
        p.handle_on(login(200, "192.0.2.200").as_bytes(), &peer(), true);
        assert!(p.table.get("192.0.2.200".parse().unwrap()).is_none());
        p.handle_on(init(201, "192.0.2.201").as_bytes(), &peer(), true);
        p.handle_on(login(201, "203.0.113.201").as_bytes(), &peer(), true);
        assert!(p.table.get("203.0.113.201".parse().unwrap()).is_none());
        p.handle_on(init(202, "192.0.2.202").as_bytes(), &peer(), true);
        p.handle_on(login(202, "192.0.2.202").as_bytes(), &peer(), true);
        assert!(p.table.get("192.0.2.202".parse().unwrap()).is_some());
        // Without attestation (the plain rule), one line is enough.
        let q = pipeline(false);
        q.handle(
            b"<22>Nov 23 10:00:03 mail ipop3d[3458]: Login user=carol host=[192.0.2.9] nmsgs=3/3",
            &peer(),
        );
        assert!(q.table.get("192.0.2.9".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn a_sender_that_exited_is_believed_only_where_its_process_is_the_credential() {
        // rsyslog attests a process that has exited before it looked with
        // no executable ("0"), its uid and pid still from the kernel: a
        // popa3d or Solid POP3 session whose client quit at once.
        let p = pipeline_with(false, true);
        // popa3d: the address line while the process ran (root), the
        // success line after it had exited: granted by its address line.
        feed(
            &p,
            "/usr/sbin/popa3d",
            0,
            300,
            "popa3d",
            "Session from 192.0.2.30",
        );
        feed(
            &p,
            "0",
            1000,
            300,
            "popa3d",
            "Authentication passed for bob",
        );
        assert!(granted(&p, "192.0.2.30"));
        // The pid must still be the address line's: an exited sender of
        // another pid (a user's quick logger) takes nothing.
        feed(
            &p,
            "/usr/sbin/popa3d",
            0,
            301,
            "popa3d",
            "Session from 192.0.2.31",
        );
        feed(
            &p,
            "0",
            1000,
            9999,
            "popa3d",
            "Authentication passed for eve",
        );
        assert!(!granted(&p, "192.0.2.31"));
        // An address line is root's word (its credential is the uid): an
        // exited sender's is refused, even as root, and its success line
        // then takes nothing.
        let forgeries = count(&p.stats.forgeries);
        feed(&p, "0", 0, 302, "popa3d", "Session from 192.0.2.32");
        assert_eq!(count(&p.stats.forgeries), forgeries + 1);
        feed(
            &p,
            "/usr/sbin/popa3d",
            1000,
            302,
            "popa3d",
            "Authentication passed for bob",
        );
        assert!(!granted(&p, "192.0.2.32"));
    }

    #[tokio::test]
    async fn an_exited_sender_is_judged_by_its_credential_in_solid_pop3_dovecot_and_uw() {
        let p = pipeline_with(false, true);
        // Solid POP3: an APOP line (credential: the connect line of its
        // process) after the process exited is granted; a USER/PASS line,
        // whose credential is its uid (root), is refused.
        feed(
            &p,
            "/usr/sbin/solid-pop3d",
            0,
            400,
            "solid-pop3d",
            "connect from 192.0.2.40",
        );
        feed(
            &p,
            "0",
            1001,
            400,
            "solid-pop3d",
            "user bob authenticated through APOP - 192.0.2.40",
        );
        assert!(granted(&p, "192.0.2.40"));
        let forgeries = count(&p.stats.forgeries);
        feed(
            &p,
            "/usr/sbin/solid-pop3d",
            0,
            401,
            "solid-pop3d",
            "connect from 192.0.2.41",
        );
        feed(
            &p,
            "0",
            0,
            401,
            "solid-pop3d",
            "user alice authenticated - 192.0.2.41",
        );
        assert!(!granted(&p, "192.0.2.41"));
        assert_eq!(count(&p.stats.forgeries), forgeries + 1);
        // A one-line login whose credential is its uid (Dovecot's log
        // process, root): an exited sender is refused (fail closed: a root
        // script's logger may carry text an attacker chose).
        feed(&p, "0", 0, 500, "dovecot", DOVECOT);
        assert!(!granted(&p, "198.51.100.40"));
        assert_eq!(count(&p.stats.forgeries), forgeries + 2);
        // UW: a Login line (credential: the service-init line of its
        // process) after the process exited, naming the same address.
        feed(
            &p,
            "/usr/sbin/ipop3d",
            0,
            600,
            "ipop3d",
            "pop3 service init from 192.0.2.60",
        );
        feed(
            &p,
            "0",
            1000,
            600,
            "ipop3d",
            "Login user=bob host=client.example.net [192.0.2.60] nmsgs=1/1",
        );
        assert!(granted(&p, "192.0.2.60"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_sums_up_its_refusals_once_a_minute() {
        let p = Arc::new(Pipeline::new(
            settings(false, false, &[]),
            Arc::new(GrantTable::with_limit(2)),
            Arc::new(Stats::default()),
        ));
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let task = tokio::spawn(p.clone().run_full_summary(move |l| {
            sink.lock().unwrap().push(l.to_string());
        }));
        let login = |i: u32| {
            format!(
                "<22>Nov 24 15:36:30 vm dovecot: imap-login: Login: user=<u{i}>, method=PLAIN, rip=192.0.2.{i}, lip=192.0.2.1, mpid=1, session=<abc{i}>"
            )
        };
        // Not full: nothing to say.
        p.handle(login(1).as_bytes(), &peer());
        step(61).await;
        assert!(lines.lock().unwrap().is_empty());
        // Full: 30 refusals, more than the per-message rate limit lets
        // through in a minute.
        p.handle(login(2).as_bytes(), &peer());
        for i in 3..33 {
            p.handle(login(i).as_bytes(), &peer());
        }
        assert_eq!(count(&p.stats.refused_full), 30);
        step(60).await;
        {
            let l = lines.lock().unwrap();
            assert_eq!(l.len(), 1, "{l:?}");
            assert!(l[0].starts_with("the grant table is full (2 grants, --max-grants 2): 30 login(s) from new addresses refused in the last minute"), "{}", l[0]);
        }
        // Still full, no new refusals: said again, with 0.
        step(60).await;
        assert_eq!(lines.lock().unwrap().len(), 2);
        assert!(lines.lock().unwrap()[1].contains(": 0 login(s)"));
        task.abort();
    }

    #[tokio::test]
    async fn a_proxied_address_is_granted_only_through_a_trusted_proxy() {
        let line = "<22>Sep 18 00:21:21 mailstore21 mailbox: INFO  [Pop3Server-7] [name=carol@example.org;ip=198.51.100.31;oip=192.0.2.10;] pop - user carol@example.org authenticated, mechanism=LOGIN ";
        let p = pipeline(false);
        p.handle(line.as_bytes(), &peer());
        assert!(p.table.is_empty(), "an untrusted proxy's word is refused");
        assert_eq!(count(&p.stats.refused_proxy), 1);
        p.settings.store(settings(false, false, &["198.51.100.31"]));
        p.handle(line.as_bytes(), &peer());
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        assert!(
            p.table.get(ip).is_some(),
            "granted through the trusted proxy"
        );
        // Another proxy is still not believed.
        p.settings
            .store(settings(false, false, &["203.0.113.0/24"]));
        p.handle(line.replace("192.0.2.10", "192.0.2.11").as_bytes(), &peer());
        assert!(p.table.get("192.0.2.11".parse().unwrap()).is_none());
    }

    #[test]
    fn the_settings_keep_prefix_grants_off_trusted_proxies() {
        let args = <crate::service::config::Cli as clap::Parser>::try_parse_from([
            "smtp-after-popd",
            "--map",
            "none",
            "--policy",
            "tcp://127.0.0.1:1",
            "--ipv6-prefix",
            "64",
            "--trusted-proxy",
            "2001:db8:1:2::99",
        ])
        .unwrap()
        .daemon;
        let s = Settings::of(&Config::from_args(&args).unwrap());
        let (scope, why) = s.policy.scope("2001:db8:1:2::5".parse().unwrap());
        assert!(scope.is_host(), "{scope}");
        assert!(why.is_some());
        let (scope, _) = s.policy.scope("2001:db8:1:3::5".parse().unwrap());
        assert!(!scope.is_host(), "{scope}");
    }

    #[tokio::test]
    async fn a_prefix_grant_never_covers_a_trusted_proxy() {
        // With --ipv6-prefix 64, a client in the /64 of one of our proxies
        // is granted its own address alone: the /64 would let the proxy,
        // and everyone behind it, relay.
        let line = "<22>Nov 24 15:36:30 vm dovecot: pop3-login: Login: user=<bob>, method=PLAIN, rip=2001:db8:1:2::5, lip=2001:db8::1, mpid=116, session=<SIu/WZhhgKTGM2QB>";
        let p = pipeline(false);
        let mut s = settings(false, false, &["2001:db8:1:2::99"]);
        s.policy = AddressPolicy::new(s.trusted_proxy.clone()).with_ipv6_prefix(64, true);
        p.settings.store(s);
        let relays = |ip: &str| p.table.lookup(ip.parse().unwrap()).is_some();
        p.handle(line.as_bytes(), &peer());
        assert!(relays("2001:db8:1:2::5"));
        assert!(!relays("2001:db8:1:2::99"), "the proxy may not relay");
        assert!(!relays("2001:db8:1:2::6"));
        // Elsewhere the prefix is granted.
        p.handle(
            line.replace("2001:db8:1:2::5", "2001:db8:1:3::5")
                .as_bytes(),
            &peer(),
        );
        assert!(relays("2001:db8:1:3::77"));
    }

    #[tokio::test]
    async fn a_login_from_a_trusted_proxy_is_the_proxys_own_connection() {
        // A Dovecot back end behind perdition logs the proxy as rip=.
        let line = "<22>Nov 24 15:36:30 vm dovecot: pop3-login: Login: user=<bob>, method=PLAIN, rip=198.51.100.1, lip=198.51.100.2, mpid=116, session=<SIu/WZhhgKTGM2QB>";
        let p = pipeline(false);
        p.settings.store(settings(false, false, &["198.51.100.1"]));
        p.handle(line.as_bytes(), &peer());
        assert!(p.table.is_empty(), "a proxy's own address is never granted");
        assert_eq!(count(&p.stats.refused_proxy_own), 1);
        assert_eq!(count(&p.stats.refused), 0);
        // Its clients, when a proxy passes them on, are.
        p.handle(
            line.replace("rip=198.51.100.1", "rip=192.0.2.50")
                .as_bytes(),
            &peer(),
        );
        assert!(p.table.get("192.0.2.50".parse().unwrap()).is_some());
        // A Zimbra client that is itself a trusted proxy: refused too.
        let z = "<22>Sep 18 00:21:21 mailstore21 mailbox: INFO  [Pop3Server-7] [name=carol@example.org;ip=198.51.100.1;oip=198.51.100.1;] pop - user carol@example.org authenticated, mechanism=LOGIN ";
        p.handle(z.as_bytes(), &peer());
        assert_eq!(count(&p.stats.refused_proxy_own), 2);
    }

    #[tokio::test]
    async fn the_rest_of_a_line_courierlogger_cut_is_not_believed() {
        // A failed login whose user name makes the cut fall just before a
        // text of the attacker's, as courierlogger logged it here: the rest
        // reads as a success line for the client's own address, with every
        // field once (nothing ambiguous about it).
        let first = format!(
            "<22>Dec  1 21:14:01 mail imapd: LOGIN FAILED, user={}",
            "x".repeat(486)
        );
        assert_eq!(first.len() - "<22>Dec  1 21:14:01 mail imapd: ".len(), 505);
        let rest =
            "<22>Dec  1 21:14:01 mail imapd: LOGIN, user=a, ip=[::ffff:192.0.2.152], port=[56115]";
        let p = pipeline(false);
        p.handle(first.as_bytes(), &peer());
        p.handle(rest.as_bytes(), &peer());
        assert!(p.table.is_empty(), "the rest of a cut line grants nothing");
        assert_eq!(count(&p.stats.refused_continuation), 1);
        assert_eq!(count(&p.stats.refused_ambiguous), 0);
        // A rest that also names another address: still a continuation.
        let injected = "<22>Dec  1 21:14:01 mail imapd: LOGIN, user=a, ip=[203.0.113.9], ip=[::ffff:192.0.2.152], port=[56115]";
        p.handle(first.as_bytes(), &peer());
        p.handle(injected.as_bytes(), &peer());
        assert!(p.table.is_empty());
        assert_eq!(count(&p.stats.refused_continuation), 2);
        // The next line is a line of its own again.
        p.handle(
            b"<22>Dec  1 21:14:02 mail imapd: LOGIN, user=bob, ip=[::ffff:192.0.2.153], port=[40145], protocol=IMAP",
            &peer(),
        );
        assert!(p.table.get("192.0.2.153".parse().unwrap()).is_some());
        // Another host's logger is another logger: its line is read as a
        // line of its own, and the ambiguity checks still apply to it.
        p.handle(first.as_bytes(), &peer());
        p.handle(
            injected.replace("mail imapd", "mail2 imapd").as_bytes(),
            &peer(),
        );
        assert!(p.table.get("203.0.113.9".parse().unwrap()).is_none());
        assert!(p.table.get("192.0.2.152".parse().unwrap()).is_none());
        assert_eq!(count(&p.stats.refused_ambiguous), 1);
        assert_eq!(count(&p.stats.refused_continuation), 2);
        p.handle(
            rest.replace("mail imapd", "mail2 imapd").as_bytes(),
            &peer(),
        );
        assert!(p.table.get("192.0.2.152".parse().unwrap()).is_some());
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// A record that carries our SD-ID where no attestation is believed (a
    /// unix listener not declared attested) is a forgery even with
    /// require-attestation off, where the same login without the element
    /// grants: whoever wrote it claimed an attestation nobody made.
    #[tokio::test]
    async fn an_attestation_element_where_none_is_believed_is_a_forgery() {
        let s = settings(false, false, &[]);
        let (memory, cut) = (AddressMemory::new(), CutLines::new());
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = Transport {
            peer: &p,
            attested: false,
        };
        let claimed = attested("/usr/lib/dovecot/log", 0, 1, "dovecot", DOVECOT);
        match decide(&s, &memory, &cut, claimed.as_bytes(), on, now).decision {
            Decision::Refused(r) => assert_eq!(r.reason(), "forgery", "{}", r.detail()),
            other => panic!("{claimed}: {other:?}"),
        }
        let plain = format!("<22>Nov 24 15:36:30 mail dovecot: {DOVECOT}");
        match decide(&s, &memory, &cut, plain.as_bytes(), on, now).decision {
            Decision::Grant(a) => assert_eq!(a.ip.to_string(), "198.51.100.40"),
            other => panic!("{plain}: {other:?}"),
        }
    }

    /// The minute's summary of a full table is written while the table is
    /// full or when it refused logins, and not otherwise.
    #[test]
    fn the_full_table_summary_is_written_only_when_there_is_something_to_say() {
        let table = Arc::new(GrantTable::with_limit(1));
        let p = Pipeline::new(
            settings(false, false, &[]),
            table.clone(),
            Arc::new(Stats::default()),
        );
        assert_eq!(p.full_summary(), None);
        let later = tokio::time::Instant::now() + Duration::from_secs(60);
        table.grant(
            "192.0.2.1".parse().unwrap(),
            crate::grants::table::Grant {
                expires: later,
                server: "dovecot".into(),
                service: crate::recognise::matcher::Service::Imap,
                user: "u".into(),
                reporter: "t".into(),
                host: "h".into(),
            },
        );
        let line = p.full_summary().expect("a full table is summed up");
        assert!(
            line.starts_with("the grant table is full (1 grants, --max-grants 1): 0 login(s)"),
            "{line}"
        );
        table.set_limit(2);
        assert_eq!(p.full_summary(), None);
    }

    /// Address lines dropped unused (a second one from the same process
    /// replaces the first) are counted in `addresses_dropped`.
    #[tokio::test]
    async fn replaced_address_lines_are_counted() {
        let p = pipeline(false);
        for ip in ["192.0.2.1", "192.0.2.2"] {
            let line = format!("<22>Mar 11 08:00:01 mail popa3d[3101]: Session from {ip}");
            p.handle(line.as_bytes(), &peer());
        }
        assert_eq!(count(&p.stats.addresses_remembered), 2);
        assert_eq!(count(&p.stats.addresses_dropped), 1);
    }

    /// A grant runs for the window from its login (hold-while-connected
    /// off).
    #[tokio::test(start_paused = true)]
    async fn a_grant_runs_for_the_window_from_its_login() {
        let line =
            "<22>Nov 23 10:00:03 mail ipop3d[3458]: Login user=carol host=[192.0.2.9] nmsgs=3/3";
        let p = pipeline(false);
        let now = tokio::time::Instant::now();
        p.handle(line.as_bytes(), &peer());
        let g = p.table.get("192.0.2.9".parse().unwrap()).expect("granted");
        assert_eq!(g.expires, now + Duration::from_secs(120));
    }

    /// Refusal lines describe a login by its server, service, user (with
    /// the log's escaping), pattern and reporter.
    #[test]
    fn a_refused_login_is_described_in_full() {
        let line = LOGIN.replace("user=<bob>", "user=<b\"ob>");
        let rec = record::parse_str(&line).unwrap();
        let Outcome::Login(l) = Matchers::builtin().match_record(&rec) else {
            panic!("no login");
        };
        assert_eq!(
            About(&l, &"unix:/run/x").to_string(),
            "dovecot imap login of user \"b\\\"ob\", pattern dovecot-login, reported by unix:/run/x"
        );
    }

    /// A refusal names the login it refused and its pattern when the line
    /// got that far (a forged login), and neither when it did not (a
    /// record that claims an attestation nobody made); a refused login
    /// still counts as a login.
    #[tokio::test]
    async fn a_refusal_names_its_login_and_pattern_when_it_has_them() {
        let s = settings(false, true, &[]);
        let (memory, cut) = (AddressMemory::new(), CutLines::new());
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = Transport {
            peer: &p,
            attested: false,
        };
        let Decision::Refused(r) = decide(&s, &memory, &cut, LOGIN.as_bytes(), on, now).decision
        else {
            panic!("granted without attestation");
        };
        assert_eq!(r.reason(), "forgery");
        assert_eq!(r.login().map(|l| l.user.as_str()), Some("bob"));
        assert_eq!(r.pattern(), Some("dovecot-login"));
        assert!(
            r.detail()
                .contains("no attestation of the sending process (require-attestation is on"),
            "{}",
            r.detail()
        );
        let claimed = attested("/usr/lib/dovecot/log", 0, 1, "dovecot", DOVECOT);
        let Decision::Refused(r) = decide(&s, &memory, &cut, claimed.as_bytes(), on, now).decision
        else {
            panic!("granted");
        };
        assert!(r.login().is_none());
        assert_eq!(r.pattern(), None);
        // Through the pipeline, the refused login is counted.
        let pl = pipeline_with(false, true);
        pl.handle(LOGIN.as_bytes(), &peer());
        assert_eq!(count(&pl.stats.logins), 1);
        assert_eq!(count(&pl.stats.forgeries), 1);
    }

    /// The full table's summary is written a minute after the start, and
    /// each minute after, not at once.
    #[tokio::test(start_paused = true)]
    async fn the_full_table_summary_comes_once_a_minute() {
        let table = Arc::new(GrantTable::with_limit(0));
        let p = Arc::new(Pipeline::new(
            settings(false, false, &[]),
            table,
            Arc::new(Stats::default()),
        ));
        let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let out = lines.clone();
        let task = tokio::spawn(p.clone().run_full_summary(move |l| {
            out.lock().unwrap().push(l.to_string());
        }));
        let n = || lines.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(n(), 0, "nothing at the start");
        tokio::time::sleep(FULL_SUMMARY_EVERY).await;
        assert_eq!(n(), 1);
        tokio::time::sleep(FULL_SUMMARY_EVERY).await;
        assert_eq!(n(), 2);
        task.abort();
    }

    /// A logout line is trusted as a login line is: with
    /// require-attestation, an unattested one is refused as a forged line
    /// (it would otherwise end someone's held session early).
    #[tokio::test]
    async fn an_unattested_logout_line_is_a_forged_line() {
        let s = settings(true, true, &[]);
        let (memory, cut) = (AddressMemory::new(), CutLines::new());
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = Transport {
            peer: &p,
            attested: false,
        };
        let logout = "<22>Dec  1 21:33:10 mail dovecot: pop3(alice)<86><SCzjRZlhz8HAAAJk>: Disconnected: Logged out top=0/0, retr=0/0, del=0/0, size=0";
        let Decision::Refused(r) = decide(&s, &memory, &cut, logout.as_bytes(), on, now).decision
        else {
            panic!("an unattested logout line was taken");
        };
        assert_eq!(r.reason(), "forgery");
        assert_eq!(r.pattern(), Some("dovecot-logout"));
        assert!(r.detail().contains("logout line ignored"), "{}", r.detail());
    }

    /// A refusal before any login was made of the line (an ambiguous line)
    /// still names the pattern that recognised it.
    #[tokio::test]
    async fn an_ambiguous_refusal_names_its_pattern() {
        let s = settings(false, false, &[]);
        let (memory, cut) = (AddressMemory::new(), CutLines::new());
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = Transport {
            peer: &p,
            attested: false,
        };
        let line = LOGIN.replace("user=<bob>", "user=<bob, rip=198.51.100.9>");
        let Decision::Refused(r) = decide(&s, &memory, &cut, line.as_bytes(), on, now).decision
        else {
            panic!("an ambiguous line was taken");
        };
        assert_eq!(r.reason(), "ambiguous");
        assert_eq!(r.pattern(), Some("dovecot-login"));
        assert!(r.login().is_none());
    }

    /// The success line of a two-line server (popa3d), attested, takes
    /// only an address line that was attested too: after an unattested
    /// `Session from` (anyone could have sent it), it grants nothing;
    /// after an attested one, it grants.
    #[tokio::test]
    async fn an_attested_success_line_takes_only_an_attested_address_line() {
        let s = settings(false, false, &[]);
        let now = tokio::time::Instant::now();
        let p = peer();
        let on = |attested| Transport { peer: &p, attested };
        let session = "Session from 192.0.2.100";
        let passed = attested(
            "/usr/sbin/popa3d",
            1000,
            3101,
            "popa3d",
            "Authentication passed for alice",
        );
        let run = |session_attested: bool| {
            let (memory, cut) = (AddressMemory::new(), CutLines::new());
            let first = if session_attested {
                attested("/usr/sbin/popa3d", 0, 3101, "popa3d", session)
            } else {
                format!("<22>Mar 11 08:00:01 mail popa3d[3101]: {session}")
            };
            let d = decide(
                &s,
                &memory,
                &cut,
                first.as_bytes(),
                on(session_attested),
                now,
            );
            assert!(
                matches!(d.decision, Decision::Remembered { .. }),
                "{:?}",
                d.decision
            );
            decide(&s, &memory, &cut, passed.as_bytes(), on(true), now).decision
        };
        match run(false) {
            Decision::Refused(r) => assert_eq!(r.reason(), "no-address-line"),
            other => panic!("{other:?}"),
        }
        match run(true) {
            Decision::Grant(a) => assert_eq!(a.ip.to_string(), "192.0.2.100"),
            other => panic!("{other:?}"),
        }
    }
}
