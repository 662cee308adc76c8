//! smtp-after-popd: POP-before-SMTP for Postfix, fed by syslog.
//!
//! # Layout
//!
//! The daemon is a pipeline, and the folders of `src/` are its stages, in
//! the order a login travels through them:
//!
//! ```text
//!  ingest/            recognise/             grants/               postfix/
//!  ───────            ──────────             ───────               ────────
//!  receiver ─Peer+bytes─▶ pipeline::decide ─Decision─▶ table ─changes─▶ map (postmap)
//!  (UDP, TCP, unix)   │  matcher (patterns)  │   (expiry)   │      memcache
//!  record (syslog)    │  hold (open sessions)│   addr       │      policy, socketmap
//!  attest (sender)    │                      │   (never)    │      (Postfix asks)
//!  authpolicy ─reported login───────────────▶│   follow: the Sink trait and loop
//!  (Dovecot, HTTP)                               state (file across restarts)
//!
//!  service/: config, daemon (start, reload, stop), control, metrics,
//!            systemd, privilege, startup, inspect (`match`)
//!  net/:     every socket: bind (unix with owner, group, mode), peer
//!            allow-lists, one accept loop with per-peer limits; HTTP
//!  logging, stats, swap: what every stage uses (the daemon's own log,
//!            the counters, settings a reload replaces)
//! ```
//!
//! Each folder's `mod.rs` says what its stage consumes, produces and
//! trusts; each file opens with the same three lines for its part.
//!
//! - [`ingest`]: datagrams and connections from outside, up to one parsed
//!   syslog record with the transport's word on who sent it; Dovecot's
//!   auth-policy reports.
//! - [`recognise`]: from a record to one decision (`recognise::pipeline::decide`):
//!   a grant, or a refusal with its reason and counter.
//! - [`grants`]: the table of live grants (the single owner of expiry),
//!   the address rules, the state file, and [`grants::follow`], the one
//!   loop by which every backend follows the table.
//! - [`postfix`]: the access map, memcached, the policy and socketmap
//!   services, and the check of Postfix's own configuration.
//! - [`service`]: configuration, start-up and stop, reload, the control
//!   socket, metrics, systemd, privileges, logging, and the `match`
//!   subcommand (`service::inspect`), which runs the same decision.
//! - `net`: the network layer under every listener and service.
//! - [`logging`], [`stats`], `swap`: the daemon's own log (escaping,
//!   rate limits), the counters of everything received, dropped and
//!   decided, and the settings a reload (SIGHUP) replaces.
//!
//! # Public API
//!
//! The crate is a daemon; its library exists for the binary
//! (`src/main.rs`), the tests, the benchmarks (`examples/`) and the fuzz
//! targets (`fuzz/`), and exports only what they use. Everything else is
//! `pub(crate)`: `net`, `swap`, and inside the stages `ingest::{attest,
//! authpolicy, shutdown, tcp}`, `recognise::{hold, pipeline}`,
//! `postfix::{check, lines, policy, socketmap}` and `service::{control,
//! inspect, metrics, privilege, startup, systemd}`.
//!
//! - the binary: [`service::daemon::main`], given a [`service::config::Cli`];
//! - one line through the daemon's decision, as the daemon takes it:
//!   [`service::daemon::Pipeline`] with its [`service::daemon::Settings`],
//!   [`ingest::receiver::Peer`] (who sent it), [`ingest::record`]
//!   (syslog parsing), [`stats::Stats`] (the counters), and
//!   [`logging::set_level`];
//! - recognition: [`recognise::matcher`] (`Matchers`, `Outcome`,
//!   `PatternSpec`, `parse_pattern_specs`, `Service`, `BUILTIN_PATTERNS`,
//!   `AddressMemory`, `ProcessKey`, `CutLines`, `CutKey`);
//! - grants: [`grants::table`] (`GrantTable`, `Grant`), [`grants::addr`]
//!   (`AddressPolicy`, `Cidr`, `canonical`), [`grants::state`]
//!   (`StateWriter`) and [`grants::follow`] (the `Sink` trait and its
//!   loop, for a test's own sink);
//! - backends: [`postfix::map`] (`PostfixMap`, `MapType`) and
//!   [`postfix::memcache`] (`Memcache`, `Server`);
//! - configuration: [`service::config`] (`Cli`, `Config`);
//! - the benchmarks' own receiver, on the daemon's socket settings:
//!   [`set_datagram_buffer`].

// The module docs link freely to crate-private items: they are for the
// people who work on the daemon (`cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod grants;
pub mod ingest;
pub mod logging;
pub(crate) mod net;
pub mod postfix;
pub mod recognise;
pub mod service;
pub mod stats;
pub(crate) mod swap;

pub use net::set_datagram_buffer;
