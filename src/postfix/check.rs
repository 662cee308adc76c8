//! What Postfix's own configuration says about this daemon's map: read at
//! start-up with `postconf`, so that a main.cf that looks up the map under
//! another path (and so fails every lookup with 451, or reads a map nobody
//! keeps) is reported with the line to change, before anyone's mail is
//! deferred.
//!
//! Consumes: `postconf -n -x` (main.cf, `$name` expanded) and `postconf -P
//! -x` (master.cf `-o` overrides) of the Postfix configuration in
//! `MAIL_CONFIG`, else `/etc/postfix`; the text of main.cf and master.cf,
//! only to name the line; the memcache_table(5) files that main.cf names;
//! the map, socketmaps and memcached servers this daemon serves.
//! Produces: findings to log: a warning for each lookup of a map named
//! like ours (`authenticated_ips`, or our map's file name) that this
//! daemon does not keep, or keeps with another type; for a `memcache:`
//! table of ours (its file or its keys named smtp-after-popd, or its
//! server one the daemon writes), a warning when its `key_format` is not
//! the daemon's keys or it sets `domain` or `backup`, and a notice when
//! the daemon does not write its server; a notice when Postfix consults
//! neither our map nor one of our memcached tables.
//! Trusts: Postfix's configuration, which is the administrator's. No
//! postconf, or no main.cf, means there is nothing to check: not an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::postfix::map::PostfixMap;

/// The file name the documentation gives the map.
const MAP_NAME: &str = "authenticated_ips";

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Postfix looks up something this daemon does not keep.
    Warning,
    /// Postfix does not consult the daemon's map at all.
    Notice,
}

/// One thing worth telling the administrator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How serious it is.
    pub level: Level,
    /// The message, naming the file, the line and what to change.
    pub text: String,
}

/// What this daemon serves Postfix, to compare with what Postfix asks.
pub struct Served<'a> {
    /// The map, unless `--map none`.
    pub map: Option<&'a PostfixMap>,
    /// The socketmap sockets.
    pub socketmaps: Vec<PathBuf>,
    /// The memcached servers written (`--memcache`).
    pub memcache: &'a [crate::postfix::memcache::Server],
    /// Their key prefix (`--memcache-prefix`).
    pub memcache_prefix: &'a str,
}

/// Postfix's configuration directory as Postfix programs find it.
pub fn config_directory() -> PathBuf {
    std::env::var_os("MAIL_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/postfix"))
}

/// Runs `postconf ARGS` with a deadline; its standard output, or `None`
/// when it cannot be run or fails.
async fn postconf(args: &[&str]) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("postconf")
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads Postfix's configuration and compares it with what is served.
/// Returns nothing when there is no main.cf or no postconf.
pub async fn check(served: &Served<'_>) -> Vec<Finding> {
    let dir = config_directory();
    let main_cf = dir.join("main.cf");
    let Ok(main_text) = std::fs::read_to_string(&main_cf) else {
        crate::log_debug!(
            "no {}: Postfix's configuration not checked",
            main_cf.display()
        );
        return Vec::new();
    };
    let Some(main) = postconf(&["-n", "-x"]).await else {
        crate::log_debug!("postconf not found or failed: Postfix's configuration not checked");
        return Vec::new();
    };
    let raw = postconf(&["-n"]).await.unwrap_or_default();
    let master = postconf(&["-P", "-x"]).await.unwrap_or_default();
    let master_text = std::fs::read_to_string(dir.join("master.cf")).unwrap_or_default();
    // The memcache_table(5) files the lookups name (read before chroot by
    // Postfix, so absolute paths), None for one that cannot be read.
    let mut memcache_files = Vec::new();
    for (_, value) in params(&main).into_iter().chain(params(&master)) {
        for (_, lookup) in lookups(value) {
            if let Lookup::Memcache(path) = lookup
                && !memcache_files.iter().any(|(p, _)| p == path)
            {
                memcache_files.push((path.to_string(), std::fs::read_to_string(path).ok()));
            }
        }
    }
    findings(
        &Conf {
            dir: &dir,
            main_text: &main_text,
            main: &main,
            raw: &raw,
            master: &master,
            master_text: &master_text,
            memcache_files: &memcache_files,
        },
        served,
    )
}

