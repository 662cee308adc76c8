//! The daemon: wires receivers, parser, matchers, address rules, grant table
//! and sink together, and runs them until SIGTERM or SIGINT. Also the
//! `match` subcommand, which runs the same parser and matchers over files.
//!
//! Consumes: a validated [`Config`].
//! Produces: grants in the table (and so in the map), one log line per
//! decision, and an exit status.
//! Trusts: what each stage's module doc says it trusts; this module adds no
//! trust of its own.

use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::addr::{AddressPolicy, Cidr};
use crate::attest::{self, Verdict};
use crate::config::{
    Cli, Command, Config, ControlArgs, DaemonArgs, EX_CONFIG, ListenSpec, format_duration,
};
use crate::control::Status;
use crate::grants::{Grant, GrantResult, GrantTable};
use crate::hold::{Closed, Holds, SessionKey};
use crate::logging::{RateLimit, escape};
use crate::matcher::{AddressMemory, Matchers, Outcome, ProcessKey};
use crate::privilege;
use crate::receiver::{self, AllowList, Peer};
use crate::record::{self, ParseError};
use crate::state::StateWriter;
use crate::stats::{ListenerCounts, Stats};
use crate::swap::Swap;
use crate::systemd::{Activated, Kind};

/// Exit status when the daemon cannot start for a reason other than its
/// configuration (a port in use, no permission).
pub const EX_OSERR: i32 = 71;
/// Exit status of `match` when an input file cannot be read.
pub const EX_NOINPUT: i32 = 66;

/// Runs the command line; returns the exit status.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Match { config, files }) => run_match(config, files),
        Some(Command::List(c)) => client(&c, "list", crate::control::format_list),
        Some(Command::Stats(c)) => client(&c, "stats", |s| s.to_string()),
        Some(Command::Revoke { control, address }) => {
            client(&control, &format!("revoke {address}"), |s| s.to_string())
        }
        None => {
            // Before any thread: taking the sockets unsets variables.
            let activated = match crate::systemd::take_listen_fds() {
                Ok(a) => a,
                Err(e) => return fatal(EX_OSERR, e),
            };
            let config = match Config::from_args(&cli.daemon) {
                Ok(c) => c,
                Err(e) => return fatal(EX_CONFIG, e),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    crate::logging::write(
                        crate::logging::Level::Fatal,
                        format_args!("cannot start the runtime: {e}"),
                    );
                    return EX_OSERR;
                }
            };
            runtime.block_on(run(config, cli.daemon, activated))
        }
    }
}

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
    /// Whether open sessions hold their address's grant.
    pub hold_while_connected: bool,
    /// The longest a session holds its grant after its login.
    pub hold_max: Duration,
}

impl Settings {
    /// The reloadable part of a configuration (its matchers are moved out).
    pub fn take(config: &mut Config) -> Settings {
        Settings {
            matchers: std::mem::replace(&mut config.matchers, Matchers::empty()),
            policy: AddressPolicy::new(config.never.clone()),
            window: config.window,
            require_attestation: config.require_attestation,
            trust_attestation_from: config.trust_attestation_from.clone(),
            hold_while_connected: config.hold_while_connected,
            hold_max: config.hold_max,
        }
    }
}

/// `list`, `stats`, `revoke`: one request to the control socket.
fn client(args: &ControlArgs, request: &str, format: impl Fn(&str) -> String) -> i32 {
    let path = match crate::config::control_path(args) {
        Ok(p) => p,
        Err(e) => return fatal(EX_CONFIG, e),
    };
    match crate::control::request(&path, request) {
        Ok(body) => {
            print!("{}", format(&body));
            0
        }
        Err(e) => {
            eprintln!("smtp-after-popd: {e}");
            1
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
    /// Reporter and host names shared by the grants they made, so that a
    /// million grants from one sender hold one copy of its name.
    pub names: std::sync::Mutex<std::collections::HashMap<String, Arc<str>>>,
    /// Address lines of two-line servers, waiting for their success line
    /// (kept across reloads).
    pub memory: AddressMemory,
    /// Sessions still open (`--hold-while-connected`; kept across reloads).
    pub holds: Holds,
}

static INPUT_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);
static REFUSAL_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 20);

