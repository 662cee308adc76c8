//! A value that a reload replaces while readers keep using it.
//!
//! Consumes: a new value from the reload ([`Swap::store`]).
//! Produces: the current value to readers ([`Swap::load`]), who keep the
//! one they loaded for as long as they hold it, so one datagram is handled
//! with one configuration from start to end.
//! Trusts: its callers.

use std::sync::{Arc, RwLock};

/// A shared value, replaced as a whole.
#[derive(Debug)]
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    /// A swap holding `value`.
    pub fn new(value: T) -> Swap<T> {
        Swap(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the value; readers that loaded the old one keep it.
    pub fn store(&self, value: T) {
        let value = Arc::new(value);
        match self.0.write() {
            Ok(mut g) => *g = value,
            Err(p) => *p.into_inner() = value,
        }
    }
}
