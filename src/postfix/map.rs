//! Sinks: keep Postfix's view in step with the grant table.
//!
//! Consumes: the grant table's changes, as the follow loop
//! ([`crate::grants::follow`]) hands them to the map's [`Sink`], and its
//! sorted set of live addresses for a full rewrite.
//! Produces: the Postfix access map: a source file of `ADDRESS OK` lines at
//! `--map`, and the database built from it with the real `postmap`.
//! Trusts: the table (its addresses passed the matchers and the never-grant
//! rules) and the `postmap` command it was configured with.
//!
//! Updates are atomic. The new source is written to a hidden file beside the
//! map, `postmap` builds the database from that file, and the database and
//! then the source are renamed over the old ones, so Postfix never opens an
//! empty or half-written database and an interrupted run leaves the old map
//! in place. Postfix's smtpd notices a changed hash map only when the file's
//! modification time, in whole seconds, differs from the one it opened; a
//! rebuild within the same second as the previous one therefore gets its
//! modification time moved one second past the previous one, so no change
//! goes unnoticed.
//!
//! The sink rewrites the map only when the set of addresses changed, never
//! more than one rebuild at a time; logins that arrive during a rebuild are
//! all picked up by the next one. It keeps a sorted copy of the addresses
//! the database holds (nothing else of the grants), so that a small change
//! is applied with `postmap -i`/`-d`. The first write fails the start; a
//! later failing `postmap` is logged with its stderr at every try and
//! retried with backoff (1 s doubling to 60 s) by the follow loop; the
//! table, which is the source of truth, is never touched by a failure.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Default postmap command (looked up in PATH).
pub const DEFAULT_POSTMAP: &str = "postmap";

/// The directory a file is created in (`.` for a bare file name).
pub fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

use std::collections::HashMap;

use crate::grants::addr::Cidr;
use crate::grants::follow::{Counters, Feed, Live, Reports, Retry, Sink};
use crate::grants::table::{Change, GrantTable};
use crate::stats::Stats;

/// The Postfix lookup table types the daemon can build atomically: one
/// database file each, built by `postmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    /// Berkeley DB hash (`hash:`), Debian's default.
    Hash,
    /// Berkeley DB btree (`btree:`).
    Btree,
    /// LMDB (`lmdb:`).
    Lmdb,
    /// CDB (`cdb:`).
    Cdb,
}

impl MapType {
    /// Parses a type name as Postfix writes it.
    pub fn parse(s: &str) -> Option<MapType> {
        Some(match s {
            "hash" => MapType::Hash,
            "btree" => MapType::Btree,
            "lmdb" => MapType::Lmdb,
            "cdb" => MapType::Cdb,
            _ => return None,
        })
    }

    /// The type name as Postfix writes it.
    pub fn name(self) -> &'static str {
        match self {
            MapType::Hash => "hash",
            MapType::Btree => "btree",
            MapType::Lmdb => "lmdb",
            MapType::Cdb => "cdb",
        }
    }

    /// The suffix `postmap` appends for the database file.
    pub fn suffix(self) -> &'static str {
        match self {
            MapType::Hash | MapType::Btree => "db",
            MapType::Lmdb => "lmdb",
            MapType::Cdb => "cdb",
        }
    }
}

/// The Postfix access map and how to build it.
#[derive(Clone, Debug)]
pub struct PostfixMap {
    /// The source file, e.g. `/var/lib/smtp-after-popd/authenticated_ips`.
    pub path: PathBuf,
    /// The database type.
    pub map_type: MapType,
    /// The `postmap` command.
    pub postmap: PathBuf,
    /// A Postfix configuration directory to run `postmap` with
    /// (`MAIL_CONFIG`), when the host has none of its own; see
    /// [`PostfixMap::use_defaults_without_main_cf`].
    pub mail_config: Option<PathBuf>,
    /// Whether small changes may be applied to a copy of the database
    /// (`postmap -i`/`-d`) instead of a full rebuild; on by default, off
    /// only to measure the difference.
    pub incremental: bool,
}

