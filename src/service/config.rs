//! Configuration: the command line and the configuration file, validated
//! into one [`Config`].
//!
//! Consumes: raw arguments ([`Cli`], parsed by clap) and, with `--config`, a
//! TOML file whose keys are the long option names (`window = "2m"`,
//! `listen = ["udp://127.0.0.1:5514"]`) plus `[[pattern]]` tables.
//! Produces: a [`Config`] with every value checked and typed, or a
//! [`ConfigError`] naming where the bad value came from (the flag, or the
//! file and line), the key, the value, and what is expected. Flags override
//! the file; the file overrides the defaults.
//! Trusts: the administrator, but checks every value: a configuration error
//! stops the daemon at start-up (exit status 78, EX_CONFIG) rather than
//! leaving it running with a value it guessed.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use toml::Spanned;

use crate::grants::addr::Cidr;
use crate::logging::{Format as LogFormat, Level};
use crate::net::Access;
use crate::postfix::map::{MapType, PostfixMap, dir_of};
use crate::recognise::matcher::{Matchers, PatternSpec};
use crate::service::privilege::{self, Group, User};

/// Exit status for configuration errors (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// Default listener: loopback UDP, usable without privileges.
pub const DEFAULT_LISTEN: &str = "udp://127.0.0.1:5514";
/// Default peers allowed to send UDP datagrams: loopback only.
pub const DEFAULT_ALLOW_FROM: &[&str] = &["127.0.0.0/8", "::1"];
/// Default networks never granted: loopback.
pub const DEFAULT_NEVER: &[&str] = &["127.0.0.0/8", "::1"];
/// Default window after a login, as in the original smtp-after-popd.
pub const DEFAULT_WINDOW: &str = "2m";
/// Default map path.
/// Default map path: in the daemon's state directory, the one place the
/// packaged (hardened) unit may write besides its runtime directory.
pub const DEFAULT_MAP: &str = "/var/lib/smtp-after-popd/authenticated_ips";
/// Default map type.
pub const DEFAULT_MAP_TYPE: &str = "hash";
pub use crate::postfix::map::DEFAULT_POSTMAP;
/// Default cap on live grants.
pub const DEFAULT_MAX_GRANTS: usize = 100_000;
/// Default upper limit on holding a grant for an open session.
pub const DEFAULT_HOLD_MAX: &str = "12h";
/// Default control socket.
pub const DEFAULT_CONTROL: &str = "/run/smtp-after-popd/control";
/// Default mode of the policy and socketmap sockets (and of the control
/// socket): the daemon's user and its group.
pub const DEFAULT_SOCKET_MODE: &str = "0660";
/// Default mode of a syslog listener's unix socket: its owner (the daemon's
/// user, or root) and root (rsyslog) only.
pub const DEFAULT_SYSLOG_SOCKET_MODE: u32 = 0o600;

/// POP-before-SMTP for Postfix: grants relay access to clients for a short
/// window after they log in to POP3 or IMAP, by reading the mail servers'
/// login records from syslog.
///
/// rsyslog or syslog-ng forwards mail log records to smtp-after-popd over a
/// unix datagram socket, UDP or TCP. Each successful POP3/IMAP login
/// (Dovecot, Courier, Cyrus, UW imapd/ipop3d, vm-pop3d, popa3d, Qpopper,
/// vpopmail, Perdition, Solid POP3, teapop, tpop3d, Zimbra, or patterns of
/// your own) grants the client address for --window (or while the session
/// is open, --hold-while-connected), optionally only
/// when rsyslog attests that the mail server itself sent the line
/// (--require-attestation). Postfix learns the grants from an access map
/// built with postmap (check_client_access in smtpd_relay_restrictions), or
/// asks the daemon directly (--policy, --socketmap). SIGHUP re-reads the
/// configuration; --state keeps grants across restarts; `list`, `revoke`
/// and `stats` talk to the running daemon. See smtp-after-popd(8),
/// SECURITY.md and the README.
#[derive(Debug, Parser)]
#[command(
    name = "smtp-after-popd",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a subcommand, run the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Daemon options.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what the daemon would do with each line of log files (or standard input).
    ///
    /// Reads lines as rsyslog writes them to /var/log/mail.log, or raw
    /// syslog datagrams, and judges each by the daemon's own rules. Each
    /// line a pattern recognised prints its verdict, tab-separated: VERDICT
    /// (grant; refused; remembered, an address line of a two-line server;
    /// logout), ADDRESS, SERVER, SERVICE, USER, PATTERN, FILE:LINE and, for
    /// refused, REASON: WHY (never-grant, unspecified-address, forgery,
    /// untrusted-proxy, proxy-own-address, ambiguous, unaddressed,
    /// no-address-line, cut-line, ...); "-" for a field the line lacks. A
    /// summary follows, each line starting "# ": lines read, recognised per
    /// pattern, granted, refused per reason, lines of a known program that
    /// no pattern matched. A file carries no sender credential, so
    /// attestation is not checked: each line is judged as if its pattern's
    /// own process sent it, and a line carrying an attestation element is
    /// a forgery (as on a listener not declared attested). Exit status 0
    /// when every input was read, whatever the verdicts; 66 when one could
    /// not be; 78 for a bad configuration. Use it to check a real log
    /// before relying on the daemon, as fail2ban-regex is used.
    Match {
        /// Configuration file whose [[pattern]] tables, never and
        /// trusted-proxy apply (else the defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log files to read; standard input when none is given.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List the live grants of the running daemon: address, time left,
    /// server, service, user, reporting host and peer.
    List(ControlArgs),
    /// Remove a live grant of the running daemon at once (and from the map).
    Revoke {
        /// How to reach the daemon.
        #[command(flatten)]
        control: ControlArgs,
        /// The client address to revoke.
        #[arg(value_name = "ADDRESS")]
        address: String,
    },
    /// Print the running daemon's counters.
    Stats(ControlArgs),
    /// Print the Postfix configuration that goes with these daemon
    /// options: the smtpd_relay_restrictions line for main.cf, and the
    /// memcache_table(5) file for each --memcache server.
    PostfixConfig {
        /// The daemon's options (or --config FILE), as it runs with them.
        #[command(flatten)]
        daemon: Box<DaemonArgs>,
        /// Where the memcache_table(5) files go.
        #[arg(long, value_name = "DIR", default_value = "/etc/postfix")]
        cf_dir: PathBuf,
    },
}

/// How the client subcommands reach the daemon.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The daemon's control socket. [default: the configuration file's
    /// control, else /run/smtp-after-popd/control]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Configuration file of the daemon, to find its control socket.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The daemon's options. Each is also a key of the configuration file,
