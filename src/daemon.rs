//! The daemon: binds the receivers, wires them to the per-datagram stage
//! ([`crate::pipeline`]), the grant table and the sinks, and runs them until
//! SIGTERM or SIGINT, reloading on SIGHUP. Also the subcommands: `match`,
//! which runs the same parser and matchers over files, and the control
//! clients `list`, `revoke` and `stats`.
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
use crate::config::{
    Cli, Command, Config, ControlArgs, DEFAULT_SYSLOG_SOCKET_MODE, DaemonArgs, EX_CONFIG,
    ListenSpec, format_duration,
};
use crate::control::{self, Status};
use crate::grants::GrantTable;
use crate::logging::escape;
use crate::matcher::{AddressMemory, CutKey, CutLines, Outcome, ProcessKey};
use crate::metrics;
use crate::net::{self, Access, AllowList, Kind, StreamListener};
use crate::policy;
use crate::privilege;
use crate::receiver::{self, Listener};
use crate::record;
use crate::startup;
use crate::state::StateWriter;
use crate::stats::{ListenerCounts, Stats};
use crate::swap::Swap;
use crate::systemd::Activated;

pub use crate::pipeline::{Pipeline, Settings};

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
        Some(Command::PostfixConfig { daemon, cf_dir }) => match Config::from_args(&daemon) {
            Ok(c) => {
                print!("{}", crate::postfix_config::render(&c, &cf_dir));
                0
            }
            Err(e) => fatal(EX_CONFIG, e),
        },
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
                Err(e) => return fatal(EX_OSERR, format_args!("cannot start the runtime: {e}")),
            };
            runtime.block_on(run(config, cli.daemon, activated))
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

/// A listening socket whose allow-list a reload may replace: where it
/// listens, and its list.
struct AllowSlot {
    spec: ListenSpec,
    allow: AllowList,
}

impl AllowSlot {
    /// Keeps a slot for a listener that has an allow-list.
    fn keep(slots: &mut Vec<AllowSlot>, spec: &ListenSpec, allow: Option<&AllowList>) {
        if let Some(allow) = allow {
            slots.push(AllowSlot {
                spec: spec.clone(),
                allow: allow.clone(),
            });
        }
    }

    /// The slot's allow-list under a new configuration.
    fn update(&self, config: &Config) {
        self.allow.store(allow_for(config, &self.spec.address()));
    }
}

/// The allow-list of the socket at `address` (`udp://ADDR:PORT`...): the
/// `?allow=` of the configured listener, policy service or metrics
/// endpoint at that address, else `--allow-from`.
fn allow_for(config: &Config, address: &str) -> Vec<Cidr> {
    config
        .listen
        .iter()
        .chain(&config.policy)
        .chain(&config.auth_policy)
        .chain(config.metrics.iter())
        .find(|s| s.address() == address)
        .and_then(ListenSpec::own_allow)
        .cloned()
        .unwrap_or_else(|| config.allow_from.clone())
}

/// Everything the running daemon keeps to apply a reload.
struct Running {
    /// The arguments, to read the configuration again.
    args: DaemonArgs,
    /// The configuration in force.
    config: Config,
    pipeline: Arc<Pipeline>,
    table: Arc<GrantTable>,
    stats: Arc<Stats>,
    slots: Vec<AllowSlot>,
}