/// A failed map update.
pub use crate::grants::follow::SinkError;

/// How long one `postmap` run may take before it is killed and retried.
const POSTMAP_TIMEOUT: Duration = Duration::from_secs(60);

impl PostfixMap {
    /// The database file Postfix opens, e.g. `authenticated_ips.db`.
    pub fn database_path(&self) -> PathBuf {
        with_suffix(&self.path, self.map_type.suffix())
    }

    /// `postmap` needs a Postfix configuration (`main.cf`), which a host
    /// that only keeps the map (or a fresh machine trying the quick start)
    /// may not have. Unless `MAIL_CONFIG` is set, the daemon runs
    /// `postmap` with a configuration directory of its own next to the
    /// map, `.smtp-after-popd-postfix`, whose `main.cf` is a link to
    /// `/etc/postfix/main.cf` when the host has one (so postmap reads the
    /// same settings), and otherwise an empty file (Postfix's built-in
    /// defaults). Either way `MAIL_CONFIG=DIR/.smtp-after-popd-postfix
    /// postmap -q ADDRESS TYPE:MAP` looks the map up as the daemon built
    /// it. Returns the directory used, if any, and whether it stands in
    /// for a missing main.cf.
    pub fn use_own_mail_config(&mut self) -> std::io::Result<Option<(PathBuf, bool)>> {
        if std::env::var_os("MAIL_CONFIG").is_some() {
            return Ok(None);
        }
        let system = Path::new("/etc/postfix/main.cf");
        let has_main_cf = system.exists();
        let dir = dir_of(&self.path).join(".smtp-after-popd-postfix");
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let main_cf = dir.join("main.cf");
        let current = std::fs::symlink_metadata(&main_cf).ok();
        let right = match &current {
            None => false,
            Some(m) if has_main_cf => {
                m.file_type().is_symlink()
                    && std::fs::read_link(&main_cf).is_ok_and(|t| t == system)
            }
            Some(m) => m.file_type().is_file(),
        };
        if !right {
            if current.is_some() {
                std::fs::remove_file(&main_cf)?;
            }
            if has_main_cf {
                std::os::unix::fs::symlink(system, &main_cf)?;
            } else {
                std::fs::write(
                    &main_cf,
                    "# Written by smtp-after-popd: this host has no /etc/postfix/main.cf,\n\
                     # so postmap runs with Postfix's built-in defaults.\n",
                )?;
                // Postfix waits (up to about two seconds) for a main.cf
                // changed within the last second to settle; this one is
                // complete.
                std::fs::File::options()
                    .write(true)
                    .open(&main_cf)?
                    .set_modified(SystemTime::now() - Duration::from_secs(60))?;
            }
        }
        self.mail_config = Some(dir.clone());
        Ok(Some((dir, !has_main_cf)))
    }

    /// What to do about a failed update, when the failure is one a person
    /// must fix: a map type whose Debian package is missing, no `postmap`,
    /// a directory the daemon may not write.
    pub fn advice(&self, e: &SinkError) -> Option<String> {
        let text = e.0.as_str();
        if let Some(rest) = text.split("unsupported dictionary type: ").nth(1) {
            let ty: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let package = match ty.as_str() {
                "lmdb" => "postfix-lmdb",
                "cdb" => "postfix-cdb",
                _ => "",
            };
            return Some(if package.is_empty() {
                format!(
                    "this Postfix has no {ty} tables (postconf -m lists the types it has): choose another --map-type (hash needs only the postfix package)"
                )
            } else {
                format!(
                    "install the Debian package {package} (apt-get install {package}; postconf -m lists the types this Postfix has), or choose --map-type hash, which needs only the postfix package"
                )
            });
        }
        if text.starts_with("cannot run ") {
            if text.contains("(os error 2)") {
                return Some(if self.postmap == Path::new(DEFAULT_POSTMAP) {
                    "postmap is not installed, or not in PATH: install postfix (apt-get install postfix), or give postmap's path with --postmap".to_string()
                } else {
                    format!(
                        "--postmap {} does not exist: install postfix (apt-get install postfix), or give the path of postmap (usually /usr/sbin/postmap)",
                        self.postmap.display()
                    )
                });
            }
            if text.contains("(os error 13)") {
                return Some(format!(
                    "--postmap {} may not be run by this user: check its mode, or give the path of postmap (usually /usr/sbin/postmap)",
                    self.postmap.display()
                ));
            }
        }
        let dir = dir_of(&self.path);
        if text.contains("(os error 30)") || text.contains("Read-only file system") {
            return Some(format!(
                "{} is read-only for the daemon (under the packaged systemd unit only /var/lib/smtp-after-popd and /run/smtp-after-popd may be written): keep the map in /var/lib/smtp-after-popd",
                dir.display()
            ));
        }
        if text.contains("(os error 13)") || text.contains("Permission denied") {
            return Some(format!(
                "{} may not write in {}: give the directory to the daemon's user (chown), run the daemon as the directory's owner, or start it as root with --user smtp-after-popd",
                crate::service::privilege::describe_uid(crate::service::privilege::effective_uid()),
                dir.display()
            ));
        }
        None
    }

