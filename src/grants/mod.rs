//! Grants: the one table of live grants, its address rules, and the way
//! every backend follows it.
//!
//! Consumes: decided logins (an address and a window) from recognise,
//! revocations from the control socket, and the state file at start.
//! Produces: the live set of granted addresses, with expiry, and a change
//! feed that every sink follows.
//! Trusts: only its callers in this process.
//!
//! - [`table`]: the table of live grants; the single owner of expiry.
//! - [`addr`]: canonical addresses and the never-grant rules.
//! - [`follow`]: the [`follow::Sink`] trait and the one loop that keeps a
//!   sink in step with the table (first write, refill, retries, backoff).
//! - [`state`]: the state file that keeps open windows across restarts.

pub mod addr;
pub mod follow;
pub mod state;
pub mod table;