/// Everything bound at start-up, before root is given up.
#[derive(Default)]
struct Sockets {
    /// Syslog listeners, with the address the log names them by.
    listeners: Vec<(Listener, String)>,
    /// Policy services and socketmaps.
    services: Vec<(&'static str, StreamListener)>,
    control: Option<StreamListener>,
    metrics: Option<StreamListener>,
    /// Auth-policy listeners, and the secret their requests must carry.
    auth_policy: Vec<StreamListener>,
    auth_secret: Option<crate::authpolicy::Secret>,
    /// The allow-lists a reload replaces.
    slots: Vec<AllowSlot>,
}

/// A start-up failure: exit status and message.
type Fatal = (i32, String);

/// Binds (or takes from systemd) every socket the configuration names,
/// each unix socket with its owner, group and mode.
fn bind_sockets(config: &Config, activated: Vec<Activated>) -> Result<Sockets, Fatal> {
    warn_deprecated(config);
    warn_few_descriptors(config);
    let mut sockets = Sockets::default();
    // Sockets systemd passed: syslog listeners first, the rest below.
    let (syslog, others): (Vec<Activated>, Vec<Activated>) = activated.into_iter().partition(|a| {
        matches!(a.kind, Kind::Udp | Kind::UnixDatagram)
            || (a.kind == Kind::Tcp && !matches!(a.name.as_str(), "policy" | "metrics"))
    });
    for a in syslog {
        let address = a.spec.address();
        let allow = Arc::new(Swap::new(allow_for(config, &address)));
        let (adopted, spec) = adopt(a)?;
        let l =
            receiver::from_adopted(adopted, address.clone(), allow).map_err(|e| (EX_OSERR, e))?;
        AllowSlot::keep(&mut sockets.slots, &spec, l.allow());
        crate::log_info!("listening on {address}, passed by systemd");
        sockets.listeners.push((l, address));
    }
    bind_listeners(config, &mut sockets)?;
    bind_services(config, &mut sockets)?;
    bind_auth_policy(config, &mut sockets)?;
    for a in others {
        adopt_service(config, a, &mut sockets)?;
    }
    if sockets.listeners.is_empty() {
        return Err((
            EX_CONFIG,
            "no listener: give at least one --listen, or pass a socket through systemd".into(),
        ));
    }
    if sockets.control.is_none() {
        sockets.control = bind_control(config)?;
    }
    if sockets.metrics.is_none()
        && let Some(spec @ ListenSpec::Tcp(addr, own)) = &config.metrics
    {
        let allow = own.clone().unwrap_or_else(|| config.allow_from.clone());
        let allow = Arc::new(Swap::new(allow));
        let what = format!("--metrics {spec}");
        let l = net::bind_tcp(*addr, None, &what)
            .map_err(|e| (EX_OSERR, startup::bind_hint(spec, &e)))?;
        let l = StreamListener::tcp(l, format!("metrics {}", spec.address()), allow);
        AllowSlot::keep(&mut sockets.slots, spec, l.allow());
        sockets.metrics = Some(l);
    }
    Ok(sockets)
}

/// Takes over a socket systemd passed, refusing a syslog socket that every
/// local user may write.
fn adopt(a: Activated) -> Result<(net::Adopted, ListenSpec), Fatal> {
    let what = format!("socket \"{}\" passed by systemd", a.name);
    let spec = a.spec.clone();
    if a.kind == Kind::UnixDatagram
        && let ListenSpec::Unix(path, _) = &spec
        && let Ok(meta) = std::fs::metadata(path)
        && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o002 != 0
    {
        return Err((
            EX_CONFIG,
            format!(
                "{what}: {} is writable by every local user (mode {}), so anyone could forge login records: set SocketMode=0600 (root, i.e. rsyslog, only) in the .socket unit",
                path.display(),
                net::mode_text(
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
                )
            ),
        ));
    }
    let path = match &spec {
        ListenSpec::Unix(p, _) => p.clone(),
        _ => PathBuf::new(),
    };
    let adopted = net::adopt(a.fd, a.kind, path, &what).map_err(|e| (EX_OSERR, e))?;
    Ok((adopted, spec))
}

/// A passed socket for the control socket, a policy service, a socketmap
/// or the metrics endpoint (by its FileDescriptorName=).
fn adopt_service(config: &Config, a: Activated, sockets: &mut Sockets) -> Result<(), Fatal> {
    // take_listen_fds let through only unix stream sockets named control,
    // policy or socketmap; a TCP one is for policy or metrics.
    let what: &'static str = match a.name.as_str() {
        "control" => "control",
        "policy" => "policy",
        "socketmap" => "socketmap",
        _ => "metrics",
    };
    let address = a.spec.address();
    let label = format!("{what} {address}");
    let (adopted, spec) = adopt(a)?;
    let l = match adopted {
        net::Adopted::Tcp(l) => {
            let allow = Arc::new(Swap::new(allow_for(config, &address)));
            StreamListener::tcp(l, label, allow)
        }
        net::Adopted::UnixStream(l, file) => StreamListener::unix(l, file, label),
        _ => {
            return Err((
                EX_OSERR,
                format!("socket \"{what}\" passed by systemd is not a stream socket"),
            ));
        }
    };
    AllowSlot::keep(&mut sockets.slots, &spec, l.allow());
    match what {
        "control" => sockets.control = Some(l),
        "metrics" => sockets.metrics = Some(l),
        what => sockets.services.push((what, l)),
    }
    Ok(())
}