    fn temp_path(&self) -> PathBuf {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "map".into());
        self.path
            .with_file_name(format!(".{name}.smtp-after-popd.tmp"))
    }

    /// `KEY OK` lines for these blocks, without the header.
    fn render_entries(blocks: &[Cidr]) -> String {
        let mut s = String::with_capacity(blocks.len() * 20);
        for b in blocks {
            push_block(&mut s, b);
        }
        s
    }

    /// The map's source text for these addresses.
    pub fn render(addrs: &[IpAddr]) -> String {
        let blocks: Vec<Cidr> = addrs.iter().map(|a| Cidr::host(*a)).collect();
        Self::render_blocks(&blocks)
    }

    /// The map's source text for these blocks: one `KEY OK` line for each
    /// key Postfix tries for a block ([`crate::grants::addr::postfix_keys`]).
    pub fn render_blocks(blocks: &[Cidr]) -> String {
        let mut s = String::with_capacity(64 + blocks.len() * 20);
        s.push_str("# Written by smtp-after-popd; do not edit: changes are overwritten.\n");
        for b in blocks {
            push_block(&mut s, b);
        }
        s
    }

    /// Rewrites the map atomically with exactly these addresses.
    pub async fn write(&self, addrs: &[IpAddr]) -> Result<(), SinkError> {
        let blocks: Vec<Cidr> = addrs.iter().map(|a| Cidr::host(*a)).collect();
        self.write_with(&blocks, None).await
    }

    /// Rewrites the map atomically with exactly `blocks`, by applying
    /// `delta` (added, removed) to a copy of the current database when
    /// given, else by building the database afresh. Either way the new
    /// database and source are built aside and renamed into place.
    pub async fn write_with(
        &self,
        blocks: &[Cidr],
        delta: Option<(&[Cidr], &[Cidr])>,
    ) -> Result<(), SinkError> {
        let tmp = self.temp_path();
        let tmp_db = with_suffix(&tmp, self.map_type.suffix());
        let result = self.build(&tmp, &tmp_db, blocks, delta).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&tmp_db);
        }
        result
    }

    /// Whether this map type can be updated in place by `postmap -i` and
    /// `postmap -d` (cdb cannot; lmdb keeps a lock file beside the data,
    /// so it is always rebuilt).
    pub fn supports_incremental(&self) -> bool {
        matches!(self.map_type, MapType::Hash | MapType::Btree)
    }

    /// Runs postmap with `args`, feeding `input` on its standard input.
    async fn postmap(&self, args: &[&str], input: Option<String>) -> Result<(), SinkError> {
        use tokio::io::AsyncWriteExt;
        let shown = args.join(" ");
        let mut command = tokio::process::Command::new(&self.postmap);
        if let Some(dir) = &self.mail_config {
            command.env("MAIL_CONFIG", dir);
        }
        let mut child = command
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                SinkError(format!(
                    "cannot run {} {shown}: {e}",
                    self.postmap.display()
                ))
            })?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).await.map_err(|e| {
                SinkError(format!(
                    "{} {shown}: writing its input: {e}",
                    self.postmap.display()
                ))
            })?;
        }
        let out = tokio::time::timeout(POSTMAP_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                SinkError(format!(
                    "{} {shown} took longer than 60 s and was killed",
                    self.postmap.display()
                ))
            })?
            .map_err(|e| SinkError(format!("{} {shown}: {e}", self.postmap.display())))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(SinkError(format!(
                "{} {shown} failed ({}): {}",
                self.postmap.display(),
                out.status,
                stderr.trim()
            )));
        }
        Ok(())
    }

    async fn build(
        &self,
        tmp: &Path,
        tmp_db: &Path,
        blocks: &[Cidr],
        delta: Option<(&[Cidr], &[Cidr])>,
    ) -> Result<(), SinkError> {
        // Streamed into the page cache here, a chunk at a time (never the
        // whole text in memory); synced aside, as that is what waits.
        let file = write_source(tmp, blocks)
            .map_err(|e| SinkError(format!("cannot write {}: {e}", tmp.display())))?;
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| SinkError(format!("writing {}: {e}", tmp.display())))?
            .map_err(|e| SinkError(format!("cannot write {}: {e}", tmp.display())))?;

        let arg = format!("{}:{}", self.map_type.name(), tmp.display());
        match delta {
            None => self.postmap(&[&arg], None).await?,
            Some((added, removed)) => {
                // A copy of the database Postfix is reading, changed aside:
                // postmap -i and -d work in place, and in place is not
                // where Postfix should see a change happen.
                let db = self.database_path();
                let (from, to) = (db.clone(), tmp_db.to_path_buf());
                tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_file(&to);
                    std::fs::copy(&from, &to)
                })
                .await
                .map_err(|e| SinkError(format!("copying {}: {e}", db.display())))?
                .map_err(|e| {
                    SinkError(format!(
                        "cannot copy {} to {}: {e}",
                        db.display(),
                        tmp_db.display()
                    ))
                })?;
                if !added.is_empty() {
                    self.postmap(&["-i", &arg], Some(Self::render_entries(added)))
                        .await?;
                }
                if !removed.is_empty() {
                    let keys: String = removed
                        .iter()
                        .flat_map(|b| crate::grants::addr::postfix_keys(b).unwrap_or_default())
                        .map(|k| k + "\n")
                        .collect();
                    self.postmap(&["-d", "-", &arg], Some(keys)).await?;
                }
            }
        }

        let db = self.database_path();
        bump_mtime_past(&db, tmp_db).map_err(|e| {
            SinkError(format!(
                "cannot set the modification time of {}: {e}",
                tmp_db.display()
            ))
        })?;
        std::fs::rename(tmp_db, &db).map_err(|e| {
            SinkError(format!(
                "cannot rename {} to {}: {e}",
                tmp_db.display(),
                db.display()
            ))
        })?;
        std::fs::rename(tmp, &self.path).map_err(|e| {
            SinkError(format!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                self.path.display()
            ))
        })?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Keeps the map in step with the table until the table is dropped.
    pub async fn run(
        self,
        table: Arc<GrantTable>,
        stats: Arc<Stats>,
        first_write: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) {
        self.run_reporting(table, stats, first_write, None).await;
    }

    /// [`PostfixMap::run`], also publishing the table generation each
    /// successful write made visible (for benchmarks and tests): the map
    /// as a [`Sink`] of the follow loop.
    pub async fn run_reporting(
        self,
        table: Arc<GrantTable>,
        stats: Arc<Stats>,
        first_write: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
        visible: Option<tokio::sync::watch::Sender<u64>>,
    ) {
        let feed = Feed::subscribe_coalescing(&table, MAP_QUEUE);
        let sink = MapSink {
            map: self,
            table: table.clone(),
            in_db: None,
            visible,
        };
        // Every rebuild, full or incremental, is one update.
        let counters = Counters {
            stats,
            writes: |s| &s.map_updates,
            failures: |s| &s.map_failures,
            refills: |s| &s.map_updates,
        };
        let reports = Reports {
            first_write,
            visible: None,
        };
        crate::grants::follow::follow(sink, table, feed, counters, reports).await;
    }
}