/// named as the long option.
#[derive(Debug, Default, Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML); its keys are the long option names.
    /// Options given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where to receive syslog records: udp://ADDR:PORT (IPv4 or [IPv6]),
    /// tcp://ADDR:PORT (RFC 6587 octet counting or LF framing, as rsyslog
    /// sends; at most 32 connections per peer and 256 in all, a new one
    /// beyond closing the one that has waited longest without a complete
    /// record), or unix:///PATH (a unix datagram socket, mode 0600: root,
    /// i.e. rsyslog, and the daemon's user only). UDP and TCP listeners may
    /// carry their own allow-list instead of --allow-from:
    /// udp://0.0.0.0:5514?allow=192.0.2.10,192.0.2.11; a unix socket its
    /// own owner, group and mode: unix:///PATH?group=adm&mode=0620 (never
    /// writable by every user). A listener fed by
    /// rsyslog/smtp-after-popd-attested.conf is declared with ?attested=yes
    /// (unix:///run/smtp-after-popd/syslog.sock?attested=yes): attestation
    /// is believed only there, and every record there must be in that
    /// rule's form; elsewhere an attestation element is a forgery.
    /// Settings are joined by &. Repeatable.
    /// [default: udp://127.0.0.1:5514]
    #[arg(long, value_name = "URL")]
    pub listen: Vec<String>,

    /// Accept UDP datagrams and TCP connections only from peers in this
    /// network, on listeners without their own ?allow=. Repeatable.
    /// [default: 127.0.0.0/8 and ::1]
    #[arg(long, value_name = "CIDR")]
    pub allow_from: Vec<String>,

    /// Never grant an address in this network, whatever the log says.
    /// Repeatable; replaces the default; "none" for no network.
    /// Unspecified (0.0.0.0/8, ::), multicast and broadcast addresses are
    /// never granted. An IPv4-mapped block (::ffff:198.51.100.0/120) is the
    /// IPv4 block it names; an IPv6 address carrying a never-granted IPv4
    /// address (::a.b.c.d, ::ffff:0:a.b.c.d, NAT64 64:ff9b::/96 and
    /// 64:ff9b:1::/48) is refused too.
    /// [default: 127.0.0.0/8 and ::1]
    #[arg(long, value_name = "CIDR")]
    pub never: Vec<String>,

    /// How long an address may relay after a login, e.g. 90s, 2m, 1h.
    /// Each new login restarts the window. [default: 2m]
    #[arg(long, value_name = "DURATION")]
    pub window: Option<String>,

    /// The Postfix access map source file; the database is built beside it
    /// with postmap, and Postfix reads it with check_client_access
    /// hash:PATH. A missing directory named smtp-after-popd is created.
    /// "none" for no map file (with --policy or --socketmap).
    /// [default: /var/lib/smtp-after-popd/authenticated_ips]
    #[arg(long, value_name = "PATH")]
    pub map: Option<String>,

    /// The map's Postfix type: hash, btree, lmdb or cdb. [default: hash]
    #[arg(long, value_name = "TYPE")]
    pub map_type: Option<String>,

    /// The postmap command that builds the database. [default: postmap]
    #[arg(long, value_name = "PATH")]
    pub postmap: Option<String>,

    /// Deprecated: give each socket its mode in its URL
    /// (unix:///PATH?mode=0660). The mode, in octal, of the policy and
    /// socketmap sockets whose URL gives none; never of a syslog socket.
    /// [default: 0660]
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Receive buffer size asked for each socket, in bytes (suffixes K, M).
    /// A datagram listener started as root gets it past net.core.rmem_max
    /// (SO_RCVBUFFORCE); otherwise the kernel caps it there, with a warning.
    /// [default: 8M for UDP and unix datagram listeners, the kernel's for
    /// TCP]
    #[arg(long, value_name = "BYTES")]
    pub receive_buffer: Option<String>,

    /// Least severe log level printed: debug, info, warning or error.
    /// [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Grant only logins whose record carries rsyslog's attestation of the
    /// sending process (forward with rsyslog/smtp-after-popd-attested.conf
    /// to a listener declared ?attested=yes) naming a uid, and executable,
    /// that the pattern allows; anything else is refused as a forgery.
    /// Records that do carry an attestation are always checked.
    /// --require-attestation alone means yes. [default: no]
    #[arg(long, value_name = "yes|no", num_args = 0..=1, require_equals = true, default_missing_value = "yes")]
    pub require_attestation: Option<String>,

    /// Keep an address granted while a session that logged in from it is
    /// still open, pairing login lines with the server's logout lines
    /// (Dovecot "Disconnected" lines with the login's session id, UW
    /// Logout/Autologout, Courier LOGOUT); the window then runs from the
    /// last logout. At most 64 open sessions per address are held, and a
    /// session at most --hold-max after its login, so that a lost logout
    /// line cannot keep a grant. Logout lines are attested like logins.
    /// --hold-while-connected alone means yes. [default: no]
    #[arg(long, value_name = "yes|no", num_args = 0..=1, require_equals = true, default_missing_value = "yes")]
    pub hold_while_connected: Option<String>,

    /// With --hold-while-connected: the longest a session holds its grant
    /// after its login, whether or not its logout line came, e.g. 12h; at
    /// least --window and at most 7d. [default: 12h]
    #[arg(long, value_name = "DURATION")]
    pub hold_max: Option<String>,

    /// Most addresses granted at once; when the table is full, logins from
    /// new addresses are refused (and logged) until grants expire, while
    /// renewals still work. Bounds the daemon's memory and the map's size.
    /// [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_grants: Option<String>,

    /// Serve the grant table to Postfix as a policy service
    /// (check_policy_service) on unix:///PATH (mode 0660, the daemon's
    /// group, or ?owner=&group=&mode=) or tcp://ADDR:PORT (TCP peers
    /// allow-listed like --allow-from, or by ?allow=): action=OK for a live
    /// grant, DUNNO otherwise. Bounded as Postfix's policy client is (100s
    /// per request, 300s idle, 1000s per connection; 512 connections per
    /// peer, 1024 in all). For a socket inside Postfix's chroot, see the
    /// README ("Chroot"). Repeatable. [default: none]
    #[arg(long, value_name = "URL")]
    pub policy: Vec<String>,

    /// Serve the grant table to Postfix as the socketmap
    /// "authenticated_ips" (check_client_access
    /// socketmap:unix:PATH:authenticated_ips) on unix:///PATH (with
    /// ?owner=&group=&mode= as --policy); unix only, since the protocol has
    /// no authentication. Repeatable. [default: none]
    #[arg(long, value_name = "URL")]
    pub socketmap: Vec<String>,

    /// Receive Dovecot's auth-policy reports on tcp://ADDR:PORT (peers
    /// allow-listed like --allow-from, or by ?allow=): a report of a
    /// successful IMAP or POP3 login grants its client address, with no
    /// log line in between. Requests must carry --auth-policy-secret;
    /// Dovecot's checks before and after authentication are answered
    /// "allow" at once, so a login is never delayed or refused. For TLS,
    /// put stunnel or a reverse proxy in front. Repeatable.
    /// [default: none]
    #[arg(long, value_name = "URL")]
    pub auth_policy: Vec<String>,

    /// The file holding USER:PASSWORD, the HTTP Basic credentials that
    /// every auth-policy request must carry (Dovecot's
    /// auth_policy_server_api_header); read at start, before --user takes
    /// effect. The daemon refuses to start if group or others may read or
    /// write it (chmod 600), or if a user other than root or the daemon's
    /// own owns it. [default: none]
    #[arg(long, value_name = "FILE")]
    pub auth_policy_secret: Option<String>,

    /// Believe the attestation in records from these network peers (their
    /// rsyslog forwarding with the attested rule) on UDP and TCP listeners
    /// declared ?attested=yes. On a unix socket declared attested, its file
    /// permissions decide who may write; from any other peer an
    /// attestation is refused as a forgery, since any local user of that
    /// host could have sent it. Repeatable. [default: none]
    #[arg(long, value_name = "CIDR")]
    pub trust_attestation_from: Vec<String>,

    /// Your proxies (perdition, a Dovecot proxy, Zimbra's nginx): a login
    /// whose client address is one of them is the proxy's own connection
    /// and is never granted (counted as refused_proxy_own); and a login
    /// line that names the client as a proxy reported it (Zimbra's oip=,
    /// with the proxy as ip=) grants only when the proxy's address is in
    /// this network, since a user who reaches the server directly could
    /// report any address. Repeatable. [default: none]
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<String>,

    /// After binding the listeners, switch to this user (name or uid) for
    /// good; the map's directory must be writable by it. Needs root at
    /// start. [default: keep the user the daemon was started as]
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// With --user: the group to switch to (name or gid).
    /// [default: the user's primary group]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Deprecated: give each socket its group in its URL
    /// (unix:///PATH?group=postfix&mode=0660). The group of the policy and
    /// socketmap sockets whose URL gives none; never of a syslog socket,
    /// so that the group Postfix runs as cannot write records.
    /// [default: the daemon's group]
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Keep live grants in this file, so that a restart or a crash keeps
    /// the windows still open (each change is appended; the file is
    /// rewritten atomically when it has grown). "none" for no state file.
    /// [default: none]
    #[arg(long, value_name = "FILE")]
    pub state: Option<String>,

    /// The control socket that `smtp-after-popd list`, `revoke` and `stats`
    /// talk to (a unix stream socket, mode 0660: root and the daemon's
    /// group). "none" for no control socket. With the default path, the
    /// daemon runs without a control socket if /run/smtp-after-popd does
    /// not exist. [default: /run/smtp-after-popd/control]
    #[arg(long, value_name = "PATH")]
    pub control: Option<String>,

    /// Serve the counters for Prometheus at http://ADDR:PORT/metrics;
    /// ADDR:PORT or tcp://ADDR:PORT?allow=CIDR,... (peers allow-listed
    /// like --allow-from, or by ?allow=). [default: none]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Write the grants to this memcached too (or instead of the map, with
    /// --map none), for Postfix's memcache: table: inet:HOST:PORT or
    /// unix:PATH, as Postfix writes them. Each grant is set with the time
    /// it has left, so it ends on time even if the daemon dies; a restarted
    /// memcached is refilled. Whoever can write to it can grant: keep it on
    /// loopback or a private network. Repeatable. [default: none]
    #[arg(long, value_name = "inet:HOST:PORT|unix:PATH")]
    pub memcache: Vec<String>,

    /// The prefix of every memcached key (key_format = PREFIX%s in
    /// Postfix's .cf file). [default: smtp-after-popd:]
    #[arg(long, value_name = "PREFIX")]
    pub memcache_prefix: Option<String>,

    /// How much of an IPv6 address a login grants, in bits: 64 lets every
    /// address of the login's /64 relay (privacy addresses change). From
    /// 48 to 128; with a map or memcached, a multiple of 16, since
    /// Postfix shortens IPv6 keys a group at a time. A prefix holding a
    /// run of zero groups before its end has no such key: a login there
    /// grants its address alone. [default: 128]
    #[arg(long, value_name = "BITS")]
    pub ipv6_prefix: Option<String>,

    /// Log line format on standard error: text (journald picks it up with
    /// each line's priority) or json (one object per line, for log
    /// shippers). [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Write the daemon's process id to this file once it has started
    /// (for init systems other than systemd), and remove it when the
    /// daemon stops. A missing directory named smtp-after-popd is created.
    /// [default: none]
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<String>,
}

/// Where a listener receives syslog records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenSpec {
    /// A UDP socket, with its own allow-list (`?allow=`) if given.
    Udp(SocketAddr, Option<Vec<Cidr>>),
    /// A TCP socket (RFC 6587 framing), with its own allow-list if given.
    Tcp(SocketAddr, Option<Vec<Cidr>>),
    /// A unix socket (datagram for syslog, stream for Postfix's
    /// services), with the owner, group and mode its URL gives.
    Unix(PathBuf, Access),
}

impl ListenSpec {
    /// The socket's address without its allow-list (`udp://ADDR:PORT`,
    /// `tcp://ADDR:PORT`, `unix:///PATH`): two specs with the same address
    /// are the same socket.
    pub fn address(&self) -> String {
        match self {
            ListenSpec::Udp(a, _) => format!("udp://{a}"),
            ListenSpec::Tcp(a, _) => format!("tcp://{a}"),
            ListenSpec::Unix(p, _) => format!("unix://{}", p.display()),
        }
    }

    /// The listener's own allow-list (`?allow=`), if it has one.
    pub fn own_allow(&self) -> Option<&Vec<Cidr>> {
        match self {
            ListenSpec::Udp(_, own) | ListenSpec::Tcp(_, own) => own.as_ref(),
            ListenSpec::Unix(..) => None,
        }
    }

    /// A unix socket's own owner, group and mode (`?owner=&group=&mode=`).
    pub fn access(&self) -> Option<&Access> {
        match self {
            ListenSpec::Unix(_, access) => Some(access),
            _ => None,
        }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address())?;
        if let Some(list) = self.own_allow() {
            let list: Vec<String> = list.iter().map(Cidr::to_string).collect();
            write!(f, "?allow={}", list.join(","))?;
        }
        if let Some(params) = self.access().map(Access::params).filter(|p| !p.is_empty()) {
            write!(f, "?{params}")?;
        }
        Ok(())
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The listeners.
    pub listen: Vec<ListenSpec>,
    /// The addresses (`ListenSpec::address`) of the listeners declared to
    /// carry the attested rule (`?attested=yes`).
    pub attested: Vec<String>,
    /// UDP peers allowed to send.
    pub allow_from: Vec<Cidr>,
    /// Networks never granted.
    pub never: Vec<Cidr>,
    /// The window after each login.
    pub window: Duration,
    /// The Postfix map, unless `--map none`.
    pub map: Option<PostfixMap>,
    /// Policy service listeners.
    pub policy: Vec<ListenSpec>,
    /// Socketmap listeners (unix only).
    pub socketmap: Vec<ListenSpec>,
    /// Auth-policy listeners (TCP only).
    pub auth_policy: Vec<ListenSpec>,
    /// The file of the auth-policy credentials (read by the daemon at
    /// start: [`crate::ingest::authpolicy::Secret::read`]).
    pub auth_policy_secret: Option<PathBuf>,
    /// Deprecated `--socket-mode`: the default mode of the policy and
    /// socketmap sockets, if set.
    pub socket_mode: Option<u32>,
    /// Receive buffer size to ask for.
    pub receive_buffer: Option<usize>,
    /// Log level.
    pub log_level: Level,
    /// The login patterns, built-in and configured.
    pub matchers: Matchers,
    /// Whether logins need an attested sender.
    pub require_attestation: bool,
    /// Most live grants.
    pub max_grants: usize,
    /// Whether open sessions hold their address's grant.
    pub hold_while_connected: bool,
    /// The longest a session holds its grant after its login.
    pub hold_max: Duration,
    /// Network peers whose attestation is believed.
    pub trust_attestation_from: Vec<Cidr>,
    /// Proxies whose report of the client address is believed.
    pub trusted_proxy: Vec<Cidr>,
    /// The user and group to switch to after binding, if any.
    pub run_as: Option<(User, Group)>,
    /// Deprecated `--socket-group`: the default group of the policy and
    /// socketmap sockets, if set.
    pub socket_group: Option<Group>,
    /// Whether `listen` is the built-in default (no flag, no file key):
    /// sockets handed over by systemd then replace it.
    pub listen_is_default: bool,
    /// The state file, if any.
    pub state: Option<PathBuf>,
    /// The control socket, if any, and whether it is the default path
    /// (whose absent directory is not an error).
    pub control: Option<(PathBuf, bool)>,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<ListenSpec>,
    /// The log line format.
    pub log_format: LogFormat,
    /// The memcached servers written (`--memcache`).
    pub memcache: Vec<crate::postfix::memcache::Server>,
    /// The memcached key prefix.
    pub memcache_prefix: String,
    /// The prefix length an IPv6 login grants.
    pub ipv6_prefix: u8,
    /// The pid file, if any.
    pub pid_file: Option<PathBuf>,
}

/// Why a value is refused, without where it came from (which
/// [`Origin::error`] adds): "expected a duration such as 90m, 4h or 1d".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

impl From<String> for Invalid {
    fn from(why: String) -> Invalid {
        Invalid(why)
    }
}

impl From<&str> for Invalid {
    fn from(why: &str) -> Invalid {
        Invalid(why.to_string())
    }
}

/// `Invalid(format!(...))`.
macro_rules! invalid {
    ($($why:tt)*) => {
        Invalid(format!($($why)*))
    };
}

/// A configuration error, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The configuration file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<Spanned<Vec<String>>>,
    allow_from: Option<Spanned<Vec<String>>>,
    never: Option<Spanned<Vec<String>>>,
    window: Option<Spanned<String>>,
    map: Option<Spanned<String>>,
    map_type: Option<Spanned<String>>,
    postmap: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    receive_buffer: Option<Spanned<toml::Value>>,
    log_level: Option<Spanned<String>>,
    require_attestation: Option<Spanned<bool>>,
    max_grants: Option<Spanned<toml::Value>>,
    hold_while_connected: Option<Spanned<bool>>,
    hold_max: Option<Spanned<String>>,
    trust_attestation_from: Option<Spanned<Vec<String>>>,
    trusted_proxy: Option<Spanned<Vec<String>>>,
    policy: Option<Spanned<Vec<String>>>,
    socketmap: Option<Spanned<Vec<String>>>,
    auth_policy: Option<Spanned<Vec<String>>>,
    auth_policy_secret: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    state: Option<Spanned<String>>,
    control: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    memcache: Option<Spanned<Vec<String>>>,
    memcache_prefix: Option<Spanned<String>>,
    ipv6_prefix: Option<Spanned<toml::Value>>,
    pid_file: Option<Spanned<String>>,
    #[serde(default)]
    pattern: Vec<PatternSpec>,
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
enum Origin<'a> {
    Default,
    Flag,
    File {
        path: &'a Path,
        source: &'a str,
        offset: usize,
    },
}