/// The configured syslog listeners, but those systemd passed (which
/// replace the default listener, and a configured one at the same address:
/// the same configuration works with and without the .socket unit).
fn bind_listeners(config: &Config, sockets: &mut Sockets) -> Result<(), Fatal> {
    if config.listen_is_default && !sockets.listeners.is_empty() {
        return Ok(());
    }
    let allow: AllowList = Arc::new(Swap::new(config.allow_from.clone()));
    let passed: Vec<String> = sockets.listeners.iter().map(|(_, n)| n.clone()).collect();
    // A syslog socket: writable by its owner (and root, i.e. rsyslog) only,
    // unless its URL says otherwise; --socket-mode and --socket-group never
    // apply to it.
    let defaults = Access {
        mode: Some(DEFAULT_SYSLOG_SOCKET_MODE),
        ..Access::default()
    };
    for spec in &config.listen {
        if passed.contains(&spec.address()) {
            continue;
        }
        let access = spec.access().cloned().unwrap_or_default().or(&defaults);
        let l = receiver::bind(spec, allow.clone(), &access, config.receive_buffer)
            .map_err(|e| (EX_OSERR, startup::bind_hint(spec, &e)))?;
        AllowSlot::keep(&mut sockets.slots, spec, l.allow());
        sockets.listeners.push((l, spec.address()));
    }
    Ok(())
}

/// The policy services and socketmaps: Postfix's side. A unix socket gets
/// its URL's owner, group and mode, else --socket-group (or the daemon's
/// group) and --socket-mode (or 0660).
fn bind_services(config: &Config, sockets: &mut Sockets) -> Result<(), Fatal> {
    let allow: AllowList = Arc::new(Swap::new(config.allow_from.clone()));
    let defaults = Access {
        owner: None,
        group: config
            .socket_group
            .clone()
            .or_else(|| config.run_as.as_ref().map(|(_, g)| g.clone())),
        mode: Some(config.socket_mode.unwrap_or(0o660)),
    };
    for (what, specs) in [("policy", &config.policy), ("socketmap", &config.socketmap)] {
        for spec in specs {
            let l = match spec {
                ListenSpec::Tcp(addr, own) => {
                    let allow = own
                        .clone()
                        .map(|a| Arc::new(Swap::new(a)))
                        .unwrap_or(allow.clone());
                    let l = net::bind_tcp(*addr, None, &format!("--{what} {spec}"))
                        .map_err(|e| (EX_OSERR, startup::bind_hint(spec, &e)))?;
                    StreamListener::tcp(l, format!("{what} {}", spec.address()), allow)
                }
                ListenSpec::Unix(path, own) => {
                    let access = own.or(&defaults);
                    StreamListener::bind_unix(path, &access, &format!("--{what} {spec}"))
                        .map_err(|e| (EX_OSERR, startup::bind_hint(spec, &e)))?
                }
                ListenSpec::Udp(..) => {
                    return Err((
                        EX_CONFIG,
                        format!("--{what} {spec}: expected a stream socket"),
                    ));
                }
            };
            AllowSlot::keep(&mut sockets.slots, spec, l.allow());
            sockets.services.push((what, l));
        }
    }
    Ok(())
}

