//! Counters for everything received, dropped and decided.
//!
//! Consumes: increments from every stage.
//! Produces: a snapshot ([`Stats::snapshot`]) of named counters, for the log,
//! `smtp-after-popd stats`, the Prometheus endpoint and tests; and the
//! datagrams received by each listener ([`Stats::listener`]).
//! Trusts: nothing; counters only count.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// The daemon's counters. All are monotonic since start-up.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl Stats {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name.load(Ordering::Relaxed)), )* ]
            }

            /// Every counter with its name and description.
            pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![ $( (stringify!($name), concat!($($doc),*).trim_ascii(), self.$name.load(Ordering::Relaxed)), )* ]
            }
        }
    };
}

counters! {
    /// Datagrams read from any listener.
    received,
    /// Datagrams and TCP connections from a peer outside the allow-list.
    dropped_peer,
    /// TCP connections accepted.
    tcp_connections,
    /// Connections closed to make room for a new one, because its peer (or
    /// the listener) had as many open as allowed: each time the one that
    /// had waited longest without completing a request.
    dropped_connections,
    /// Connections closed because a request was not complete, or its
    /// answer not taken, within the service's deadline.
    timed_out_connections,
    /// Datagrams longer than 8 KiB.
    dropped_too_long,
    /// Datagrams that were not valid UTF-8.
    dropped_invalid_utf8,
    /// Datagrams in which no syslog tag could be found.
    dropped_unparsed,
    /// Records that name no program any pattern applies to: not parsed.
    skipped,
    /// Lines a pattern recognised whose address did not parse.
    bad_address,
    /// Logins recognised.
    logins,
    /// Logins refused by the never-grant rules.
    refused,
    /// Logins refused as forgeries (attestation missing or wrong).
    forgeries,
    /// Lines a pattern matched that grant nothing because their user's text
    /// could stand for a field the server writes (a field twice, a field or
    /// the text ending the user's field inside it).
    refused_ambiguous,
    /// Logins whose address a proxy reported (Zimbra oip=) refused because
    /// the proxy is not a --trusted-proxy.
    refused_proxy,
    /// Logins whose client address is itself a --trusted-proxy: the
    /// proxy's own connection to the server (a proxy that did not pass
    /// the client's address on), never a client's.
    refused_proxy_own,
    /// Records that continue a line the server's logger cut (courierlogger,
    /// 512 bytes): they begin in the middle of the user's text, so nothing
    /// in them is believed.
    refused_continuation,
    /// Logins from new addresses refused because the table was full.
    refused_full,
    /// New grants.
    granted,
    /// Logins that renewed a live grant.
    renewed,
    /// Grants that expired.
    expired,
    /// Policy requests answered.
    policy_requests,
    /// Policy requests answered OK.
    policy_ok,
    /// Socketmap lookups answered.
    socketmap_requests,
    /// Socketmap lookups answered OK.
    socketmap_ok,
    /// Map rebuilds that succeeded.
    map_updates,
    /// Map rebuilds that failed (and were retried).
    map_failures,
    /// Keys set or deleted in memcached (--memcache), all servers.
    memcache_writes,
    /// Writes to memcached that failed (and were retried, with a refill).
    memcache_failures,
    /// Times a memcached was filled with every live grant: at start, after
    /// a reconnection, a restart, a flush or a failure.
    memcache_refills,
    /// Grants removed by `smtp-after-popd revoke`.
    revoked,
    /// Configuration reloads that took effect.
    reloads,
    /// Configuration reloads refused (the old configuration stayed).
    reload_failures,
    /// Address lines of two-line servers (popa3d, vm-pop3d, spop3d)
    /// remembered for the success line of the same process.
    addresses_remembered,
    /// Remembered addresses dropped unused: expired, or pushed out when the
    /// memory was full.
    addresses_dropped,
    /// Success lines of two-line servers with no remembered address from
    /// the same process: nothing granted.
    logins_without_address,
    /// Login lines that carry no client address at all (old UW ipop3d,
    /// or a host name cut before the address): nothing granted.
    logins_unaddressed,
    /// Sessions held open (--hold-while-connected).
    holds_opened,
    /// Sessions closed by their logout line.
    holds_closed,
    /// Sessions not held because their address had the most open sessions
    /// held, or all sessions held were too many: the window alone applies.
    holds_refused,
    /// Logout lines that closed no held session.
    logouts_unpaired,
    /// Auth-policy reports of a successful IMAP or POP3 login (each then
    /// granted, renewed or refused by the address rules, as a logged login
    /// is).
    auth_policy_reports,
    /// Auth-policy reports that grant nothing by design: a failed or
    /// policy-rejected login, or another protocol (smtp, submission,
    /// sieve...).
    auth_policy_ignored,
    /// Auth-policy checks before or after authentication, answered allow.
    auth_policy_checks,
    /// Auth-policy requests refused with an HTTP error: no or wrong
    /// secret, a body too large, bad JSON, a field missing, another method
    /// or command.
    auth_policy_refused,
}

/// Datagrams received by each listener, by name.
#[derive(Debug, Default)]
pub struct ListenerCounts(std::sync::Mutex<Vec<(String, std::sync::Arc<AtomicU64>)>>);

impl ListenerCounts {
    /// The counter of the listener `name`, made on first use.
    pub fn counter(&self, name: &str) -> std::sync::Arc<AtomicU64> {
        let mut v = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((_, c)) = v.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = std::sync::Arc::new(AtomicU64::new(0));
        v.push((name.to_string(), c.clone()));
        c
    }

    /// Every listener's name and count.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let v = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        v.iter()
            .map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
