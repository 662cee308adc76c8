//! Service: the daemon as a system service: configuration, start-up,
//! reload, the control socket, metrics, systemd, privileges and logging.
//!
//! Consumes: the command line, the configuration file, signals, and
//! requests on the control socket.
//! Produces: the running pipeline (each stage started with its settings),
//! start-up errors with their exit codes, the daemon's own log, counters.
//! Trusts: the configuration file (it is the administrator's), and a
//! control client as far as the socket's mode and SO_PEERCRED allow.
//!
//! - [`config`]: command line and configuration file, validated.
//! - [`daemon`]: binds the sockets, wires the stages together and runs
//!   them; reload; the subcommands.
//! - [`startup`]: the directories and pid file made at start-up, and
//!   hints for start-up failures.
//! - [`swap`]: the settings a reload (SIGHUP) replaces.
//! - [`control`], [`metrics`]: the control socket (`list`, `revoke`,
//!   `stats`) and the Prometheus endpoint.
//! - [`stats`]: counters for everything received, dropped and decided.
//! - [`systemd`]: readiness notification and socket activation.
//! - [`privilege`]: switching to an unprivileged user after binding.
//! - [`logging`]: the daemon's own log, with escaping and rate limits.
//! - [`inspect`]: the `match` subcommand: each line of a log file through
//!   the daemon's own decision, and a summary.

pub mod config;
pub mod control;
pub mod daemon;
pub mod inspect;
pub mod logging;
pub mod metrics;
pub mod privilege;
pub mod startup;
pub mod stats;
pub mod swap;
pub mod systemd;
