//! The follow loop: one shape for every sink that follows the grant table
//! change by change. The Postfix map (`postfix::map`), the state file
//! (`grants::state`) and each memcached server (`postfix::memcache`) are
//! its [`Sink`]s: a new backend is one implementation of the trait.
//!
//! Consumes: the table's changes, through a bounded queue that a change
//! hook fills under the table's lock ([`Feed`]); and the table itself, for
//! a full refill.
//! Produces: calls to a [`Sink`]: [`Sink::refill`] with every live grant
//! (at the first write, after a failure, after the queue overflowed, and
//! whenever the sink finds that its store lost what it was given), then
//! [`Sink::apply`] with the changes since, in order; the sink's counters
//! (writes, failures, refills) and log lines.
//! Trusts: the table, and the sink to say truthfully whether a write
//! worked.
//!
//! The loop owns what every such sink needs: the first write (reported
//! through a oneshot, so that start-up can wait for it), the refill after
//! anything that may have lost a change, retries with backoff (by default
//! 250 ms doubling to 30 s, [`Sink::retry`]) with the failure logged once,
//! then at most once a minute while it lasts (the map: at every try), and
//! its end logged; the counters; and the registration with [`flush_all`],
//! which the stop path waits for. A failing sink never holds up
//! the receivers or the other sinks: the hook only queues, and on overflow
//! ([`QUEUE`] changes waiting) the queue is dropped and the sink refilled
//! from the table instead, so no change is lost, only coalesced.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::grants::addr::Cidr;
use crate::grants::table::{Change, GrantTable};
use crate::stats::Stats;

/// Most changes waiting for one sink; beyond it the sink is refilled from
/// the table instead.
pub const QUEUE: usize = 262_144;
/// The first pause after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest pause between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a failure that goes on is logged again.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// A failed write, ready to print.
#[derive(Debug)]
pub struct SinkError(pub String);

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One live grant, as a refill writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// The block granted.
    pub key: Cidr,
    /// When its window closes.
    pub expires: Instant,
}

/// How a sink's failures are retried and logged.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// The first pause after a failure.
    pub first: Duration,
    /// The longest pause between two tries (each doubles the last).
    pub max: Duration,
    /// How often a failure that goes on is logged again (zero: every try).
    pub log_every: Duration,
}

impl Retry {
    /// 250 ms doubling to 30 s, logged once a minute.
    pub const DEFAULT: Retry = Retry {
        first: FIRST_BACKOFF,
        max: MAX_BACKOFF,
        log_every: FAILURE_LOG_EVERY,
    };
}

