//! Service: the daemon as a system service: configuration, start-up,
//! reload, the control socket, metrics, systemd and privileges.
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
//! - [`control`], [`metrics`]: the control socket (`list`, `revoke`,
//!   `stats`) and the Prometheus endpoint.
//! - [`systemd`]: readiness notification and socket activation.
//! - [`privilege`]: switching to an unprivileged user after binding.
//! - [`inspect`]: the `match` subcommand: each line of a log file through
//!   the daemon's own decision, and a summary.

pub mod config;
pub(crate) mod control;
pub mod daemon;
pub(crate) mod inspect;
pub(crate) mod metrics;
pub(crate) mod privilege;
pub(crate) mod startup;
pub(crate) mod systemd;