impl Origin<'_> {
    fn error(&self, key: &str, value: &str, expected: impl fmt::Display) -> ConfigError {
        match self {
            Origin::Default => ConfigError(format!("default {key} \"{value}\": {expected}")),
            Origin::Flag => ConfigError(format!("--{key} \"{value}\": {expected}")),
            Origin::File {
                path,
                source,
                offset,
            } => ConfigError(format!(
                "{}, line {}: {key} = \"{value}\": {expected}",
                path.display(),
                crate::recognise::matcher::line_of(source, *offset)
            )),
        }
    }
}

/// Reads the configuration file, if any.
fn read_file(path: &Path) -> Result<(String, FileConfig), ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "cannot read configuration file {}: {e}; check the path given with --config",
            path.display()
        ))
    })?;
    let file: FileConfig = toml::from_str(&source).map_err(|e| {
        let line = e
            .span()
            .map(|s| crate::recognise::matcher::line_of(&source, s.start))
            .unwrap_or(1);
        ConfigError(format!(
            "{}, line {line}: {}; see smtp-after-popd --help for the keys and their values",
            path.display(),
            e.message().trim_end()
        ))
    })?;
    Ok((source, file))
}

/// The name of the directories the daemon makes itself when they are
/// missing (`/run/smtp-after-popd`, `/var/lib/smtp-after-popd`, or
/// `/tmp/smtp-after-popd` for a trial); any other directory must exist,
/// so that a mistyped path is an error rather than a new directory.
pub const OWN_DIR: &str = "smtp-after-popd";

/// Whether the daemon makes `dir` itself when it is missing: it is named
/// [`OWN_DIR`] and its parent exists.
pub fn is_own_dir(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| n == OWN_DIR)
        && dir
            .parent()
            .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir())
}

/// Checks that the directory a file goes in exists, or is one the daemon
/// makes at start-up ([`is_own_dir`]).
fn creatable_dir(file: &Path) -> Result<(), Invalid> {
    let dir = dir_of(file);
    if dir.is_dir() || is_own_dir(&dir) {
        return Ok(());
    }
    if dir.exists() {
        return Err(invalid!(
            "{} is not a directory: choose another path",
            dir.display()
        ));
    }
    Err(invalid!(
        "the directory {} does not exist: create it or choose another path (the daemon makes only its own directories, named {OWN_DIR}, when they are missing)",
        dir.display()
    ))
}

/// A yes/no setting: the flag (`yes`, `no`, `true`, `false`), else the
/// file's boolean, else no.
fn yes_no(
    key: &str,
    flag: &Option<String>,
    file: &Option<Spanned<bool>>,
) -> Result<bool, ConfigError> {
    match (flag, file) {
        (Some(v), _) => match v.as_str() {
            "yes" | "true" => Ok(true),
            "no" | "false" => Ok(false),
            _ => Err(Origin::Flag.error(key, v, "expected yes or no")),
        },
        (None, Some(v)) => Ok(*v.get_ref()),
        (None, None) => Ok(false),
    }
}

/// Picks a single value: the flag, else the file, else the default.
fn pick<'a>(
    flag: &'a Option<String>,
    file: &'a Option<Spanned<String>>,
    default: &'a str,
    path: &'a Path,
    source: &'a str,
) -> (&'a str, Origin<'a>) {
    if let Some(v) = flag {
        return (v, Origin::Flag);
    }
    if let Some(v) = file {
        return (
            v.get_ref(),
            Origin::File {
                path,
                source,
                offset: v.span().start,
            },
        );
    }
    (default, Origin::Default)
}

/// Picks a list: the flags if any were given, else the file, else the
/// default.
fn pick_list<'a>(
    flag: &'a [String],
    file: &'a Option<Spanned<Vec<String>>>,
    default: &'a [&'a str],
    path: &'a Path,
    source: &'a str,
) -> Vec<(&'a str, Origin<'a>)> {
    if !flag.is_empty() {
        return flag.iter().map(|v| (v.as_str(), Origin::Flag)).collect();
    }
    if let Some(v) = file {
        let origin = Origin::File {
            path,
            source,
            offset: v.span().start,
        };
        return v.get_ref().iter().map(|s| (s.as_str(), origin)).collect();
    }
    default.iter().map(|v| (*v, Origin::Default)).collect()
}

fn cidrs(
    key: &str,
    values: Vec<(&str, Origin<'_>)>,
    allow_none: bool,
) -> Result<Vec<Cidr>, ConfigError> {
    let mut out = Vec::new();
    for (v, origin) in values {
        if allow_none && v == "none" {
            continue;
        }
        out.push(v.parse::<Cidr>().map_err(|e| origin.error(key, v, &e))?);
    }
    Ok(out)
}

impl Config {
    /// The networks no grant may cover: the never-grant rules and the
    /// trusted proxies (a proxy's own connection names none of the clients
    /// behind it, and a prefix grant that held a proxy's address would
    /// open the relay to all of them).
    pub fn never_and_proxies(&self) -> Vec<Cidr> {
        let mut v = self.never.clone();
        v.extend(self.trusted_proxy.iter().copied());
        v
    }

    /// The settings that differ in `new` but keep their value until a
    /// restart, by name (empty if a reload applies every change).
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        RESTART_GROUPS
            .iter()
            .filter(|(_, differs)| differs(self, new))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Validates the daemon's arguments, reading `--config` if given.
    pub fn from_args(args: &DaemonArgs) -> Result<Config, ConfigError> {
        let (path, source, file) = match &args.config {
            Some(p) => {
                let (source, file) = read_file(p)?;
                (p.clone(), source, file)
            }
            None => (PathBuf::new(), String::new(), FileConfig::default()),
        };
        let path = path.as_path();
        let source = source.as_str();

        let i = Input {
            args,
            file: &file,
            path,
            source,
        };
        let (listen, attested, attested_network) = listeners(&i)?;
        let (allow_from, never) = peers(&i)?;
        let window = window(&i)?;
        let map = map_sink(&i)?;
        let (socket_mode, receive_buffer) = socket_options(&i)?;
        let log_level = log_level(&i)?;
        let require_attestation = yes_no(
            "require-attestation",
            &args.require_attestation,
            &file.require_attestation,
        )?;
        let (hold_while_connected, hold_max) = hold(&i, window)?;
        let max_grants = max_grants(&i)?;
        let (run_as, socket_group) = privileges(&i)?;
        let (trust_attestation_from, trusted_proxy) =
            trust(&i, &attested, &attested_network, require_attestation)?;
        let (policy, socketmap) = stream_services(&i)?;
        let (memcache, memcache_prefix, ipv6_prefix) =
            sink_group(args, &file, path, source, map.is_some())?;
        let (auth_policy, auth_policy_secret) = auth_policy(args, &file, path, source)?;
        let asked =
            map.is_some() || !policy.is_empty() || !socketmap.is_empty() || !memcache.is_empty();
        check_asked(&i, asked)?;
        let log_format = log_format(&i)?;
        let state = state_file(&i)?;
        let control = control(&i)?;
        let (metrics, pid_file) = metrics_and_pid_file(&i)?;
        let listen_is_default = args.listen.is_empty() && file.listen.is_none();

        let matchers = build_matchers(path, source, file.pattern)?;

        Ok(Config {
            memcache,
            memcache_prefix,
            ipv6_prefix,
            attested,
            pid_file,
            listen_is_default,
            state,
            control,
            metrics,
            log_format,
            listen,
            allow_from,
            never,
            window,
            map,
            policy,
            socketmap,
            auth_policy,
            auth_policy_secret,
            socket_mode,
            receive_buffer,
            log_level,
            matchers,
            require_attestation,
            max_grants,
            hold_while_connected,
            hold_max,
            trust_attestation_from,
            trusted_proxy,
            run_as,
            socket_group,
        })
    }
}

/// Where each setting may come from: the command line, else the
/// configuration file (its path and text, for the messages), else the
/// default.
#[derive(Clone, Copy)]
struct Input<'a> {
    args: &'a DaemonArgs,
    file: &'a FileConfig,
    path: &'a Path,
    source: &'a str,
}

/// The syslog listeners; the addresses of those declared attested; the
/// first network listener declared attested, with where it was given.
type Listeners<'a> = (Vec<ListenSpec>, Vec<String>, Option<(String, Origin<'a>)>);

/// The user and group to switch to, if any.
type RunAs = Option<(User, Group)>;

/// Whether two configurations differ in a group of settings.
type Differs = fn(&Config, &Config) -> bool;

/// Picks an optional value: the flag, else the file, else nothing.
fn pick_opt<'a>(
    flag: &Option<String>,
    file: &Option<Spanned<String>>,
    path: &'a Path,
    source: &'a str,
) -> Option<(String, Origin<'a>)> {
    match (flag, file) {
        (Some(v), _) => Some((v.clone(), Origin::Flag)),
        (None, Some(v)) => Some((
            v.get_ref().clone(),
            Origin::File {
                path,
                source,
                offset: v.span().start,
            },
        )),
        (None, None) => None,
    }
}

/// The syslog listeners; the addresses of those declared attested; the
/// first network listener declared attested, with where it was given.
fn listeners<'a>(i: &Input<'a>) -> Result<Listeners<'a>, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let mut listen = Vec::new();
    let mut attested = Vec::new();
    let mut attested_network = None;
    for (v, origin) in pick_list(&args.listen, &file.listen, &[DEFAULT_LISTEN], path, source) {
        let (url, declared) = split_attested(v).map_err(|e| origin.error("listen", v, &e))?;
        let spec = parse_url(&url, UrlKind::Listen).map_err(|e| origin.error("listen", v, &e))?;
        if let Some(mode) = spec.access().and_then(|a| a.mode)
            && mode & 0o002 != 0
        {
            return Err(origin.error(
                    "listen",
                    v,
                    "a syslog socket that every local user may write lets anyone forge login records: give write access to rsyslog's group instead, e.g. ?group=adm&mode=0620, or leave mode= out (0600: root only)",
                ));
        }
        if declared {
            attested.push(spec.address());
            if !matches!(spec, ListenSpec::Unix(..)) && attested_network.is_none() {
                attested_network = Some((v.to_string(), origin));
            }
        }
        listen.push(spec);
    }
    if listen.is_empty() {
        return Err(ConfigError(
            "no listener: give at least one --listen udp://ADDR:PORT or unix:///PATH".into(),
        ));
    }
    Ok((listen, attested, attested_network))
}

/// `--allow-from` and `--never`.
fn peers(i: &Input<'_>) -> Result<(Vec<Cidr>, Vec<Cidr>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let allow_from = cidrs(
        "allow-from",
        pick_list(
            &args.allow_from,
            &file.allow_from,
            DEFAULT_ALLOW_FROM,
            path,
            source,
        ),
        false,
    )?;
    let never = cidrs(
        "never",
        pick_list(&args.never, &file.never, DEFAULT_NEVER, path, source),
        true,
    )?;

    Ok((allow_from, never))
}

/// `--window`: how long a login's grant lasts.
fn window(i: &Input<'_>) -> Result<Duration, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(&args.window, &file.window, DEFAULT_WINDOW, path, source);
    let window = parse_duration(v).map_err(|e| origin.error("window", v, &e))?;
    if window.is_zero() || window > Duration::from_secs(7 * 86400) {
        return Err(origin.error(
            "window",
            v,
            "expected a window longer than 0 and at most 7d",
        ));
    }

    Ok(window)
}

