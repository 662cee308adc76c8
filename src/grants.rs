//! The grant table: which client addresses may relay, and until when.
//!
//! Consumes: accepted logins ([`GrantTable::grant`]) from the daemon.
//! Produces: the set of live addresses, with a generation number that
//! changes whenever the set changes ([`GrantTable::subscribe`]), for the
//! sinks; every change, in order, to each change subscriber
//! ([`GrantTable::add_hook`]); and one log line per expiry.
//!
//! A grant covers a block ([`Cidr`]): one address, or the IPv6 prefix of
//! the login's address (`--ipv6-prefix`). [`GrantTable::lookup`] finds the
//! grant covering a client address.
//! Trusts: its callers; every address reaching it has passed the matchers
//! and the never-grant rules.
//!
//! Expiry lives in one data structure with one owner: a map from address to
//! grant plus an ordered set of `(expiry, address)`, under one mutex, and one
//! purge task that sleeps until the earliest expiry (it does not poll). The
//! mutex is a `std::sync::Mutex`, not tokio's: it is never held across an
//! `.await`, and critical sections are a few map operations.
//!
//! A renewal (a new login from an address already granted) moves the expiry
//! but leaves the set of addresses, and so the generation, unchanged: the
//! Postfix map is rewritten only when the set changes.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::addr::Cidr;
use crate::logging::escape;
use crate::matcher::Service;
use crate::stats::Stats;

/// What is known about one live grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// When the window closes.
    pub expires: Instant,
    /// The server software of the latest login, e.g. `dovecot`.
    pub server: Arc<str>,
    /// The service of the latest login.
    pub service: Service,
    /// The user of the latest login (untrusted text).
    pub user: Box<str>,
    /// Who reported the latest login: the peer address or socket path.
    pub reporter: Arc<str>,
    /// The host name in the latest login's record (untrusted text).
    pub host: Arc<str>,
}

/// A change of the table, as the state file and the memcached sink
/// follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A block was granted, or its grant renewed or moved.
    Grant(Cidr, Grant),
    /// A grant was revoked (by `revoke`, or a reload's never-grant rules).
    Revoke(Cidr),
    /// A grant's window closed.
    Expire(Cidr),
}

impl Change {
    /// The block the change is about.
    pub fn key(&self) -> Cidr {
        match self {
            Change::Grant(c, _) | Change::Revoke(c) | Change::Expire(c) => *c,
        }
    }
}

/// Receives every grant, renewal, revocation and expiry, in the order the
/// table applied them (it is called under the table's lock, so it must be
/// quick: hand the change over, do not write it).
pub type ChangeHook = Box<dyn Fn(Change) + Send + Sync>;

/// Names (servers, reporters, host names) shared by the grants that carry
/// them, so that a million grants from one sender hold one copy of its
/// name. Bounded: beyond [`Names::MAX`] distinct names (TCP peers change
/// port with each connection, host names are the sender's text), names are
/// simply not shared.
#[derive(Debug, Default)]
pub struct Names(Mutex<HashMap<String, Arc<str>>>);

impl Names {
    /// Most distinct names kept for sharing.
    pub const MAX: usize = 4096;

    /// The shared copy of a name.
    pub fn get(&self, name: &str) -> Arc<str> {
        let mut map = match self.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(a) = map.get(name) {
            return a.clone();
        }
        let a: Arc<str> = name.into();
        if map.len() < Self::MAX {
            map.insert(name.to_string(), a.clone());
        }
        a
    }
}

/// Whether a login opened a new grant or renewed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantResult {
    /// The address was not granted before.
    New,
    /// The address was granted; its window now runs from this login.
    Renewed,
    /// The address was not granted and the table is full: nothing changed.
    Full,
}

#[derive(Debug, Default)]
struct Inner {
    /// Live grants by block.
    grants: HashMap<Cidr, Grant>,
    /// The same grants ordered by expiry, for the purge task.
    expiries: BTreeSet<(Instant, Cidr)>,
    /// Bumped whenever the set of addresses changes.
    generation: u64,
    /// How many live grants are IPv6 prefixes of each length (not single
    /// addresses), so that a lookup tries only the lengths in use.
    prefixes: std::collections::BTreeMap<u8, usize>,
}

impl Inner {
    fn count_prefix(&mut self, key: Cidr, added: bool) {
        if key.is_host() {
            return;
        }
        let n = self.prefixes.entry(key.prefix()).or_insert(0);
        if added {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.prefixes.remove(&key.prefix());
            }
        }
    }

    fn remove(&mut self, key: Cidr) -> Option<Grant> {
        let old = self.grants.remove(&key)?;
        self.expiries.remove(&(old.expires, key));
        self.count_prefix(key, false);
        Some(old)
    }
}