/// The auth-policy listeners, and their secret, read now (before --user
/// takes effect, so the file may be root's alone).
fn bind_auth_policy(config: &Config, sockets: &mut Sockets) -> Result<(), Fatal> {
    let Some(path) = &config.auth_policy_secret else {
        return Ok(());
    };
    sockets.auth_secret = Some(crate::authpolicy::Secret::read(path).map_err(|e| (EX_CONFIG, e))?);
    for spec in &config.auth_policy {
        let ListenSpec::Tcp(addr, own) = spec else {
            continue;
        };
        let allow = own.clone().unwrap_or_else(|| config.allow_from.clone());
        let l = net::bind_tcp(*addr, None, &format!("--auth-policy {spec}"))
            .map_err(|e| (EX_OSERR, startup::bind_hint(spec, &e)))?;
        let l = StreamListener::tcp(
            l,
            format!("auth-policy {}", spec.address()),
            Arc::new(Swap::new(allow)),
        );
        AllowSlot::keep(&mut sockets.slots, spec, l.allow());
        sockets.auth_policy.push(l);
    }
    Ok(())
}

/// The control socket, unless systemd passed one: mode 0660, the daemon's
/// group. With the default path, a missing directory or a socket in use
/// (an installed daemon's) means no control socket, not a failed start.
fn bind_control(config: &Config) -> Result<Option<StreamListener>, Fatal> {
    let Some((path, is_default)) = &config.control else {
        return Ok(None);
    };
    let dir_missing = path.parent().is_some_and(|d| !d.is_dir());
    if *is_default && dir_missing {
        crate::log_info!(
            "no control socket ({} does not exist): list, revoke and stats will not reach this daemon; create the directory or set --control",
            path.parent()
                .map_or_else(String::new, |d| d.display().to_string())
        );
        return Ok(None);
    }
    let group = config.run_as.as_ref().map(|(_, g)| g.clone());
    match control::bind(path, group) {
        Ok(l) => Ok(Some(l)),
        // The default path may belong to an installed daemon: a second one
        // started by hand runs without a control socket.
        Err(e) if *is_default => {
            crate::log_warning!(
                "no control socket: {e}; list, revoke and stats will not reach this daemon (set --control)"
            );
            Ok(None)
        }
        Err(e) => Err((
            EX_OSERR,
            startup::bind_hint(&ListenSpec::Unix(path.clone(), Access::default()), &e),
        )),
    }
}

/// Raises the descriptor limit, and warns when it is below what the
/// configured listeners may hold at once.
fn warn_few_descriptors(config: &Config) {
    let tcp_syslog = config
        .listen
        .iter()
        .filter(|s| matches!(s, ListenSpec::Tcp(..)))
        .count();
    let services = config.policy.len() + config.socketmap.len();
    let needed = 64
        + tcp_syslog * crate::tcp::LIMITS.total
        + services * policy::LIMITS.total
        + config.metrics.iter().count() * metrics::LIMITS.total
        + config.auth_policy.len() * crate::authpolicy::LIMITS.total
        + control::LIMITS.total;
    let have = net::raise_fd_limit(16384);
    if have < needed as u64 {
        crate::log_warning!(
            "only {have} file descriptors, and the listeners may hold {needed} connections: once they run out, new connections wait until the longest-waiting one is closed; raise the limit (LimitNOFILE= under systemd, ulimit -n)"
        );
    }
}

/// --socket-group and --socket-mode no longer give every socket one group
/// and mode: say what they do now.
fn warn_deprecated(config: &Config) {
    if let Some(g) = &config.socket_group {
        crate::log_warning!(
            "socket-group {name} is deprecated: it gives its group to the policy and socketmap sockets only, never to a syslog listener's (writable by root, i.e. rsyslog, alone unless its URL says otherwise); say it per socket instead: unix:///PATH?group={name}&mode=0660",
            name = g.name
        );
    }
    if let Some(m) = config.socket_mode {
        crate::log_warning!(
            "socket-mode {mode} is deprecated: it gives its mode to the policy and socketmap sockets only, never to a syslog listener's (0600 unless its URL says otherwise); say it per socket instead: unix:///PATH?mode={mode}",
            mode = net::mode_text(m)
        );
    }
}

/// Fatal start-up error: logs it and gives the exit status.
fn fatal(status: i32, message: impl std::fmt::Display) -> i32 {
    crate::logging::write(crate::logging::Level::Fatal, format_args!("{message}"));
    status
}