/// The map as a sink: rewritten only when the set of addresses changed,
/// never more than one rebuild at a time (logins that arrive during a
/// rebuild are all picked up by the next one).
struct MapSink {
    map: PostfixMap,
    table: Arc<GrantTable>,
    /// What the database holds, sorted, when we wrote it and know it (the
    /// addresses only: 18 bytes each).
    in_db: Option<Vec<Cidr>>,
    visible: Option<tokio::sync::watch::Sender<u64>>,
}

impl MapSink {
    /// Makes the map hold exactly `blocks` (sorted). A small change is
    /// applied to a copy of the database (postmap -i / -d), which costs
    /// little however large the table; a large one, or a database we did
    /// not write, is rebuilt from scratch. Returns the number of rebuilds.
    async fn write_set(&mut self, blocks: Vec<Cidr>) -> Result<u64, SinkError> {
        if self.in_db.as_ref() == Some(&blocks) {
            return Ok(0);
        }
        let started = tokio::time::Instant::now();
        let m = &self.map;
        let delta = match &self.in_db {
            Some(old)
                if m.incremental && m.supports_incremental() && m.database_path().exists() =>
            {
                let (added, removed) = diff(old, &blocks);
                (added.len() + removed.len() <= INCREMENTAL_MAX + blocks.len() / 4)
                    .then_some((added, removed))
            }
            _ => None,
        };
        // After a failure, trust only a full rebuild.
        self.in_db = None;
        let result = match &delta {
            Some((a, r)) => m.write_with(&blocks, Some((a, r))).await,
            None => m.write_with(&blocks, None).await,
        };
        result?;
        let (n, ms) = (blocks.len(), started.elapsed().as_millis());
        let plural = if n == 1 { "" } else { "es" };
        let (ty, path) = (m.map_type.name(), m.path.display());
        match &delta {
            Some((a, r)) => crate::log_info!(
                "map {ty}:{path} updated (+{} -{}) to {n} address{plural} in {ms} ms",
                a.len(),
                r.len()
            ),
            None => {
                crate::log_info!("map {ty}:{path} rewritten with {n} address{plural} in {ms} ms")
            }
        }
        self.in_db = Some(blocks);
        Ok(1)
    }

