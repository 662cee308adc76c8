//! Holding grants while sessions are open (`--hold-while-connected`).
//!
//! Consumes: logins whose pattern pairs them with a logout line (a session
//! id the server wrote, or the process id), and the logout lines.
//! Produces: for each address, whether a session that logged in from it is
//! still open, and until when its grant is held: the latest login of an
//! open session plus `--hold-max`. The daemon gives the grant that expiry
//! while sessions are open, and `logout + --window` when the last one
//! closes.
//! Trusts: logout lines as far as login lines (the same attestation rules,
//! checked by the daemon before they reach this module). A session key is
//! the reporter, the host name, the server and the session id or pid, so
//! that one mail host cannot close another's sessions.
//!
//! Bounded: at most [`MAX_PER_ADDRESS`] open sessions per address and
//! [`MAX_SESSIONS`] in all (beyond, a login gets the window alone), and a
//! session is forgotten `--hold-max` after its login, so that a lost
//! logout line cannot keep a grant forever.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Most sessions held open per address.
pub const MAX_PER_ADDRESS: u32 = 64;
/// Most sessions held open in all.
pub const MAX_SESSIONS: usize = 262_144;

/// Which session a login or logout line belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The reporting peer.
    pub reporter: Arc<str>,
    /// The host name in the record.
    pub host: String,
    /// The server software.
    pub server: Arc<str>,
    /// `session ID` or `pid N`, as the matcher made it.
    pub id: String,
}

#[derive(Debug)]
struct Session {
    ip: IpAddr,
    /// Logins of this key still open (several for `user`-and-address keys).
    open: u32,
    since: Instant,
}

#[derive(Debug)]
struct PerAddress {
    open: u32,
    latest: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionKey, Session>,
    per_ip: HashMap<IpAddr, PerAddress>,
    /// Sessions in login order, for forgetting them after `--hold-max`;
    /// entries whose time no longer matches are stale.
    order: VecDeque<(Instant, SessionKey)>,
    total: usize,
}

/// What a logout line did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// No held session has this key (or its address differs).
    Unknown,
    /// A session closed; others from the address are still open.
    StillOpen(IpAddr, u32),
    /// The last open session from the address closed.
    Last(IpAddr),
}

/// The open sessions. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Holds {
    inner: Mutex<Inner>,
}

