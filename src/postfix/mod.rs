//! Postfix: every way Postfix learns of the grants, and the check of
//! Postfix's own configuration.
//!
//! Consumes: the grant table (through [`crate::grants::follow`]) and
//! Postfix's requests (policy delegation, socketmap).
//! Produces: the access map (`postmap`, replaced atomically), memcached
//! entries that Postfix reads with `memcache:`, and answers to Postfix.
//! Trusts: Postfix's programs (`postmap`, `postconf`); a policy or
//! socketmap client only as far as its listener's allow-list.
//!
//! - [`map`]: keeps the Postfix access map in step with the table.
//! - [`memcache`]: the memcached sink (several relays, one truth).
//! - [`policy`], [`socketmap`]: the table served to Postfix directly.
//! - [`check`]: main.cf and master.cf compared with what is served.
//! - [`lines`]: the main.cf line and memcache_table(5) file that go with
//!   the configuration (`postfix-config`).

pub(crate) mod check;
pub(crate) mod lines;
pub mod map;
pub mod memcache;
pub(crate) mod policy;
pub(crate) mod socketmap;