    fn publish(&self, generation: u64) {
        if let Some(v) = &self.visible {
            v.send_replace(generation);
        }
    }
}

impl Sink for MapSink {
    fn name(&self) -> String {
        format!(
            "map {}:{}",
            self.map.map_type.name(),
            self.map.path.display()
        )
    }

    async fn refill(&mut self, _live: &[Live]) -> Result<u64, SinkError> {
        let (generation, blocks) = self.table.blocks();
        let n = self.write_set(blocks).await?;
        self.publish(generation);
        Ok(n)
    }

    async fn apply(&mut self, changes: &[Change]) -> Result<u64, SinkError> {
        let Some(old) = &self.in_db else {
            return Err(SinkError("the map's contents are unknown".into()));
        };
        let new = patch(old, changes);
        self.write_set(new).await
    }

    fn reads_table(&self) -> bool {
        true
    }

    fn first_failure_ends(&self) -> bool {
        true
    }

    fn written(&mut self, generation: u64) {
        self.publish(generation);
    }

    fn retry(&self) -> Retry {
        Retry {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
            // Every failure is logged, with when the next try is.
            log_every: Duration::ZERO,
        }
    }

    fn explain(&self, e: &SinkError) -> String {
        match self.map.advice(e) {
            Some(a) => format!("{e}; {a}"),
            None => e.to_string(),
        }
    }

    fn failure_line(&self, e: &SinkError, retry_in: Duration, _: Option<Duration>) -> String {
        format!(
            "{} not updated: {}; the grants are kept, retrying in {} s",
            self.name(),
            self.explain(e),
            retry_in.as_secs()
        )
    }

