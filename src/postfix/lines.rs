//! `smtp-after-popd postfix-config`: the Postfix side of this daemon's
//! configuration, printed from the same options, so that the two cannot
//! drift apart.
//!
//! Consumes: a validated [`Config`] (the daemon's own options and file).
//! Produces: the `smtpd_relay_restrictions` line for main.cf, with one
//! check per table the daemon serves (map, memcached, socketmap, policy
//! service) after `permit_auth_destination`, so that mail to this site
//! never depends on them; and the memcache_table(5) file for each
//! `--memcache` server.
//! Trusts: the configuration (already validated).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::service::config::{Config, ListenSpec};

/// Where Postfix's queue (smtpd's chroot on Debian) is.
const QUEUE_DIR: &str = "/var/spool/postfix";

/// The memcache_table(5) file for the `n`th of `of` servers.
pub fn cf_path(dir: &Path, n: usize, of: usize) -> PathBuf {
    if of <= 1 {
        dir.join("smtp-after-popd-memcache.cf")
    } else {
        dir.join(format!("smtp-after-popd-memcache-{}.cf", n + 1))
    }
}

/// The text of one memcache_table(5) file.
pub fn memcache_cf(server: &crate::postfix::memcache::Server, prefix: &str) -> String {
    format!(
        "# memcache_table(5) for smtp-after-popd (smtp-after-popd postfix-config).\n\
         # Leave domain unset (it skips every key without @, which is every\n\
         # address) and backup unset (expired grants would come back from it).\n\
         memcache = {server}\n\
         key_format = {prefix}%s\n"
    )
}

/// The checks, in order, for `smtpd_relay_restrictions`.
pub fn checks(config: &Config, cf_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(map) = &config.map {
        out.push(format!(
            "check_client_access {}:{}",
            map.map_type.name(),
            map.path.display()
        ));
    }
    if !config.memcache.is_empty() {
        let cf = cf_path(cf_dir, 0, config.memcache.len());
        out.push(format!("check_client_access memcache:{}", cf.display()));
    }
    for spec in &config.socketmap {
        if let ListenSpec::Unix(path, _) = spec {
            out.push(format!(
                "check_client_access socketmap:unix:{}:{}",
                path.display(),
                crate::postfix::socketmap::MAP_NAME
            ));
        }
    }
    for spec in &config.policy {
        match spec {
            ListenSpec::Unix(path, _) => {
                // A chrooted smtpd names sockets relative to the queue.
                let name = path
                    .strip_prefix(QUEUE_DIR)
                    .map_or_else(|_| path.display().to_string(), |p| p.display().to_string());
                out.push(format!("check_policy_service unix:{name}"));
            }
            ListenSpec::Tcp(addr, _) => out.push(format!("check_policy_service inet:{addr}")),
            ListenSpec::Udp(..) => {}
        }
    }
    out
}

/// The whole text `postfix-config` prints.
pub fn render(config: &Config, cf_dir: &Path) -> String {
    let mut s = String::from(
        "# main.cf (then: postfix reload). The checks come after\n\
         # permit_auth_destination, so that mail to this site never depends\n\
         # on them, and before reject_unauth_destination.\n\
         smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated,\n    permit_auth_destination,\n",
    );
    for check in checks(config, cf_dir) {
        let _ = writeln!(s, "    {check},");
    }
    s.push_str("    reject_unauth_destination\n");
    let n = config.memcache.len();
    for (i, server) in config.memcache.iter().enumerate() {
        let path = cf_path(cf_dir, i, n);
        let _ = write!(s, "\n# {}\n", path.display());
        if n > 1 {
            let _ = writeln!(
                s,
                "# (on the relay that reads {server}: name this file in its main.cf)"
            );
        }
        s.push_str(&memcache_cf(server, &config.memcache_prefix));
    }
    if config.ipv6_prefix < 128 {
        let _ = write!(
            s,
            "\n# ipv6-prefix {}: a login grants its /{}; the map and memcached hold the\n# keys Postfix tries for it, the policy service and socketmap match it.\n",
            config.ipv6_prefix, config.ipv6_prefix
        );
    }
    s
}