/// Postfix's configuration as postconf printed it.
pub struct Conf<'a> {
    /// The configuration directory.
    pub dir: &'a Path,
    /// main.cf's text (for line numbers).
    pub main_text: &'a str,
    /// `postconf -n -x`.
    pub main: &'a str,
    /// `postconf -n` (not expanded).
    pub raw: &'a str,
    /// `postconf -P -x`.
    pub master: &'a str,
    /// master.cf's text (for line numbers).
    pub master_text: &'a str,
    /// The memcache_table(5) files named by `memcache:` lookups, with
    /// their text (None: it cannot be read).
    pub memcache_files: &'a [(String, Option<String>)],
}

/// `name = value` lines as postconf prints them.
fn params(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| {
            l.split_once(" = ")
                .or_else(|| l.strip_suffix(" =").map(|n| (n, "")))
        })
        .collect()
}

/// A table lookup in a Postfix value: `TYPE:NAME` (with any `proxy:`
/// prefix dropped).
#[derive(Debug, PartialEq, Eq)]
enum Lookup<'a> {
    /// A file-based table: its type and path.
    File(&'a str, &'a str),
    /// `socketmap:unix:PATH:NAME`.
    Socketmap(&'a str, &'a str),
    /// `memcache:PATH`, a memcache_table(5) file.
    Memcache(&'a str),
}

fn lookups(value: &str) -> Vec<(&str, Lookup<'_>)> {
    const FILE_TYPES: &[&str] = &["hash", "btree", "lmdb", "cdb", "dbm", "sdbm", "texthash"];
    let mut out = Vec::new();
    for token in value
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        let t = token.strip_prefix("proxy:").unwrap_or(token);
        if let Some(rest) = t.strip_prefix("socketmap:unix:")
            && let Some((path, name)) = rest.rsplit_once(':')
        {
            out.push((token, Lookup::Socketmap(path, name)));
            continue;
        }
        if let Some(path) = t.strip_prefix("memcache:")
            && !path.is_empty()
        {
            out.push((token, Lookup::Memcache(path)));
            continue;
        }
        if let Some((ty, path)) = t.split_once(':')
            && FILE_TYPES.contains(&ty)
            && !path.is_empty()
        {
            out.push((token, Lookup::File(ty, path)));
        }
    }
    out
}

/// The line of `text` (main.cf syntax) where parameter `name` is set last.
fn main_cf_line(text: &str, name: &str) -> Option<usize> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with(|c: char| c.is_whitespace() || c == '#') {
            continue;
        }
        if let Some((n, _)) = line.split_once('=')
            && n.trim() == name
        {
            found = Some(i + 1);
        }
    }
    found
}

/// The line of master.cf where service `name` of `kind` starts.
fn master_cf_line(text: &str, name: &str, kind: &str) -> Option<usize> {
    text.lines().enumerate().find_map(|(i, line)| {
        let mut f = line.split_whitespace();
        (!line.starts_with(|c: char| c.is_whitespace() || c == '#')
            && f.next() == Some(name)
            && f.next() == Some(kind))
        .then_some(i + 1)
    })
}