    fn refilled_line(&self, _: usize, _: u128) -> Option<String> {
        None
    }
}

/// Sorted `old` with `changes` applied in order (the last change of a
/// block wins): what the table holds after them.
fn patch(old: &[Cidr], changes: &[Change]) -> Vec<Cidr> {
    let mut last: HashMap<Cidr, bool> = HashMap::with_capacity(changes.len());
    for c in changes {
        match c {
            Change::Grant(k, _) => last.insert(*k, true),
            Change::Revoke(k) | Change::Expire(k) => last.insert(*k, false),
        };
    }
    let mut added: Vec<Cidr> = last
        .iter()
        .filter(|(k, present)| **present && old.binary_search(k).is_err())
        .map(|(k, _)| *k)
        .collect();
    added.sort_unstable();
    let kept = old.iter().filter(|k| last.get(k) != Some(&false));
    let mut new = Vec::with_capacity(old.len() + added.len());
    let mut added = added.into_iter().peekable();
    for k in kept {
        while let Some(a) = added.next_if(|a| a < k) {
            new.push(a);
        }
        new.push(*k);
    }
    new.extend(added);
    new
}

/// Appends a `KEY OK` line for each key of a block: the address for one
/// address, the keys Postfix tries for a prefix (none when it has none).
fn push_block(s: &mut String, b: &Cidr) {
    if b.is_host() {
        return push_entry(s, &b.addr());
    }
    for key in crate::grants::addr::postfix_keys(b).unwrap_or_default() {
        let _ = writeln!(s, "{key} OK");
    }
}

/// Appends `ADDRESS OK` and a newline. IPv4 addresses, nearly all of a
/// large map, are formatted by hand: the map is rewritten often, and the
/// general formatter was a third of an incremental update's time.
fn push_entry(s: &mut String, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                let o = *octet;
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + (o / 10) % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s.push_str(" OK\n");
        }
        IpAddr::V6(_) => {
            let _ = writeln!(s, "{ip} OK");
        }
    }
}

/// Most changes waiting for the map while it is rebuilt; past it the next
/// write reads the whole set from the table, as a large change would.
const MAP_QUEUE: usize = 16_384;

/// Changes up to this many (plus a quarter of the table) are applied
/// incrementally; more are rebuilt.
const INCREMENTAL_MAX: usize = 10_000;

/// What to add to and remove from sorted `old` to get sorted `new`.
fn diff<T: Ord + Copy>(old: &[T], new: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                removed.push(*a);
                i += 1;
            }
            (Some(_), Some(b)) => {
                added.push(*b);
                j += 1;
            }
            (Some(a), None) => {
                removed.push(*a);
                i += 1;
            }
            (None, Some(b)) => {
                added.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (added, removed)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes the map's source text for `blocks` to a new file at `path`
/// (what [`PostfixMap::render_blocks`] returns, in chunks of about
/// 64 KiB); returns the file, written but not yet synced.
fn write_source(path: &Path, blocks: &[Cidr]) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 64 * 1024;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    let mut s = PostfixMap::render_blocks(&[]);
    s.reserve(CHUNK + 1024);
    for b in blocks {
        push_block(&mut s, b);
        if s.len() >= CHUNK {
            f.write_all(s.as_bytes())?;
            s.clear();
        }
    }
    f.write_all(s.as_bytes())?;
    Ok(f)
}

