//! smtp-after-popd: POP-before-SMTP for Postfix, fed by syslog.
//!
//! # Layout
//!
//! The daemon is a pipeline; each stage is one module, with typed values
//! between them:
//!
//! ```text
//! receiver ──Datagram──▶ record ──Record──▶ matcher ──Login──▶ attest ──▶ addr ──▶ grants ──▶ sink
//! (UDP, TCP, unix)       (syslog parse)     (patterns)         (sender)    (never-   (table,    (Postfix map
//!                                                                          grant)    expiry)    via postmap)
//! ```
//!
//! - [`net`]: the network layer under every listener and service: peer
//!   allow-lists, binding (unix sockets with their own owner, group and
//!   mode, never over a live socket), sockets passed by systemd, and the
//!   one accept loop, [`net::serve_stream`], with per-peer limits,
//!   deadlines and shedding.
//! - [`receiver`]: the syslog listeners (UDP, TCP, unix datagram) and their
//!   peers (`--allow-from`).
//! - [`authpolicy`]: the other input: Dovecot's auth-policy reports over
//!   HTTP (`--auth-policy`), with a shared secret; a reported login joins
//!   the pipeline at the address rules ([`pipeline::Pipeline::reported`]).
//! - [`http`]: the one HTTP server (hyper) under the auth-policy listener
//!   and the metrics endpoint.
//! - [`tcp`]: the TCP listener's RFC 6587 framing and bounds.
//! - [`record`]: parses one datagram into a syslog [`record::Record`].
//! - [`matcher`]: recognises successful logins ([`matcher::Login`]).
//! - [`attest`]: checks that the sender of a login record may speak for
//!   its pattern (rsyslog's attested executable and uid).
//! - [`addr`]: canonical addresses and the never-grant rules.
//! - [`grants`]: the table of live grants, with expiry.
//! - [`hold`]: sessions still open, which hold their address's grant
//!   (`--hold-while-connected`).
//! - [`sink`]: keeps the Postfix access map in step with the table.
//! - [`follow`]: the [`follow::Sink`] trait and the loop that keeps a sink
//!   in step with the table change by change (refill, retries, backoff).
//! - [`memcache`]: the memcached sink, which Postfix reads through
//!   `memcache:` (several relays, one truth).
//! - [`policy`], [`socketmap`]: the table served to Postfix directly
//!   (policy delegation, socketmap), with no map file.
//! - [`state`]: the state file that keeps grants across restarts.
//! - [`control`], [`metrics`]: the control socket (`list`, `revoke`,
//!   `stats`) and the Prometheus endpoint.
//! - [`systemd`]: readiness notification and socket activation.
//! - [`swap`]: the settings a reload (SIGHUP) replaces.
//! - [`config`]: command line and configuration file, validated one group
//!   of settings at a time; which settings a reload cannot change
//!   ([`config::Config::needs_restart`]).
//! - [`postfix_config`]: the main.cf line and memcache_table(5) file that
//!   go with the daemon's configuration (`postfix-config`).
//! - [`privilege`]: switching to an unprivileged user after binding.
//! - [`shutdown`]: receivers that finish what senders sent before a stop.
//! - [`startup`]: the directories and pid file made at start-up, hints for
//!   start-up failures, and [`startup::StartError`], a failure with its exit
//!   status.
//! - [`postfix`]: Postfix's main.cf and master.cf compared with the map and
//!   socketmaps served, at start-up.
//! - [`pipeline`]: the per-datagram stage: parse, match, attest, check,
//!   grant (with the two-line memory and the open sessions).
//! - [`daemon`]: binds the sockets, wires the stages together and runs
//!   them (start, then stop, each one function of steps); reload; the
//!   subcommands.
//! - [`stats`]: counters for everything received, dropped and decided.
//! - [`logging`]: the daemon's own log, with escaping and rate limits.

pub mod addr;
pub mod attest;
pub mod authpolicy;
pub mod config;
pub mod control;
pub mod daemon;
pub mod follow;
pub mod grants;
pub mod hold;
pub mod http;
pub mod inspect;
pub mod logging;
pub mod matcher;
pub mod memcache;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod policy;
pub mod postfix;
pub mod postfix_config;
pub mod privilege;
pub mod receiver;
pub mod record;
pub mod shutdown;
pub mod sink;
pub mod socketmap;
pub mod startup;
pub mod state;
pub mod stats;
pub mod swap;
pub mod systemd;
pub mod tcp;