/// A path as the kernel would resolve it, as far as it exists.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// The findings for a configuration (separate from running postconf, so
/// that it can be tested on text).
pub fn findings(conf: &Conf<'_>, served: &Served<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut consulted = false;
    let mut memcache_consulted = false;
    for (at, token) in places(conf) {
        let Some((_, lookup)) = lookups(token).into_iter().next() else {
            continue;
        };
        match lookup {
            Lookup::File(ty, path) => {
                consulted |= map_lookup(&at, token, ty, path, served, &mut out);
            }
            Lookup::Socketmap(path, name) => {
                out.extend(socketmap_lookup(&at, token, path, name, served));
            }
            Lookup::Memcache(path) => {
                let text = conf
                    .memcache_files
                    .iter()
                    .find(|(p, _)| p == path)
                    .and_then(|(_, t)| t.as_deref());
                memcache_consulted |= memcache_table(&at, token, path, text, served, &mut out);
            }
        }
    }
    let main_cf = conf.dir.join("main.cf");
    let ours_text = served
        .map
        .map(|m| format!("{}:{}", m.map_type.name(), m.path.display()));
    if let (false, false, Some(text)) = (consulted, memcache_consulted, &ours_text) {
        out.push(Finding {
            level: Level::Notice,
            text: format!(
                "Postfix's {} does not look up {text}, so Postfix does not see the grants: add check_client_access {text} to smtpd_relay_restrictions, before reject_unauth_destination, then postfix reload",
                main_cf.display()
            ),
        });
    }
    out
}

/// Every lookup table Postfix's configuration names, with where it is
/// written (file, line, parameter or service).
fn places<'a>(conf: &Conf<'a>) -> Vec<(String, &'a str)> {
    let main_cf = conf.dir.join("main.cf");
    let master_cf = conf.dir.join("master.cf");
    let raw: Vec<(&str, &str)> = params(conf.raw);
    let mut places: Vec<(String, &str)> = Vec::new();
    for (name, value) in params(conf.main) {
        // A value that refers to another parameter ($name) is reported
        // where the lookup is written, not everywhere it is used.
        let written = raw
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(value, |(_, v)| *v);
        let line = main_cf_line(conf.main_text, name)
            .map(|l| format!(", line {l}"))
            .unwrap_or_default();
        let at = format!("{}{line} ({name})", main_cf.display());
        for (token, lookup) in lookups(value) {
            let name_in_raw = match &lookup {
                Lookup::File(_, p) => Path::new(p)
                    .file_name()
                    .is_some_and(|f| written.contains(&*f.to_string_lossy())),
                Lookup::Socketmap(p, _) | Lookup::Memcache(p) => written.contains(p),
            };
            if name_in_raw {
                places.push((at.clone(), token));
            }
        }
    }
    for (name, value) in params(conf.master) {
        let mut parts = name.splitn(3, '/');
        let (service, kind, param) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let line = master_cf_line(conf.master_text, service, kind)
            .map(|l| format!(", line {l}"))
            .unwrap_or_default();
        let at = format!(
            "{}{line} (service {service}/{kind}, -o {param})",
            master_cf.display()
        );
        for (token, _) in lookups(value) {
            places.push((at.clone(), token));
        }
    }

    places
}

