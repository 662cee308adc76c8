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
//! Expiry lives in one data structure with one owner, under one mutex, with
//! one purge task that sleeps until the earliest expiry (it does not poll).
//! The mutex is a `std::sync::Mutex`, not tokio's: it is never held across
//! an `.await`, and critical sections are a few map operations.
//!
//! Storage is compact (issue 17: about 100 bytes a grant, against 331
//! before): the grants are 64-byte slots in one dense vector (expiry as
//! nanoseconds from the table's base instant, server, reporter and host as
//! numbers into a counted name table, a user name of up to 22 bytes
//! inline), found through a hash index of `u32` slot numbers; the expiries
//! are a queue in insertion order (one window for every grant: they
//! arrive sorted), with a small ordered set for those that arrive out of
//! order, and renewals leave stale entries that are skipped when met and
//! dropped in bulk once they outnumber the live ones.
//!
//! A renewal (a new login from an address already granted) moves the expiry
//! but leaves the set of addresses, and so the generation, unchanged: the
//! Postfix map is rewritten only when the set changes.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashTable;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::grants::addr::Cidr;
use crate::logging::escape;
use crate::recognise::matcher::Service;
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

/// A user name as a grant stores it: up to [`Text::SHORT`] bytes inline
/// (most names), longer ones in a box of their own.
#[derive(Debug)]
enum Text {
    Short(u8, [u8; Text::SHORT]),
    Long(Box<str>),
}

impl Text {
    /// The longest name kept inline (the enum stays 24 bytes).
    const SHORT: usize = 22;

    fn new(s: &str) -> Text {
        if s.len() <= Self::SHORT {
            let mut b = [0u8; Self::SHORT];
            b[..s.len()].copy_from_slice(s.as_bytes());
            Text::Short(s.len() as u8, b)
        } else {
            Text::Long(s.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Always valid: the bytes were copied from a `&str`.
            Text::Short(n, b) => std::str::from_utf8(&b[..usize::from(*n)]).unwrap_or_default(),
            Text::Long(s) => s,
        }
    }
}

/// The names (servers, reporters, host names) of the live grants, each
/// stored once and named by a number in the grants, counted so that a
/// name goes when its last grant does.
#[derive(Debug, Default)]
struct NameIds {
    ids: HashMap<Arc<str>, u32>,
    /// By id: the name and how many grants carry it (`None`: free).
    names: Vec<Option<(Arc<str>, u32)>>,
    free: Vec<u32>,
}

impl NameIds {
    fn acquire(&mut self, name: &Arc<str>) -> u32 {
        if let Some(&id) = self.ids.get(&**name) {
            if let Some(Some((_, n))) = self.names.get_mut(id as usize) {
                *n += 1;
            }
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some((name.clone(), 1));
                id
            }
            None => {
                self.names.push(Some((name.clone(), 1)));
                (self.names.len() - 1) as u32
            }
        };
        self.ids.insert(name.clone(), id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some(entry) = self.names.get_mut(id as usize) else {
            return;
        };
        if let Some((name, n)) = entry {
            *n -= 1;
            if *n == 0 {
                self.ids.remove(&**name);
                *entry = None;
                self.free.push(id);
            }
        }
    }

    fn get(&self, id: u32) -> Arc<str> {
        match self.names.get(id as usize) {
            Some(Some((name, _))) => name.clone(),
            _ => "".into(),
        }
    }
}

/// One live grant as the table stores it (64 bytes): the expiry as
/// nanoseconds from the table's base instant, names by number.
#[derive(Debug)]
struct Slot {
    expires: i64,
    user: Text,
    key: Cidr,
    server: u32,
    reporter: u32,
    host: u32,
    service: Service,
}

/// Expiries in the order they were set. With one window for every grant
/// (the usual case) they arrive sorted, so a queue holds them; the few
/// that arrive earlier than the queue's last go to a small ordered set.
/// An entry is `(expiry, slot)`; a renewal leaves the old entry behind,
/// which is dropped when it is met (its slot's expiry differs) or when
/// stale entries outnumber the live ones.
#[derive(Debug, Default)]
struct ExpiryQueue {
    fifo: VecDeque<(i64, u32)>,
    rest: BTreeSet<(i64, u32)>,
}

impl ExpiryQueue {
    fn push(&mut self, t: i64, slot: u32) {
        if self.fifo.back().is_none_or(|b| b.0 <= t) {
            self.fifo.push_back((t, slot));
        } else {
            self.rest.insert((t, slot));
        }
    }