/// Makes `new`'s modification time at least one whole second later than
/// `old`'s, so that Postfix, which compares whole seconds, sees the change.
fn bump_mtime_past(old: &Path, new: &Path) -> std::io::Result<()> {
    let Ok(old_meta) = std::fs::metadata(old) else {
        return Ok(());
    };
    let old_secs = secs(old_meta.modified()?);
    let new_secs = secs(std::fs::metadata(new)?.modified()?);
    if new_secs <= old_secs {
        let f = std::fs::File::options().write(true).open(new)?;
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(old_secs + 1))?;
        f.sync_all()?;
    }
    Ok(())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_addresses() {
        let addrs: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let s = PostfixMap::render(&addrs);
        assert!(s.starts_with('#'));
        assert!(s.contains("\n192.0.2.7 OK\n2001:db8::1 OK\n"));
    }

    #[test]
    fn database_path_has_type_suffix() {
        let m = PostfixMap {
            path: "/etc/postfix/authenticated_ips".into(),
            map_type: MapType::Lmdb,
            postmap: "postmap".into(),
            mail_config: None,
            incremental: true,
        };
        assert_eq!(
            m.database_path(),
            PathBuf::from("/etc/postfix/authenticated_ips.lmdb")
        );
    }

    #[test]
    fn mtime_is_bumped_past_the_old_database() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        let new = dir.path().join("new");
        std::fs::write(&old, "a").unwrap();
        std::fs::write(&new, "b").unwrap();
        bump_mtime_past(&old, &new).unwrap();
        let o = secs(std::fs::metadata(&old).unwrap().modified().unwrap());
        let n = secs(std::fs::metadata(&new).unwrap().modified().unwrap());
        assert!(n > o);
    }

    #[test]
    fn diff_of_sorted_address_lists() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let old = [ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.4")];
        let new = [
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
            ip("192.0.2.5"),
        ];
        let (a, r) = diff(&old, &new);
        assert_eq!(a, [ip("192.0.2.3"), ip("192.0.2.5")]);
        assert_eq!(r, [ip("192.0.2.1")]);
        assert_eq!(diff::<IpAddr>(&[], &[]), (vec![], vec![]));
    }

    #[test]
    fn patch_applies_changes_in_order_to_the_sorted_set() {
        use crate::grants::table::Grant;
        let c = |s: &str| Cidr::host(s.parse().unwrap());
        let g = Grant {
            expires: tokio::time::Instant::now(),
            server: "dovecot".into(),
            service: crate::recognise::matcher::Service::Imap,
            user: "u".into(),
            reporter: "r".into(),
            host: "h".into(),
        };
        let old = [c("192.0.2.2"), c("192.0.2.4"), c("192.0.2.6")];
        let changes = [
            Change::Grant(c("192.0.2.9"), g.clone()),
            Change::Grant(c("192.0.2.1"), g.clone()),
            Change::Revoke(c("192.0.2.4")),
            // Renewed: still there once.
            Change::Grant(c("192.0.2.2"), g.clone()),
            // Granted, then gone: the last change wins.
            Change::Grant(c("192.0.2.5"), g.clone()),
            Change::Expire(c("192.0.2.5")),
            // Gone, then back.
            Change::Expire(c("192.0.2.6")),
            Change::Grant(c("192.0.2.6"), g),
            // Not there: nothing to remove.
            Change::Revoke(c("192.0.2.8")),
        ];
        let want = [
            c("192.0.2.1"),
            c("192.0.2.2"),
            c("192.0.2.6"),
            c("192.0.2.9"),
        ];
        assert_eq!(patch(&old, &changes), want);
        assert_eq!(patch(&[], &[]), Vec::<Cidr>::new());
    }

    #[test]
    fn hand_formatted_ipv4_matches_the_standard_form() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.100.255.9",
            "255.255.255.255",
            "192.0.2.7",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut s = String::new();
            push_entry(&mut s, &ip);
            assert_eq!(s, format!("{text} OK\n"));
        }
        let mut s = String::new();
        push_entry(&mut s, &"2001:db8::2a".parse().unwrap());
        assert_eq!(s, "2001:db8::2a OK\n");
    }

    #[test]
    fn the_streamed_source_is_the_rendered_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src");
        let mut blocks: Vec<Cidr> = (0..20_000u32)
            .map(|i| Cidr::host(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | i))))
            .collect();
        blocks.push("2001:db8:1::/48".parse().unwrap());
        drop(write_source(&path, &blocks).unwrap());
        let want = PostfixMap::render_blocks(&blocks);
        assert!(want.len() > 4 * 64 * 1024);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
    }
}
