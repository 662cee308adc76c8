//! The daemon: binds the receivers, wires them to the per-datagram stage
//! ([`crate::recognise::pipeline`]), the grant table and the sinks, and runs them until
//! SIGTERM or SIGINT, reloading on SIGHUP. Also the subcommands: `match`,
//! which runs the same parser and matchers over files, and the control
//! clients `list`, `revoke` and `stats`.
//!
//! Consumes: a validated [`Config`].
//! Produces: grants in the table (and so in the map), one log line per
//! decision, and an exit status.
//! Trusts: what each stage's module doc says it trusts; this module adds no
//! trust of its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::grants::addr::{AddressPolicy, Cidr};
use crate::grants::state::StateWriter;
use crate::grants::table::GrantTable;
use crate::ingest::receiver::{self, Listener};
use crate::net::{self, Access, AllowList, Kind, StreamListener};
use crate::postfix::policy;
use crate::service::config::{
    Cli, Command, Config, ControlArgs, DEFAULT_SYSLOG_SOCKET_MODE, DaemonArgs, EX_CONFIG,
    ListenSpec, format_duration,
};
use crate::service::control::{self, Status};
use crate::service::metrics;
use crate::service::privilege;
use crate::service::startup::{self, StartError};
use crate::service::systemd::Activated;
use crate::stats::{ListenerCounts, Stats};
use crate::swap::Swap;

pub use crate::recognise::pipeline::{Pipeline, Settings};

pub use crate::service::startup::{EX_NOINPUT, EX_OSERR};

/// Runs the command line; returns the exit status.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Match { config, files }) => crate::service::inspect::run(config, files),
        Some(Command::List(c)) => client(&c, "list", crate::service::control::format_list),
        Some(Command::Stats(c)) => client(&c, "stats", |s| s.to_string()),
        Some(Command::PostfixConfig { daemon, cf_dir }) => match Config::from_args(&daemon) {
            Ok(c) => {
                print!("{}", crate::postfix::lines::render(&c, &cf_dir));
                0
            }
            Err(e) => fatal(EX_CONFIG, e),
        },
        Some(Command::Revoke { control, address }) => {
            client(&control, &format!("revoke {address}"), |s| s.to_string())
        }
        None => match prepare(&cli.daemon) {
            Ok((config, activated, runtime)) => {
                runtime.block_on(run(config, cli.daemon, activated))
            }
            Err(e) => e.report(),
        },
    }
}

/// What the daemon needs before its runtime starts: the sockets systemd
/// passed (taken before any thread, since taking them unsets variables),
/// the configuration and the runtime.
fn prepare(
    args: &DaemonArgs,
) -> Result<(Config, Vec<Activated>, tokio::runtime::Runtime), StartError> {
    let activated = crate::service::systemd::take_listen_fds().map_err(StartError::os)?;
    let config = Config::from_args(args).map_err(StartError::config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::os(format_args!("cannot start the runtime: {e}")))?;
    Ok((config, activated, runtime))
}

