//! Recognise: from a parsed record to one decision, grant or refusal.
//!
//! Consumes: [`crate::ingest::record::Record`]s with their sender.
//! Produces: one outcome per record (a grant for an address, or a refusal
//! with its reason and counter), applied to the grant table.
//! Trusts: the patterns (data, in `patterns.toml` or the configuration),
//! and the sender facts ingest established; never the text of a message
//! beyond the fields a pattern names, and never an address that a
//! user-controlled field could have supplied.
//!
//! - [`matcher`]: the patterns: recognises successful logins.
//! - [`hold`]: sessions still open, which hold their address's grant
//!   (`--hold-while-connected`).
//! - [`pipeline`]: the per-record stage: match, attest, check the address
//!   rules, pair two-line logins, decide, and apply the outcome.

pub(crate) mod hold;
pub mod matcher;
pub(crate) mod pipeline;