async fn run(mut config: Config, args: DaemonArgs, activated: Vec<Activated>) -> i32 {
    let signals = catch_signals();
    crate::logging::set_level(config.log_level);
    crate::logging::set_format(config.log_format);
    // Without systemd nobody made the runtime and state directories: make
    // them as the unit would, before the first socket is bound there.
    if let Err(e) = startup::make_dirs(&config) {
        return fatal(EX_CONFIG, e);
    }
    let listener_counts = Arc::new(ListenerCounts::default());
    let Sockets {
        listeners,
        services,
        control,
        metrics,
        auth_policy,
        auth_secret,
        slots,
    } = match bind_sockets(&config, activated) {
        Ok(s) => s,
        Err((status, e)) => return fatal(status, e),
    };
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
        crate::log_info!(
            "running as user {} (uid {}), group {} (gid {})",
            user.name,
            user.uid,
            group.name,
            group.gid
        );
    }
    if let Err(e) = startup::check_writable(&config) {
        return fatal(EX_CONFIG, e);
    }
    if let Some(map) = config.map.as_mut() {
        match map.use_own_mail_config() {
            Ok(Some((dir, true))) => crate::log_info!(
                "no /etc/postfix/main.cf and no MAIL_CONFIG: postmap runs with Postfix's built-in defaults (MAIL_CONFIG={})",
                dir.display()
            ),
            Ok(Some((dir, false))) => crate::log_debug!(
                "postmap runs with MAIL_CONFIG={} (its main.cf links to /etc/postfix/main.cf)",
                dir.display()
            ),
            Ok(None) => {}
            Err(e) if !std::path::Path::new("/etc/postfix/main.cf").exists() => {
                crate::log_warning!(
                    "no /etc/postfix/main.cf and no MAIL_CONFIG, and cannot write an empty configuration for postmap next to {}: {e}; set MAIL_CONFIG to a directory with a main.cf",
                    map.path.display()
                )
            }
            Err(e) => crate::log_debug!(
                "postmap runs with /etc/postfix: cannot make its own configuration directory next to {}: {e}",
                map.path.display()
            ),
        }
    }
    let stats = Arc::new(Stats::default());
    let table = Arc::new(GrantTable::with_limit(config.max_grants));
    let settings = Settings::of(&config);

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
        let (restored, expired, refused) = crate::state::restore(
            &loaded,
            &table,
            &AddressPolicy::new(config.never_and_proxies()),
            settings.window,
        );
        crate::log_info!(
            "state {}: restored {} ({expired} expired meanwhile, {refused} refused by the never-grant rules)",
            path.display(),
            startup::count(restored, "grant", "grants")
        );
        match StateWriter::start(path.clone(), table.clone()) {
            Ok(w) => state_writer = Some(w),
            Err(e) => return fatal(EX_OSERR, e),
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(table.clone().run_purge(stats.clone()));

    let mut map_visible = None;
    if let Some(map) = config.map.clone() {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let shown = format!("{}:{}", map.map_type.name(), map.path.display());
        let (visible_tx, visible_rx) = tokio::sync::watch::channel(0);
        map_visible = Some(visible_rx);
        tasks.spawn(map.run_reporting(
            table.clone(),
            stats.clone(),
            Some(first_tx),
            Some(visible_tx),
        ));
        // Postfix fails every lookup of a missing map, so the map is
        // written before the daemon says it is ready; one that cannot be
        // built at all (a map type Postfix lacks, no postmap, a directory
        // the daemon may not write) stops the start with what to do, since
        // retrying would not help. Later failures are retried.
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if let Some(w) = state_writer {
                    w.stop(Duration::from_millis(800));
                }
                return fatal(
                    EX_CONFIG,
                    format_args!("map {shown} cannot be built, so the daemon does not start: {e}"),
                );
            }
            Err(_) => return fatal(EX_OSERR, format_args!("map {shown}: the map task ended")),
        }
    }
    // What Postfix's own configuration looks up, against what is served.
    let served = crate::postfix::Served {
        map: config.map.as_ref(),
        socketmaps: config
            .socketmap
            .iter()
            .filter_map(|s| match s {
                ListenSpec::Unix(p, _) => Some(p.clone()),
                _ => None,
            })
            .collect(),
        memcache: &config.memcache,
        memcache_prefix: &config.memcache_prefix,
    };
    for f in crate::postfix::check(&served).await {
        match f.level {
            crate::postfix::Level::Warning => crate::log_warning!("{}", f.text),
            crate::postfix::Level::Notice => crate::log_info!("{}", f.text),
        }
    }
    if let Some(p) = &config.pid_file
        && let Err(e) = startup::write_pid_file(p)
    {
        return fatal(EX_CONFIG, e);
    }
    crate::memcache::start(
        &config.memcache,
        &config.memcache_prefix,
        &table,
        &stats,
        &mut tasks,
    )
    .await;
    for (what, l) in services {
        let (table, served) = (table.clone(), stats.clone());
        let stats = stats.clone();
        if what == "policy" {
            tasks.spawn(net::serve_stream(
                l,
                policy::LIMITS,
                served,
                move |conn, io| policy::session(conn, io, table.clone(), stats.clone()),
            ));
        } else {
            tasks.spawn(net::serve_stream(
                l,
                policy::LIMITS,
                served,
                move |conn, io| crate::socketmap::session(conn, io, table.clone(), stats.clone()),
            ));
        }
    }
    let status = Arc::new(Status {
        table: table.clone(),
        stats: stats.clone(),
        listeners: listener_counts.clone(),
    });
    let control_desc = control
        .as_ref()
        .and_then(|l| l.socket_path())
        .map(|p| format!("; control {}", p.display()));
    if let Some(l) = control {
        let status = status.clone();
        tasks.spawn(net::serve_stream(
            l,
            control::LIMITS,
            stats.clone(),
            move |conn, io| control::session(conn, io, status.clone()),
        ));
    }
    if let Some(l) = metrics {
        let status = status.clone();
        tasks.spawn(net::serve_stream(
            l,
            metrics::LIMITS,
            stats.clone(),
            move |conn, io| metrics::session(conn, io, status.clone()),
        ));
    }

    let pipeline = Arc::new(Pipeline::new(settings, table.clone(), stats.clone()));
    if let Some(secret) = auth_secret {
        let service = Arc::new(crate::authpolicy::AuthPolicy {
            secret,
            pipeline: pipeline.clone(),
        });
        for l in auth_policy {
            let service = service.clone();
            tasks.spawn(net::serve_stream(
                l,
                crate::authpolicy::LIMITS,
                stats.clone(),
                move |conn, io| service.clone().session(conn, io),
            ));
        }
    }
    // Not rate-limited with the refusals it sums up.
    tasks.spawn(
        pipeline
            .clone()
            .run_full_summary(|line| crate::log_warning!("{line}")),
    );
    let mut serving = match &config.map {
        Some(m) => format!("map {}:{}", m.map_type.name(), m.path.display()),
        None => "no map file".to_string(),
    };
    if !config.policy.is_empty() {
        serving.push_str(&format!("; policy {}", join(&config.policy)));
    }
    if !config.memcache.is_empty() {
        let prefix = &config.memcache_prefix;
        serving.push_str(&format!(
            "; memcache {} (keys {prefix}ADDRESS)",
            join(&config.memcache)
        ));
    }
    if !config.socketmap.is_empty() {
        serving.push_str(&format!(
            "; socketmap {} (map name {})",
            join(&config.socketmap),
            crate::socketmap::MAP_NAME
        ));
    }
    if !config.auth_policy.is_empty() {
        serving.push_str(&format!("; auth-policy {}", join(&config.auth_policy)));
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
    if let Some(p) = &config.pid_file {
        serving.push_str(&format!("; pid file {}", p.display()));
    }
    let names: Vec<String> = listeners
        .iter()
        .map(|(_, n)| {
            if config.attested.contains(n) {
                format!("{n} (attested)")
            } else {
                n.clone()
            }
        })
        .collect();
    crate::log_info!(
        "started: listening on {}; allow-from {}; never {}; window {}{}; {serving}",
        names.join(", "),
        join(&config.allow_from),
        join_or_none(&config.never),
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
    attestation_notes(&config);
    if let Some(note) = ipv6_prefix_note(&config) {
        crate::log_info!("{note}");
    }

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
        // Only a listener declared ?attested=yes carries attestation.
        let attested = config.attested.contains(&name);
        tasks.spawn(l.run(stats.clone(), counter, move |bytes, peer| {
            p.handle_on(bytes, peer, attested)
        }));
    }
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {}; {}",
        names.join(", "),
        startup::count(table.len(), "grant", "grants")
    ));

    let pid_file = config.pid_file.clone();
    let mut running = Running {
        args,
        config,
        pipeline,
        table: table.clone(),
        stats: stats.clone(),
        slots,
    };
    let status = wait_for_signal(&mut running, signals).await;
    crate::systemd::notify("STOPPING=1");
    // Senders are told to stop sending here, and what they sent before is
    // handled (for at most half a second), so that those that retry send
    // the rest to the next daemon rather than into closing sockets.
    crate::shutdown::begin();
    crate::shutdown::drained(crate::shutdown::DRAIN).await;
    // Read the kernel's count while the sockets are still open.
    let kernel_dropped = receiver::kernel_drops(&udp_inodes);
    crate::log_info!(
        "stopping: {} queued datagrams handled",
        crate::shutdown::queued_handled()
    );
    // The map takes what the drain granted before the sink is stopped.
    if let Some(v) = &mut map_visible
        && !crate::shutdown::map_written(v, table.blocks().0, crate::shutdown::FLUSH).await
    {
        crate::log_error!("map: the last changes could not be written within 4 s");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(w) = state_writer
        && !w.stop(Duration::from_millis(800))
    {
        crate::log_error!("state: the last changes could not be written within 0.8 s");
    }
    if let Some(p) = &pid_file {
        startup::remove_pid_file(p);
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

/// What --ipv6-prefix means for this configuration's tables, said at start.
fn ipv6_prefix_note(config: &Config) -> Option<String> {
    let n = config.ipv6_prefix;
    if n >= 128 {
        return None;
    }
    let keyed = config.map.is_some() || !config.memcache.is_empty();
    Some(format!(
        "ipv6-prefix {n}: an IPv6 login grants every address of its /{n}{}; never-grant networks and --max-grants count per /{n}, and a /{n} that overlaps a never-grant network grants the login's address alone",
        if keyed {
            format!(
                ", under the keys Postfix's check_client_access tries (its first {} groups; a /{n} ending in zero groups also under its shortened form); a /{n} with a run of zero groups before its end, such as 2001:0:0:1::/64, has no key every address in it tries, so a login there grants its address alone",
                n / 16
            )
        } else {
            String::new()
        }
    ))
}

/// Says at start (and after a reload) who may speak for the patterns, when
/// attestation is in use: accounts that do not exist here, patterns that
/// accept no attested line, patterns that the account nobody may speak
/// for (see [`crate::matcher::Matchers::attestation_notes`]).
fn attestation_notes(config: &Config) {
    if !config.require_attestation && config.attested.is_empty() {
        return;
    }
    for (warning, note) in config
        .matchers
        .attestation_notes(config.require_attestation)
    {
        if warning {
            crate::log_warning!("{note}");
        } else {
            crate::log_info!("{note}");
        }
    }
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
    let new = match Config::from_args(&r.args) {
        Ok(c) => c,
        Err(e) => {
            Stats::bump(&r.stats.reload_failures);
            crate::log_error!("reload refused, the running configuration stays in force: {e}");
            crate::systemd::notify("READY=1\nSTATUS=reload refused: see the log");
            return;
        }
    };
    let old = &r.config;
    let strip = |l: &[ListenSpec]| -> Vec<String> { l.iter().map(ListenSpec::address).collect() };
    let mut restart = Vec::new();
    if strip(&old.listen) != strip(&new.listen) || old.attested != new.attested {
        restart.push("listen");
    }
    let access = |c: &Config| -> Vec<Option<Access>> {
        c.listen
            .iter()
            .chain(&c.policy)
            .chain(&c.socketmap)
            .map(|s| s.access().cloned())
            .collect()
    };
    if access(old) != access(&new) {
        restart.push("a unix socket's owner=, group= or mode=");
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
    if strip(&old.auth_policy) != strip(&new.auth_policy)
        || old.auth_policy_secret != new.auth_policy_secret
    {
        restart.push("auth-policy or auth-policy-secret");
    }
    if old.state != new.state {
        restart.push("state");
    }
    if old.memcache != new.memcache || old.memcache_prefix != new.memcache_prefix {
        restart.push("memcache or memcache-prefix");
    }
    if old.pid_file != new.pid_file {
        restart.push("pid-file");
    }
    if old.control != new.control {
        restart.push("control");
    }
    if old.metrics.as_ref().map(ListenSpec::address)
        != new.metrics.as_ref().map(ListenSpec::address)
    {
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
    for slot in &r.slots {
        slot.update(&new);
    }
    r.table.set_limit(new.max_grants);
    let settings = Settings::of(&new);
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
            "hold-while-connected turned off: {} get the window from now",
            startup::count(ips.len(), "held address", "held addresses")
        );
    }
    // "Never" means never: live grants the new rules refuse end now, and
    // so do grants of addresses now named as trusted proxies (a proxy's
    // own connection is never a client's).
    let policy = AddressPolicy::new(new.never_and_proxies());
    for (key, _) in r.table.list_blocks() {
        if let Err(why) = policy.check_scope(&key)
            && r.table.revoke_block(key).is_some()
        {
            Stats::bump(&r.stats.revoked);
            crate::log_info!(
                "revoke {}: {why} (never-grant rules of the reloaded configuration)",
                key.shown()
            );
        }
    }
    Stats::bump(&r.stats.reloads);
    crate::log_info!(
        "reloaded: window {}; allow-from {}; never {}; trusted-proxy {}; require-attestation {}; hold-while-connected {}; max-grants {}; {} kept",
        format_duration(new.window),
        join(&new.allow_from),
        join_or_none(&new.never),
        join_or_none(&new.trusted_proxy),
        if new.require_attestation { "yes" } else { "no" },
        if new.hold_while_connected {
            format!("yes (hold-max {})", format_duration(new.hold_max))
        } else {
            "no".to_string()
        },
        new.max_grants,
        startup::count(r.table.len(), "live grant", "live grants")
    );
    if !restart.is_empty() {
        crate::log_warning!(
            "reload: changed {} keep their old value until the daemon is restarted",
            restart.join("; ")
        );
    }
    attestation_notes(&new);
    // What is in force now, for the next comparison.
    r.config = new;
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=reloaded; {}",
        startup::count(r.table.len(), "grant", "grants")
    ));
}