/// `list`, `stats`, `revoke`: one request to the control socket.
fn client(args: &ControlArgs, request: &str, format: impl Fn(&str) -> String) -> i32 {
    let path = match crate::service::config::control_path(args) {
        Ok(p) => p,
        Err(e) => return fatal(EX_CONFIG, e),
    };
    match crate::service::control::request(&path, request) {
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
    auth_secret: Option<crate::ingest::authpolicy::Secret>,
    /// The allow-lists a reload replaces.
    slots: Vec<AllowSlot>,
}

/// Binds (or takes from systemd) every socket the configuration names,
/// each unix socket with its owner, group and mode.
fn bind_sockets(config: &Config, activated: Vec<Activated>) -> Result<Sockets, StartError> {
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
        let l = receiver::from_adopted(adopted, address.clone(), allow).map_err(StartError::os)?;
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
        return Err(StartError::config(
            "no listener: give at least one --listen, or pass a socket through systemd",
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
            .map_err(|e| StartError::os(startup::bind_hint(spec, &e)))?;
        let l = StreamListener::tcp(l, format!("metrics {}", spec.address()), allow);
        AllowSlot::keep(&mut sockets.slots, spec, l.allow());
        sockets.metrics = Some(l);
    }
    Ok(sockets)
}

/// Takes over a socket systemd passed, refusing a syslog socket that every
/// local user may write.
fn adopt(a: Activated) -> Result<(net::Adopted, ListenSpec), StartError> {
    let what = format!("socket \"{}\" passed by systemd", a.name);
    let spec = a.spec.clone();
    if a.kind == Kind::UnixDatagram
        && let ListenSpec::Unix(path, _) = &spec
        && let Ok(meta) = std::fs::metadata(path)
        && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o002 != 0
    {
        return Err(StartError::config(format!(
            "{what}: {} is writable by every local user (mode {}), so anyone could forge login records: set SocketMode=0600 (root, i.e. rsyslog, only) in the .socket unit",
            path.display(),
            net::mode_text(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777)
        )));
    }
    let path = match &spec {
        ListenSpec::Unix(p, _) => p.clone(),
        _ => PathBuf::new(),
    };
    let adopted = net::adopt(a.fd, a.kind, path, &what).map_err(StartError::os)?;
    Ok((adopted, spec))
}

/// A passed socket for the control socket, a policy service, a socketmap
/// or the metrics endpoint (by its FileDescriptorName=).
fn adopt_service(config: &Config, a: Activated, sockets: &mut Sockets) -> Result<(), StartError> {
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
            return Err(StartError::os(format!(
                "socket \"{what}\" passed by systemd is not a stream socket"
            )));
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
fn bind_listeners(config: &Config, sockets: &mut Sockets) -> Result<(), StartError> {
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
            .map_err(|e| StartError::os(startup::bind_hint(spec, &e)))?;
        AllowSlot::keep(&mut sockets.slots, spec, l.allow());
        sockets.listeners.push((l, spec.address()));
    }
    Ok(())
}

/// The policy services and socketmaps: Postfix's side. A unix socket gets
/// its URL's owner, group and mode, else --socket-group (or the daemon's
/// group) and --socket-mode (or 0660).
fn bind_services(config: &Config, sockets: &mut Sockets) -> Result<(), StartError> {
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
                        .map_err(|e| StartError::os(startup::bind_hint(spec, &e)))?;
                    StreamListener::tcp(l, format!("{what} {}", spec.address()), allow)
                }
                ListenSpec::Unix(path, own) => {
                    let access = own.or(&defaults);
                    StreamListener::bind_unix(path, &access, &format!("--{what} {spec}"))
                        .map_err(|e| StartError::os(startup::bind_hint(spec, &e)))?
                }
                ListenSpec::Udp(..) => {
                    return Err(StartError::config(format!(
                        "--{what} {spec}: expected a stream socket"
                    )));
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
fn bind_auth_policy(config: &Config, sockets: &mut Sockets) -> Result<(), StartError> {
    let Some(path) = &config.auth_policy_secret else {
        return Ok(());
    };
    sockets.auth_secret =
        Some(crate::ingest::authpolicy::Secret::read(path).map_err(StartError::config)?);
    for spec in &config.auth_policy {
        let ListenSpec::Tcp(addr, own) = spec else {
            continue;
        };
        let allow = own.clone().unwrap_or_else(|| config.allow_from.clone());
        let l = net::bind_tcp(*addr, None, &format!("--auth-policy {spec}"))
            .map_err(|e| StartError::os(startup::bind_hint(spec, &e)))?;
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
fn bind_control(config: &Config) -> Result<Option<StreamListener>, StartError> {
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
        Err(e) => Err(StartError::os(startup::bind_hint(
            &ListenSpec::Unix(path.clone(), Access::default()),
            &e,
        ))),
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
        + tcp_syslog * crate::ingest::tcp::LIMITS.total
        + services * policy::LIMITS.total
        + config.metrics.iter().count() * metrics::LIMITS.total
        + config.auth_policy.len() * crate::ingest::authpolicy::LIMITS.total
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

/// Fatal error of a subcommand: logs it and gives the exit status.
fn fatal(status: i32, message: impl std::fmt::Display) -> i32 {
    crate::logging::write(crate::logging::Level::Fatal, format_args!("{message}"));
    status
}

/// What the running daemon needs again when it stops.
struct Started {
    /// The inodes of the UDP listeners, whose kernel drop counts the stop
    /// line reports.
    udp_inodes: Vec<u64>,
    state_writer: Option<StateWriter>,
    pid_file: Option<PathBuf>,
    stats: Arc<Stats>,
}

async fn run(config: Config, args: DaemonArgs, activated: Vec<Activated>) -> i32 {
    let signals = catch_signals();
    crate::logging::set_level(config.log_level);
    crate::logging::set_format(config.log_format);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut running, started) = match start(config, args, activated, &mut tasks).await {
        Ok(s) => s,
        Err(e) => return e.report(),
    };
    let status = wait_for_signal(&mut running, signals).await;
    stop(started, tasks).await;
    status
}

/// Starts the daemon: binds, gives up root, starts the sinks and services,
/// says "started" and starts the listeners.
async fn start(
    mut config: Config,
    args: DaemonArgs,
    activated: Vec<Activated>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(Running, Started), StartError> {
    // Without systemd nobody made the runtime and state directories: make
    // them as the unit would, before the first socket is bound there.
    startup::make_dirs(&config)?;
    let sockets = bind_sockets(&config, activated)?;
    drop_privileges(&config)?;
    startup::check_writable(&config)?;
    if let Some(map) = config.map.as_mut() {
        postmap_config(map);
    }
    let stats = Arc::new(Stats::default());
    let table = Arc::new(GrantTable::with_limit(config.max_grants));
    let settings = Settings::of(&config);
    let state_writer = start_sinks(&config, &table, &stats, settings.window, tasks).await?;
    check_postfix(&config).await;
    if let Some(p) = &config.pid_file {
        startup::write_pid_file(p)?;
    }
    let listener_counts = Arc::new(ListenerCounts::default());
    let status = Arc::new(Status {
        table: table.clone(),
        stats: stats.clone(),
        listeners: listener_counts.clone(),
    });
    let Sockets {
        listeners,
        services,
        control,
        metrics,
        auth_policy,
        auth_secret,
        slots,
    } = sockets;
    spawn_services(services, &table, &stats, tasks);
    let control_desc = spawn_status(control, metrics, &status, &stats, tasks);
    let pipeline = Arc::new(Pipeline::new(settings, table.clone(), stats.clone()));
    if let Some(secret) = auth_secret {
        spawn_auth_policy(secret, auth_policy, &pipeline, &stats, tasks);
    }
    // Not rate-limited with the refusals it sums up.
    tasks.spawn(
        pipeline
            .clone()
            .run_full_summary(|line| crate::log_warning!("{line}")),
    );
    let names = listener_names(&config, &listeners);
    log_started(&config, &names, control_desc);
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
    crate::service::systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {}; {}",
        names.join(", "),
        startup::count(table.len(), "grant", "grants")
    ));
    let started = Started {
        udp_inodes,
        state_writer,
        pid_file: config.pid_file.clone(),
        stats: stats.clone(),
    };
    let running = Running {
        args,
        config,
        pipeline,
        table,
        stats,
        slots,
    };
    Ok((running, started))
}

/// Stops the daemon: drains the senders, ends the tasks, writes the state
/// a last time, removes the pid file and says what was counted.
async fn stop(started: Started, mut tasks: tokio::task::JoinSet<()>) {
    crate::service::systemd::notify("STOPPING=1");
    // Senders are told to stop sending here, and what they sent before is
    // handled (for at most half a second), so that those that retry send
    // the rest to the next daemon rather than into closing sockets.
    crate::ingest::shutdown::begin();
    crate::ingest::shutdown::drained(crate::ingest::shutdown::DRAIN).await;
    // Read the kernel's count while the sockets are still open.
    let kernel_dropped = receiver::kernel_drops(&started.udp_inodes);
    crate::log_info!(
        "stopping: {} handled",
        startup::count(
            usize::try_from(crate::ingest::shutdown::queued_handled()).unwrap_or(usize::MAX),
            "queued datagram",
            "queued datagrams"
        )
    );
    // The sinks (map, state file, memcached) take what the drain granted
    // before they are stopped.
    if !crate::grants::follow::flush_all(crate::ingest::shutdown::FLUSH).await {
        crate::log_error!(
            "sinks: the last changes could not be written within 4 s (the errors above say which sink failed)"
        );
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // The state file was among the sinks flush_all waited for; when that
    // ran out of time, it has a little more.
    if let Some(w) = started.state_writer
        && !w.finish(Duration::from_millis(800)).await
    {
        crate::log_error!("state: the last changes could not be written within 0.8 s");
    }
    if let Some(p) = &started.pid_file {
        startup::remove_pid_file(p);
    }
    crate::log_info!(
        "stopped: {} kernel_dropped={kernel_dropped}",
        started
            .stats
            .snapshot()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// Switches to --user and --group, once every socket is bound.
fn drop_privileges(config: &Config) -> Result<(), StartError> {
    let Some((user, group)) = &config.run_as else {
        return Ok(());
    };
    privilege::drop_to(user.uid, group.gid).map_err(|e| {
        StartError::os(format_args!(
            "cannot switch to user {} (uid {}) and group {} (gid {}): {e}; start the daemon as root to use --user",
            user.name, user.uid, group.name, group.gid
        ))
    })?;
    crate::log_info!(
        "running as user {} (uid {}), group {} (gid {})",
        user.name,
        user.uid,
        group.name,
        group.gid
    );
    Ok(())
}

/// Gives postmap a configuration directory of its own when the host has
/// no Postfix configuration, and says so.
fn postmap_config(map: &mut crate::postfix::map::PostfixMap) {
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

/// Starts the grant table's purge and the sinks: the state file (whose
/// grants come back first, with their original expiry), the map (written
/// before the daemon says it is ready) and memcached.
async fn start_sinks(
    config: &Config,
    table: &Arc<GrantTable>,
    stats: &Arc<Stats>,
    window: Duration,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Option<StateWriter>, StartError> {
    let state_writer = match &config.state {
        Some(path) => Some(start_state(path, config, table, window)?),
        None => None,
    };
    tasks.spawn(table.clone().run_purge(stats.clone()));
    if let Some(map) = config.map.clone() {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let shown = format!("{}:{}", map.map_type.name(), map.path.display());
        tasks.spawn(map.run_reporting(table.clone(), stats.clone(), Some(first_tx), None));
        // Postfix fails every lookup of a missing map, so the map is
        // written before the daemon says it is ready; one that cannot be
        // built at all (a map type Postfix lacks, no postmap, a directory
        // the daemon may not write) stops the start with what to do, since
        // retrying would not help. Later failures are retried.
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Nothing changed since the state file was written whole.
                drop(state_writer);
                return Err(StartError::config(format_args!(
                    "map {shown} cannot be built, so the daemon does not start: {e}"
                )));
            }
            Err(_) => {
                return Err(StartError::os(format_args!(
                    "map {shown}: the map task ended"
                )));
            }
        }
    }
    crate::postfix::memcache::start(
        &config.memcache,
        &config.memcache_prefix,
        table,
        stats,
        tasks,
    )
    .await;
    Ok(state_writer)
}

/// Restores the grants of the state file into the table, and starts its
/// writer.
fn start_state(
    path: &std::path::Path,
    config: &Config,
    table: &Arc<GrantTable>,
    window: Duration,
) -> Result<StateWriter, StartError> {
    let loaded = crate::grants::state::load(path).map_err(StartError::config)?;
    for bad in &loaded.bad_lines {
        crate::log_warning!("state {bad}");
    }
    let (restored, expired, refused) = crate::grants::state::restore(
        &loaded,
        table,
        &AddressPolicy::new(config.never_and_proxies()),
        window,
    );
    crate::log_info!(
        "state {}: restored {} ({expired} expired meanwhile, {refused} refused by the never-grant rules)",
        path.display(),
        startup::count(restored, "grant", "grants")
    );
    StateWriter::start(path.to_path_buf(), table.clone()).map_err(StartError::os)
}

/// Says what Postfix's own configuration looks up, against what is served.
async fn check_postfix(config: &Config) {
    let served = crate::postfix::check::Served {
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
    for f in crate::postfix::check::check(&served).await {
        match f.level {
            crate::postfix::check::Level::Warning => crate::log_warning!("{}", f.text),
            crate::postfix::check::Level::Notice => crate::log_info!("{}", f.text),
        }
    }
}

/// Serves the policy services and socketmaps.
fn spawn_services(
    services: Vec<(&'static str, StreamListener)>,
    table: &Arc<GrantTable>,
    stats: &Arc<Stats>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
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
                move |conn, io| {
                    crate::postfix::socketmap::session(conn, io, table.clone(), stats.clone())
                },
            ));
        }
    }
}

/// Serves the control socket and the metrics endpoint; gives the control
/// socket's part of the start line.
fn spawn_status(
    control: Option<StreamListener>,
    metrics: Option<StreamListener>,
    status: &Arc<Status>,
    stats: &Arc<Stats>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Option<String> {
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
    control_desc
}

/// Serves Dovecot's auth-policy reports.
fn spawn_auth_policy(
    secret: crate::ingest::authpolicy::Secret,
    listeners: Vec<StreamListener>,
    pipeline: &Arc<Pipeline>,
    stats: &Arc<Stats>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let service = Arc::new(crate::ingest::authpolicy::AuthPolicy {
        secret,
        pipeline: pipeline.clone(),
    });
    for l in listeners {
        let service = service.clone();
        tasks.spawn(net::serve_stream(
            l,
            crate::ingest::authpolicy::LIMITS,
            stats.clone(),
            move |conn, io| service.clone().session(conn, io),
        ));
    }
}

/// The listeners' names for the log, those declared attested marked.
fn listener_names(config: &Config, listeners: &[(Listener, String)]) -> Vec<String> {
    listeners
        .iter()
        .map(|(_, n)| {
            if config.attested.contains(n) {
                format!("{n} (attested)")
            } else {
                n.clone()
            }
        })
        .collect()
}

/// What the daemon serves Postfix and its operator, for the start line.
fn serving(config: &Config, control_desc: Option<String>) -> String {
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
            crate::postfix::socketmap::MAP_NAME
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
    serving
}

/// The start line, and the notes on attestation and --ipv6-prefix.
fn log_started(config: &Config, names: &[String], control_desc: Option<String>) {
    let serving = serving(config, control_desc);
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
    attestation_notes(config);
    if let Some(note) = ipv6_prefix_note(config) {
        crate::log_info!("{note}");
    }
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
/// for (see [`crate::recognise::matcher::Matchers::attestation_notes`]).
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
/// or files opened again are reported as needing a restart
/// ([`Config::needs_restart`]).
fn reload(r: &mut Running) {
    crate::service::systemd::notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        crate::service::systemd::monotonic_usec()
    ));
    let new = match Config::from_args(&r.args) {
        Ok(c) => c,
        Err(e) => {
            Stats::bump(&r.stats.reload_failures);
            crate::log_error!("reload refused, the running configuration stays in force: {e}");
            crate::service::systemd::notify("READY=1\nSTATUS=reload refused: see the log");
            return;
        }
    };
    let restart = r.config.needs_restart(&new);
    crate::logging::set_level(new.log_level);
    crate::logging::set_format(new.log_format);
    for slot in &r.slots {
        slot.update(&new);
    }
    r.table.set_limit(new.max_grants);
    let hold_off = r.config.hold_while_connected && !new.hold_while_connected;
    r.pipeline.settings.store(Settings::of(&new));
    if hold_off {
        end_holds(r, new.window);
    }
    revoke_refused(r, &new);
    Stats::bump(&r.stats.reloads);
    log_reloaded(r, &new, &restart);
    attestation_notes(&new);
    // What is in force now, for the next comparison.
    r.config = new;
    crate::service::systemd::notify(&format!(
        "READY=1\nSTATUS=reloaded; {}",
        startup::count(r.table.len(), "grant", "grants")
    ));
}

/// hold-while-connected turned off: grants held by open sessions get the
/// window from now, unless they end sooner.
fn end_holds(r: &Running, window: Duration) {
    let now = tokio::time::Instant::now();
    let ips = r.pipeline.holds.clear();
    for ip in &ips {
        if r.table.get(*ip).is_some_and(|g| g.expires > now + window) {
            r.table.set_expiry(*ip, now + window);
        }
    }
    crate::log_info!(
        "hold-while-connected turned off: {} get the window from now",
        startup::count(ips.len(), "held address", "held addresses")
    );
}

/// "Never" means never: live grants the new rules refuse end now, and so
/// do grants of addresses now named as trusted proxies (a proxy's own
/// connection is never a client's).
fn revoke_refused(r: &Running, new: &Config) {
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
}

/// The reload's line, and its warning about what needs a restart.
fn log_reloaded(r: &Running, new: &Config, restart: &[&str]) {
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
}

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

/// Waits for SIGTERM or SIGINT, reloading on each SIGHUP; returns the exit
/// status.
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