impl Holds {
    /// No session open.
    pub fn new() -> Holds {
        Holds::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Forgets sessions whose login is `hold_max` old.
    fn forget_old(inner: &mut Inner, now: Instant, hold_max: Duration) {
        while let Some((t, _)) = inner.order.front() {
            if *t + hold_max > now {
                break;
            }
            let Some((t, key)) = inner.order.pop_front() else {
                break;
            };
            if inner.sessions.get(&key).is_some_and(|s| s.since == t)
                && let Some(s) = inner.sessions.remove(&key)
            {
                Self::release(inner, s.ip, s.open);
            }
        }
        if inner.order.len() > 4 * inner.sessions.len().max(1024) {
            let mut v: Vec<(Instant, SessionKey)> = inner
                .sessions
                .iter()
                .map(|(k, s)| (s.since, k.clone()))
                .collect();
            v.sort_by_key(|(t, _)| *t);
            inner.order = v.into();
        }
    }

    fn release(inner: &mut Inner, ip: IpAddr, n: u32) {
        inner.total = inner.total.saturating_sub(n as usize);
        if let Some(a) = inner.per_ip.get_mut(&ip) {
            a.open = a.open.saturating_sub(n);
            if a.open == 0 {
                inner.per_ip.remove(&ip);
            }
        }
    }

    /// A login of session `key` from `ip`: holds it open. Returns until
    /// when the address's grant is held, or `None` when the session is not
    /// held (the address has [`MAX_PER_ADDRESS`] open, or all sessions
    /// are [`MAX_SESSIONS`]).
    pub fn open(
        &self,
        key: SessionKey,
        ip: IpAddr,
        now: Instant,
        hold_max: Duration,
    ) -> Option<Instant> {
        let mut inner = self.lock();
        Self::forget_old(&mut inner, now, hold_max);
        // The same key again (a duplicated line, or a pid reused): the
        // older login of it is over.
        if let Some(old) = inner.sessions.get(&key)
            && old.ip != ip
            && let Some(old) = inner.sessions.remove(&key)
        {
            Self::release(&mut inner, old.ip, old.open);
        }
        let open_here = inner.per_ip.get(&ip).map_or(0, |a| a.open);
        if open_here >= MAX_PER_ADDRESS || inner.total >= MAX_SESSIONS {
            return None;
        }
        let s = inner.sessions.entry(key.clone()).or_insert(Session {
            ip,
            open: 0,
            since: now,
        });
        s.open += 1;
        s.since = now;
        inner.order.push_back((now, key));
        inner.total += 1;
        let a = inner.per_ip.entry(ip).or_insert(PerAddress {
            open: 0,
            latest: now,
        });
        a.open += 1;
        a.latest = now;
        Some(now + hold_max)
    }

    /// A logout line of session `key` (naming `ip` if the line does).
    pub fn close(
        &self,
        key: &SessionKey,
        ip: Option<IpAddr>,
        now: Instant,
        hold_max: Duration,
    ) -> Closed {
        let mut inner = self.lock();
        Self::forget_old(&mut inner, now, hold_max);
        let Some(s) = inner.sessions.get_mut(key) else {
            return Closed::Unknown;
        };
        if ip.is_some_and(|ip| ip != s.ip) {
            return Closed::Unknown;
        }
        let sip = s.ip;
        s.open = s.open.saturating_sub(1);
        if s.open == 0 {
            inner.sessions.remove(key);
        }
        Self::release(&mut inner, sip, 1);
        match inner.per_ip.get(&sip) {
            Some(a) => Closed::StillOpen(sip, a.open),
            None => Closed::Last(sip),
        }
    }

    /// Until when the grant of `ip` is held by its open sessions, if any.
    pub fn held_until(&self, ip: IpAddr, now: Instant, hold_max: Duration) -> Option<Instant> {
        let mut inner = self.lock();
        Self::forget_old(&mut inner, now, hold_max);
        inner.per_ip.get(&ip).map(|a| a.latest + hold_max)
    }

    /// How many sessions are held open.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// Whether no session is held open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every session (the mode was turned off); returns the
    /// addresses that had open sessions.
    pub fn clear(&self) -> Vec<IpAddr> {
        let mut inner = self.lock();
        let ips = inner.per_ip.keys().copied().collect();
        *inner = Inner::default();
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        SessionKey {
            reporter: "unix:/x".into(),
            host: "mail".into(),
            server: "dovecot".into(),
            id: id.into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const MAX: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn sessions_open_and_close_per_address() {
        let h = Holds::new();
        let t0 = Instant::now();
        assert_eq!(
            h.open(key("session a"), ip("192.0.2.7"), t0, MAX),
            Some(t0 + MAX)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        assert_eq!(
            h.open(key("session b"), ip("192.0.2.7"), t1, MAX),
            Some(t1 + MAX)
        );
        assert_eq!(h.held_until(ip("192.0.2.7"), t1, MAX), Some(t1 + MAX));
        assert_eq!(
            h.close(&key("session a"), None, t1, MAX),
            Closed::StillOpen(ip("192.0.2.7"), 1)
        );
        // A logout naming another address closes nothing.
        assert_eq!(
            h.close(&key("session b"), Some(ip("192.0.2.8")), t1, MAX),
            Closed::Unknown
        );
        assert_eq!(
            h.close(&key("session b"), None, t1, MAX),
            Closed::Last(ip("192.0.2.7"))
        );
        assert_eq!(h.close(&key("session b"), None, t1, MAX), Closed::Unknown);
        assert!(h.is_empty());
        assert_eq!(h.held_until(ip("192.0.2.7"), t1, MAX), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_logout_is_forgotten_after_hold_max() {
        let h = Holds::new();
        let t0 = Instant::now();
        h.open(key("pid 7"), ip("192.0.2.7"), t0, MAX);
        tokio::time::advance(MAX - Duration::from_secs(1)).await;
        assert!(h.held_until(ip("192.0.2.7"), Instant::now(), MAX).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.held_until(ip("192.0.2.7"), Instant::now(), MAX), None);
        assert!(h.is_empty());
        assert_eq!(
            h.close(&key("pid 7"), None, Instant::now(), MAX),
            Closed::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_per_address() {
        let h = Holds::new();
        let now = Instant::now();
        for n in 0..MAX_PER_ADDRESS {
            assert!(
                h.open(key(&format!("pid {n}")), ip("192.0.2.7"), now, MAX)
                    .is_some()
            );
        }
        assert_eq!(h.open(key("pid x"), ip("192.0.2.7"), now, MAX), None);
        assert!(h.open(key("pid x"), ip("192.0.2.8"), now, MAX).is_some());
        assert_eq!(h.len(), MAX_PER_ADDRESS as usize + 1);
        assert_eq!(h.clear().len(), 2);
        assert!(h.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_reused_from_another_address_replaces_the_old_session() {
        let h = Holds::new();
        let now = Instant::now();
        h.open(key("pid 7"), ip("192.0.2.7"), now, MAX);
        h.open(key("pid 7"), ip("192.0.2.8"), now, MAX);
        assert_eq!(h.held_until(ip("192.0.2.7"), now, MAX), None);
        assert_eq!(
            h.close(&key("pid 7"), None, now, MAX),
            Closed::Last(ip("192.0.2.8"))
        );
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// Each login leaves an entry in the login-order queue, stale once its
    /// session closed; the queue is rebuilt from the open sessions when it
    /// holds more than four times their number (at least 4 × 1,024), and
    /// not before. Pins that bound exactly.
    #[tokio::test(start_paused = true)]
    async fn stale_order_entries_are_dropped_exactly_past_the_bound() {
        let h = Holds::new();
        let now = Instant::now();
        let a = ip("192.0.2.7");
        for i in 0..4096 {
            let k = key(&format!("pid {i}"));
            assert!(h.open(k.clone(), a, now, MAX).is_some());
            h.close(&k, None, now, MAX);
        }
        assert_eq!(h.lock().order.len(), 4096);
        assert!(h.held_until(a, now, MAX).is_none());
        assert_eq!(
            h.lock().order.len(),
            4096,
            "4,096 entries are not past the bound"
        );
        h.open(key("one more"), a, now, MAX);
        assert_eq!(h.lock().order.len(), 4097);
        assert!(!h.is_empty());
        assert!(h.held_until(a, now, MAX).is_some());
        assert_eq!(h.lock().order.len(), 1, "rebuilt from the one open session");
    }
}