/// The table of live grants. Cheap to share: wrap it in an `Arc`.
pub struct GrantTable {
    /// The grants; see the module doc for why a std mutex.
    inner: Mutex<Inner>,
    /// Publishes the generation to the sinks.
    generation_tx: watch::Sender<u64>,
    /// Wakes the purge task when an earlier expiry appears.
    purge_wake: Notify,
    /// Most live grants; new addresses are refused beyond it.
    max_grants: AtomicUsize,
    /// Told of every change, in the order they were added.
    hooks: std::sync::RwLock<Vec<ChangeHook>>,
}

impl std::fmt::Debug for GrantTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantTable")
            .field("len", &self.len())
            .field("max_grants", &self.max_grants)
            .finish_non_exhaustive()
    }
}

impl Default for GrantTable {
    fn default() -> Self {
        Self::new()
    }
}

impl GrantTable {
    /// An empty table without a practical limit.
    pub fn new() -> GrantTable {
        Self::with_limit(usize::MAX)
    }

    /// An empty table that holds at most `max_grants` addresses.
    pub fn with_limit(max_grants: usize) -> GrantTable {
        GrantTable {
            inner: Mutex::new(Inner::default()),
            generation_tx: watch::Sender::new(0),
            purge_wake: Notify::new(),
            max_grants: AtomicUsize::new(max_grants),
            hooks: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// Changes the most live grants (a reload); grants beyond a lower
    /// limit stay until they expire.
    pub fn set_limit(&self, max_grants: usize) {
        self.max_grants.store(max_grants, Ordering::Relaxed);
    }

    /// The most live grants.
    pub fn limit(&self) -> usize {
        self.max_grants.load(Ordering::Relaxed)
    }

    /// Adds a hook told of every change from now on (the state file, a
    /// memcached sink); any number may be added.
    pub fn add_hook(&self, hook: ChangeHook) {
        // Under the table's lock, so that no change is told to some hooks
        // and not to this one.
        let _inner = self.lock();
        match self.hooks.write() {
            Ok(mut h) => h.push(hook),
            Err(p) => p.into_inner().push(hook),
        }
    }

    /// The same as [`GrantTable::add_hook`], kept for its callers.
    pub fn set_hook(&self, hook: ChangeHook) {
        self.add_hook(hook);
    }

    /// Tells every hook of a change (called under the lock).
    fn tell(&self, change: impl FnOnce() -> Change) {
        let hooks = match self.hooks.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        if let Some((last, rest)) = hooks.split_last() {
            let change = change();
            for hook in rest {
                hook(change.clone());
            }
            last(change);
        }
    }

    /// Runs `f` with the live grants under the table's lock, so that no
    /// change can come between what `f` sees and the changes the hooks
    /// are told after it (a sink's refill).
    pub fn with_snapshot<T>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = (Cidr, &Grant)>) -> T,
    ) -> T {
        let inner = self.lock();
        let mut it = inner.grants.iter().map(|(k, g)| (*k, g));
        f(&mut it)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the two structures out
        // of step (each operation updates both before it can fail), so the
        // data is still good after a poisoning.
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Grants `ip` until `grant.expires`, or renews its grant.
    pub fn grant(&self, ip: IpAddr, grant: Grant) -> GrantResult {
        self.grant_block(Cidr::host(ip), grant)
    }

    /// Grants block `key` (one address or an IPv6 prefix) until
    /// `grant.expires`, or renews its grant.
    pub fn grant_block(&self, key: Cidr, grant: Grant) -> GrantResult {
        let expires = grant.expires;
        let mut inner = self.lock();
        if inner.grants.len() >= self.max_grants.load(Ordering::Relaxed)
            && !inner.grants.contains_key(&key)
        {
            return GrantResult::Full;
        }
        self.tell(|| Change::Grant(key, grant.clone()));
        let earliest_before = inner.expiries.first().map(|(t, _)| *t);
        let result = match inner.grants.insert(key, grant) {
            Some(old) => {
                inner.expiries.remove(&(old.expires, key));
                GrantResult::Renewed
            }
            None => {
                inner.count_prefix(key, true);
                inner.generation += 1;
                GrantResult::New
            }
        };
        inner.expiries.insert((expires, key));
        let generation = inner.generation;
        drop(inner);
        if result == GrantResult::New {
            self.generation_tx.send_replace(generation);
        }
        if earliest_before.is_none_or(|t| expires < t) {
            self.purge_wake.notify_one();
        }
        result
    }

    /// Moves the expiry of the live grant of address `ip` to `expires`
    /// (earlier or later), keeping the rest of it; false when `ip` has no
    /// grant. The change hooks are told, as for a renewal.
    pub fn set_expiry(&self, ip: IpAddr, expires: Instant) -> bool {
        self.set_block_expiry(Cidr::host(ip), expires)
    }

    /// [`GrantTable::set_expiry`] for the grant of block `key`.
    pub fn set_block_expiry(&self, key: Cidr, expires: Instant) -> bool {
        let mut inner = self.lock();
        let earliest_before = inner.expiries.first().map(|(t, _)| *t);
        let Some(g) = inner.grants.get_mut(&key) else {
            return false;
        };
        let old = g.expires;
        g.expires = expires;
        let g = g.clone();
        self.tell(|| Change::Grant(key, g));
        inner.expiries.remove(&(old, key));
        inner.expiries.insert((expires, key));
        drop(inner);
        if earliest_before.is_none_or(|t| expires < t) {
            self.purge_wake.notify_one();
        }
        true
    }

    /// Removes the grant of address `ip` at once; returns it if there was
    /// one.
    pub fn revoke(&self, ip: IpAddr) -> Option<Grant> {
        self.revoke_block(Cidr::host(ip))
    }

    /// Removes the grant of block `key` at once; returns it if there was
    /// one.
    pub fn revoke_block(&self, key: Cidr) -> Option<Grant> {
        let mut inner = self.lock();
        let old = inner.remove(key)?;
        self.tell(|| Change::Revoke(key));
        inner.generation += 1;
        let generation = inner.generation;
        drop(inner);
        self.generation_tx.send_replace(generation);
        Some(old)
    }

    /// Removes every grant that lets `ip` relay (its own, and the prefix
    /// grants covering it); returns the blocks removed, with their grants.
    pub fn revoke_covering(&self, ip: IpAddr) -> Vec<(Cidr, Grant)> {
        let keys: Vec<Cidr> = {
            let inner = self.lock();
            Self::covering(&inner, ip).collect()
        };
        keys.into_iter()
            .filter_map(|k| self.revoke_block(k).map(|g| (k, g)))
            .collect()
    }

    /// The live blocks that contain `ip`, most specific first.
    fn covering<'a>(inner: &'a Inner, ip: IpAddr) -> impl Iterator<Item = Cidr> + 'a {
        let host = Cidr::host(ip);
        let prefixes = inner
            .prefixes
            .keys()
            .rev()
            .filter(move |_| ip.is_ipv6())
            .map(move |&len| Cidr::new(ip, len));
        std::iter::once(host)
            .chain(prefixes)
            .filter(|k| inner.grants.contains_key(k))
    }

    /// The grant that lets `ip` relay, if any: its own, or the IPv6 prefix
    /// grant covering it. What the policy service and socketmap answer.
    pub fn lookup(&self, ip: IpAddr) -> Option<(Cidr, Grant)> {
        let inner = self.lock();
        let key = Self::covering(&inner, ip).next()?;
        inner.grants.get(&key).map(|g| (key, g.clone()))
    }

    /// Removes every grant whose window has closed by `now`. Returns them and
    /// the next expiry, if any.
    pub fn purge(&self, now: Instant) -> (Vec<(IpAddr, Grant)>, Option<Instant>) {
        let (gone, next) = self.purge_blocks(now);
        (gone.into_iter().map(|(k, g)| (k.addr(), g)).collect(), next)
    }

    /// [`GrantTable::purge`], naming the blocks.
    pub fn purge_blocks(&self, now: Instant) -> (Vec<(Cidr, Grant)>, Option<Instant>) {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        while let Some(&(t, key)) = inner.expiries.first() {
            if t > now {
                break;
            }
            if let Some(g) = inner.remove(key) {
                self.tell(|| Change::Expire(key));
                gone.push((key, g));
            } else {
                inner.expiries.pop_first();
            }
        }
        if !gone.is_empty() {
            inner.generation += 1;
        }
        let next = inner.expiries.first().map(|(t, _)| *t);
        let generation = inner.generation;
        drop(inner);
        if !gone.is_empty() {
            self.generation_tx.send_replace(generation);
        }
        (gone, next)
    }

    /// The generation and the live addresses (each block's network
    /// address), sorted, taken together so a sink knows exactly which
    /// state it wrote.
    pub fn addresses(&self) -> (u64, Vec<IpAddr>) {
        let (generation, keys) = self.blocks();
        (generation, keys.into_iter().map(|k| k.addr()).collect())
    }

    /// The generation and the live blocks, sorted (IPv4 before IPv6, then
    /// by address, then by prefix length).
    pub fn blocks(&self) -> (u64, Vec<Cidr>) {
        let inner = self.lock();
        let mut v: Vec<Cidr> = inner.grants.keys().copied().collect();
        let generation = inner.generation;
        drop(inner);
        // The same order as sorting Cidr, by a plain integer key, which
        // sorts several times faster.
        v.sort_unstable_by_key(|c| match c.addr() {
            IpAddr::V4(a) => (0u8, u128::from(a.to_bits()), c.prefix()),
            IpAddr::V6(a) => (1u8, a.to_bits(), c.prefix()),
        });
        (generation, v)
    }

    /// A copy of the grant of address `ip` (not of a prefix covering it:
    /// see [`GrantTable::lookup`]).
    pub fn get(&self, ip: IpAddr) -> Option<Grant> {
        self.lock().grants.get(&Cidr::host(ip)).cloned()
    }

    /// A copy of every grant, ordered by expiry, by network address.
    pub fn list(&self) -> Vec<(IpAddr, Grant)> {
        self.list_blocks()
            .into_iter()
            .map(|(k, g)| (k.addr(), g))
            .collect()
    }

    /// A copy of every grant, ordered by expiry.
    pub fn list_blocks(&self) -> Vec<(Cidr, Grant)> {
        let inner = self.lock();
        inner
            .expiries
            .iter()
            .filter_map(|(_, k)| inner.grants.get(k).map(|g| (*k, g.clone())))
            .collect()
    }

    /// How many grants are live.
    pub fn len(&self) -> usize {
        self.lock().grants.len()
    }

    /// Whether no grant is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver of the generation, which changes whenever the set of
    /// addresses does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation_tx.subscribe()
    }

    /// Runs the purge task: sleeps until the earliest expiry (or until a new
    /// earlier one arrives), removes what has expired and logs each expiry.
    /// Never returns; cancel it by dropping its task.
    pub async fn run_purge(self: Arc<Self>, stats: Arc<Stats>) {
        loop {
            let (gone, next) = self.purge_blocks(Instant::now());
            for (key, g) in gone {
                Stats::bump(&stats.expired);
                crate::log_info!(
                    "expire {}: window over (last login: {} {} user \"{}\", reported by {})",
                    key.shown(),
                    g.server,
                    g.service,
                    escape(&g.user),
                    g.reporter
                );
            }
            let wake = self.purge_wake.notified();
            match next {
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = wake => {}
                    }
                }
                None => wake.await,
            }
        }
    }
}