/// `--map`, `--map-type` and `--postmap`: the Postfix map, unless none.
fn map_sink(i: &Input<'_>) -> Result<Option<PostfixMap>, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(
        &args.map_type,
        &file.map_type,
        DEFAULT_MAP_TYPE,
        path,
        source,
    );
    let map_type = MapType::parse(v).ok_or_else(|| {
            origin.error(
                "map-type",
                v,
                "expected hash, btree, lmdb or cdb (types postmap builds into one file that can be replaced atomically)",
            )
        })?;
    let (v, origin) = pick(&args.map, &file.map, DEFAULT_MAP, path, source);
    let map_none = v == "none";
    let map_path = PathBuf::from(v);
    if map_none {
        // No map file: Postfix asks the policy service or socketmap.
    } else if v.is_empty() || v.ends_with('/') {
        return Err(origin.error(
            "map",
            v,
            "expected the path of a file, e.g. /var/lib/smtp-after-popd/authenticated_ips",
        ));
    }
    if !map_none && let Err(e) = creatable_dir(&map_path) {
        return Err(origin.error("map", v, &e));
    }
    let (v, _) = pick(&args.postmap, &file.postmap, DEFAULT_POSTMAP, path, source);
    let map = (!map_none).then(|| PostfixMap {
        path: map_path,
        map_type,
        postmap: PathBuf::from(v),
        mail_config: None,
        incremental: true,
    });

    Ok(map)
}

/// The deprecated `--socket-mode`, and `--receive-buffer`.
fn socket_options(i: &Input<'_>) -> Result<(Option<u32>, Option<usize>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let socket_mode = match (&args.socket_mode, &file.socket_mode) {
        (None, None) => None,
        _ => {
            let (v, origin) = pick(
                &args.socket_mode,
                &file.socket_mode,
                DEFAULT_SOCKET_MODE,
                path,
                source,
            );
            Some(parse_mode(v).map_err(|e| origin.error("socket-mode", v, &e))?)
        }
    };

    let receive_buffer = match (&args.receive_buffer, &file.receive_buffer) {
        (Some(v), _) => {
            Some(parse_size(v).map_err(|e| Origin::Flag.error("receive-buffer", v, &e))?)
        }
        (None, Some(v)) => {
            let origin = Origin::File {
                path,
                source,
                offset: v.span().start,
            };
            let text = match v.get_ref() {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                other => other.to_string(),
            };
            Some(parse_size(&text).map_err(|e| origin.error("receive-buffer", &text, &e))?)
        }
        (None, None) => None,
    };

    Ok((socket_mode, receive_buffer))
}

/// `--log-level`.
fn log_level(i: &Input<'_>) -> Result<Level, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(&args.log_level, &file.log_level, "info", path, source);
    let log_level = match v {
        "debug" => Level::Debug,
        "info" => Level::Info,
        "warning" => Level::Warning,
        "error" => Level::Error,
        _ => {
            return Err(origin.error("log-level", v, "expected debug, info, warning or error"));
        }
    };

    Ok(log_level)
}

/// `--hold-while-connected` and `--hold-max` (at least the window).
fn hold(i: &Input<'_>, window: Duration) -> Result<(bool, Duration), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let hold_while_connected = yes_no(
        "hold-while-connected",
        &args.hold_while_connected,
        &file.hold_while_connected,
    )?;
    let (v, origin) = pick(
        &args.hold_max,
        &file.hold_max,
        DEFAULT_HOLD_MAX,
        path,
        source,
    );
    let hold_max = parse_duration(v).map_err(|e| origin.error("hold-max", v, &e))?;
    if hold_max.is_zero() || hold_max > Duration::from_secs(7 * 86400) {
        return Err(origin.error(
            "hold-max",
            v,
            "expected a duration longer than 0 and at most 7d",
        ));
    }
    if hold_while_connected && hold_max < window {
        return Err(origin.error(
            "hold-max",
            v,
            format!(
                "expected at least the window ({}) with hold-while-connected",
                format_duration(window)
            ),
        ));
    }

    Ok((hold_while_connected, hold_max))
}

/// `--max-grants`.
fn max_grants(i: &Input<'_>) -> Result<usize, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let max_grants = {
        let (text, origin) = match (&args.max_grants, &file.max_grants) {
            (Some(v), _) => (v.clone(), Origin::Flag),
            (None, Some(v)) => (
                match v.get_ref() {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                Origin::File {
                    path,
                    source,
                    offset: v.span().start,
                },
            ),
            (None, None) => (DEFAULT_MAX_GRANTS.to_string(), Origin::Default),
        };
        text.parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000_000).contains(n))
            .ok_or_else(|| {
                origin.error(
                    "max-grants",
                    &text,
                    "expected a whole number of addresses from 1 to 10000000",
                )
            })?
    };

    Ok(max_grants)
}

/// `--user` and `--group`, and the deprecated `--socket-group`.
fn privileges(i: &Input<'_>) -> Result<(RunAs, Option<Group>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let run_as = match pick_opt(&args.user, &file.user, path, source) {
        None => {
            if let Some((v, origin)) = pick_opt(&args.group, &file.group, path, source) {
                return Err(origin.error(
                    "group",
                    &v,
                    "only meaningful with --user: name the user too",
                ));
            }
            None
        }
        Some((v, origin)) => {
            let u = privilege::user(&v).map_err(|e| origin.error("user", &v, &e))?;
            let g = match pick_opt(&args.group, &file.group, path, source) {
                Some((gv, gorigin)) => {
                    privilege::group(&gv).map_err(|e| gorigin.error("group", &gv, &e))?
                }
                None => Group {
                    name: privilege::group_name(u.gid).unwrap_or_else(|| u.gid.to_string()),
                    gid: u.gid,
                },
            };
            Some((u, g))
        }
    };
    let socket_group = match pick_opt(&args.socket_group, &file.socket_group, path, source) {
        None => None,
        Some((v, origin)) => {
            Some(privilege::group(&v).map_err(|e| origin.error("socket-group", &v, &e))?)
        }
    };

    Ok((run_as, socket_group))
}

/// `--trust-attestation-from` and `--trusted-proxy`, checked against the
/// listeners declared attested and `--require-attestation`.
fn trust(
    i: &Input<'_>,
    attested: &[String],
    attested_network: &Option<(String, Origin<'_>)>,
    require_attestation: bool,
) -> Result<(Vec<Cidr>, Vec<Cidr>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let trust_attestation_from = cidrs(
        "trust-attestation-from",
        pick_list(
            &args.trust_attestation_from,
            &file.trust_attestation_from,
            &[],
            path,
            source,
        ),
        false,
    )?;
    match (&attested_network, trust_attestation_from.is_empty()) {
        (Some((v, origin)), true) => {
            return Err(origin.error(
                    "listen",
                    v,
                    "attestation from network peers is believed only from --trust-attestation-from peers: list the hosts whose rsyslog forwards with the attested rule",
                ));
        }
        (None, false) => {
            return Err(ConfigError(format!(
                "trust-attestation-from is set, but no udp:// or tcp:// listener is declared ?attested=yes: attestation is believed only on listeners declared to carry the attested rule; add ?attested=yes to the listener those peers send to{}",
                if path.as_os_str().is_empty() {
                    String::new()
                } else {
                    format!(" ({})", path.display())
                }
            )));
        }
        _ => {}
    }
    if require_attestation && attested.is_empty() {
        return Err(ConfigError(format!(
            "require-attestation is on, but no listener is declared ?attested=yes, so every login would be refused: forward with rsyslog/smtp-after-popd-attested.conf and declare its socket, e.g. --listen unix:///run/smtp-after-popd/syslog.sock?attested=yes{}",
            if path.as_os_str().is_empty() {
                String::new()
            } else {
                format!(" ({})", path.display())
            }
        )));
    }
    let trusted_proxy = cidrs(
        "trusted-proxy",
        pick_list(&args.trusted_proxy, &file.trusted_proxy, &[], path, source),
        false,
    )?;

    Ok((trust_attestation_from, trusted_proxy))
}

/// `--policy` and `--socketmap`: the services Postfix asks.
fn stream_services(i: &Input<'_>) -> Result<(Vec<ListenSpec>, Vec<ListenSpec>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let mut policy = Vec::new();
    for (v, origin) in pick_list(&args.policy, &file.policy, &[], path, source) {
        let spec = parse_url(v, UrlKind::Policy).map_err(|e| origin.error("policy", v, &e))?;
        policy.push(spec);
    }
    let mut socketmap = Vec::new();
    for (v, origin) in pick_list(&args.socketmap, &file.socketmap, &[], path, source) {
        let spec =
            parse_url(v, UrlKind::Socketmap).map_err(|e| origin.error("socketmap", v, &e))?;
        socketmap.push(spec);
    }
    Ok((policy, socketmap))
}

/// `--log-format`.
fn log_format(i: &Input<'_>) -> Result<LogFormat, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(&args.log_format, &file.log_format, "text", path, source);
    let log_format = match v {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        _ => return Err(origin.error("log-format", v, "expected text or json")),
    };
    Ok(log_format)
}

/// `--state`: the state file, unless none.
fn state_file(i: &Input<'_>) -> Result<Option<PathBuf>, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(&args.state, &file.state, "none", path, source);
    let state = if v == "none" {
        None
    } else {
        let p = PathBuf::from(v);
        if v.is_empty() || v.ends_with('/') {
            return Err(origin.error(
                "state",
                v,
                "expected the path of a file, e.g. /var/lib/smtp-after-popd/state",
            ));
        }
        creatable_dir(&p).map_err(|e| origin.error("state", v, &e))?;
        Some(p)
    };
    Ok(state)
}

/// `--control`: the control socket unless none, and whether it is the
/// default path.
fn control(i: &Input<'_>) -> Result<Option<(PathBuf, bool)>, ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let (v, origin) = pick(&args.control, &file.control, DEFAULT_CONTROL, path, source);
    let control = if v == "none" {
        None
    } else {
        if v.is_empty() || v.ends_with('/') || v.len() > 107 {
            return Err(origin.error(
                    "control",
                    v,
                    "expected a socket path of at most 107 bytes, e.g. /run/smtp-after-popd/control, or none",
                ));
        }
        Some((PathBuf::from(v), matches!(origin, Origin::Default)))
    };
    Ok(control)
}

/// `--metrics` and `--pid-file`.
fn metrics_and_pid_file(
    i: &Input<'_>,
) -> Result<(Option<ListenSpec>, Option<PathBuf>), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    let metrics = match pick_opt(&args.metrics, &file.metrics, path, source) {
        None => None,
        Some((v, origin)) => {
            Some(parse_url(&v, UrlKind::Metrics).map_err(|e| origin.error("metrics", &v, &e))?)
        }
    };
    let pid_file = match pick_opt(&args.pid_file, &file.pid_file, path, source) {
        None => None,
        Some((v, _)) if v == "none" => None,
        Some((v, origin)) => {
            if v.is_empty() || v.ends_with('/') {
                return Err(origin.error(
                    "pid-file",
                    &v,
                    "expected the path of a file, e.g. /run/smtp-after-popd/smtp-after-popd.pid",
                ));
            }
            let p = PathBuf::from(&v);
            creatable_dir(&p).map_err(|e| origin.error("pid-file", &v, &e))?;
            Some(p)
        }
    };
    Ok((metrics, pid_file))
}

/// Refuses `--map none` when Postfix would have nothing else to ask.
fn check_asked(i: &Input<'_>, asked: bool) -> Result<(), ConfigError> {
    let Input {
        args,
        file,
        path,
        source,
    } = i;
    if !asked {
        let origin = if args.map.is_some() {
            Origin::Flag
        } else {
            Origin::File {
                path,
                source,
                offset: file.map.as_ref().map_or(0, |m| m.span().start),
            }
        };
        return Err(origin.error(
                "map",
                "none",
                "with no map file, Postfix needs --policy, --socketmap or --memcache to ask: give one of them, or a map path",
            ));
    }
    Ok(())
}

