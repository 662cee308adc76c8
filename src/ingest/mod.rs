//! Ingest: everything that arrives from outside, up to one parsed syslog
//! record with the transport's word on who sent it.
//!
//! Consumes: datagrams on UDP and unix datagram sockets, RFC 6587 frames on
//! TCP, and Dovecot's auth-policy reports over HTTP.
//! Produces: [`receiver::Peer`] (who the kernel or rsyslog's attestation
//! says sent it) beside the bytes, [`record::Record`] (one parsed syslog
//! message), and, for auth-policy reports, a reported login.
//! Trusts: the kernel (peer address, SO_PEERCRED), a listener's
//! `attested=yes` (rsyslog's own properties, checked by [`attest`]), and
//! the auth-policy secret. Nothing inside a message is trusted.
//!
//! - [`receiver`]: the syslog listeners and their peers (`--allow-from`).
//! - [`tcp`]: the TCP listener's RFC 6587 framing and bounds.
//! - [`record`]: parses one datagram into a [`record::Record`].
//! - [`attest`]: checks that a record's sender may speak for its pattern
//!   (rsyslog's attested uid first, executable second).
//! - [`authpolicy`]: Dovecot's auth-policy reports (`--auth-policy`).
//! - [`shutdown`]: receivers that finish what senders sent before a stop.

pub(crate) mod attest;
pub(crate) mod authpolicy;
pub mod receiver;
pub mod record;
pub(crate) mod shutdown;
pub(crate) mod tcp;