/// The expiry for a login seen now with the given window.
pub fn expiry(window: Duration) -> Instant {
    Instant::now() + window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(expires: Instant) -> Grant {
        Grant {
            expires,
            server: "dovecot".into(),
            service: Service::Imap,
            user: "alice".into(),
            reporter: "127.0.0.1".into(),
            host: "mail".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn grant_renew_and_expire_on_time() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let mut gen_rx = table.subscribe();
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));

        let w = Duration::from_secs(120);
        assert_eq!(table.grant(ip("192.0.2.7"), g(expiry(w))), GrantResult::New);
        assert!(gen_rx.has_changed().unwrap());
        gen_rx.borrow_and_update();

        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(
            table.grant(ip("192.0.2.7"), g(expiry(w))),
            GrantResult::Renewed
        );
        // A renewal does not change the set, so no map rewrite is asked for.
        assert!(!gen_rx.has_changed().unwrap());

        // 200 s after the first login, still inside the renewed window.
        tokio::time::advance(Duration::from_secs(100)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.len(), 1);

        // Past the renewed window (100 + 120 = 220 s).
        tokio::time::advance(Duration::from_secs(21)).await;
        tokio::task::yield_now().await;
        assert!(table.is_empty());
        assert!(gen_rx.has_changed().unwrap());
        assert_eq!(stats.expired.load(std::sync::atomic::Ordering::Relaxed), 1);
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn earlier_expiry_wakes_the_purge_task() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));
        table.grant(ip("192.0.2.1"), g(expiry(Duration::from_secs(3600))));
        tokio::task::yield_now().await;
        table.grant(ip("192.0.2.2"), g(expiry(Duration::from_secs(2))));
        tokio::time::advance(Duration::from_secs(3)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.addresses().1, vec![ip("192.0.2.1")]);
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn set_expiry_moves_a_grant_both_ways() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = changes.clone();
        table.set_hook(Box::new(move |ch| c.lock().unwrap().push(ch)));
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));
        let a = ip("192.0.2.7");
        table.grant(a, g(expiry(Duration::from_secs(60))));
        assert!(table.set_expiry(a, expiry(Duration::from_secs(3600))));
        tokio::time::advance(Duration::from_secs(120)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.len(), 1);
        // Earlier again: the purge task wakes for it.
        assert!(table.set_expiry(a, expiry(Duration::from_secs(3))));
        tokio::time::advance(Duration::from_secs(4)).await;
        tokio::task::yield_now().await;
        assert!(table.is_empty());
        assert!(!table.set_expiry(a, expiry(Duration::from_secs(3))));
        // The hooks heard of each move, and of the expiry.
        let heard = changes.lock().unwrap().clone();
        assert_eq!(heard.len(), 4);
        assert_eq!(heard[3], Change::Expire(Cidr::host(a)));
        purge.abort();
    }

    #[test]
    fn prefix_grants_cover_their_block_and_every_hook_hears() {
        let table = GrantTable::with_limit(2);
        let (h1, h2) = (
            Arc::new(std::sync::Mutex::new(Vec::new())),
            Arc::new(std::sync::Mutex::new(Vec::new())),
        );
        for h in [&h1, &h2] {
            let h = h.clone();
            table.add_hook(Box::new(move |c| h.lock().unwrap().push(c)));
        }
        let net: Cidr = "2001:db8:1:2::/64".parse().unwrap();
        let now = Instant::now();
        table.grant_block(net, g(now + Duration::from_secs(60)));
        table.grant(ip("192.0.2.7"), g(now + Duration::from_secs(60)));
        assert_eq!(
            table.lookup(ip("2001:db8:1:2:aaaa::1")).map(|l| l.0),
            Some(net)
        );
        assert!(table.lookup(ip("2001:db8:1:3::1")).is_none());
        assert!(table.get(ip("2001:db8:1:2:aaaa::1")).is_none());
        // Counted per prefix: the table of two is full.
        assert_eq!(
            table.grant_block("2001:db8:9::/64".parse().unwrap(), g(now)),
            GrantResult::Full
        );
        let gone = table.revoke_covering(ip("2001:db8:1:2::77"));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, net);
        assert!(table.lookup(ip("2001:db8:1:2::5")).is_none());
        assert_eq!(h1.lock().unwrap().len(), 3);
        assert_eq!(*h1.lock().unwrap(), *h2.lock().unwrap());
    }

    #[test]
    fn revoke_and_list() {
        let table = GrantTable::new();
        let now = Instant::now();
        table.grant(ip("2001:db8::1"), g(now + Duration::from_secs(5)));
        table.grant(ip("192.0.2.9"), g(now + Duration::from_secs(1)));
        let l = table.list();
        assert_eq!(l[0].0, ip("192.0.2.9"));
        assert!(table.revoke(ip("192.0.2.9")).is_some());
        assert!(table.revoke(ip("192.0.2.9")).is_none());
        assert_eq!(table.addresses(), (3, vec![ip("2001:db8::1")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_refuses_new_addresses_but_renews() {
        let t = GrantTable::with_limit(2);
        let g = || Grant {
            expires: expiry(Duration::from_secs(60)),
            server: "dovecot".into(),
            service: Service::Pop3,
            user: "u".into(),
            reporter: "test".into(),
            host: "mail".into(),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.grant(ip("192.0.2.1"), g()), GrantResult::New);
        assert_eq!(t.grant(ip("192.0.2.2"), g()), GrantResult::New);
        assert_eq!(t.grant(ip("192.0.2.3"), g()), GrantResult::Full);
        assert_eq!(t.grant(ip("192.0.2.1"), g()), GrantResult::Renewed);
        assert_eq!(t.len(), 2);
        t.revoke(ip("192.0.2.2"));
        assert_eq!(t.grant(ip("192.0.2.3"), g()), GrantResult::New);
    }

    #[test]
    fn addresses_are_in_ipaddr_order() {
        let t = GrantTable::new();
        let mut want: Vec<IpAddr> = [
            "2001:db8::1",
            "192.0.2.7",
            "::1",
            "10.0.0.1",
            "2001:db8::",
            "255.255.255.255",
            "ffff::",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for ip in &want {
            t.grant(
                *ip,
                Grant {
                    expires: expiry(Duration::from_secs(60)),
                    server: "dovecot".into(),
                    service: Service::Pop3,
                    user: "u".into(),
                    reporter: "test".into(),
                    host: "mail".into(),
                },
            );
        }
        want.sort();
        assert_eq!(t.addresses().1, want);
    }
}
