//! Deadlines on a connection: a request must be complete (and its answer
//! written) within its limit from its first byte, a connection may not idle
//! longer than its limit, nor outlive its lifetime once idle.
//!
//! The stream a handler reads and writes enforces them ([`Deadlined`]): a
//! read or write that would wait past the deadline fails with `TimedOut`.
//! The handler says when a request is complete ([`Progress::complete`]);
//! the listener reads how long each connection has waited without
//! completing one, to choose whom to shed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// The bounds of one stream service.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once by one listener.
    pub total: usize,
    /// Connections served at once for one peer (one uid for a local peer,
    /// one IPv4 address or IPv6 /64 for a remote one).
    pub per_peer: usize,
    /// From a request's first byte until it is complete and answered.
    pub request: Duration,
    /// Before the first request, and between requests.
    pub idle: Duration,
    /// A connection older than this is closed when it is next idle.
    pub lifetime: Option<Duration>,
}

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `busy` when no request is under way.
const IDLE: u64 = u64::MAX;

/// Which deadline a connection missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    /// It waited too long between requests, or outlived its lifetime.
    Idle,
    /// A request (or its answer) took too long.
    Request,
}

/// Where a connection is, in milliseconds since its listener started:
/// shared by its stream, its handler and its listener.
#[derive(Debug)]
pub(crate) struct Progress {
    base: Instant,
    accepted: u64,
    /// When the last request was completed (when it was accepted, before).
    done: AtomicU64,
    /// When the request under way began, or [`IDLE`].
    busy: AtomicU64,
    /// 0, or 1 + the [`Expired`] deadline it missed.
    expired: AtomicU8,
}

impl Progress {
    /// A connection accepted now, on a listener that started at `base`.
    pub fn new(base: Instant) -> Progress {
        let now = ms(Instant::now().saturating_duration_since(base));
        Progress {
            base,
            accepted: now,
            done: AtomicU64::new(now),
            busy: AtomicU64::new(IDLE),
            expired: AtomicU8::new(0),
        }
    }

    fn now(&self) -> u64 {
        ms(Instant::now().saturating_duration_since(self.base))
    }

    /// A byte of a request arrived (or of an answer left).
    pub fn begin(&self) {
        let _ = self
            .busy
            .compare_exchange(IDLE, self.now(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A request was completed (and answered).
    pub fn complete(&self) {
        self.busy.store(IDLE, Ordering::Relaxed);
        self.done.store(self.now(), Ordering::Relaxed);
    }

    /// Since when it has waited without completing a request; the smallest
    /// is the one to shed.
    pub fn waiting_since(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// How long it has waited without completing a request.
    pub fn waited(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.waiting_since()))
    }

    /// The deadline in force, and which one it is.
    fn deadline(&self, limits: &Limits) -> (u64, Expired) {
        match self.busy.load(Ordering::Relaxed) {
            IDLE => {
                let mut at = self.waiting_since().saturating_add(ms(limits.idle));
                if let Some(life) = limits.lifetime {
                    at = at.min(self.accepted.saturating_add(ms(life)));
                }
                (at, Expired::Idle)
            }
            since => (since.saturating_add(ms(limits.request)), Expired::Request),
        }
    }

    /// The deadline it missed, if it did.
    pub fn expired(&self) -> Option<Expired> {
        match self.expired.load(Ordering::Relaxed) {
            1 => Some(Expired::Idle),
            2 => Some(Expired::Request),
            _ => None,
        }
    }

    fn expire(&self, why: Expired) {
        let code = match why {
            Expired::Idle => 1,
            Expired::Request => 2,
        };
        self.expired.store(code, Ordering::Relaxed);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One timer, set to the deadline in force whenever an operation waits.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    at: Option<u64>,
}

impl Timer {
    fn new(progress: &Progress) -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(progress.base)),
            at: None,
        }
    }

    /// After the operation returned Pending: the error if its deadline has
    /// passed, else None (and a wake-up at the deadline).
    fn check(&mut self, cx: &mut Context<'_>, p: &Progress, limits: &Limits) -> Option<io::Error> {
        let (at, why) = p.deadline(limits);
        if self.at != Some(at) {
            let when = p
                .base
                .checked_add(Duration::from_millis(at))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
            self.sleep.as_mut().reset(when);
            self.at = Some(at);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        p.expire(why);
        let what = match why {
            Expired::Idle => "idle too long",
            Expired::Request => "request not complete in time",
        };
        Some(io::Error::new(io::ErrorKind::TimedOut, what))
    }
}

/// A stream whose reads and writes fail with `TimedOut` past the
/// connection's deadline.
pub(crate) struct Deadlined<S> {
    inner: S,
    progress: std::sync::Arc<Progress>,
    limits: Limits,
    read_timer: Timer,
    write_timer: Timer,
}

impl<S> Deadlined<S> {
    pub fn new(inner: S, progress: std::sync::Arc<Progress>, limits: Limits) -> Deadlined<S> {
        Deadlined {
            read_timer: Timer::new(&progress),
            write_timer: Timer::new(&progress),
            inner,
            progress,
            limits,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.progress.begin();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.read_timer.check(cx, &this.progress, &this.limits) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> Deadlined<S> {
    /// Runs one write-side operation under the deadline.
    fn write_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.progress.begin();
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Pending => match self.write_timer.check(cx, &self.progress, &self.limits) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_op(cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_op(cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_op(cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        total: 8,
        per_peer: 4,
        request: Duration::from_secs(100),
        idle: Duration::from_secs(300),
        lifetime: Some(Duration::from_secs(1000)),
    };

    fn pair() -> (
        Deadlined<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Progress>,
    ) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let p = Arc::new(Progress::new(Instant::now()));
        (Deadlined::new(ours, p.clone(), LIMITS), theirs, p)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_trickling_in_is_cut_at_its_deadline() {
        let (mut ours, mut theirs, p) = pair();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match ours.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        let started = Instant::now();
        // A byte every 5 s: each keeps nothing alive beyond the request's
        // 100 s from its first byte.
        for _ in 0..30 {
            if theirs.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            if reader.is_finished() {
                break;
            }
        }
        assert_eq!(reader.await.unwrap(), Err(io::ErrorKind::TimedOut));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(100) && took <= Duration::from_secs(105),
            "{took:?}"
        );
        assert_eq!(p.expired(), Some(Expired::Request));
    }

    #[tokio::test(start_paused = true)]
    async fn completed_requests_reset_the_idle_deadline_until_the_lifetime() {
        let (mut ours, mut theirs, p) = pair();
        let started = Instant::now();
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match ours.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        if let Err(e) = ours.write_all(b"ok\n").await {
                            return Err((e.kind(), p.expired()));
                        }
                        p.complete();
                    }
                    Err(e) => return Err((e.kind(), p.expired())),
                }
            }
        });
        // A request every 250 s is within the 300 s idle limit, but the
        // connection is closed when idle after its 1000 s.
        let mut buf = [0u8; 3];
        for _ in 0..10 {
            if theirs.write_all(b"q\n").await.is_err() || theirs.read_exact(&mut buf).await.is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(250)).await;
        }
        let r = server.await.unwrap();
        assert_eq!(r, Err((io::ErrorKind::TimedOut, Some(Expired::Idle))));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1000) && took < Duration::from_secs(1251),
            "{took:?}"
        );
    }
}