/// The settings a reload cannot change, since they open sockets or files
/// or are in force only from the start: each by the name the reload's
/// warning gives it, with whether it differs between two configurations.
const RESTART_GROUPS: &[(&str, Differs)] = &[
    ("listen", |a, b| {
        addresses(&a.listen) != addresses(&b.listen) || a.attested != b.attested
    }),
    ("a unix socket's owner=, group= or mode=", |a, b| {
        socket_access(a) != socket_access(b)
    }),
    ("map, map-type or postmap", |a, b| {
        let shown = |c: &Config| {
            c.map
                .as_ref()
                .map(|m| (m.path.clone(), m.map_type, m.postmap.clone()))
        };
        shown(a) != shown(b)
    }),
    ("policy", |a, b| {
        addresses(&a.policy) != addresses(&b.policy)
    }),
    ("socketmap", |a, b| {
        addresses(&a.socketmap) != addresses(&b.socketmap)
    }),
    ("auth-policy or auth-policy-secret", |a, b| {
        addresses(&a.auth_policy) != addresses(&b.auth_policy)
            || a.auth_policy_secret != b.auth_policy_secret
    }),
    ("state", |a, b| a.state != b.state),
    ("memcache or memcache-prefix", |a, b| {
        a.memcache != b.memcache || a.memcache_prefix != b.memcache_prefix
    }),
    ("pid-file", |a, b| a.pid_file != b.pid_file),
    ("control", |a, b| a.control != b.control),
    ("metrics", |a, b| {
        a.metrics.as_ref().map(ListenSpec::address) != b.metrics.as_ref().map(ListenSpec::address)
    }),
    (
        "user, group, socket-group, socket-mode or receive-buffer",
        |a, b| {
            a.run_as != b.run_as
                || a.socket_group != b.socket_group
                || a.socket_mode != b.socket_mode
                || a.receive_buffer != b.receive_buffer
        },
    ),
];

/// Where the listeners listen, without their allow-lists (which a reload
/// changes).
fn addresses(specs: &[ListenSpec]) -> Vec<String> {
    specs.iter().map(ListenSpec::address).collect()
}

/// The owner, group and mode each unix socket is made with.
fn socket_access(c: &Config) -> Vec<Option<Access>> {
    c.listen
        .iter()
        .chain(&c.policy)
        .chain(&c.socketmap)
        .map(|s| s.access().cloned())
        .collect()
}

/// `--memcache`, `--memcache-prefix` and `--ipv6-prefix`, checked
/// together (a map or memcached needs a prefix Postfix has keys for).
fn sink_group(
    args: &DaemonArgs,
    file: &FileConfig,
    path: &Path,
    source: &str,
    map: bool,
) -> Result<(Vec<crate::postfix::memcache::Server>, String, u8), ConfigError> {
    let mut servers = Vec::new();
    for (v, origin) in pick_list(&args.memcache, &file.memcache, &[], path, source) {
        let server = crate::postfix::memcache::Server::parse(v)
            .map_err(|e| origin.error("memcache", v, &e))?;
        servers.push(server);
    }
    let (prefix, origin) = pick(
        &args.memcache_prefix,
        &file.memcache_prefix,
        crate::postfix::memcache::DEFAULT_PREFIX,
        path,
        source,
    );
    crate::postfix::memcache::check_prefix(prefix)
        .map_err(|e| origin.error("memcache-prefix", prefix, &e))?;
    let (text, origin) = match (&args.ipv6_prefix, &file.ipv6_prefix) {
        (Some(v), _) => (v.clone(), Origin::Flag),
        (None, Some(v)) => (
            match v.get_ref() {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            Origin::File {
                path,
                source,
                offset: v.span().start,
            },
        ),
        (None, None) => ("128".to_string(), Origin::Default),
    };
    let bits = text
        .trim_start_matches('/')
        .parse::<u8>()
        .ok()
        .filter(|n| (48..=128).contains(n))
        .ok_or_else(|| {
            origin.error(
                "ipv6-prefix",
                &text,
                "expected a prefix length from 48 to 128 bits (64: the client's /64)",
            )
        })?;
    if (map || !servers.is_empty()) && !bits.is_multiple_of(16) {
        return Err(origin.error(
            "ipv6-prefix",
            &text,
            "with a map or memcached, expected 48, 64, 80, 96, 112 or 128: Postfix shortens an IPv6 address one group (16 bits) at a time, so only those prefixes have a key it looks up",
        ));
    }
    Ok((servers, prefix.to_string(), bits))
}

/// The auth-policy listeners (TCP only) and the file of their secret:
/// both, or neither.
fn auth_policy(
    args: &DaemonArgs,
    file: &FileConfig,
    path: &Path,
    source: &str,
) -> Result<(Vec<ListenSpec>, Option<PathBuf>), ConfigError> {
    let mut specs = Vec::new();
    let mut first = None;
    for (v, origin) in pick_list(&args.auth_policy, &file.auth_policy, &[], path, source) {
        specs.push(
            parse_url(v, UrlKind::AuthPolicy).map_err(|e| origin.error("auth-policy", v, &e))?,
        );
        first.get_or_insert((v, origin));
    }
    let (secret, origin) = pick(
        &args.auth_policy_secret,
        &file.auth_policy_secret,
        "",
        path,
        source,
    );
    match (first, secret) {
        (Some((v, origin)), "") => Err(origin.error(
            "auth-policy",
            v,
            "needs --auth-policy-secret FILE, a file of mode 0600 holding USER:PASSWORD, the credentials Dovecot sends (see the README, \"Dovecot's auth-policy reports\")",
        )),
        (None, "") => Ok((specs, None)),
        (None, v) => Err(origin.error(
            "auth-policy-secret",
            v,
            "no --auth-policy listener uses it: add one (tcp://ADDR:PORT) or remove the secret",
        )),
        (Some(_), v) if v.ends_with('/') => Err(origin.error(
            "auth-policy-secret",
            v,
            "expected the path of a file holding USER:PASSWORD, e.g. /etc/smtp-after-popd/auth-policy.secret",
        )),
        (Some(_), v) => Ok((specs, Some(PathBuf::from(v)))),
    }
}

/// The built-in patterns plus the file's `[[pattern]]` tables.
fn build_matchers(
    path: &Path,
    source: &str,
    specs: Vec<PatternSpec>,
) -> Result<Matchers, ConfigError> {
    let pairs: Vec<(PatternSpec, &str)> = specs.into_iter().map(|s| (s, source)).collect();
    Matchers::new(&pairs).map_err(|(builtin, e)| {
        let place = if builtin {
            "built-in patterns".to_string()
        } else {
            path.display().to_string()
        };
        match e.line {
            Some(l) => ConfigError(format!("{place}, line {l}: {}", e.message)),
            None => ConfigError(format!("{place}: {}", e.message)),
        }
    })
}

/// The patterns for `smtp-after-popd match`: built-in plus the file's.
pub fn matchers_from_file(path: Option<&Path>) -> Result<Matchers, ConfigError> {
    match path {
        None => build_matchers(Path::new(""), "", Vec::new()),
        Some(p) => {
            let (source, file) = read_file(p)?;
            build_matchers(p, &source, file.pattern)
        }
    }
}

/// What `match` applies from a configuration file (the defaults without
/// one): its patterns, never-grant rules and trusted proxies.
pub fn match_rules(path: Option<&Path>) -> Result<(Matchers, Vec<Cidr>, Vec<Cidr>), ConfigError> {
    let (p, source, file) = match path {
        Some(p) => {
            let (source, file) = read_file(p)?;
            (p, source, file)
        }
        None => (Path::new(""), String::new(), FileConfig::default()),
    };
    let never = cidrs(
        "never",
        pick_list(&[], &file.never, DEFAULT_NEVER, p, &source),
        true,
    )?;
    let proxies = pick_list(&[], &file.trusted_proxy, &[], p, &source);
    let proxies = cidrs("trusted-proxy", proxies, false)?;
    Ok((build_matchers(p, &source, file.pattern)?, never, proxies))
}

/// The control socket for the client subcommands: `--control`, else the
/// configuration file's `control`, else the default.
pub fn control_path(args: &ControlArgs) -> Result<PathBuf, ConfigError> {
    if let Some(p) = &args.control {
        return Ok(p.clone());
    }
    if let Some(p) = &args.config {
        let (_, file) = read_file(p)?;
        if let Some(v) = file.control {
            if v.get_ref() == "none" {
                return Err(ConfigError(format!(
                    "{}: control = \"none\": the daemon has no control socket; set control to a path and restart it",
                    p.display()
                )));
            }
            return Ok(PathBuf::from(v.get_ref()));
        }
    }
    Ok(PathBuf::from(DEFAULT_CONTROL))
}

/// The parameters after `?` in a listener URL: `KEY=VALUE` pairs joined by
/// `&` (`unix:///PATH?group=postfix&mode=0660`). Each kind of URL takes the
/// keys it knows with [`UrlParams::take`]; [`UrlParams::finish`] refuses the
/// rest, so a misspelt key is an error rather than ignored.
#[derive(Debug, Default)]
pub struct UrlParams<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> UrlParams<'a> {
    /// Splits `url` into what comes before `?` and its parameters.
    pub fn split(url: &'a str) -> Result<(&'a str, UrlParams<'a>), Invalid> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url, UrlParams::default()));
        };
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for part in query.split('&') {
            let Some((key, value)) = part.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                return Err(invalid!(
                    "\"{part}\" after ? is not KEY=VALUE (settings are joined by &)"
                ));
            };
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(invalid!("{key}= is given twice"));
            }
            pairs.push((key, value));
        }
        Ok((base, UrlParams { pairs }))
    }

    /// Takes the value of `key`, if the URL gives it.
    pub fn take(&mut self, key: &str) -> Option<&'a str> {
        let i = self.pairs.iter().position(|(k, _)| *k == key)?;
        Some(self.pairs.remove(i).1)
    }

    /// Refuses a parameter no one took; `known` says which this kind of
    /// URL takes.
    pub fn finish(self, known: &str) -> Result<(), Invalid> {
        match self.pairs.first() {
            None => Ok(()),
            Some((key, _)) => Err(invalid!("unknown setting {key}=: {known}")),
        }
    }
}

/// What a socket URL is for: which schemes it takes, and how to say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlKind {
    /// `--listen`: UDP, TCP or a unix datagram socket.
    Listen,
    /// `--policy`: TCP or a unix stream socket.
    Policy,
    /// `--socketmap`: a unix stream socket only.
    Socketmap,
    /// `--metrics`: TCP, with or without the `tcp://`.
    Metrics,
    /// `--auth-policy`: TCP only (HTTP).
    AuthPolicy,
}

