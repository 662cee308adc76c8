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
use crate::config::{Cli, Command, Config, EX_CONFIG, format_duration};
use crate::grants::{Grant, GrantResult, GrantTable};
use crate::logging::{RateLimit, escape};
use crate::matcher::{Matchers, Outcome};
use crate::privilege;
use crate::receiver::{self, Peer};
use crate::record::{self, ParseError};
use crate::stats::Stats;

/// Exit status when the daemon cannot start for a reason other than its
/// configuration (a port in use, no permission).
pub const EX_OSERR: i32 = 71;
/// Exit status of `match` when an input file cannot be read.
pub const EX_NOINPUT: i32 = 66;

/// Runs the command line; returns the exit status.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Match { config, files }) => run_match(config, files),
        None => {
            let config = match Config::from_args(&cli.daemon) {
                Ok(c) => c,
                Err(e) => {
                    crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
                    return EX_CONFIG;
                }
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
            runtime.block_on(run(config))
        }
    }
}

/// What happens to one datagram: parse, match, check, grant.
pub struct Pipeline {
    /// The login patterns.
    pub matchers: Matchers,
    /// The never-grant rules.
    pub policy: AddressPolicy,
    /// Where grants go.
    pub table: Arc<GrantTable>,
    /// The window after each login.
    pub window: Duration,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Whether a login needs an attested sender.
    pub require_attestation: bool,
    /// Network peers whose attestation is believed (unix sockets always).
    pub trust_attestation_from: Vec<Cidr>,
    /// Reporter names shared by the grants they made, so that a million
    /// grants from one sender hold one copy of its name.
    pub reporters: std::sync::Mutex<std::collections::HashMap<String, Arc<str>>>,
}

static INPUT_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 10);
static REFUSAL_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(60), 20);

/// Most distinct reporter names kept for sharing (TCP peers change port
/// with each connection; beyond this, names are simply not shared).
const MAX_REPORTERS: usize = 4096;

impl Pipeline {
    /// The shared name of a reporting peer.
    fn reporter(&self, peer: &Peer) -> Arc<str> {
        let name = peer.to_string();
        let mut map = match self.reporters.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(a) = map.get(&name) {
            return a.clone();
        }
        let a: Arc<str> = name.as_str().into();
        if map.len() < MAX_REPORTERS {
            map.insert(name, a.clone());
        }
        a
    }