/// A store the table is copied to, change by change. A new backend is an
/// implementation of this (and a configuration group); the loop,
/// [`follow`], does the rest.
pub trait Sink: Send + 'static {
    /// The sink as the log names it, e.g. `memcache inet:127.0.0.1:11211`.
    fn name(&self) -> String;

    /// Makes the store hold exactly `live` (nothing else of ours); returns
    /// the number of writes it made. A sink that
    /// [reads the table itself](Sink::reads_table) gets an empty `live`.
    fn refill(&mut self, live: &[Live]) -> impl Future<Output = Result<u64, SinkError>> + Send;

    /// Applies `changes`, in order; returns the number of writes.
    fn apply(&mut self, changes: &[Change]) -> impl Future<Output = Result<u64, SinkError>> + Send;

    /// Whether the store still holds what it was given (false: it was
    /// restarted or flushed, and needs a refill). Asked every
    /// [`Sink::check_every`].
    fn intact(&mut self) -> impl Future<Output = Result<bool, SinkError>> + Send {
        async { Ok(true) }
    }

    /// How often to ask [`Sink::intact`]; `None`: never.
    fn check_every(&self) -> Option<Duration> {
        None
    }

    /// Whether [`Sink::refill`] reads the table itself (the map and the
    /// state file, which walk or sort it their own way) instead of being
    /// given a copy of every live grant. Changes made after the loop's
    /// snapshot are then applied on top of a later state, which is the
    /// same: each change sets or removes one key.
    fn reads_table(&self) -> bool {
        false
    }

    /// Asked once, at the start: whether the store already holds the
    /// table as it was when the feed was subscribed (the state file,
    /// written before the daemon goes on), so no first refill is needed.
    fn filled(&mut self) -> bool {
        false
    }

    /// Whether the loop ends when the first write fails (the map: the
    /// daemon then does not start), instead of retrying.
    fn first_failure_ends(&self) -> bool {
        false
    }

    /// Told, after each successful [`Sink::apply`], the table generation
    /// the store now holds.
    fn written(&mut self, _generation: u64) {}

    /// How failures are retried and logged.
    fn retry(&self) -> Retry {
        Retry::DEFAULT
    }

    /// The text of an error, as the first-write report gives it (with
    /// what to do, when the sink knows).
    fn explain(&self, e: &SinkError) -> String {
        e.to_string()
    }

    /// The log line of a failure: the first of a run (`failing_for`
    /// `None`), or one that goes on; `retry_in` is the pause before the
    /// next try.
    fn failure_line(
        &self,
        e: &SinkError,
        retry_in: Duration,
        failing_for: Option<Duration>,
    ) -> String {
        match failing_for {
            None => format!(
                "{}: {}; the grants are kept, retrying (every {} ms at first, at most every {} s)",
                self.name(),
                self.explain(e),
                retry_in.as_millis(),
                self.retry().max.as_secs()
            ),
            Some(d) => format!(
                "{}: still failing after {} s: {}",
                self.name(),
                d.as_secs(),
                self.explain(e)
            ),
        }
    }

    /// The log line once writes work again after `failed_for`.
    fn recovered_line(&self, failed_for: Duration) -> String {
        format!(
            "{}: written again after {} s of failures",
            self.name(),
            failed_for.as_secs()
        )
    }

    /// The log line of a successful refill of `live` grants in `ms`;
    /// `None` for a sink that logs its own writes.
    fn refilled_line(&self, live: usize, ms: u128) -> Option<String> {
        Some(format!(
            "{}: filled with {live} live grant{} in {ms} ms",
            self.name(),
            if live == 1 { "" } else { "s" }
        ))
    }
}

/// What a running sink gives [`register`]: a future, made on demand, that
/// ends once the sink's store holds what the table held when it was made.
pub type CaughtUp = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

static RUNNING: Mutex<Vec<(u64, CaughtUp)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn running() -> std::sync::MutexGuard<'static, Vec<(u64, CaughtUp)>> {
    match RUNNING.lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    }
}

/// A sink's place among those [`flush_all`] waits for; dropping it (the
/// sink's task ending) takes the sink out.
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        running().retain(|(id, _)| *id != self.0);
    }
}

/// Enters a running sink (the map, the state file, each memcached) for
/// [`flush_all`].
pub fn register(caught_up: CaughtUp) -> Registered {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    running().push((id, caught_up));
    Registered(id)
}

/// For the shutdown path, once the receivers are drained: makes every
/// running sink write what the table holds now, and waits until they all
/// have, at most `deadline` (say 4 s); false when one had not by then (it
/// is failing: its error is in the log). Every sink writes on its own at
/// every change; this only waits for the last writes, so it must be called
/// before the sinks' tasks are aborted.
pub async fn flush_all(deadline: Duration) -> bool {
    let waits: Vec<_> = running().iter().map(|(_, f)| f()).collect();
    tokio::time::timeout(deadline, async {
        // The sinks write concurrently on their own tasks: waiting for
        // them one after the other takes as long as the slowest.
        for w in waits {
            w.await;
        }
    })
    .await
    .is_ok()
}

/// Which of the daemon's counters a sink's follow loop bumps.
#[derive(Clone)]
pub struct Counters {
    /// The counters.
    pub stats: Arc<Stats>,
    /// Writes made (one per key set or deleted).
    pub writes: fn(&Stats) -> &AtomicU64,
    /// Failed tries (each retried).
    pub failures: fn(&Stats) -> &AtomicU64,
    /// Full refills.
    pub refills: fn(&Stats) -> &AtomicU64,
}

#[derive(Default)]
struct Queue {
    /// Changes not yet taken, in order.
    changes: Vec<Change>,
    /// Whether changes were dropped since the last take.
    overflowed: bool,
    /// Changes queued since the feed began (dropped ones too).
    seq: u64,
}