/// The networks a restored or kept grant may not be in: the never-grant
/// rules and the trusted proxies (whose own connections are never a
/// client's).
/// The items joined, or `none`.
fn join_or_none<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        join(items)
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
/// The signals the daemon handles, caught from the start of `run`: one
/// that arrives while the daemon is still starting (systemd stopping it
/// then, or a quick restart) waits here instead of killing the process
/// with the default action, before the state is written and the senders
/// are drained.
type Signals = Option<(
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
)>;

fn catch_signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(int), Ok(hup)) => Some((term, int, hup)),
        _ => None,
    }
}

async fn wait_for_signal(r: &mut Running, signals: Signals) -> i32 {
    let Some((mut term, mut int, mut hup)) = signals else {
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
        Err(e) => return fatal(EX_CONFIG, e),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut status = 0;
    let memory = AddressMemory::new();
    let cut = CutLines::new();
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
            // The rest of a line its logger cut is not a line of its own.
            if let Some(limit) = matchers.line_limit(rec.program) {
                let key = CutKey {
                    reporter: "-".to_string(),
                    host: rec.hostname.unwrap_or("-").to_string(),
                    program: rec.program.to_string(),
                };
                if cut.continues(key, rec.message.len() >= limit) {
                    continue;
                }
            }
            let outcome = matchers.match_record(&rec);
            let key = ProcessKey::of("-".to_string(), &rec, rec.pid);
            // Lines of a file carry no receive time: pair by order only.
            let (outcome, _) = memory.pair(key, outcome, tokio::time::Instant::now(), false);
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