    fn peek(&self) -> Option<(i64, u32)> {
        match (self.fifo.front(), self.rest.first()) {
            (Some(a), Some(b)) => Some(*a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    fn pop(&mut self) {
        let from_fifo = match (self.fifo.front(), self.rest.first()) {
            (Some(a), Some(b)) => a <= b,
            (a, _) => a.is_some(),
        };
        if from_fifo {
            self.fifo.pop_front();
        } else {
            self.rest.pop_first();
        }
    }

    fn len(&self) -> usize {
        self.fifo.len() + self.rest.len()
    }

    fn retain(&mut self, mut live: impl FnMut(i64, u32) -> bool) {
        self.fifo.retain(|&(t, s)| live(t, s));
        self.rest.retain(|&(t, s)| live(t, s));
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Live grants, by number; `None` is a free place.
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Block -> number of its slot.
    index: HashTable<u32>,
    hasher: RandomState,
    names: NameIds,
    /// The same grants ordered by expiry, for the purge task.
    expiries: ExpiryQueue,
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

    fn len(&self) -> usize {
        self.index.len()
    }

    fn find(&self, key: Cidr) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        self.index
            .find(hash, |&i| {
                slots
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.key == key)
            })
            .copied()
    }

    fn slot(&self, i: u32) -> Option<&Slot> {
        self.slots.get(i as usize).and_then(Option::as_ref)
    }

    fn contains(&self, key: Cidr) -> bool {
        self.find(key).is_some()
    }

    /// Whether a queue entry still names its slot's expiry.
    fn current(&self, t: i64, i: u32) -> bool {
        self.slot(i).is_some_and(|s| s.expires == t)
    }

    fn fill(&mut self, i: u32, key: Cidr, g: &Grant, expires: i64) {
        let slot = Slot {
            expires,
            user: Text::new(&g.user),
            key,
            server: self.names.acquire(&g.server),
            reporter: self.names.acquire(&g.reporter),
            host: self.names.acquire(&g.host),
            service: g.service,
        };
        if let Some(old) = self.slots.get_mut(i as usize).and_then(Option::take) {
            self.release(&old);
        }
        self.slots[i as usize] = Some(slot);
    }

    fn release(&mut self, s: &Slot) {
        self.names.release(s.server);
        self.names.release(s.reporter);
        self.names.release(s.host);
    }

    /// Adds a new block (not in the table); returns its slot.
    fn insert(&mut self, key: Cidr, g: &Grant, expires: i64) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.fill(i, key, g, expires);
        let hash = self.hasher.hash_one(key);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, i, |&j| {
            slots
                .get(j as usize)
                .and_then(Option::as_ref)
                .map_or(0, |s| hasher.hash_one(s.key))
        });
        self.count_prefix(key, true);
        i
    }

    fn remove(&mut self, key: Cidr, base: Instant) -> Option<Grant> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let entry = self
            .index
            .find_entry(hash, |&i| {
                slots
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.key == key)
            })
            .ok()?;
        let (i, _) = entry.remove();
        let old = self.slots.get_mut(i as usize).and_then(Option::take)?;
        let g = self.grant_of(&old, base);
        self.release(&old);
        self.free.push(i);
        self.count_prefix(key, false);
        self.compact();
        Some(g)
    }

    /// Drops the stale queue entries once they outnumber the live ones.
    fn compact(&mut self) {
        if self.expiries.len() > 2 * self.len() + 1024 {
            let slots = &self.slots;
            self.expiries.retain(|t, i| {
                slots
                    .get(i as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.expires == t)
            });
        }
    }

    /// Drops stale entries at the head of the queue; then the head is the
    /// earliest real expiry.
    fn clean_head(&mut self) -> Option<(i64, u32)> {
        while let Some((t, i)) = self.expiries.peek() {
            if self.current(t, i) {
                return Some((t, i));
            }
            self.expiries.pop();
        }
        None
    }

    fn grant_of(&self, s: &Slot, base: Instant) -> Grant {
        Grant {
            expires: from_nanos(base, s.expires),
            server: self.names.get(s.server),
            service: s.service,
            user: s.user.as_str().into(),
            reporter: self.names.get(s.reporter),
            host: self.names.get(s.host),
        }
    }

    fn live(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter_map(Option::as_ref)
    }
}

