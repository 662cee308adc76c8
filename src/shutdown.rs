//! Stopping without losing what senders already sent. When the daemon
//! stops (SIGTERM), each receiver first tells its senders to stop sending
//! and then handles everything they sent before that, so that a sender
//! that retries (syslog-ng, rsyslog's omfwd over TCP) sends the rest to
//! the next daemon rather than into a socket about to close:
//!
//! - a unix datagram socket the daemon bound itself is shut for reading
//!   (senders now get EPIPE) and its queue is read to the end;
//! - a TCP connection gets our FIN (rsyslog checks for it before each
//!   send, closes, and sends the rest on a new connection) and is read
//!   until the peer closes it;
//! - a socket systemd passed is left alone: it outlives the daemon, and
//!   what waits in it is the next daemon's.
//!
//! Consumes: the daemon's decision to stop.
//! Produces: a signal receivers wait for, and a count of receivers still
//! draining, which the daemon waits on (with a deadline) before it stops
//! its other tasks.
//! Trusts: nothing from outside; a peer that never closes is cut off at
//! the deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// How long a receiver may take to read what was sent before the stop.
pub const DRAIN: Duration = Duration::from_millis(500);

fn stopping_tx() -> &'static watch::Sender<bool> {
    static TX: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
    TX.get_or_init(|| watch::channel(false).0)
}

static DRAINING: AtomicUsize = AtomicUsize::new(0);

fn done_tx() -> &'static watch::Sender<usize> {
    static TX: std::sync::OnceLock<watch::Sender<usize>> = std::sync::OnceLock::new();
    TX.get_or_init(|| watch::channel(0).0)
}

/// Tells every receiver that the daemon stops.
pub fn begin() {
    stopping_tx().send_replace(true);
}

/// Resolves once the daemon stops (at once if it already has).
pub async fn stopping() {
    let mut rx = stopping_tx().subscribe();
    let _ = rx.wait_for(|s| *s).await;
}

/// Held by a receiver while it has something to finish at a stop.
pub struct Draining(());

impl Draining {
    /// Counts a receiver that must finish before the daemon stops.
    pub fn enter() -> Draining {
        DRAINING.fetch_add(1, Ordering::SeqCst);
        Draining(())
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        let left = DRAINING.fetch_sub(1, Ordering::SeqCst) - 1;
        done_tx().send_replace(left);
    }
}

/// Waits until every receiver has finished, or `deadline` passed.
pub async fn drained(deadline: Duration) {
    let mut rx = done_tx().subscribe();
    let _ = tokio::time::timeout(deadline, async {
        while DRAINING.load(Ordering::SeqCst) > 0 {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}