/// A lookup of a file-based table: whether it is this daemon's map (of
/// the right type); a finding when it looks like ours but is not.
fn map_lookup(
    at: &str,
    token: &str,
    ty: &str,
    path: &str,
    served: &Served<'_>,
    out: &mut Vec<Finding>,
) -> bool {
    let ours = served.map.map(|m| (m.map_type.name(), resolved(&m.path)));
    let our_name = served
        .map
        .and_then(|m| m.path.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let ours_text = served
        .map
        .map(|m| format!("{}:{}", m.map_type.name(), m.path.display()));
    let mut consulted = false;
    let file = Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let same_path = ours
        .as_ref()
        .is_some_and(|(_, p)| *p == resolved(Path::new(path)));
    let like_ours = file == MAP_NAME || our_name.as_deref() == Some(file.as_str());
    match (&ours, &ours_text) {
                    (Some((our_ty, _)), Some(text)) if same_path => {
                        if *our_ty == ty {
                            consulted = true;
                        } else {
                            out.push(Finding {
                                level: Level::Warning,
                                text: format!(
                                    "Postfix's {at} looks up {token}, but this daemon builds that map as {text}: write {text} there instead (or start the daemon with --map-type {ty}), then postfix reload"
                                ),
                            });
                        }
                    }
                    (Some(_), Some(text)) if like_ours => out.push(Finding {
                        level: Level::Warning,
                        text: format!(
                            "Postfix's {at} looks up {token}, but this daemon writes {text}: write {text} there instead, then postfix reload (Postfix fails every lookup of a map that does not exist with 451, and a map nobody keeps up to date grants the wrong addresses)"
                        ),
                    }),
                    (None, _) if like_ours => out.push(Finding {
                        level: Level::Warning,
                        text: format!(
                            "Postfix's {at} looks up {token}, but this daemon writes no map (--map none): remove that lookup, or start the daemon with --map {path}"
                        ),
                    }),
                    _ => {}
                }
    consulted
}

/// A socketmap lookup of our map name that no socketmap served here
/// answers.
fn socketmap_lookup(
    at: &str,
    token: &str,
    path: &str,
    name: &str,
    served: &Served<'_>,
) -> Option<Finding> {
    if name != crate::postfix::socketmap::MAP_NAME {
        return None;
    }
    if served
        .socketmaps
        .iter()
        .any(|s| resolved(s) == resolved(Path::new(path)))
    {
        return None;
    }
    let serving = if served.socketmaps.is_empty() {
        "serves no socketmap (--socketmap)".to_string()
    } else {
        let list: Vec<String> = served
            .socketmaps
            .iter()
            .map(|p| format!("socketmap:unix:{}:{name}", p.display()))
            .collect();
        format!("serves {}", list.join(", "))
    };
    Some(Finding {
        level: Level::Warning,
        text: format!(
            "Postfix's {at} asks {token}, but this daemon {serving}: make the two agree, then postfix reload"
        ),
    })
}

/// A memcache_table(5) file's settings (`name = value`, continued on
/// indented lines, `#` comments).
fn cf_settings(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((n, v)) = line.split_once('=') {
            out.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Whether the server a memcache_table(5) file names (`memcache = ...`,
/// Postfix's default `inet:localhost:11211`) is `ours`.
fn same_server(theirs: &str, ours: &crate::postfix::memcache::Server) -> bool {
    use crate::postfix::memcache::Server;
    let Ok(theirs) = Server::parse(theirs) else {
        return false;
    };
    let local = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "::1");
    match (&theirs, ours) {
        (Server::Inet(a, p), Server::Inet(b, q)) => p == q && (a == b || (local(a) && local(b))),
        (Server::Unix(a), Server::Unix(b)) => resolved(a) == resolved(b),
        _ => false,
    }
}

/// Adds to `out` the findings for one `memcache:PATH` lookup at `at`,
/// given the file's text (None: it cannot be read); returns whether it is
/// a table this daemon writes, with its keys (so that Postfix sees the
/// grants).
fn memcache_table(
    at: &str,
    token: &str,
    path: &str,
    text: Option<&str>,
    served: &Served<'_>,
    out: &mut Vec<Finding>,
) -> bool {
    let named_ours = Path::new(path)
        .file_name()
        .is_some_and(|f| f.to_string_lossy().contains("smtp-after-popd"));
    let mut say = |level, text| out.push(Finding { level, text });
    let Some(text) = text else {
        // Postfix fails every lookup of a table that does not exist.
        if named_ours && !Path::new(path).exists() {
            say(
                Level::Warning,
                format!(
                    "Postfix's {at} looks up {token}, but {path} does not exist, so every lookup fails (451): write it (smtp-after-popd postfix-config prints it), then postfix reload"
                ),
            );
        }
        return false;
    };
    let settings = cf_settings(text);
    let get = |name: &str| {
        settings
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let server = get("memcache").unwrap_or("inet:localhost:11211");
    let key_format = get("key_format").unwrap_or("%s");
    let written = served.memcache.iter().any(|s| same_server(server, s));
    if !(named_ours || written || key_format.contains("smtp-after-popd")) {
        return false;
    }
    if served.memcache.is_empty() {
        say(
            Level::Notice,
            format!(
                "Postfix's {at} looks up {token} (memcached {server}), but this daemon writes to no memcached: unless another daemon writes the grants there, start this one with --memcache {server}, or remove that lookup"
            ),
        );
        return false;
    }
    for (name, why) in [
        (
            "domain",
            "it skips every key without @, which is every address, so nothing is ever granted",
        ),
        (
            "backup",
            "grants that expired in memcached would come back from it",
        ),
    ] {
        if get(name).is_some_and(|v| !v.is_empty()) {
            say(
                Level::Warning,
                format!(
                    "Postfix's {at} looks up {token}, whose {path} sets {name}: {why}; remove {name} from it, then postfix reload"
                ),
            );
        }
    }
    let want = format!("{}%s", served.memcache_prefix);
    if key_format != want {
        say(
            Level::Warning,
            format!(
                "Postfix's {at} looks up {token}, whose {path} has key_format = {key_format}, but this daemon writes keys {}ADDRESS, so no grant is found: set key_format = {want} there (smtp-after-popd postfix-config prints the file), then postfix reload",
                served.memcache_prefix
            ),
        );
        return false;
    }
    if !written {
        let list: Vec<String> = served.memcache.iter().map(ToString::to_string).collect();
        say(
            Level::Notice,
            format!(
                "Postfix's {at} looks up {token}, which reads memcached {server}, but this daemon writes {}: unless another daemon writes {server}, make the two agree",
                list.join(", ")
            ),
        );
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postfix::map::MapType;

    fn map(path: &str) -> PostfixMap {
        PostfixMap {
            path: path.into(),
            map_type: MapType::Hash,
            postmap: "postmap".into(),
            mail_config: None,
            incremental: true,
        }
    }

    fn run(main_text: &str, main: &str, raw: &str, master: &str, served: &Served) -> Vec<Finding> {
        run_with(main_text, main, raw, master, &[], served)
    }

    fn run_with(
        main_text: &str,
        main: &str,
        raw: &str,
        master: &str,
        memcache_files: &[(String, Option<String>)],
        served: &Served,
    ) -> Vec<Finding> {
        findings(
            &Conf {
                dir: Path::new("/etc/postfix"),
                main_text,
                main,
                raw,
                master,
                master_text: "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n  -o x=y\n",
                memcache_files,
            },
            served,
        )
    }

    #[test]
    fn a_lookup_under_another_path_is_reported_with_its_line() {
        let m = map("/nonexistent-sap/authenticated_ips");
        let served = Served {
            map: Some(&m),
            socketmaps: vec![],
            memcache: &[],
            memcache_prefix: "smtp-after-popd:",
        };
        let text = "# comment\nsmtpd_relay_restrictions = permit_mynetworks,\n    check_client_access hash:/etc/postfix/authenticated_ips,\n    reject_unauth_destination\n";
        let value = "permit_mynetworks, check_client_access hash:/etc/postfix/authenticated_ips, reject_unauth_destination";
        let line = format!("smtpd_relay_restrictions = {value}\n");
        let f = run(text, &line, &line, "", &served);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].level, Level::Warning);
        assert!(
            f[0].text.starts_with("Postfix's /etc/postfix/main.cf, line 2 (smtpd_relay_restrictions) looks up hash:/etc/postfix/authenticated_ips, but this daemon writes hash:/nonexistent-sap/authenticated_ips: write hash:/nonexistent-sap/authenticated_ips there instead"),
            "{}",
            f[0].text
        );
        assert_eq!(f[1].level, Level::Notice);
    }

    #[test]
    fn the_right_lookup_is_quiet_and_a_parameter_reference_is_reported_once() {
        let m = map("/nonexistent-sap/authenticated_ips");
        let served = Served {
            map: Some(&m),
            socketmaps: vec![],
            memcache: &[],
            memcache_prefix: "smtp-after-popd:",
        };
        let good = "smtpd_relay_restrictions = permit_mynetworks, check_client_access proxy:hash:/nonexistent-sap/authenticated_ips, reject_unauth_destination\n";
        assert!(run(good, good, good, "", &served).is_empty());
        // my_checks holds the lookup; smtpd_relay_restrictions uses it.
        let raw = "my_checks = lmdb:$dir/authenticated_ips\nsmtpd_relay_restrictions = check_client_access $my_checks\n";
        let expanded = "my_checks = lmdb:/nonexistent-sap/authenticated_ips\nsmtpd_relay_restrictions = check_client_access lmdb:/nonexistent-sap/authenticated_ips\n";
        let f = run(raw, expanded, raw, "", &served);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].text.starts_with("Postfix's /etc/postfix/main.cf, line 1 (my_checks) looks up lmdb:/nonexistent-sap/authenticated_ips, but this daemon builds that map as hash:"),
            "{}",
            f[0].text
        );
    }

    #[test]
    fn master_cf_overrides_socketmaps_and_no_map() {
        let served = Served {
            map: None,
            socketmaps: vec!["/nonexistent-sap/socketmap.sock".into()],
            memcache: &[],
            memcache_prefix: "smtp-after-popd:",
        };
        let master = "submission/inet/smtpd_relay_restrictions = check_client_access,hash:/etc/postfix/authenticated_ips\n";
        let main = "smtpd_relay_restrictions = check_client_access socketmap:unix:/elsewhere.sock:authenticated_ips, check_client_access socketmap:unix:/nonexistent-sap/socketmap.sock:authenticated_ips\n";
        let f = run(main, main, main, master, &served);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].text.contains("asks socketmap:unix:/elsewhere.sock:authenticated_ips, but this daemon serves socketmap:unix:/nonexistent-sap/socketmap.sock:authenticated_ips"), "{}", f[0].text);
        assert!(
            f[1].text.starts_with("Postfix's /etc/postfix/master.cf, line 2 (service submission/inet, -o smtpd_relay_restrictions) looks up hash:/etc/postfix/authenticated_ips, but this daemon writes no map (--map none)"),
            "{}",
            f[1].text
        );
    }

    #[test]
    fn memcache_tables_are_recognised_and_checked() {
        use crate::postfix::memcache::Server;
        let servers = [Server::Inet("127.0.0.1".into(), 11211)];
        let cf = "/etc/postfix/smtp-after-popd-memcache.cf".to_string();
        let good = crate::postfix::lines::memcache_cf(&servers[0], "smtp-after-popd:");
        let main = format!(
            "smtpd_relay_restrictions = permit_mynetworks, permit_auth_destination, check_client_access memcache:{cf}, reject_unauth_destination\n"
        );
        // The daemon writes memcached only (--map none), as postfix-config
        // says: nothing to report, and no notice that Postfix does not
        // look up a map.
        let memcache_only = Served {
            map: None,
            socketmaps: vec![],
            memcache: &servers,
            memcache_prefix: "smtp-after-popd:",
        };
        let files = [(cf.clone(), Some(good.clone()))];
        let f = run_with(&main, &main, &main, "", &files, &memcache_only);
        assert!(f.is_empty(), "{f:?}");
        // With a map too: Postfix sees the grants through memcached.
        let m = map("/nonexistent-sap/authenticated_ips");
        let both = Served {
            map: Some(&m),
            socketmaps: vec![],
            ..memcache_only
        };
        assert!(run_with(&main, &main, &main, "", &files, &both).is_empty());
        // Keys that are not the daemon's, domain and backup.
        let bad = "memcache = inet:localhost:11211\nkey_format = other:%s\ndomain = example.com\nbackup = inet:127.0.0.1:11212\n";
        let files = [(cf.clone(), Some(bad.to_string()))];
        let f = run_with(&main, &main, &main, "", &files, &memcache_only);
        let text: Vec<&str> = f.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(f.len(), 3, "{text:?}");
        assert!(
            text[0].contains("sets domain: it skips every key without @"),
            "{}",
            text[0]
        );
        assert!(
            text[1].contains("sets backup: grants that expired"),
            "{}",
            text[1]
        );
        assert!(
            text[2].contains("has key_format = other:%s, but this daemon writes keys smtp-after-popd:ADDRESS, so no grant is found: set key_format = smtp-after-popd:%s there"),
            "{}",
            text[2]
        );
        assert!(f.iter().all(|f| f.level == Level::Warning));
    }

    #[test]
    fn memcache_tables_of_others_or_missing_are_noticed() {
        use crate::postfix::memcache::Server;
        let servers = [Server::Inet("127.0.0.1".into(), 11211)];
        let cf = "/etc/postfix/smtp-after-popd-memcache.cf".to_string();
        let good = crate::postfix::lines::memcache_cf(&servers[0], "smtp-after-popd:");
        let main = format!(
            "smtpd_relay_restrictions = permit_mynetworks, permit_auth_destination, check_client_access memcache:{cf}, reject_unauth_destination\n"
        );
        // The daemon writes memcached only (--map none), as postfix-config
        // says: nothing to report, and no notice that Postfix does not
        // look up a map.
        let memcache_only = Served {
            map: None,
            socketmaps: vec![],
            memcache: &servers,
            memcache_prefix: "smtp-after-popd:",
        };
        let m = map("/nonexistent-sap/authenticated_ips");
        // A table of ours while the daemon writes no memcached: a notice
        // (another daemon may write it), beside the map's own check.
        let map_only = Served {
            map: Some(&m),
            socketmaps: vec![],
            memcache: &[],
            memcache_prefix: "smtp-after-popd:",
        };
        let files = [(cf.clone(), Some(good.clone()))];
        let f = run_with(&main, &main, &main, "", &files, &map_only);
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].level, Level::Notice);
        assert!(
            f[0].text.contains("but this daemon writes to no memcached"),
            "{}",
            f[0].text
        );
        // Another memcached than the daemon's: a notice.
        let elsewhere = "memcache = inet:192.0.2.5:11211\nkey_format = smtp-after-popd:%s\n";
        let files = [(cf.clone(), Some(elsewhere.to_string()))];
        let f = run_with(&main, &main, &main, "", &files, &memcache_only);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].level, Level::Notice);
        assert!(
            f[0].text.contains(
                "reads memcached inet:192.0.2.5:11211, but this daemon writes inet:127.0.0.1:11211"
            ),
            "{}",
            f[0].text
        );
        // A missing file of ours fails every lookup; a table of someone
        // else's is none of our business.
        let missing = "/nonexistent-sap/smtp-after-popd-memcache.cf";
        let main_missing = main.replace(&cf, missing);
        let files = [(missing.to_string(), None)];
        let f = run_with(
            &main_missing,
            &main_missing,
            &main_missing,
            "",
            &files,
            &memcache_only,
        );
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].text.contains("/nonexistent-sap/smtp-after-popd-memcache.cf does not exist, so every lookup fails (451)"), "{}", f[0].text);
        let theirs =
            "smtpd_relay_restrictions = check_client_access memcache:/etc/postfix/greylist.cf\n";
        let files = [(
            "/etc/postfix/greylist.cf".to_string(),
            Some("memcache = inet:192.0.2.9:11211\n".to_string()),
        )];
        assert!(run_with(theirs, theirs, theirs, "", &files, &memcache_only).is_empty());
    }
}