/// The changes waiting for one sink, filled by a hook on the table.
pub struct Feed {
    queue: Mutex<Queue>,
    wake: Notify,
    /// Most changes kept waiting.
    bound: usize,
    /// Whether an overflow is routine (not logged as a warning).
    coalescing: bool,
}

impl Feed {
    /// A feed told of every change of `table` from now on, holding at
    /// most [`QUEUE`] changes (an overflow is logged).
    pub fn subscribe(table: &GrantTable) -> Arc<Feed> {
        Self::with_bound(table, QUEUE, false)
    }

    /// A feed for a sink that coalesces anyway (the map, which writes the
    /// whole set; the state file): past `bound` changes waiting (each
    /// holds a copy of its grant), the queue is dropped quietly and the
    /// sink refilled from the table.
    pub fn subscribe_coalescing(table: &GrantTable, bound: usize) -> Arc<Feed> {
        Self::with_bound(table, bound, true)
    }

    fn with_bound(table: &GrantTable, bound: usize, coalescing: bool) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            bound,
            coalescing,
        });
        let f = feed.clone();
        table.add_hook(Box::new(move |change| f.push(change)));
        feed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        match self.queue.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        }
    }

    /// Called under the table's lock: queues, or drops the queue when it
    /// is full (a refill follows).
    fn push(&self, change: Change) {
        let mut q = self.lock();
        q.seq += 1;
        if q.changes.len() >= self.bound {
            q.changes = Vec::new();
            q.overflowed = true;
        } else if !q.overflowed {
            q.changes.push(change);
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Takes what is waiting: the changes, whether some were dropped, and
    /// the sequence number of the last change they reach.
    fn take(&self) -> (Vec<Change>, bool, u64) {
        let mut q = self.lock();
        let overflowed = std::mem::take(&mut q.overflowed);
        (std::mem::take(&mut q.changes), overflowed, q.seq)
    }

    /// The sequence number of the last change queued.
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// The live grants (none when `bare`: the sink reads the table
    /// itself), with the queue emptied at the same instant (under the
    /// table's lock), so that what follows the snapshot is exactly the
    /// changes made after it.
    fn snapshot(&self, table: &GrantTable, bare: bool) -> (Vec<Live>, u64) {
        table.with_snapshot(|grants| {
            let mut q = self.lock();
            q.changes.clear();
            q.overflowed = false;
            let live = if bare {
                Vec::new()
            } else {
                grants
                    .map(|(key, g)| Live {
                        key,
                        expires: g.expires,
                    })
                    .collect()
            };
            (live, q.seq)
        })
    }
}

/// How a sink is doing, for its log lines.
struct Health {
    retry: Retry,
    backoff: Duration,
    /// Since when it fails, and when that was last logged.
    failing: Option<(Instant, Instant)>,
    counters: Option<Counters>,
}

impl Health {
    fn ok<S: Sink>(&mut self, sink: &S) {
        if let Some((since, _)) = self.failing.take() {
            crate::log_info!("{}", sink.recovered_line(since.elapsed()));
        }
        self.backoff = self.retry.first;
    }

    fn count_failure(&self) {
        if let Some(c) = &self.counters {
            Stats::bump((c.failures)(&c.stats));
        }
    }

    /// Counts and logs a failure (once, then at most every
    /// [`Retry::log_every`]), and waits before the next try.
    async fn failed<S: Sink>(&mut self, sink: &S, e: SinkError) {
        self.count_failure();
        let now = Instant::now();
        match &mut self.failing {
            None => {
                crate::log_error!("{}", sink.failure_line(&e, self.backoff, None));
                self.failing = Some((now, now));
            }
            Some((since, logged)) if now.duration_since(*logged) >= self.retry.log_every => {
                let line = sink.failure_line(&e, self.backoff, Some(now.duration_since(*since)));
                crate::log_error!("{line}");
                *logged = now;
            }
            Some(_) => {}
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(self.retry.max);
    }
}

/// Optional reports of a follow loop, for start-up, benchmarks and tests.
#[derive(Default)]
pub struct Reports {
    /// Told once whether the first refill worked (with the error, as
    /// [`Sink::explain`] gives it, when it did not).
    pub first_write: Option<oneshot::Sender<Result<(), String>>>,
    /// The sequence number of the last change the store holds (see
    /// [`Feed`]), published after each successful write.
    pub visible: Option<watch::Sender<u64>>,
}

/// One follow loop's state: the sink and what the loop keeps for it.
struct Follower<S: Sink> {
    sink: S,
    table: Arc<GrantTable>,
    feed: Arc<Feed>,
    counters: Option<Counters>,
    reports: Reports,
    health: Health,
    /// The sequence number the store holds, for [`flush_all`].
    done: watch::Sender<Option<u64>>,
}

/// What one step of the loop asks for next.
enum Next {
    Go,
    Refill,
    End,
}

impl<S: Sink> Follower<S> {
    fn count(&self, n: u64, refill: bool) {
        if let Some(c) = &self.counters {
            (c.writes)(&c.stats).fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if refill {
                Stats::bump((c.refills)(&c.stats));
            }
        }
    }

    fn wrote(&mut self, seq: u64) {
        self.health.ok(&self.sink);
        self.done.send_replace(Some(seq));
        publish(&mut self.reports, Ok(()), seq);
    }

    /// Makes the store hold the table; retried with backoff until it does.
    async fn refill(&mut self) -> Next {
        let started = Instant::now();
        let (live, seq) = self.feed.snapshot(&self.table, self.sink.reads_table());
        match self.sink.refill(&live).await {
            Ok(n) => {
                self.count(n, true);
                if let Some(line) = self
                    .sink
                    .refilled_line(live.len(), started.elapsed().as_millis())
                {
                    crate::log_info!("{line}");
                }
                self.wrote(seq);
                Next::Go
            }
            Err(e) => {
                let first = self.reports.first_write.is_some();
                publish(&mut self.reports, Err(self.sink.explain(&e)), 0);
                if first && self.sink.first_failure_ends() {
                    // Whoever waits for the first write says it.
                    self.health.count_failure();
                    return Next::End;
                }
                self.health.failed(&self.sink, e).await;
                Next::Refill
            }
        }
    }

    /// Waits for changes (or the time to check the store), and writes them.
    async fn step(&mut self, next_check: &mut Option<Instant>) -> Next {
        let at = *next_check;
        let check = async move {
            match at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.feed.wake.notified() => {}
            _ = check => {
                *next_check = self.sink.check_every().map(|d| Instant::now() + d);
                // A failed check is followed by a refill at once (which
                // reconnects, and is retried with backoff if it fails).
                return match self.sink.intact().await {
                    Ok(true) => Next::Go,
                    _ => Next::Refill,
                };
            }
        }
        let ((changes, overflowed, seq), generation) =
            self.table.at_generation(|g| (self.feed.take(), g));
        if overflowed {
            let (name, bound) = (self.sink.name(), self.feed.bound);
            if self.feed.coalescing {
                crate::log_debug!("{name}: more than {bound} changes waited; refilling");
            } else {
                crate::log_warning!(
                    "{name}: more than {bound} changes waited; refilling from the table instead"
                );
            }
            return Next::Refill;
        }
        if changes.is_empty() {
            return Next::Go;
        }
        match self.sink.apply(&changes).await {
            Ok(n) => {
                self.count(n, false);
                self.sink.written(generation);
                self.wrote(seq);
                Next::Go
            }
            Err(e) => {
                // What the store holds is unknown now: only a refill is
                // sure to put it right.
                self.health.failed(&self.sink, e).await;
                Next::Refill
            }
        }
    }
}

/// Keeps `sink` in step with `table` for ever (cancel by dropping the
/// task): a refill first (unless the sink is [filled](Sink::filled)
/// already), then the changes as they come. `counters`: `None` for a sink
/// with no counters of its own (the state file).
pub async fn follow<S: Sink>(
    mut sink: S,
    table: Arc<GrantTable>,
    feed: Arc<Feed>,
    counters: impl Into<Option<Counters>>,
    reports: Reports,
) {
    let counters = counters.into();
    let (done, done_rx) = watch::channel(None::<u64>);
    let f = feed.clone();
    let _registered = register(Box::new(move || {
        let want = f.seq();
        let mut done = done_rx.clone();
        Box::pin(async move {
            while done.borrow_and_update().is_none_or(|d| d < want) {
                if done.changed().await.is_err() {
                    return;
                }
            }
        })
    }));
    let filled = sink.filled();
    let mut next_check = sink.check_every().map(|d| Instant::now() + d);
    let retry = sink.retry();
    let mut f = Follower {
        sink,
        table,
        feed,
        counters: counters.clone(),
        reports,
        health: Health {
            retry,
            backoff: retry.first,
            failing: None,
            counters,
        },
        done,
    };
    let mut next = if filled {
        // Held since the feed began: nothing queued before it is missing.
        f.wrote(0);
        Next::Go
    } else {
        Next::Refill
    };
    loop {
        next = match next {
            Next::Refill => f.refill().await,
            Next::Go => f.step(&mut next_check).await,
            Next::End => return,
        };
    }
}

fn publish(reports: &mut Reports, result: Result<(), String>, seq: u64) {
    let ok = result.is_ok();
    if let Some(tx) = reports.first_write.take() {
        let _ = tx.send(result);
    }
    if ok && let Some(v) = &reports.visible {
        v.send_replace(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::table::Grant;
    use crate::recognise::matcher::Service;
    use std::collections::HashSet;
    use std::net::IpAddr;

    /// A store that keeps the blocks it was given, and whose writes wait
    /// for a gate: a sink that falls behind.
    struct Slow {
        held: Arc<Mutex<HashSet<Cidr>>>,
        refills: Arc<AtomicU64>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Sink for Slow {
        fn name(&self) -> String {
            "slow".into()
        }
        async fn refill(&mut self, live: &[Live]) -> Result<u64, SinkError> {
            self.refills
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut h = self.held.lock().unwrap();
            *h = live.iter().map(|l| l.key).collect();
            Ok(live.len() as u64)
        }
        async fn apply(&mut self, changes: &[Change]) -> Result<u64, SinkError> {
            let _pass = self
                .gate
                .acquire()
                .await
                .map_err(|e| SinkError(e.to_string()))?;
            let mut h = self.held.lock().unwrap();
            for c in changes {
                match c {
                    Change::Grant(k, _) => h.insert(*k),
                    Change::Revoke(k) | Change::Expire(k) => h.remove(k),
                };
            }
            Ok(changes.len() as u64)
        }
        async fn intact(&mut self) -> Result<bool, SinkError> {
            Ok(true)
        }
        fn check_every(&self) -> Option<Duration> {
            None
        }
    }

    fn grant() -> Grant {
        Grant {
            expires: Instant::now() + Duration::from_secs(600),
            server: "dovecot".into(),
            service: Service::Imap,
            user: "u".into(),
            reporter: "test".into(),
            host: "mail".into(),
        }
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | i))
    }

    #[tokio::test]
    async fn a_sink_that_falls_behind_gets_a_full_refill_not_a_gap() {
        let table = Arc::new(GrantTable::new());
        let feed = Feed::subscribe(&table);
        let held = Arc::new(Mutex::new(HashSet::new()));
        let refills = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sink = Slow {
            held: held.clone(),
            refills: refills.clone(),
            gate: gate.clone(),
        };
        let (first_tx, first_rx) = oneshot::channel();
        let (visible_tx, mut visible_rx) = watch::channel(0);
        let counters = Counters {
            stats: Arc::new(Stats::default()),
            writes: |s| &s.memcache_writes,
            failures: |s| &s.memcache_failures,
            refills: |s| &s.memcache_refills,
        };
        let reports = Reports {
            first_write: Some(first_tx),
            visible: Some(visible_tx),
        };
        let task = tokio::spawn(follow(sink, table.clone(), feed, counters, reports));
        assert!(first_rx.await.unwrap().is_ok());

        // One change, whose write hangs at the gate.
        table.grant(ip(0), grant());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Meanwhile more changes than the queue holds: some are dropped.
        let n = QUEUE as u32 + 100;
        for i in 1..=n {
            table.grant(ip(i), grant());
        }
        table.revoke(ip(7));
        gate.add_permits(1_000);
        let want: HashSet<Cidr> = table.blocks().1.into_iter().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *held.lock().unwrap() != want {
            assert!(Instant::now() < deadline, "the sink never caught up");
            let _ = tokio::time::timeout(Duration::from_millis(100), visible_rx.changed()).await;
        }
        // The first fill, then the refill that replaced the dropped changes.
        assert_eq!(refills.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(want.len(), n as usize);
        task.abort();
    }
}