impl UrlKind {
    fn schemes(self) -> &'static [&'static str] {
        match self {
            UrlKind::Listen => &["udp", "tcp", "unix"],
            UrlKind::Policy => &["tcp", "unix"],
            UrlKind::Socketmap => &["unix"],
            UrlKind::Metrics | UrlKind::AuthPolicy => &["tcp"],
        }
    }

    /// The forms this kind takes, with examples.
    fn expected(self) -> &'static str {
        match self {
            UrlKind::Listen => {
                "expected udp://ADDR:PORT, tcp://ADDR:PORT or unix:///PATH (e.g. udp://127.0.0.1:5514, tcp://[::]:5514 or unix:///run/smtp-after-popd/syslog.sock)"
            }
            UrlKind::Policy => {
                "expected tcp://ADDR:PORT or unix:///PATH (e.g. tcp://127.0.0.1:10040 or unix:///var/spool/postfix/smtp-after-popd/policy)"
            }
            UrlKind::Socketmap => {
                "expected unix:///PATH (e.g. unix:///run/smtp-after-popd/socketmap.sock)"
            }
            UrlKind::Metrics => {
                "expected ADDR:PORT or tcp://ADDR:PORT (e.g. 127.0.0.1:9154 or [::]:9154)"
            }
            UrlKind::AuthPolicy => {
                "expected tcp://ADDR:PORT, optionally followed by ?allow=CIDR,CIDR (e.g. tcp://127.0.0.1:12999)"
            }
        }
    }

    /// A port to show in examples.
    fn example_port(self) -> u16 {
        match self {
            UrlKind::Policy => 10040,
            UrlKind::Metrics => 9154,
            UrlKind::AuthPolicy => 12999,
            _ => 5514,
        }
    }

    /// Why a scheme this kind does not take is wrong here.
    fn refuse_scheme(self, scheme: &str) -> String {
        match self {
            UrlKind::Policy => "expected unix:///PATH or tcp://ADDR:PORT: Postfix speaks to a policy service over a stream".into(),
            UrlKind::Socketmap => "expected unix:///PATH: the socketmap protocol has no authentication, so it is served on a unix socket only".into(),
            UrlKind::Metrics => "expected ADDR:PORT or tcp://ADDR:PORT?allow=CIDR,CIDR, e.g. 127.0.0.1:9154 or [::]:9154: the metrics are served over HTTP on TCP".into(),
            UrlKind::AuthPolicy => "expected tcp://ADDR:PORT, optionally followed by ?allow=CIDR,CIDR (e.g. tcp://127.0.0.1:12999): Dovecot's auth-policy client speaks HTTP over TCP".into(),
            UrlKind::Listen => format!("{scheme}:// is not a listener: {}", self.expected()),
        }
    }
}

/// Parses an octal file mode (`0660`).
pub fn parse_mode(v: &str) -> Result<u32, Invalid> {
    u32::from_str_radix(v.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777 && !v.is_empty())
        .ok_or_else(|| "expected an octal file mode such as 0660".into())
}

/// The owner, group and mode a unix socket URL gives.
fn unix_access(params: &mut UrlParams<'_>) -> Result<Access, Invalid> {
    let owner = params.take("owner");
    let group = params.take("group");
    let mode = params.take("mode");
    Ok(Access {
        owner: owner
            .map(|v| privilege::user(v).map_err(|e| format!("owner={v}: {e}")))
            .transpose()?,
        group: group
            .map(|v| privilege::group(v).map_err(|e| format!("group={v}: {e}")))
            .transpose()?,
        mode: mode
            .map(|v| parse_mode(v).map_err(|e| format!("mode={v}: {e}")))
            .transpose()?,
    })
}

/// Takes `attested=yes` (or `no`) out of a listener URL's settings
/// (`unix:///PATH?attested=yes`, `udp://ADDR:PORT?allow=CIDR&attested=yes`):
/// the URL without it, and whether the listener is declared to carry the
/// attested rule. The other settings are left for [`parse_listen`].
pub fn split_attested(url: &str) -> Result<(String, bool), Invalid> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), false));
    };
    let mut rest = Vec::new();
    let mut attested = None;
    for item in query.split('&') {
        match item.strip_prefix("attested=") {
            Some(v) if attested.is_some() => {
                return Err(invalid!("attested={v}: attested is given twice"));
            }
            Some("yes") => attested = Some(true),
            Some("no") => attested = Some(false),
            Some(other) => {
                return Err(invalid!(
                    "attested={other}: expected attested=yes (the listener carries rsyslog/smtp-after-popd-attested.conf) or attested=no"
                ));
            }
            None => rest.push(item),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, attested.unwrap_or(false)))
}

/// Parses a socket URL for `kind`: the forms [`parse_listen`] takes, those
/// of the kind only, with a message that names the part that is wrong (the
/// scheme, the address, the port or the path) and how to write it.
pub fn parse_url(s: &str, kind: UrlKind) -> Result<ListenSpec, Invalid> {
    let full;
    let s = if kind == UrlKind::Metrics && !s.contains("://") {
        full = format!("tcp://{s}");
        full.as_str()
    } else {
        s
    };
    // The scheme, address, port and path are looked at first, each with
    // its own message; the settings after `?` are then parse_listen's.
    let base = s.split_once('?').map_or(s, |(base, _)| base);
    if let Some(why) = diagnose_url(base, kind) {
        return Err(Invalid(why));
    }
    let spec = parse_listen(s)?;
    let scheme = match spec {
        ListenSpec::Udp(..) => "udp",
        ListenSpec::Tcp(..) => "tcp",
        ListenSpec::Unix(..) => "unix",
    };
    if !kind.schemes().contains(&scheme) {
        return Err(Invalid(kind.refuse_scheme(scheme)));
    }
    Ok(spec)
}

/// What is wrong with a socket URL without its settings (what comes
/// before `?`), part by part, if anything is; `None` when its scheme,
/// address, port and path are well formed.
fn diagnose_url(s: &str, kind: UrlKind) -> Option<String> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Some(diagnose_no_scheme(s, kind));
    };
    if !["udp", "tcp", "unix"].contains(&scheme) {
        return Some(format!("unknown scheme \"{scheme}\": {}", kind.expected()));
    }
    if !kind.schemes().contains(&scheme) {
        return Some(kind.refuse_scheme(scheme));
    }
    if scheme == "unix" {
        return diagnose_unix_path(rest, kind);
    }
    let (host, bracketed, port) = match split_host_port(scheme, rest, kind) {
        Ok(parts) => parts,
        Err(why) => return Some(why.0),
    };
    diagnose_host(scheme, host, bracketed, kind)
        .or_else(|| diagnose_port(scheme, host, bracketed, port, kind))
}

/// What is wrong with a URL without `://`.
fn diagnose_no_scheme(s: &str, kind: UrlKind) -> String {
    if let Some(path) = s.strip_prefix("unix:") {
        return format!(
            "a unix socket URL has three slashes before the absolute path: unix:///{}",
            path.trim_start_matches('/')
        );
    }
    let mut why = format!("no scheme: {}", kind.expected());
    if s.parse::<SocketAddr>().is_ok() {
        let suggest: Vec<String> = kind
            .schemes()
            .iter()
            .filter(|sc| **sc != "unix")
            .map(|sc| format!("{sc}://{s}"))
            .collect();
        if !suggest.is_empty() {
            why = format!("no scheme: write {}", suggest.join(" or "));
        }
    }
    why
}

/// What is wrong with the path of a `unix://` URL.
fn diagnose_unix_path(rest: &str, kind: UrlKind) -> Option<String> {
    if rest.is_empty() {
        Some(format!("no socket path: {}", kind.expected()))
    } else if !rest.starts_with('/') {
        Some(format!(
            "the socket path must be absolute, after three slashes: unix:///{rest}"
        ))
    } else if rest.ends_with('/') {
        Some("the path names a directory: give the socket file's path".into())
    } else {
        None
    }
}

/// The address (without brackets), whether it was in brackets, and the
/// port (if a colon gave one) of a `udp://` or `tcp://` URL.
fn split_host_port<'a>(
    scheme: &str,
    hostport: &'a str,
    kind: UrlKind,
) -> Result<(&'a str, bool, Option<&'a str>), Invalid> {
    if let Some(i) = hostport.find('/') {
        return Err(invalid!(
            "unexpected \"{}\" after the address: a {scheme}:// URL is {scheme}://ADDR:PORT",
            &hostport[i..]
        ));
    }
    let parts = if let Some(inner) = hostport.strip_prefix('[') {
        let Some((host, after)) = inner.split_once(']') else {
            return Err("the IPv6 address has no closing ]".into());
        };
        match after.strip_prefix(':') {
            Some(p) => (host, true, Some(p)),
            None if after.is_empty() => (host, true, None),
            None => {
                return Err(invalid!(
                    "unexpected \"{after}\" after ]: the port follows a colon, e.g. {scheme}://[{host}]:{}",
                    kind.example_port()
                ));
            }
        }
    } else if hostport.matches(':').count() > 1 {
        return Err(invalid!(
            "an IPv6 address goes in brackets, the port after them: e.g. {scheme}://[::1]:{}",
            kind.example_port()
        ));
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, false, Some(p)),
            None => (hostport, false, None),
        }
    };
    Ok(parts)
}

/// What is wrong with the address of a `udp://` or `tcp://` URL.
fn diagnose_host(scheme: &str, host: &str, bracketed: bool, kind: UrlKind) -> Option<String> {
    if host.is_empty() {
        return Some(format!(
            "no address: give the IP address to listen on, e.g. {scheme}://127.0.0.1:{port}, {scheme}://0.0.0.0:{port} (every IPv4 address) or {scheme}://[::]:{port} (IPv6 and IPv4)",
            port = kind.example_port()
        ));
    }
    if bracketed {
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Some(format!("\"{host}\" in brackets is not an IPv6 address"));
        }
    } else if host.parse::<std::net::Ipv4Addr>().is_err() {
        return Some(if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            format!(
                "\"{host}\" is not an IPv4 address: expected four numbers from 0 to 255, e.g. 192.0.2.25"
            )
        } else {
            format!(
                "\"{host}\" is a host name: give an IP address (e.g. 127.0.0.1, or [::1] for IPv6), so that what is bound does not depend on name resolution"
            )
        });
    }
    None
}

/// What is wrong with the port of a `udp://` or `tcp://` URL.
fn diagnose_port(
    scheme: &str,
    host: &str,
    bracketed: bool,
    port: Option<&str>,
    kind: UrlKind,
) -> Option<String> {
    let shown = if bracketed {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    match port {
        None => Some(format!(
            "no port: add one after the address, e.g. {scheme}://{shown}:{}",
            kind.example_port()
        )),
        Some("") => Some(format!(
            "no port after the colon: e.g. {scheme}://{shown}:{}",
            kind.example_port()
        )),
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(format!("the port \"{p}\" is not a number"))
        }
        Some(p) if p.parse::<u16>().is_err() => {
            Some(format!("port {p} is out of range: ports go up to 65535"))
        }
        Some(_) => None,
    }
}

/// Parses `udp://ADDR:PORT`, `tcp://ADDR:PORT` (either with
/// `?allow=CIDR[,CIDR...]`) or `unix:///PATH` (with
/// `?owner=USER&group=GROUP&mode=MODE`, each optional).
pub fn parse_listen(s: &str) -> Result<ListenSpec, Invalid> {
    const EXPECTED: &str = "expected udp://ADDR:PORT or tcp://ADDR:PORT (e.g. udp://127.0.0.1:5514 or tcp://[::]:5514, optionally followed by ?allow=CIDR,CIDR) or unix:///PATH (e.g. unix:///run/smtp-after-popd/syslog.sock, optionally followed by ?owner=USER&group=GROUP&mode=MODE)";
    let (base, mut params) = UrlParams::split(s).map_err(|e| format!("{EXPECTED}; {e}"))?;
    for (scheme, tcp) in [("udp://", false), ("tcp://", true)] {
        let Some(addr) = base.strip_prefix(scheme) else {
            continue;
        };
        let allow = match params.take("allow") {
            None => None,
            Some(list) => {
                let mut cidrs = Vec::new();
                for c in list.split(',') {
                    cidrs.push(c.parse::<Cidr>().map_err(|e| format!("allow={c}: {e}"))?);
                }
                Some(cidrs)
            }
        };
        params
            .finish("a udp:// or tcp:// URL takes allow=CIDR,CIDR")
            .map_err(|e| format!("{EXPECTED}; {e}"))?;
        let addr: SocketAddr = addr.parse().map_err(|_| EXPECTED.to_string())?;
        return Ok(if tcp {
            ListenSpec::Tcp(addr, allow)
        } else {
            ListenSpec::Udp(addr, allow)
        });
    }
    if let Some(rest) = base.strip_prefix("unix://") {
        if !rest.starts_with('/') || rest.len() < 2 || rest.ends_with('/') {
            return Err(invalid!("{EXPECTED}; the path must be absolute"));
        }
        // sockaddr_un holds at most 107 bytes of path.
        if rest.len() > 107 {
            return Err(
                "the socket path is longer than 107 bytes, the limit of a unix socket address"
                    .into(),
            );
        }
        let access = unix_access(&mut params)?;
        params.finish("a unix:// URL takes owner=USER, group=GROUP and mode=MODE (octal)")?;
        return Ok(ListenSpec::Unix(PathBuf::from(rest), access));
    }
    Err(EXPECTED.into())
}