    /// Handles one datagram from `peer`.
    pub fn handle(&self, bytes: &[u8], peer: &Peer) {
        // Most of a mail log is not a login: a record that names none of
        // the patterns' programs is counted and not even parsed. (Records
        // too long or not UTF-8 go on, to be counted as such.)
        if bytes.len() <= record::MAX_RECORD
            && !self.matchers.may_match(bytes)
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
        let login = match self.matchers.match_record(&rec) {
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
            Outcome::Login(l) => l,
        };
        Stats::bump(&self.stats.logins);
        let believed = match peer {
            Peer::Unix(_) => true,
            Peer::Udp(a) | Peer::Tcp(a) => self
                .trust_attestation_from
                .iter()
                .any(|c| c.contains(a.ip())),
        };
        let verdict = if believed {
            attest::check(
                &rec,
                &login.pattern,
                &login.speakers,
                self.require_attestation,
            )
        } else {
            attest::unbelieved(&rec, self.require_attestation)
        };
        if let Verdict::Forgery(why) = verdict {
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
        let ip = match self.policy.check(login.ip) {
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
        let grant = Grant {
            expires: tokio::time::Instant::now() + self.window,
            server: login.server.clone(),
            service: login.service,
            user: login.user.as_str().into(),
            reporter: self.reporter(peer),
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
        crate::log_info!(
            "{verb} {ip} for {}: {} {} login of user \"{}\" (pattern {}, host {}, reported by {peer})",
            format_duration(self.window),
            login.server,
            login.service,
            escape(&login.user),
            login.pattern,
            escape(rec.hostname.unwrap_or("-"))
        );
    }
}

async fn run(mut config: Config) -> i32 {
    crate::logging::set_level(config.log_level);
    let allow = Arc::new(config.allow_from.clone());
    let mut listeners = Vec::new();
    for spec in &config.listen {
        match receiver::bind(
            spec,
            allow.clone(),
            config.socket_mode,
            config.receive_buffer,
        ) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
                return EX_OSERR;
            }
        }
    }

    // Postfix's side: the policy service and the socketmap.
    let mut services = Vec::new();
    for (what, specs) in [("policy", &config.policy), ("socketmap", &config.socketmap)] {
        for spec in specs {
            match crate::serve::bind(what, spec, allow.clone(), config.socket_mode) {
                Ok(l) => services.push((what, l)),
                Err(e) => {
                    crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
                    return EX_OSERR;
                }
            }
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
            .filter_map(|l| l.socket_path())
            .chain(services.iter().filter_map(|(_, l)| l.socket_path()));
        for path in paths {
            if let Err(e) = privilege::chgrp(path, gid) {
                crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
                return EX_OSERR;
            }
        }
    }
    if let Some((user, group)) = &config.run_as {
        if let Err(e) = privilege::drop_to(user.uid, group.gid) {
            crate::logging::write(
                crate::logging::Level::Fatal,
                format_args!(
                    "cannot switch to user {} (uid {}) and group {} (gid {}): {e}; start the daemon as root to use --user",
                    user.name, user.uid, group.name, group.gid
                ),
            );
            return EX_OSERR;
        }
        if let Some(map) = &config.map {
            let dir = match map.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !privilege::can_write(&dir) {
                crate::logging::write(
                    crate::logging::Level::Fatal,
                    format_args!(
                        "--map {}: user {} may not create files in {}: give the directory to that user (chown) or choose a map in a directory it owns",
                        map.path.display(),
                        user.name,
                        dir.display()
                    ),
                );
                return EX_CONFIG;
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

    let pipeline = Arc::new(Pipeline {
        matchers: config.matchers,
        policy: AddressPolicy::new(config.never.clone()),
        table: table.clone(),
        window: config.window,
        stats: stats.clone(),
        require_attestation: config.require_attestation,
        trust_attestation_from: config.trust_attestation_from.clone(),
        reporters: Default::default(),
    });
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
    crate::log_info!(
        "started: listening on {}; allow-from {}; never {}; window {}; {serving}",
        join(&config.listen),
        join(&config.allow_from),
        if config.never.is_empty() {
            "none".to_string()
        } else {
            join(&config.never)
        },
        format_duration(config.window)
    );

    // The sockets are bound, so datagrams that arrived meanwhile wait in
    // their queues; say "started" before the first of them is handled.
    // The kernel counts the datagrams it dropped for a full receive queue;
    // the stop line reports them with our own counters.
    let udp_inodes: Vec<u64> = listeners.iter().filter_map(|l| l.udp_inode()).collect();
    for l in listeners {
        let p = pipeline.clone();
        tasks.spawn(l.run(stats.clone(), move |bytes, peer| p.handle(bytes, peer)));
    }

    let status = wait_for_signal().await;
    // Read the kernel's count while the sockets are still open.
    let kernel_dropped = receiver::kernel_drops(&udp_inodes);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
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

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits for SIGTERM or SIGINT; returns the exit status.
async fn wait_for_signal() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        crate::log_error!("cannot install signal handlers; stop the daemon with SIGKILL");
        std::future::pending::<()>().await;
        return 0;
    };
    tokio::select! {
        _ = term.recv() => crate::log_info!("SIGTERM received, stopping"),
        _ = int.recv() => crate::log_info!("SIGINT received, stopping"),
    }
    0
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
            if let Outcome::Login(l) = matchers.match_record(&rec) {
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
