//! Sinks: keep Postfix's view in step with the grant table.
//!
//! Consumes: the grant table's generation (a change signal) and its set of
//! live addresses.
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
//! all picked up by the next one. A failing `postmap` is logged with its
//! stderr and retried with backoff (1 s doubling to 60 s); the table, which
//! is the source of truth, is never touched by a failure.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::grants::GrantTable;
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
    /// The source file, e.g. `/etc/postfix/authenticated_ips`.
    pub path: PathBuf,
    /// The database type.
    pub map_type: MapType,
    /// The `postmap` command.
    pub postmap: PathBuf,
    /// A Postfix configuration directory to run `postmap` with
    /// (`MAIL_CONFIG`), when the host has none of its own; see
    /// [`PostfixMap::use_defaults_without_main_cf`].
    pub mail_config: Option<PathBuf>,
}

/// A failed map update.
#[derive(Debug)]
pub struct SinkError(pub String);

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How long one `postmap` run may take before it is killed and retried.
const POSTMAP_TIMEOUT: Duration = Duration::from_secs(60);

impl PostfixMap {
    /// The database file Postfix opens, e.g. `authenticated_ips.db`.
    pub fn database_path(&self) -> PathBuf {
        with_suffix(&self.path, self.map_type.suffix())
    }

    /// `postmap` refuses to run without a Postfix configuration
    /// (`/etc/postfix/main.cf`), which a host that only keeps the map (or a
    /// fresh machine trying the quick start) may not have. When neither
    /// `MAIL_CONFIG` is set nor that file exists, this gives `postmap` an
    /// empty configuration of its own next to the map, so that it builds
    /// the map with Postfix's built-in defaults, and says so. Returns the
    /// directory used, if any.
    pub fn use_defaults_without_main_cf(&mut self) -> std::io::Result<Option<PathBuf>> {
        if std::env::var_os("MAIL_CONFIG").is_some() || Path::new("/etc/postfix/main.cf").exists() {
            return Ok(None);
        }
        let parent = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = parent.join(".smtp-after-popd-postfix");
        std::fs::create_dir_all(&dir)?;
        let main_cf = dir.join("main.cf");
        if !main_cf.exists() {
            std::fs::write(
                &main_cf,
                "# Written by smtp-after-popd: this host has no /etc/postfix/main.cf,\n\
                 # so postmap runs with Postfix's built-in defaults.\n",
            )?;
        }
        self.mail_config = Some(dir.clone());
        Ok(Some(dir))
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

    /// The map's source text for these addresses.
    pub fn render(addrs: &[IpAddr]) -> String {
        let mut s = String::with_capacity(64 + addrs.len() * 20);
        s.push_str("# Written by smtp-after-popd; do not edit: changes are overwritten.\n");
        for ip in addrs {
            let _ = writeln!(s, "{ip} OK");
        }
        s
    }

    /// Rewrites the map atomically with exactly these addresses.
    pub async fn write(&self, addrs: &[IpAddr]) -> Result<(), SinkError> {
        let tmp = self.temp_path();
        let tmp_db = with_suffix(&tmp, self.map_type.suffix());
        let text = Self::render(addrs);
        let result = self.build(&tmp, &tmp_db, text).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&tmp_db);
        }
        result
    }

    async fn build(&self, tmp: &Path, tmp_db: &Path, text: String) -> Result<(), SinkError> {
        let tmp_owned = tmp.to_path_buf();
        tokio::task::spawn_blocking(move || write_synced(&tmp_owned, text.as_bytes()))
            .await
            .map_err(|e| SinkError(format!("writing {}: {e}", tmp.display())))?
            .map_err(|e| SinkError(format!("cannot write {}: {e}", tmp.display())))?;

        let arg = format!("{}:{}", self.map_type.name(), tmp.display());
        let mut command = tokio::process::Command::new(&self.postmap);
        if let Some(dir) = &self.mail_config {
            command.env("MAIL_CONFIG", dir);
        }
        let child = command
            .arg(&arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SinkError(format!("cannot run {} {arg}: {e}", self.postmap.display())))?;
        let out = tokio::time::timeout(POSTMAP_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                SinkError(format!(
                    "{} {arg} took longer than 60 s and was killed",
                    self.postmap.display()
                ))
            })?
            .map_err(|e| SinkError(format!("{} {arg}: {e}", self.postmap.display())))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(SinkError(format!(
                "{} {arg} failed ({}): {}",
                self.postmap.display(),
                out.status,
                stderr.trim()
            )));
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
        first_write: Option<tokio::sync::oneshot::Sender<bool>>,
    ) {
        let mut changes = table.subscribe();
        let mut written: Option<u64> = None;
        let mut backoff = Duration::from_secs(1);
        let mut first_write = first_write;
        loop {
            let (generation, addrs) = table.addresses();
            if written != Some(generation) {
                let started = tokio::time::Instant::now();
                match self.write(&addrs).await {
                    Ok(()) => {
                        Stats::bump(&stats.map_updates);
                        written = Some(generation);
                        backoff = Duration::from_secs(1);
                        crate::log_info!(
                            "map {}:{} rewritten with {} address{} in {} ms",
                            self.map_type.name(),
                            self.path.display(),
                            addrs.len(),
                            if addrs.len() == 1 { "" } else { "es" },
                            started.elapsed().as_millis()
                        );
                        if let Some(tx) = first_write.take() {
                            let _ = tx.send(true);
                        }
                    }
                    Err(e) => {
                        Stats::bump(&stats.map_failures);
                        crate::log_error!(
                            "map {}:{} not updated: {e}; the grants are kept, retrying in {} s",
                            self.map_type.name(),
                            self.path.display(),
                            backoff.as_secs()
                        );
                        if let Some(tx) = first_write.take() {
                            let _ = tx.send(false);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
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
}