/// Most distinct reporter and host names kept for sharing (TCP peers change
/// port with each connection, and host names are the sender's text; beyond
/// this, names are simply not shared).
const MAX_NAMES: usize = 4096;

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
        }
    }

    /// The shared copy of a name.
    fn shared(&self, name: &str) -> Arc<str> {
        let mut map = match self.names.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(a) = map.get(name) {
            return a.clone();
        }
        let a: Arc<str> = name.into();
        if map.len() < MAX_NAMES {
            map.insert(name.to_string(), a.clone());
        }
        a
    }

    /// Handles one datagram from `peer`.
    pub fn handle(&self, bytes: &[u8], peer: &Peer) {
        let settings = self.settings.load();
        let s = &*settings;
        // Most of a mail log is not a login: a record that names none of
        // the patterns' programs is counted and not even parsed. (Records
        // too long or not UTF-8 go on, to be counted as such.)
        if bytes.len() <= record::MAX_RECORD
            && !s.matchers.may_match(bytes)
            && std::str::from_utf8(bytes).is_ok()
        {
            Stats::bump(&self.stats.skipped);
            return;
        }
        let rec = match record::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                Stats::bump(match e {
                    ParseError::TooLong => &self.stats.dropped_too_long,
                    ParseError::InvalidUtf8 => &self.stats.dropped_invalid_utf8,
                    ParseError::NoProgram => &self.stats.dropped_unparsed,
                });
                crate::log_warning_limited!(INPUT_WARNINGS, "datagram from {peer} dropped: {e}");
                return;
            }
        };
        let believed = match peer {
            Peer::Unix(_) => true,
            Peer::Udp(a) | Peer::Tcp(a) => {
                s.trust_attestation_from.iter().any(|c| c.contains(a.ip()))
            }
        };
        let verdict = |pattern: &str, speakers: &attest::Speakers| {
            if believed {
                attest::check(&rec, pattern, speakers, s.require_attestation)
            } else {
                attest::unbelieved(&rec, s.require_attestation)
            }
        };
        let now = tokio::time::Instant::now();
        let outcome = s.matchers.match_record_with(&rec, s.hold_while_connected);
        let outcome = match outcome {
            Outcome::Address {
                ref ip,
                ref pattern,
                ref speakers,
                ..
            } => {
                // The address line of a two-line server is trusted as a
                // login line is: its sender must be allowed to speak for
                // the pattern.
                if let Verdict::Forgery(why) = verdict(pattern, speakers) {
                    Stats::bump(&self.stats.forgeries);
                    crate::log_warning_limited!(
                        REFUSAL_WARNINGS,
                        "address line for {ip} not remembered: forgery: {why} (pattern {pattern}, reported by {peer})"
                    );
                    return;
                }
                outcome
            }
            Outcome::Logout {
                ref pattern,
                ref speakers,
                ..
            } => {
                if !s.hold_while_connected {
                    return;
                }
                if let Verdict::Forgery(why) = verdict(pattern, speakers) {
                    Stats::bump(&self.stats.forgeries);
                    crate::log_warning_limited!(
                        REFUSAL_WARNINGS,
                        "logout line ignored: forgery: {why} (pattern {pattern}, reported by {peer})"
                    );
                    return;
                }
                outcome
            }
            other => other,
        };
        let outcome = match outcome {
            Outcome::Address { .. } | Outcome::LoginWithoutAddress { .. } => {
                let key = self.process_key(&rec, peer, believed);
                let (o, dropped) = self.memory.pair(key, outcome, now);
                if dropped > 0 {
                    self.stats
                        .addresses_dropped
                        .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
                }
                o
            }
            other => other,
        };
        let login = match outcome {
            Outcome::NoMatch => {
                crate::log_debug!(
                    "no login in record from {peer}: program \"{}\", message \"{}\"",
                    escape(rec.program),
                    escape(rec.message)
                );
                return;
            }
            Outcome::BadAddress { pattern, text } => {
                Stats::bump(&self.stats.bad_address);
                crate::log_warning_limited!(
                    INPUT_WARNINGS,
                    "line from {peer} matched pattern {pattern} but \"{}\" is not an IP address: nothing granted",
                    escape(&text)
                );
                return;
            }
            Outcome::Remembered { pattern } => {
                Stats::bump(&self.stats.addresses_remembered);
                crate::log_debug!(
                    "address remembered for the success line of the same process (pattern {pattern}, reported by {peer})"
                );
                return;
            }
            Outcome::Unaddressed { server, pattern } => {
                Stats::bump(&self.stats.logins_unaddressed);
                crate::log_warning_limited!(
                    INPUT_WARNINGS,
                    "line from {peer} is a {server} login (pattern {pattern}) that carries no client address (an old server release, or a host name cut before the address): nothing granted"
                );
                return;
            }
            Outcome::NoAddress { pattern } => {
                Stats::bump(&self.stats.logins_without_address);
                crate::log_warning_limited!(
                    INPUT_WARNINGS,
                    "line from {peer} matched pattern {pattern}, but no address line of the same process came before it (within {}s): nothing granted",
                    crate::matcher::MEMORY_TTL.as_secs()
                );
                return;
            }
            Outcome::Logout {
                ip,
                server,
                session,
                user,
                pattern,
                ..
            } => {
                self.logout(s, &rec, peer, ip, server, session, &user, &pattern, now);
                return;
            }
            // Paired above.
            Outcome::Address { .. } | Outcome::LoginWithoutAddress { .. } => return,
            Outcome::Login(l) => l,
        };
        Stats::bump(&self.stats.logins);
        if let Verdict::Forgery(why) = verdict(&login.pattern, &login.speakers) {
            Stats::bump(&self.stats.forgeries);
            crate::log_warning_limited!(
                REFUSAL_WARNINGS,
                "refuse {}: forgery: {why} ({} {} login of user \"{}\", pattern {}, reported by {peer})",
                login.ip,
                login.server,
                login.service,
                escape(&login.user),
                login.pattern
            );
            return;
        }
        let ip = match s.policy.check(login.ip) {
            Ok(ip) => ip,
            Err(why) => {
                Stats::bump(&self.stats.refused);
                crate::log_warning_limited!(
                    REFUSAL_WARNINGS,
                    "refuse {}: {why} ({} {} login of user \"{}\", pattern {}, reported by {peer})",
                    login.ip,
                    login.server,
                    login.service,
                    escape(&login.user),
                    login.pattern
                );
                return;
            }
        };
        let reporter = self.shared(&peer.to_string());
        let sender = self.shared(&sender_of(peer));
        let host = rec.hostname.unwrap_or("-");
        let mut expires = now + s.window;
        let mut held = None;
        if s.hold_while_connected {
            let until = match &login.session {
                Some(id) => {
                    let key = SessionKey {
                        reporter: sender,
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
                                crate::hold::MAX_PER_ADDRESS,
                                crate::hold::MAX_SESSIONS
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
        let grant = Grant {
            expires,
            server: login.server.clone(),
            service: login.service,
            user: login.user.as_str().into(),
            reporter: reporter.clone(),
            host: self.shared(host),
        };
        let verb = match self.table.grant(ip, grant) {
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
                if let Some(key) = held {
                    self.holds.close(&key, Some(ip), now, s.hold_max);
                }
                crate::log_warning_limited!(
                    REFUSAL_WARNINGS,
                    "refuse {ip}: the table is full ({} grants, --max-grants) ({} {} login of user \"{}\", pattern {}, reported by {peer})",
                    self.table.len(),
                    login.server,
                    login.service,
                    escape(&login.user),
                    login.pattern
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
        crate::log_info!(
            "{verb} {ip} for {how_long}: {} {} login of user \"{}\" (pattern {}, host {}, reported by {peer})",
            login.server,
            login.service,
            escape(&login.user),
            login.pattern,
            escape(host)
        );
    }

    /// The process a record comes from, for pairing the lines of a
    /// two-line server: the attested pid when the record carries a believed
    /// attestation, else the pid of its tag.
    fn process_key(
        &self,
        rec: &record::Record<'_>,
        peer: &Peer,
        believed: bool,
    ) -> Option<ProcessKey> {
        let attested = if believed {
            attest::sender(rec).ok().flatten().map(|s| s.pid)
        } else {
            None
        };
        Some(ProcessKey {
            reporter: sender_of(peer),
            host: rec.hostname.unwrap_or("-").to_string(),
            program: rec.program.to_string(),
            pid: attested.or(rec.pid)?,
        })
    }

    /// A logout line, attested: closes its session; the last one from an
    /// address lets the window run from now.
    #[allow(clippy::too_many_arguments)]
    fn logout(
        &self,
        s: &Settings,
        rec: &record::Record<'_>,
        peer: &Peer,
        ip: Option<std::net::IpAddr>,
        server: Arc<str>,
        session: Option<String>,
        user: &str,
        pattern: &str,
        now: tokio::time::Instant,
    ) {
        let ip = ip.and_then(|ip| s.policy.check(ip).ok());
        let closed = match session {
            None => Closed::Unknown,
            Some(id) => {
                let key = SessionKey {
                    reporter: self.shared(&sender_of(peer)),
                    host: rec.hostname.unwrap_or("-").to_string(),
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
                    escape(user)
                );
            }
            Closed::StillOpen(ip, n) => {
                Stats::bump(&self.stats.holds_closed);
                crate::log_info!(
                    "logout from {ip} of user \"{}\": {n} session(s) still open, grant still held (pattern {pattern}, reported by {peer})",
                    escape(user)
                );
            }
            Closed::Last(ip) => {
                Stats::bump(&self.stats.holds_closed);
                if self.table.set_expiry(ip, now + s.window) {
                    crate::log_info!(
                        "logout from {ip} of user \"{}\": last session closed, grant ends in {} (pattern {pattern}, reported by {peer})",
                        escape(user),
                        format_duration(s.window)
                    );
                }
            }
        }
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

/// A listening socket whose allow-list a reload may replace: the spec it
/// was bound from (none if systemd passed it) and its list.
struct AllowSlot {
    spec: Option<ListenSpec>,
    allow: AllowList,
}

impl AllowSlot {
    /// The slot's new allow-list: its spec's own `?allow=` in the new
    /// configuration if the same socket is still configured with one, else
    /// the new `--allow-from`.
    fn update(&self, specs: &[&ListenSpec], allow_from: &[Cidr]) {
        let same = |a: &ListenSpec| match (&self.spec, a) {
            (Some(ListenSpec::Udp(x, _)), ListenSpec::Udp(y, _))
            | (Some(ListenSpec::Tcp(x, _)), ListenSpec::Tcp(y, _)) => x == y,
            _ => false,
        };
        let own = specs.iter().find(|s| same(s)).and_then(|s| match s {
            ListenSpec::Udp(_, own) | ListenSpec::Tcp(_, own) => own.clone(),
            ListenSpec::Unix(_) => None,
        });
        self.allow.store(own.unwrap_or_else(|| allow_from.to_vec()));
    }
}

/// Everything the running daemon keeps to apply a reload.
struct Running {
    /// The arguments, to read the configuration again.
    args: DaemonArgs,
    /// The configuration in force (its matchers moved to the pipeline).
    config: Config,
    pipeline: Arc<Pipeline>,
    table: Arc<GrantTable>,
    stats: Arc<Stats>,
    slots: Vec<AllowSlot>,
}

/// Fatal start-up error: logs it and gives the exit status.
fn fatal(status: i32, message: impl std::fmt::Display) -> i32 {
    crate::logging::write(crate::logging::Level::Fatal, format_args!("{message}"));
    status
}

async fn run(mut config: Config, args: DaemonArgs, activated: Vec<Activated>) -> i32 {
    crate::logging::set_level(config.log_level);
    crate::logging::set_format(config.log_format);
    let allow: AllowList = Arc::new(Swap::new(config.allow_from.clone()));
    let listener_counts = Arc::new(ListenerCounts::default());
    let mut slots = Vec::new();
    let mut listeners = Vec::new();
    // Sockets systemd passed: syslog listeners first, the rest below.
    let mut others = Vec::new();
    for a in activated {
        let syslog = matches!(a.kind, Kind::Udp | Kind::UnixDatagram)
            || (a.kind == Kind::Tcp && !matches!(a.name.as_str(), "policy" | "metrics"));
        if !syslog {
            others.push(a);
            continue;
        }
        match receiver::from_activated(a, allow.clone()) {
            Ok((l, name)) => {
                if let Some(al) = l.allow() {
                    slots.push(AllowSlot {
                        spec: None,
                        allow: al.clone(),
                    });
                }
                crate::log_info!("listening on {name}, passed by systemd");
                listeners.push((l, name));
            }
            Err(e) => return fatal(EX_OSERR, e),
        }
    }
    let activated = others;
    // Passed sockets replace the default listener, and a configured one
    // at the same address (the same configuration works with and without
    // the .socket unit).
    let passed: Vec<String> = listeners.iter().map(|(_, n)| n.clone()).collect();
    if !config.listen_is_default || listeners.is_empty() {
        for spec in &config.listen {
            if passed.contains(&bare(spec)) {
                continue;
            }
            match receiver::bind(
                spec,
                allow.clone(),
                config.socket_mode,
                config.receive_buffer,
            ) {
                Ok(l) => {
                    if let Some(a) = l.allow() {
                        slots.push(AllowSlot {
                            spec: Some(spec.clone()),
                            allow: a.clone(),
                        });
                    }
                    listeners.push((l, bare(spec)));
                }
                Err(e) => return fatal(EX_OSERR, e),
            }
        }
    }

    // Postfix's side: the policy service and the socketmap.
    let mut services = Vec::new();
    for (what, specs) in [("policy", &config.policy), ("socketmap", &config.socketmap)] {
        for spec in specs {
            match crate::serve::bind(what, spec, allow.clone(), config.socket_mode) {
                Ok(l) => {
                    if let Some(a) = l.allow() {
                        slots.push(AllowSlot {
                            spec: Some(spec.clone()),
                            allow: a.clone(),
                        });
                    }
                    services.push((what, l));
                }
                Err(e) => return fatal(EX_OSERR, e),
            }
        }
    }
    let mut control = None;
    let mut metrics = None;
    for a in activated {
        let name = a.name.clone();
        match (a.kind, name.as_str()) {
            (Kind::UnixStream, "control") => match crate::serve::from_activated(a, allow.clone()) {
                Ok(crate::serve::StreamListener::Unix(l, p)) => control = Some((l, p)),
                Ok(_) => {}
                Err(e) => return fatal(EX_OSERR, e),
            },
            (Kind::UnixStream | Kind::Tcp, "policy" | "socketmap" | "metrics") => {
                let what = match name.as_str() {
                    "policy" => "policy",
                    "socketmap" => "socketmap",
                    _ => "metrics",
                };
                match crate::serve::from_activated(a, allow.clone()) {
                    Ok(l) => {
                        if let Some(al) = l.allow() {
                            slots.push(AllowSlot {
                                spec: None,
                                allow: al.clone(),
                            });
                        }
                        if what == "metrics" {
                            metrics = Some(l);
                        } else {
                            services.push((what, l));
                        }
                    }
                    Err(e) => return fatal(EX_OSERR, e),
                }
            }
            _ => {}
        }
    }
    if listeners.is_empty() {
        return fatal(
            EX_CONFIG,
            "no listener: give at least one --listen, or pass a socket through systemd",
        );
    }
    if control.is_none()
        && let Some((path, is_default)) = &config.control
    {
        let dir_missing = path.parent().is_some_and(|d| !d.is_dir());
        if *is_default && dir_missing {
            crate::log_info!(
                "no control socket ({} does not exist): list, revoke and stats will not reach this daemon; create the directory or set --control",
                path.parent()
                    .map_or_else(String::new, |d| d.display().to_string())
            );
        } else {
            match crate::control::bind(path) {
                Ok(c) => control = Some(c),
                // The default path may belong to an installed daemon: a
                // second one started by hand runs without a control socket.
                Err(e) if *is_default => crate::log_warning!(
                    "no control socket: {e}; list, revoke and stats will not reach this daemon (set --control)"
                ),
                Err(e) => return fatal(EX_OSERR, e),
            }
        }
    }
    if metrics.is_none()
        && let Some(spec) = &config.metrics
    {
        match crate::serve::bind("metrics", spec, allow.clone(), config.socket_mode) {
            Ok(l) => {
                if let Some(a) = l.allow() {
                    slots.push(AllowSlot {
                        spec: Some(spec.clone()),
                        allow: a.clone(),
                    });
                }
                metrics = Some(l);
            }
            Err(e) => return fatal(EX_OSERR, e),
        }
    }

    // Unix socket files get their group, then root is given up for good,
    // before any record is read or the map written.
    let socket_gid = config
        .socket_group
        .as_ref()
        .map(|g| g.gid)
        .or(config.run_as.as_ref().map(|(_, g)| g.gid));
    if let Some(gid) = socket_gid {
        let paths = listeners
            .iter()
            .filter_map(|(l, _)| l.socket_path())
            .chain(services.iter().filter_map(|(_, l)| l.socket_path()));
        for path in paths {
            if let Err(e) = privilege::chgrp(path, gid) {
                return fatal(EX_OSERR, e);
            }
        }
    }
    if let (Some((_, path)), Some((_, group))) = (&control, &config.run_as)
        && path.1
        && let Err(e) = privilege::chgrp(&path.0, group.gid)
    {
        return fatal(EX_OSERR, e);
    }
    if let Some((user, group)) = &config.run_as {
        if let Err(e) = privilege::drop_to(user.uid, group.gid) {
            return fatal(
                EX_OSERR,
                format_args!(
                    "cannot switch to user {} (uid {}) and group {} (gid {}): {e}; start the daemon as root to use --user",
                    user.name, user.uid, group.name, group.gid
                ),
            );
        }
        let mut dirs = Vec::new();
        if let Some(map) = &config.map {
            dirs.push(("--map", map.path.clone()));
        }
        if let Some(state) = &config.state {
            dirs.push(("--state", state.clone()));
        }
        for (key, file) in dirs {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !privilege::can_write(&dir) {
                return fatal(
                    EX_CONFIG,
                    format_args!(
                        "{key} {}: user {} may not create files in {}: give the directory to that user (chown) or choose a file in a directory it owns",
                        file.display(),
                        user.name,
                        dir.display()
                    ),
                );
            }
        }
        crate::log_info!(
            "running as user {} (uid {}), group {} (gid {})",
            user.name,
            user.uid,
            group.name,
            group.gid
        );
    }
    if let Some(map) = config.map.as_mut() {
        match map.use_defaults_without_main_cf() {
            Ok(Some(dir)) => crate::log_info!(
                "no /etc/postfix/main.cf and no MAIL_CONFIG: postmap runs with Postfix's built-in defaults (MAIL_CONFIG={})",
                dir.display()
            ),
            Ok(None) => {}
            Err(e) => crate::log_warning!(
                "no /etc/postfix/main.cf and no MAIL_CONFIG, and cannot write an empty configuration for postmap next to {}: {e}; set MAIL_CONFIG to a directory with a main.cf",
                map.path.display()
            ),
        }
    }
    let stats = Arc::new(Stats::default());
    let table = Arc::new(GrantTable::with_limit(config.max_grants));
    let settings = Settings::take(&mut config);

    // Grants still open from the last run come back before the map is
    // first written, with their original expiry.
    let mut state_writer = None;
    if let Some(path) = &config.state {
        let loaded = match crate::state::load(path) {
            Ok(l) => l,
            Err(e) => return fatal(EX_CONFIG, e),
        };
        for bad in &loaded.bad_lines {
            crate::log_warning!("state {bad}");
        }
        let (restored, expired, refused) =
            crate::state::restore(&loaded, &table, &settings.policy, settings.window);
        crate::log_info!(
            "state {}: restored {restored} grants ({expired} expired meanwhile, {refused} refused by the never-grant rules)",
            path.display()
        );
        match StateWriter::start(path.clone(), table.clone()) {
            Ok(w) => state_writer = Some(w),
            Err(e) => return fatal(EX_OSERR, e),
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(table.clone().run_purge(stats.clone()));

    if let Some(map) = config.map.clone() {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(map.run(table.clone(), stats.clone(), Some(first_tx)));
        // Postfix fails every lookup of a missing map, so write it before
        // accepting logins; if postmap fails, the sink keeps retrying.
        let _ = first_rx.await;
    }
    for (what, l) in services {
        let (table, stats) = (table.clone(), stats.clone());
        if what == "policy" {
            tasks.spawn(l.serve("policy", move |io, peer| {
                crate::policy::session(io, peer, table.clone(), stats.clone())
            }));
        } else {
            tasks.spawn(l.serve("socketmap", move |io, peer| {
                crate::socketmap::session(io, peer, table.clone(), stats.clone())
            }));
        }
    }
    let status = Arc::new(Status {
        table: table.clone(),
        stats: stats.clone(),
        listeners: listener_counts.clone(),
    });
    let control_desc = control
        .as_ref()
        .map(|(_, p)| format!("; control {}", p.0.display()));
    if let Some((l, p)) = control {
        tasks.spawn(crate::control::serve(l, p, status.clone()));
    }
    if let Some(l) = metrics {
        let status = status.clone();
        tasks.spawn(l.serve("metrics", move |io, _peer| {
            crate::metrics::session(io, status.clone())
        }));
    }

    let pipeline = Arc::new(Pipeline::new(settings, table.clone(), stats.clone()));
    let mut serving = match &config.map {
        Some(m) => format!("map {}:{}", m.map_type.name(), m.path.display()),
        None => "no map file".to_string(),
    };
    if !config.policy.is_empty() {
        serving.push_str(&format!("; policy {}", join(&config.policy)));
    }
    if !config.socketmap.is_empty() {
        serving.push_str(&format!(
            "; socketmap {} (map name {})",
            join(&config.socketmap),
            crate::socketmap::MAP_NAME
        ));
    }
    if let Some(c) = control_desc {
        serving.push_str(&c);
    }
    if let Some(m) = &config.metrics {
        serving.push_str(&format!("; metrics {m}"));
    }
    if let Some(s) = &config.state {
        serving.push_str(&format!("; state {}", s.display()));
    }
    let names: Vec<String> = listeners.iter().map(|(_, n)| n.clone()).collect();
    crate::log_info!(
        "started: listening on {}; allow-from {}; never {}; window {}{}; {serving}",
        names.join(", "),
        join(&config.allow_from),
        if config.never.is_empty() {
            "none".to_string()
        } else {
            join(&config.never)
        },
        format_duration(config.window),
        if config.hold_while_connected {
            format!(
                "; hold-while-connected (hold-max {})",
                format_duration(config.hold_max)
            )
        } else {
            String::new()
        }
    );

    // The sockets are bound, so datagrams that arrived meanwhile wait in
    // their queues; say "started" before the first of them is handled.
    // The kernel counts the datagrams it dropped for a full receive queue;
    // the stop line reports them with our own counters.
    let udp_inodes: Vec<u64> = listeners
        .iter()
        .filter_map(|(l, _)| l.udp_inode())
        .collect();
    for (l, name) in listeners {
        let p = pipeline.clone();
        let counter = listener_counts.counter(&name);
        tasks.spawn(l.run(stats.clone(), counter, move |bytes, peer| {
            p.handle(bytes, peer)
        }));
    }
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {}; {} grants",
        names.join(", "),
        table.len()
    ));

    let mut running = Running {
        args,
        config,
        pipeline,
        table: table.clone(),
        stats: stats.clone(),
        slots,
    };
    let status = wait_for_signal(&mut running).await;
    crate::systemd::notify("STOPPING=1");
    // Read the kernel's count while the sockets are still open.
    let kernel_dropped = receiver::kernel_drops(&udp_inodes);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(w) = state_writer
        && !w.stop(Duration::from_millis(800))
    {
        crate::log_error!("state: the last changes could not be written within 0.8 s");
    }
    crate::log_info!(
        "stopped: {} kernel_dropped={kernel_dropped}",
        stats
            .snapshot()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    status
}

/// Re-reads the configuration (SIGHUP). A configuration that does not
/// validate is refused and the old one stays in force; otherwise patterns,
/// window, never-grant rules, attestation, allow-lists, the grant limit and
/// logging change at once, live grants stay (but for those the new
/// never-grant rules refuse, which end), and settings that need sockets
/// or files opened again are reported as needing a restart.
fn reload(r: &mut Running) {
    crate::systemd::notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        crate::systemd::monotonic_usec()
    ));
    let mut new = match Config::from_args(&r.args) {
        Ok(c) => c,
        Err(e) => {
            Stats::bump(&r.stats.reload_failures);
            crate::log_error!("reload refused, the running configuration stays in force: {e}");
            crate::systemd::notify("READY=1\nSTATUS=reload refused: see the log");
            return;
        }
    };
    let old = &r.config;
    let strip = |l: &[ListenSpec]| -> Vec<String> { l.iter().map(bare).collect() };
    let mut restart = Vec::new();
    if strip(&old.listen) != strip(&new.listen) {
        restart.push("listen");
    }
    if format!("{:?}", old.map) != format!("{:?}", new.map) {
        restart.push("map, map-type or postmap");
    }
    if strip(&old.policy) != strip(&new.policy) {
        restart.push("policy");
    }
    if strip(&old.socketmap) != strip(&new.socketmap) {
        restart.push("socketmap");
    }
    if old.state != new.state {
        restart.push("state");
    }
    if old.control != new.control {
        restart.push("control");
    }
    if format!(
        "{:?}",
        old.metrics.as_ref().map(|m| strip(std::slice::from_ref(m)))
    ) != format!(
        "{:?}",
        new.metrics.as_ref().map(|m| strip(std::slice::from_ref(m)))
    ) {
        restart.push("metrics");
    }
    if format!("{:?}", old.run_as) != format!("{:?}", new.run_as)
        || format!("{:?}", old.socket_group) != format!("{:?}", new.socket_group)
        || old.socket_mode != new.socket_mode
        || old.receive_buffer != new.receive_buffer
    {
        restart.push("user, group, socket-group, socket-mode or receive-buffer");
    }

    crate::logging::set_level(new.log_level);
    crate::logging::set_format(new.log_format);
    let specs: Vec<&ListenSpec> = new
        .listen
        .iter()
        .chain(&new.policy)
        .chain(new.metrics.iter())
        .collect();
    for slot in &r.slots {
        slot.update(&specs, &new.allow_from);
    }
    r.table.set_limit(new.max_grants);
    let settings = Settings::take(&mut new);
    let hold_off = r.config.hold_while_connected && !new.hold_while_connected;
    r.pipeline.settings.store(settings);
    if hold_off {
        // Grants held by open sessions get the window from now, unless
        // they end sooner.
        let now = tokio::time::Instant::now();
        let ips = r.pipeline.holds.clear();
        for ip in &ips {
            if r.table
                .get(*ip)
                .is_some_and(|g| g.expires > now + new.window)
            {
                r.table.set_expiry(*ip, now + new.window);
            }
        }
        crate::log_info!(
            "hold-while-connected turned off: {} held addresses get the window from now",
            ips.len()
        );
    }
    // "Never" means never: live grants the new rules refuse end now.
    let policy = AddressPolicy::new(new.never.clone());
    for (ip, _) in r.table.list() {
        if let Err(why) = policy.check(ip)
            && r.table.revoke(ip).is_some()
        {
            Stats::bump(&r.stats.revoked);
            crate::log_info!(
                "revoke {ip}: {why} (never-grant rules of the reloaded configuration)"
            );
        }
    }
    Stats::bump(&r.stats.reloads);
    crate::log_info!(
        "reloaded: window {}; allow-from {}; never {}; require-attestation {}; hold-while-connected {}; max-grants {}; {} live grants kept",
        format_duration(new.window),
        join(&new.allow_from),
        if new.never.is_empty() {
            "none".to_string()
        } else {
            join(&new.never)
        },
        if new.require_attestation { "yes" } else { "no" },
        if new.hold_while_connected {
            format!("yes (hold-max {})", format_duration(new.hold_max))
        } else {
            "no".to_string()
        },
        new.max_grants,
        r.table.len()
    );
    if !restart.is_empty() {
        crate::log_warning!(
            "reload: changed {} keep their old value until the daemon is restarted",
            restart.join("; ")
        );
    }
    // What is in force now, for the next comparison.
    r.config = new;
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=reloaded; {} grants",
        r.table.len()
    ));
}

/// A listen spec without its allow-list: `udp://ADDR:PORT`,
/// `tcp://ADDR:PORT`, `unix:///PATH`.
fn bare(spec: &ListenSpec) -> String {
    match spec {
        ListenSpec::Udp(a, _) => format!("udp://{a}"),
        ListenSpec::Tcp(a, _) => format!("tcp://{a}"),
        ListenSpec::Unix(p) => format!("unix://{}", p.display()),
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits for SIGTERM or SIGINT, reloading on each SIGHUP; returns the exit
/// status.
async fn wait_for_signal(r: &mut Running) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        crate::log_error!("cannot install signal handlers; stop the daemon with SIGKILL");
        std::future::pending::<()>().await;
        return 0;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                crate::log_info!("SIGTERM received, stopping");
                return 0;
            }
            _ = int.recv() => {
                crate::log_info!("SIGINT received, stopping");
                return 0;
            }
            _ = hup.recv() => {
                crate::log_info!("SIGHUP received, reloading the configuration");
                reload(r);
            }
        }
    }
}
/// `smtp-after-popd match`: prints each recognised login in the files.
fn run_match(config: Option<PathBuf>, files: Vec<PathBuf>) -> i32 {
    let matchers = match crate::config::matchers_from_file(config.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
            return EX_CONFIG;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut status = 0;
    let memory = AddressMemory::new();
    let mut scan = |reader: &mut dyn BufRead| -> std::io::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let Ok(rec) = record::parse(&line) else {
                continue;
            };
            let outcome = matchers.match_record(&rec);
            let key = rec.pid.map(|pid| ProcessKey {
                reporter: "-".to_string(),
                host: rec.hostname.unwrap_or("-").to_string(),
                program: rec.program.to_string(),
                pid,
            });
            // Lines of a file carry no receive time: pair by order only.
            let (outcome, _) = memory.pair(key, outcome, tokio::time::Instant::now());
            if let Outcome::Login(l) = outcome {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    crate::addr::canonical(l.ip),
                    l.server,
                    l.service,
                    escape(&l.user)
                )?;
            }
        }
    };
    if files.is_empty() {
        let stdin = std::io::stdin();
        if let Err(e) = scan(&mut stdin.lock()) {
            crate::log_error!("standard input: {e}");
            status = EX_NOINPUT;
        }
    }
    for f in &files {
        match std::fs::File::open(f) {
            Ok(file) => {
                if let Err(e) = scan(&mut std::io::BufReader::new(file)) {
                    crate::log_error!("{}: {e}", f.display());
                    status = EX_NOINPUT;
                }
            }
            Err(e) => {
                crate::log_error!("cannot open {}: {e}", f.display());
                status = EX_NOINPUT;
            }
        }
    }
    if out.flush().is_err() {
        return 74;
    }
    status
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
            Settings {
                matchers: Matchers::builtin(),
                policy: AddressPolicy::new(Vec::new()),
                window: Duration::from_secs(120),
                require_attestation,
                trust_attestation_from: Vec::new(),
                hold_while_connected: hold,
                hold_max: Duration::from_secs(3600),
            },
            Arc::new(GrantTable::new()),
            Arc::new(Stats::default()),
        )
    }

    fn peer() -> Peer {
        Peer::Unix("/run/test.sock".into())
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
        assert_eq!(
            p.stats
                .holds_opened
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            p.stats
                .holds_closed
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
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
        assert_eq!(
            p.stats
                .logouts_unpaired
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
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
        assert_eq!(
            p.stats
                .logouts_unpaired
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
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
        assert_eq!(
            p.stats
                .logins_without_address
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // The remembered address expires after a minute.
        tokio::time::advance(Duration::from_secs(61)).await;
        p.handle(
            b"<22>Mar 11 08:01:03 mail popa3d[3101]: Authentication passed for alice",
            &peer(),
        );
        assert!(p.table.get("192.0.2.100".parse().unwrap()).is_none());
        assert_eq!(
            p.stats
                .logins_without_address
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
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
        assert_eq!(
            p.stats.forgeries.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