/// Parses a duration such as `90s`, `2m`, `1h30m`, `1d` or `500ms`; a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Invalid> {
    const EXPECTED: &str = "expected a duration such as 90s, 2m, 1h or 1h30m";
    let s = s.trim();
    if s.is_empty() {
        return Err(EXPECTED.into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(EXPECTED.into());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| EXPECTED.to_string())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => return Err(EXPECTED.into()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Writes a duration the way the configuration takes it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        s if s % 86400 == 0 && s > 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Parses a byte size: a number, optionally followed by K or M (powers of
/// 1024).
pub fn parse_size(s: &str) -> Result<usize, Invalid> {
    const EXPECTED: &str = "expected a size in bytes such as 262144, 256K or 4M";
    let t = s.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix(['K', 'k']) {
        (n, 1024)
    } else if let Some(n) = t.strip_suffix(['M', 'm']) {
        (n, 1024 * 1024)
    } else {
        (t, 1)
    };
    let n: usize = num.parse().map_err(|_| EXPECTED.to_string())?;
    let v = n.checked_mul(mul).ok_or_else(|| EXPECTED.to_string())?;
    if v == 0 || v > 1 << 30 {
        return Err("expected a size between 1 byte and 1G".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(list: &[&str]) -> DaemonArgs {
        let mut v = vec!["smtp-after-popd"];
        v.extend_from_slice(list);
        Cli::try_parse_from(v).unwrap().daemon
    }

    #[test]
    fn the_shipped_example_configuration_loads_and_requires_attestation() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/smtp-after-popd.toml");
        // Every path the file names lies under /var/lib or /run, which only
        // an installed package creates: point them at a scratch directory,
        // so that the test reads and writes nothing of the host's.
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let (map, state, control) = (at("authenticated_ips"), at("state"), at("control"));
        let c = Config::from_args(&args(&[
            "--config",
            path,
            "--map",
            &map,
            "--state",
            &state,
            "--control",
            &control,
        ]))
        .unwrap();
        assert!(c.require_attestation);
        assert_eq!(c.attested, ["unix:///run/smtp-after-popd/syslog.sock"]);
        assert_eq!(c.max_grants, 100_000);
        assert_eq!(c.window, Duration::from_secs(120));
    }

    #[test]
    fn listeners_are_declared_attested() {
        assert_eq!(
            split_attested("unix:///run/x.sock?attested=yes"),
            Ok(("unix:///run/x.sock".to_string(), true))
        );
        assert_eq!(
            split_attested("udp://0.0.0.0:5514?allow=192.0.2.1&attested=yes"),
            Ok(("udp://0.0.0.0:5514?allow=192.0.2.1".to_string(), true))
        );
        assert_eq!(
            split_attested("udp://0.0.0.0:5514?attested=no"),
            Ok(("udp://0.0.0.0:5514".to_string(), false))
        );
        assert_eq!(
            split_attested("udp://0.0.0.0:5514"),
            Ok(("udp://0.0.0.0:5514".to_string(), false))
        );
        assert!(split_attested("unix:///x?attested=true").is_err());
        assert!(split_attested("unix:///x?attested=yes&attested=no").is_err());
        let c = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "unix:///run/a.sock?attested=yes",
            "--listen",
            "unix:///run/b.sock",
        ]))
        .unwrap();
        assert_eq!(c.attested, ["unix:///run/a.sock"]);
        assert_eq!(
            c.listen[0],
            ListenSpec::Unix("/run/a.sock".into(), Access::default())
        );
        // Nothing could ever be granted.
        let e =
            Config::from_args(&args(&["--map", "/tmp/m", "--require-attestation"])).unwrap_err();
        assert!(
            e.0.starts_with("require-attestation is on, but no listener is declared ?attested=yes"),
            "{e}"
        );
        // Network peers: attested listener and trusted peers go together.
        let e = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "udp://127.0.0.1:5514?attested=yes",
        ]))
        .unwrap_err();
        assert!(
            e.0.contains("believed only from --trust-attestation-from peers"),
            "{e}"
        );
        let e = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "udp://127.0.0.1:5514",
            "--trust-attestation-from",
            "192.0.2.25",
        ]))
        .unwrap_err();
        assert!(
            e.0.starts_with("trust-attestation-from is set, but no udp:// or tcp:// listener is declared ?attested=yes"),
            "{e}"
        );
        let c = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "udp://127.0.0.1:5514?attested=yes",
            "--trust-attestation-from",
            "192.0.2.25",
        ]))
        .unwrap();
        assert_eq!(c.attested, ["udp://127.0.0.1:5514"]);
    }

    #[test]
    fn require_attestation_and_max_grants() {
        let c = Config::from_args(&args(&["--map", "/tmp/m"])).unwrap();
        assert!(!c.require_attestation);
        assert_eq!(c.max_grants, DEFAULT_MAX_GRANTS);
        let c = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "unix:///run/x.sock?attested=yes",
            "--require-attestation",
        ]))
        .unwrap();
        assert!(c.require_attestation);
        let c = Config::from_args(&args(&["--map", "/tmp/m", "--require-attestation=no"])).unwrap();
        assert!(!c.require_attestation);
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--max-grants", "0"])).unwrap_err();
        assert_eq!(
            e.0,
            "--max-grants \"0\": expected a whole number of addresses from 1 to 10000000"
        );
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--require-attestation=maybe"]))
            .unwrap_err();
        assert_eq!(e.0, "--require-attestation \"maybe\": expected yes or no");
    }

    #[test]
    fn control_paths() {
        let c = Config::from_args(&args(&["--map", "/tmp/m", "--control", "run/control"])).unwrap();
        assert_eq!(c.control, Some((PathBuf::from("run/control"), false)));
        let c = Config::from_args(&args(&["--map", "/tmp/m", "--control", "none"])).unwrap();
        assert_eq!(c.control, None);
        let long = format!("/{}", "x".repeat(107));
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--control", &long])).unwrap_err();
        assert!(
            e.0.contains("expected a socket path of at most 107 bytes"),
            "{e}"
        );
    }

    #[test]
    fn hold_while_connected_and_hold_max() {
        let c = Config::from_args(&args(&["--map", "/tmp/m"])).unwrap();
        assert!(!c.hold_while_connected);
        assert_eq!(c.hold_max, Duration::from_secs(12 * 3600));
        let c = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--hold-while-connected",
            "--hold-max",
            "1h",
        ]))
        .unwrap();
        assert!(c.hold_while_connected);
        assert_eq!(c.hold_max, Duration::from_secs(3600));
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--hold-while-connected=maybe"]))
            .unwrap_err();
        assert_eq!(e.0, "--hold-while-connected \"maybe\": expected yes or no");
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--hold-max", "8d"])).unwrap_err();
        assert_eq!(
            e.0,
            "--hold-max \"8d\": expected a duration longer than 0 and at most 7d"
        );
        let e = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--window",
            "2h",
            "--hold-max",
            "1h",
            "--hold-while-connected=yes",
        ]))
        .unwrap_err();
        assert_eq!(
            e.0,
            "--hold-max \"1h\": expected at least the window (2h) with hold-while-connected"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "map = \"/tmp/m\"\nhold-while-connected = true\nhold-max = \"soon\"\n",
        )
        .unwrap();
        let e = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "{}, line 3: hold-max = \"soon\": expected a duration such as 90s, 2m, 1h or 1h30m",
                path.display()
            )
        );
    }

    #[test]
    fn memcache_and_ipv6_prefix() {
        let c = Config::from_args(&args(&[
            "--map",
            "none",
            "--memcache",
            "inet:127.0.0.1:11211",
            "--ipv6-prefix",
            "64",
        ]))
        .unwrap();
        assert_eq!(c.memcache.len(), 1);
        assert_eq!(
            (c.memcache_prefix.as_str(), c.ipv6_prefix),
            ("smtp-after-popd:", 64)
        );
        let e = Config::from_args(&args(&["--map", "/tmp/m", "--ipv6-prefix", "56"])).unwrap_err();
        assert!(e.0.contains("expected 48, 64, 80, 96, 112 or 128"), "{e}");
        // A policy service alone matches any prefix itself.
        let c = Config::from_args(&args(&[
            "--map",
            "none",
            "--policy",
            "tcp://127.0.0.1:10040",
            "--ipv6-prefix",
            "56",
        ]))
        .unwrap();
        assert_eq!(c.ipv6_prefix, 56);
        for bad in [
            ["--ipv6-prefix", "32"],
            ["--memcache", "127.0.0.1:11211"],
            ["--memcache-prefix", "a b"],
        ] {
            let e = Config::from_args(&args(&[&["--map", "/tmp/m"][..], &bad[..]].concat()))
                .unwrap_err();
            assert!(e.0.starts_with(&format!("{} \"", bad[0])), "{e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn listen_urls() {
        assert_eq!(
            parse_listen("udp://[::]:5514"),
            Ok(ListenSpec::Udp("[::]:5514".parse().unwrap(), None))
        );
        assert_eq!(
            parse_listen("tcp://0.0.0.0:5514?allow=192.0.2.10,2001:db8::/32"),
            Ok(ListenSpec::Tcp(
                "0.0.0.0:5514".parse().unwrap(),
                Some(vec![
                    "192.0.2.10".parse().unwrap(),
                    "2001:db8::/32".parse().unwrap()
                ])
            ))
        );
        assert_eq!(
            parse_listen("udp://0.0.0.0:5514?allow=192.0.2.0/24")
                .unwrap()
                .to_string(),
            "udp://0.0.0.0:5514?allow=192.0.2.0/24"
        );
        assert!(parse_listen("udp://0.0.0.0:5514?allow=192.0.2.1/24").is_err());
        assert!(parse_listen("udp://0.0.0.0:5514?deny=192.0.2.1").is_err());
        assert_eq!(
            parse_listen("unix:///run/x.sock"),
            Ok(ListenSpec::Unix("/run/x.sock".into(), Access::default()))
        );
        let spec = parse_listen("unix:///run/x.sock?group=root&mode=0620").unwrap();
        assert_eq!(spec.to_string(), "unix:///run/x.sock?group=root&mode=0620");
        assert_eq!(spec.address(), "unix:///run/x.sock");
        assert_eq!(spec.access().and_then(|a| a.mode), Some(0o620));
        assert_eq!(spec.access().and_then(|a| a.group.clone()).unwrap().gid, 0);
        for (url, error) in [
            (
                "unix:///run/x.sock?mode=999",
                "mode=999: expected an octal file mode",
            ),
            (
                "unix:///run/x.sock?mode=",
                "mode=: expected an octal file mode",
            ),
            (
                "unix:///run/x.sock?grup=x",
                "unknown setting grup=: a unix:// URL takes owner=USER, group=GROUP and mode=MODE",
            ),
            (
                "unix:///run/x.sock?mode=0600&mode=0660",
                "mode= is given twice",
            ),
            (
                "unix:///run/x.sock?mode",
                "\"mode\" after ? is not KEY=VALUE",
            ),
            (
                "unix:///run/x.sock?group=no-such-group-sap",
                "group=no-such-group-sap: no such group",
            ),
            (
                "unix:///run/x.sock?owner=no-such-user-sap",
                "owner=no-such-user-sap: no such user",
            ),
            (
                "udp://0.0.0.0:5514?mode=0600",
                "unknown setting mode=: a udp:// or tcp:// URL takes allow=",
            ),
        ] {
            let e = parse_listen(url).unwrap_err();
            assert!(e.0.contains(error), "{url}: {e}");
        }
        assert!(parse_listen("tcp://1.2.3.4").is_err());
        assert!(parse_listen("unix://relative").is_err());
        assert!(parse_listen("udp://localhost:5514").is_err());
    }

    #[test]
    fn a_syslog_socket_every_user_may_write_is_refused() {
        let e = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--listen",
            "unix:///tmp/x.sock?mode=0622",
        ]))
        .unwrap_err();
        assert!(
            e.0.starts_with("--listen \"unix:///tmp/x.sock?mode=0622\": a syslog socket that every local user may write lets anyone forge login records"),
            "{e}"
        );
        // A policy socket may be (Postfix asks; nothing there grants).
        let c = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--policy",
            "unix:///tmp/p.sock?mode=0666",
            "--socket-mode",
            "0640",
        ]))
        .unwrap();
        assert_eq!(c.socket_mode, Some(0o640));
        assert_eq!(c.policy[0].access().and_then(|a| a.mode), Some(0o666));
    }

    /// Wrong URLs: the flag, its value, and the start (or a part) of the
    /// message that must name what is wrong.
    const WRONG_URLS: &[(&str, &str, &str)] = &[
        (
            "--listen",
            "localhost",
            "--listen \"localhost\": no scheme: expected udp://ADDR:PORT, tcp://ADDR:PORT or unix:///PATH (e.g. udp://127.0.0.1:5514, tcp://[::]:5514 or unix:///run/smtp-after-popd/syslog.sock)",
        ),
        (
            "--listen",
            "127.0.0.1:5514",
            "--listen \"127.0.0.1:5514\": no scheme: write udp://127.0.0.1:5514 or tcp://127.0.0.1:5514",
        ),
        (
            "--listen",
            "udp://127.0.0.1",
            "--listen \"udp://127.0.0.1\": no port: add one after the address, e.g. udp://127.0.0.1:5514",
        ),
        (
            "--listen",
            "udp://300.1.1.1:5514",
            "--listen \"udp://300.1.1.1:5514\": \"300.1.1.1\" is not an IPv4 address: expected four numbers from 0 to 255, e.g. 192.0.2.25",
        ),
        (
            "--listen",
            "udp://127.0.0.1:99999",
            "--listen \"udp://127.0.0.1:99999\": port 99999 is out of range: ports go up to 65535",
        ),
        (
            "--listen",
            "unix:/x",
            "--listen \"unix:/x\": a unix socket URL has three slashes before the absolute path: unix:///x",
        ),
        (
            "--listen",
            "unix://run/x.sock",
            "--listen \"unix://run/x.sock\": the socket path must be absolute, after three slashes: unix:///run/x.sock",
        ),
        (
            "--listen",
            "udp://localhost:5514",
            "--listen \"udp://localhost:5514\": \"localhost\" is a host name: give an IP address",
        ),
        (
            "--listen",
            "udp://::1:5514",
            "--listen \"udp://::1:5514\": an IPv6 address goes in brackets, the port after them: e.g. udp://[::1]:5514",
        ),
        (
            "--listen",
            "udp://127.0.0.1:x",
            "--listen \"udp://127.0.0.1:x\": the port \"x\" is not a number",
        ),
        (
            "--listen",
            "http://127.0.0.1:80",
            "--listen \"http://127.0.0.1:80\": unknown scheme \"http\": expected udp://",
        ),
        (
            "--listen",
            "udp://:5514",
            "--listen \"udp://:5514\": no address: give the IP address to listen on",
        ),
        (
            "--listen",
            "udp://127.0.0.1:5514?deny=x",
            "unknown setting deny=: a udp:// or tcp:// URL takes allow=CIDR,CIDR",
        ),
        (
            "--policy",
            "localhost",
            "--policy \"localhost\": no scheme: expected tcp://ADDR:PORT or unix:///PATH",
        ),
        (
            "--policy",
            "127.0.0.1:10040",
            "--policy \"127.0.0.1:10040\": no scheme: write tcp://127.0.0.1:10040",
        ),
        (
            "--policy",
            "udp://127.0.0.1:10040",
            "--policy \"udp://127.0.0.1:10040\": expected unix:///PATH or tcp://ADDR:PORT: Postfix speaks to a policy service over a stream",
        ),
        (
            "--policy",
            "tcp://127.0.0.1",
            "--policy \"tcp://127.0.0.1\": no port: add one after the address, e.g. tcp://127.0.0.1:10040",
        ),
        (
            "--socketmap",
            "tcp://127.0.0.1:1",
            "served on a unix socket only",
        ),
        (
            "--metrics",
            "localhost:9154",
            "--metrics \"localhost:9154\": \"localhost\" is a host name",
        ),
        (
            "--metrics",
            "127.0.0.1",
            "--metrics \"127.0.0.1\": no port: add one after the address, e.g. tcp://127.0.0.1:9154",
        ),
        (
            "--metrics",
            "udp://127.0.0.1:9154",
            "the metrics are served over HTTP on TCP",
        ),
    ];

    #[test]
    fn each_wrong_part_of_a_url_gets_its_own_message() {
        let err = |flag: &str, v: &str| {
            Config::from_args(&args(&["--map", "/tmp/m", flag, v]))
                .unwrap_err()
                .0
        };
        for &(flag, value, want) in WRONG_URLS {
            let e = err(flag, value);
            assert!(
                e.starts_with(want) || e.contains(want),
                "{flag} {value}: {e}"
            );
            if flag == "--policy" {
                assert!(!e.contains("udp://ADDR") && !e.contains("write udp"), "{e}");
            }
        }
    }

    #[test]
    fn well_formed_urls_pass() {
        for (flag, value) in [
            ("--listen", "udp://[::]:5514"),
            ("--listen", "tcp://0.0.0.0:5514?allow=192.0.2.0/24"),
            ("--policy", "unix:///tmp/p.sock"),
            ("--metrics", "[::1]:9154"),
        ] {
            assert!(
                Config::from_args(&args(&["--map", "/tmp/m", flag, value])).is_ok(),
                "{flag} {value}"
            );
        }
    }

    #[test]
    fn defaults() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("authenticated_ips");
        let c = Config::from_args(&args(&["--map", map.to_str().unwrap()])).unwrap();
        assert_eq!(c.window, Duration::from_secs(120));
        assert_eq!(
            c.listen,
            vec![ListenSpec::Udp("127.0.0.1:5514".parse().unwrap(), None)]
        );
        assert_eq!(c.never.len(), 2);
        assert_eq!(c.socket_mode, None);
        assert_eq!(c.map.unwrap().map_type, MapType::Hash);
    }

    #[test]
    fn flag_errors_name_the_flag_and_value() {
        let e = Config::from_args(&args(&["--window", "2x", "--map", "/tmp/m"])).unwrap_err();
        assert_eq!(
            e.0,
            "--window \"2x\": expected a duration such as 90s, 2m, 1h or 1h30m"
        );
        let e = Config::from_args(&args(&["--allow-from", "10.0.0.1/8", "--map", "/tmp/m"]))
            .unwrap_err();
        assert!(e.0.contains("perhaps you should use \"10.0.0.0/8\""), "{e}");
        let e = Config::from_args(&args(&["--map", "/nonexistent/dir/m"])).unwrap_err();
        assert!(e.0.contains("/nonexistent/dir does not exist"), "{e}");
        let e = Config::from_args(&args(&["--never", "none", "--map", "/tmp/m"])).unwrap();
        assert!(e.never.is_empty());
    }

    #[test]
    fn a_reload_names_the_settings_that_need_a_restart() {
        let config = |extra: &[&str]| {
            let base = ["--map", "none", "--policy", "tcp://127.0.0.1:10040"];
            Config::from_args(&args(&[&base[..], extra].concat())).unwrap()
        };
        let old = config(&[]);
        assert!(old.needs_restart(&config(&[])).is_empty());
        // What a reload applies at once.
        let live = config(&[
            "--window",
            "5m",
            "--allow-from",
            "10.0.0.0/8",
            "--never",
            "none",
            "--max-grants",
            "10",
        ]);
        assert!(old.needs_restart(&live).is_empty());
        let restart = config(&[
            "--listen",
            "udp://127.0.0.1:5515",
            "--state",
            "/tmp/state",
            "--receive-buffer",
            "1M",
            "--memcache-prefix",
            "other:",
        ]);
        assert_eq!(
            old.needs_restart(&restart),
            [
                "listen",
                "state",
                "memcache or memcache-prefix",
                "user, group, socket-group, socket-mode or receive-buffer"
            ]
        );
    }

    #[test]
    fn file_values_and_flag_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(
            f,
            "# comment\nwindow = \"1h\"\nlisten = [\"udp://127.0.0.1:0\", \"unix:///tmp/x.sock\"]\nmap = \"{}/m\"\nreceive-buffer = 1048576",
            dir.path().display()
        )
        .unwrap();
        drop(f);
        let c = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.window, Duration::from_secs(3600));
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.receive_buffer, Some(1 << 20));
        let c = Config::from_args(&args(&[
            "--config",
            path.to_str().unwrap(),
            "--window",
            "5m",
        ]))
        .unwrap();
        assert_eq!(c.window, Duration::from_secs(300));
    }

    #[test]
    fn file_errors_name_file_line_key_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "map = \"/tmp/m\"\n\nwindow = \"forever\"\n").unwrap();
        let e = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "{}, line 3: window = \"forever\": expected a duration such as 90s, 2m, 1h or 1h30m",
                path.display()
            )
        );
        std::fs::write(&path, "map = \"/tmp/m\"\nwindw = \"2m\"\n").unwrap();
        let e = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "{}, line 2: unknown field `windw`",
                path.display()
            )),
            "{e}"
        );
        std::fs::write(&path, "map = \"/tmp/m\"\nlisten = [\"tcp://x\"]\n").unwrap();
        let e = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(
            e.0.contains("line 2: listen = \"tcp://x\": \"x\" is a host name: give an IP address"),
            "{e}"
        );
        std::fs::write(&path, "map = \"/tmp/m\"\n[[pattern]]\nserver = \"x\"\nprogram = [\"x\"]\nservice = \"imap\"\nregex = 'from (?P<addr>.*)'\n").unwrap();
        let e = Config::from_args(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(e.0.contains("line 6: pattern \"x-"), "{e}");
    }

    #[test]
    fn auth_policy_listeners_are_tcp_and_need_their_secret() {
        let ok = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--auth-policy",
            "tcp://127.0.0.1:12999?allow=192.0.2.0/24",
            "--auth-policy",
            "tcp://[::1]:12999",
            "--auth-policy-secret",
            "/etc/smtp-after-popd/auth-policy.secret",
        ]))
        .unwrap();
        assert_eq!(ok.auth_policy.len(), 2);
        assert_eq!(
            ok.auth_policy[0].own_allow().map(|a| a.len()),
            Some(1),
            "its own allow-list"
        );
        let no_secret = Config::from_args(&args(&[
            "--map",
            "/tmp/m",
            "--auth-policy",
            "tcp://127.0.0.1:12999",
        ]))
        .unwrap_err()
        .0;
        assert!(
            no_secret.starts_with(
                "--auth-policy \"tcp://127.0.0.1:12999\": needs --auth-policy-secret FILE"
            ),
            "{no_secret}"
        );
        let unused = Config::from_args(&args(&["--map", "/tmp/m", "--auth-policy-secret", "/x"]))
            .unwrap_err()
            .0;
        assert!(
            unused.contains("no --auth-policy listener uses it"),
            "{unused}"
        );
        for (bad, want) in [
            ("udp://127.0.0.1:12999", "expected tcp://ADDR:PORT"),
            ("unix:///run/a.sock", "expected tcp://ADDR:PORT"),
            ("127.0.0.1:12999", "no scheme: write tcp://127.0.0.1:12999"),
            (
                "tcp://127.0.0.1",
                "no port: add one after the address, e.g. tcp://127.0.0.1:12999",
            ),
        ] {
            let e = Config::from_args(&args(&[
                "--map",
                "/tmp/m",
                "--auth-policy",
                bad,
                "--auth-policy-secret",
                "/x",
            ]))
            .unwrap_err()
            .0;
            assert!(e.contains(want), "{e}");
        }
    }
}