/// `t` as signed nanoseconds from `base` (saturating: about 292 years).
fn to_nanos(base: Instant, t: Instant) -> i64 {
    if t >= base {
        i64::try_from((t - base).as_nanos()).unwrap_or(i64::MAX)
    } else {
        i64::try_from((base - t).as_nanos()).map_or(i64::MIN, |n| -n)
    }
}

/// The instant `n` nanoseconds from `base`.
fn from_nanos(base: Instant, n: i64) -> Instant {
    let d = Duration::from_nanos(n.unsigned_abs());
    if n >= 0 {
        base.checked_add(d).unwrap_or(base)
    } else {
        base.checked_sub(d).unwrap_or(base)
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
    /// The instant stored expiries count from.
    base: Instant,
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
            base: Instant::now(),
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
        f: impl FnOnce(&mut dyn Iterator<Item = (Cidr, Grant)>) -> T,
    ) -> T {
        let inner = self.lock();
        let mut it = inner.live().map(|s| (s.key, inner.grant_of(s, self.base)));
        f(&mut it)
    }

    /// Calls `f` with the table's generation, under the lock: what a change
    /// hook queued by then is exactly the changes up to that generation.
    pub fn at_generation<T>(&self, f: impl FnOnce(u64) -> T) -> T {
        let inner = self.lock();
        f(inner.generation)
    }

    /// Calls `f` with up to `max` live grants, from place `from` in the
    /// table's storage on, under the lock; returns the place to go on
    /// from, or `None` once every place was seen. A writer walks the table
    /// this way, a chunk at a time, without copying it whole and without
    /// holding the lock for long (changes made meanwhile reach it through
    /// its change hook, as always).
    pub fn visit(&self, from: usize, max: usize, mut f: impl FnMut(Cidr, &Grant)) -> Option<usize> {
        let inner = self.lock();
        let mut seen = 0;
        for (i, slot) in inner.slots.iter().enumerate().skip(from) {
            if seen == max {
                return Some(i);
            }
            if let Some(s) = slot {
                f(s.key, &inner.grant_of(s, self.base));
                seen += 1;
            }
        }
        None
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the structures out
        // of step in a way that matters (a slot is filled before it is
        // indexed, and a stale queue entry is skipped), so the data is
        // still good after a poisoning.
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn nanos(&self, t: Instant) -> i64 {
        to_nanos(self.base, t)
    }

    /// Grants `ip` until `grant.expires`, or renews its grant.
    pub fn grant(&self, ip: IpAddr, grant: Grant) -> GrantResult {
        self.grant_block(Cidr::host(ip), grant)
    }

    /// Grants block `key` (one address or an IPv6 prefix) until
    /// `grant.expires`, or renews its grant.
    pub fn grant_block(&self, key: Cidr, grant: Grant) -> GrantResult {
        let expires = self.nanos(grant.expires);
        let mut inner = self.lock();
        let found = inner.find(key);
        if found.is_none() && inner.len() >= self.max_grants.load(Ordering::Relaxed) {
            return GrantResult::Full;
        }
        self.tell(|| Change::Grant(key, grant.clone()));
        let earliest_before = inner.expiries.peek().map(|(t, _)| t);
        let (result, slot, moved) = match found {
            Some(i) => {
                let moved = inner.slot(i).is_none_or(|s| s.expires != expires);
                inner.fill(i, key, &grant, expires);
                (GrantResult::Renewed, i, moved)
            }
            None => {
                let i = inner.insert(key, &grant, expires);
                inner.generation += 1;
                (GrantResult::New, i, true)
            }
        };
        if moved {
            inner.expiries.push(expires, slot);
            inner.compact();
        }
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
        let t = self.nanos(expires);
        let mut inner = self.lock();
        let earliest_before = inner.expiries.peek().map(|(t, _)| t);
        let Some(i) = inner.find(key) else {
            return false;
        };
        let Some(s) = inner.slots.get_mut(i as usize).and_then(Option::as_mut) else {
            return false;
        };
        let moved = s.expires != t;
        s.expires = t;
        if let Some(s) = inner.slot(i) {
            let g = inner.grant_of(s, self.base);
            self.tell(|| Change::Grant(key, g));
        }
        if moved {
            inner.expiries.push(t, i);
            inner.compact();
        }
        drop(inner);
        if earliest_before.is_none_or(|e| t < e) {
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
        let old = inner.remove(key, self.base)?;
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
            .filter(|k| inner.contains(*k))
    }

    /// The grant that lets `ip` relay, if any: its own, or the IPv6 prefix
    /// grant covering it. What the policy service and socketmap answer.
    pub fn lookup(&self, ip: IpAddr) -> Option<(Cidr, Grant)> {
        let inner = self.lock();
        let key = Self::covering(&inner, ip).next()?;
        let s = inner.find(key).and_then(|i| inner.slot(i))?;
        Some((key, inner.grant_of(s, self.base)))
    }

    /// Removes every grant whose window has closed by `now`. Returns them and
    /// the next expiry, if any.
    pub fn purge(&self, now: Instant) -> (Vec<(IpAddr, Grant)>, Option<Instant>) {
        let (gone, next) = self.purge_blocks(now);
        (gone.into_iter().map(|(k, g)| (k.addr(), g)).collect(), next)
    }

    /// [`GrantTable::purge`], naming the blocks.
    pub fn purge_blocks(&self, now: Instant) -> (Vec<(Cidr, Grant)>, Option<Instant>) {
        let now = self.nanos(now);
        let mut inner = self.lock();
        let mut gone = Vec::new();
        while let Some((t, i)) = inner.clean_head() {
            if t > now {
                break;
            }
            inner.expiries.pop();
            let Some(key) = inner.slot(i).map(|s| s.key) else {
                continue;
            };
            if let Some(g) = inner.remove(key, self.base) {
                self.tell(|| Change::Expire(key));
                gone.push((key, g));
            }
        }
        if !gone.is_empty() {
            inner.generation += 1;
        }
        let next = inner.clean_head().map(|(t, _)| from_nanos(self.base, t));
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
        let mut v: Vec<Cidr> = inner.live().map(|s| s.key).collect();
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
        let inner = self.lock();
        let s = inner.find(Cidr::host(ip)).and_then(|i| inner.slot(i))?;
        Some(inner.grant_of(s, self.base))
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
        let mut v: Vec<(i64, Cidr, Grant)> = inner
            .live()
            .map(|s| (s.expires, s.key, inner.grant_of(s, self.base)))
            .collect();
        drop(inner);
        v.sort_unstable_by_key(|(t, k, _)| (*t, *k));
        v.into_iter().map(|(_, k, g)| (k, g)).collect()
    }

    /// How many grants are live.
    pub fn len(&self) -> usize {
        self.lock().len()
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

/// A table holding one grant for `addr`, for the tests of the services
/// that answer from the table.
#[cfg(test)]
pub(crate) fn table_granting(
    addr: &str,
    service: crate::recognise::matcher::Service,
) -> GrantTable {
    let t = GrantTable::new();
    t.grant(
        addr.parse().expect("a test address"),
        Grant {
            expires: tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            server: "dovecot".into(),
            service,
            user: "u".into(),
            reporter: "t".into(),
            host: "h".into(),
        },
    );
    t
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

    #[tokio::test(start_paused = true)]
    async fn renewals_leave_a_bounded_queue_and_expire_at_the_last_window() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));
        let a = ip("192.0.2.7");
        let w = Duration::from_secs(60);
        // 10,000 renewals, one every 10 ms: each leaves a stale entry.
        for _ in 0..10_000 {
            table.grant(a, g(expiry(w)));
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let queued = table.lock().expiries.len();
        assert!(queued <= 2 * table.len() + 1025, "{queued} entries queued");
        // 59 s after the last renewal: still live (the stale entries did
        // not expire it early).
        tokio::time::advance(Duration::from_secs(59)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.len(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert!(table.is_empty());
        assert_eq!(stats.expired.load(Ordering::Relaxed), 1);
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_window_after_a_longer_one_expires_first() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));
        // Out of insertion order: 300 s, then 30 s, then 120 s.
        table.grant(ip("192.0.2.1"), g(expiry(Duration::from_secs(300))));
        table.grant(ip("192.0.2.2"), g(expiry(Duration::from_secs(30))));
        table.grant(ip("192.0.2.3"), g(expiry(Duration::from_secs(120))));
        let order: Vec<IpAddr> = table.list().into_iter().map(|(a, _)| a).collect();
        assert_eq!(order, [ip("192.0.2.2"), ip("192.0.2.3"), ip("192.0.2.1")]);
        tokio::time::advance(Duration::from_secs(31)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.addresses().1, [ip("192.0.2.1"), ip("192.0.2.3")]);
        tokio::time::advance(Duration::from_secs(90)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.addresses().1, [ip("192.0.2.1")]);
        tokio::time::advance(Duration::from_secs(180)).await;
        tokio::task::yield_now().await;
        assert!(table.is_empty());
        purge.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_slot_is_not_expired_by_its_former_grant() {
        let table = Arc::new(GrantTable::new());
        let stats = Arc::new(Stats::default());
        let purge = tokio::spawn(table.clone().run_purge(stats.clone()));
        table.grant(ip("192.0.2.1"), g(expiry(Duration::from_secs(10))));
        table.revoke(ip("192.0.2.1"));
        // Takes the freed slot, with a later window.
        table.grant(ip("192.0.2.2"), g(expiry(Duration::from_secs(100))));
        tokio::time::advance(Duration::from_secs(11)).await;
        tokio::task::yield_now().await;
        assert_eq!(table.addresses().1, [ip("192.0.2.2")]);
        tokio::time::advance(Duration::from_secs(90)).await;
        tokio::task::yield_now().await;
        assert!(table.is_empty());
        purge.abort();
    }

    #[test]
    fn stored_grants_come_back_exactly() {
        let table = GrantTable::new();
        let before = Instant::now() - Duration::from_millis(1500);
        let long = "a-user-name-longer-than-the-inline-room@example.org";
        for (a, user, t) in [
            ("192.0.2.1", "bob", before),
            (
                "192.0.2.2",
                long,
                Instant::now() + Duration::from_nanos(123_456_789),
            ),
        ] {
            let mut want = g(t);
            want.user = user.into();
            want.host = format!("host-of-{a}").into();
            table.grant(ip(a), want.clone());
            assert_eq!(table.get(ip(a)), Some(want));
        }
        // Names go with their last grant.
        table.revoke(ip("192.0.2.1"));
        assert_eq!(table.lock().names.ids.len(), 3);
        assert_eq!(table.lock().index.len(), 1);
        assert_eq!(std::mem::size_of::<Slot>(), 64);
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// Each renewal that moves an expiry leaves a stale queue entry; the
    /// stale entries are dropped all at once when the queue holds more
    /// than twice the live grants plus 1,024, and not before. Pins the
    /// bound of `Inner::compact` exactly (with one live grant, 1,026
    /// entries stay, the 1,027th drops the 1,026 stale ones).
    #[tokio::test(start_paused = true)]
    async fn stale_expiry_entries_are_dropped_exactly_past_the_bound() {
        let table = GrantTable::new();
        let a = ip("192.0.2.7");
        let now = Instant::now();
        for k in 1..=1026u64 {
            table.grant(a, g(now + Duration::from_millis(k)));
        }
        assert_eq!(table.lock().expiries.len(), 1026);
        table.grant(a, g(now + Duration::from_millis(1027)));
        assert_eq!(table.lock().expiries.len(), 1);
        assert_eq!(table.len(), 1);
    }

    /// Two IPv6 prefix grants of the same length: revoking one leaves the
    /// other found for its addresses (the count of live prefixes of each
    /// length goes 2, 1, 0, and the length is tried while it is above 0).
    #[test]
    fn revoking_one_of_two_prefixes_of_a_length_keeps_the_other_found() {
        let table = GrantTable::new();
        let later = Instant::now() + Duration::from_secs(60);
        let p1: Cidr = "2001:db8:1:1::/64".parse().unwrap();
        let p2: Cidr = "2001:db8:1:2::/64".parse().unwrap();
        table.grant_block(p1, g(later));
        table.grant_block(p2, g(later));
        assert_eq!(
            table.lookup(ip("2001:db8:1:2::5")).map(|(k, _)| k),
            Some(p2)
        );
        assert!(table.revoke_block(p1).is_some());
        assert_eq!(
            table.lookup(ip("2001:db8:1:2::5")).map(|(k, _)| k),
            Some(p2)
        );
        assert_eq!(table.lookup(ip("2001:db8:1:1::5")), None);
        assert!(table.revoke_block(p2).is_some());
        assert_eq!(table.lookup(ip("2001:db8:1:2::5")), None);
        // A new grant of that length after the count went to 0 is found.
        table.grant_block(p1, g(later));
        assert_eq!(
            table.lookup(ip("2001:db8:1:1::5")).map(|(k, _)| k),
            Some(p1)
        );
    }

    /// The table's Debug form (in panics and `{:?}` logs) shows its size
    /// and limit.
    #[test]
    fn the_debug_form_shows_the_size_and_the_limit() {
        let table = GrantTable::with_limit(7);
        assert!(table.is_empty());
        table.grant(ip("192.0.2.7"), g(Instant::now() + Duration::from_secs(60)));
        assert!(!table.is_empty());
        let d = format!("{table:?}");
        assert!(d.starts_with("GrantTable {"), "{d}");
        assert!(d.contains("len: 1"), "{d}");
        assert!(d.contains("max_grants: 7"), "{d}");
    }

    /// `visit` walks the table a chunk at a time: at most `max` grants a
    /// call, and the place to go on from, until every grant was seen once.
    #[test]
    fn visit_hands_out_at_most_max_grants_a_call() {
        let table = GrantTable::new();
        let later = Instant::now() + Duration::from_secs(60);
        for k in 1..=5 {
            table.grant(ip(&format!("192.0.2.{k}")), g(later));
        }
        let mut seen = Vec::new();
        let mut from = 0;
        let mut calls = 0;
        loop {
            let mut chunk = 0;
            let next = table.visit(from, 2, |k, _| {
                seen.push(k);
                chunk += 1;
            });
            calls += 1;
            assert!(chunk <= 2, "{chunk} grants in one call");
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(calls, 3, "5 grants, 2 a call");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 5);
    }

    /// A window closes at its expiry instant: `purge` at exactly that
    /// instant removes the grant, returns it with its address, bumps the
    /// generation once and tells the sinks; a purge with nothing due
    /// changes nothing, the generation included.
    #[tokio::test(start_paused = true)]
    async fn purge_at_the_expiry_instant_removes_the_grant_and_bumps_the_generation_once() {
        let table = GrantTable::new();
        let mut rx = table.subscribe();
        let now = Instant::now();
        let (a, b) = (ip("192.0.2.7"), ip("192.0.2.8"));
        table.grant(a, g(now + Duration::from_secs(10)));
        table.grant(b, g(now + Duration::from_secs(20)));
        let (before, _) = table.addresses();
        rx.borrow_and_update();
        // Nothing due yet.
        let (gone, next) = table.purge(now + Duration::from_secs(9));
        assert!(gone.is_empty());
        assert_eq!(next, Some(now + Duration::from_secs(10)));
        assert_eq!(
            table.addresses().0,
            before,
            "a purge of nothing left the generation"
        );
        assert!(!rx.has_changed().unwrap());
        // At the instant itself.
        let (gone, next) = table.purge(now + Duration::from_secs(10));
        assert_eq!(gone.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![a]);
        assert_eq!(next, Some(now + Duration::from_secs(20)));
        assert_eq!(table.addresses(), (before + 1, vec![b]));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), before + 1);
    }

    /// A reload's new `max-grants` takes effect at once: a table that was
    /// full has room again when its limit is raised.
    #[test]
    fn a_raised_limit_makes_room_at_once() {
        let table = GrantTable::with_limit(1);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(table.grant(ip("192.0.2.1"), g(later)), GrantResult::New);
        assert_eq!(table.grant(ip("192.0.2.2"), g(later)), GrantResult::Full);
        table.set_limit(2);
        assert_eq!(table.limit(), 2);
        assert_eq!(table.grant(ip("192.0.2.2"), g(later)), GrantResult::New);
    }
}
