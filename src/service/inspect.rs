//! `smtp-after-popd match FILE...`: what the daemon would do with each
//! line of a mail log, in the spirit of fail2ban-regex.
//!
//! Consumes: log files (standard input when none is named), one syslog
//! line per line as rsyslog writes `/var/log/mail.log`; with `--config`,
//! the file's `[[pattern]]` tables, `never` and `trusted-proxy` (else the
//! defaults).
//! Produces: on standard output, one verdict line for each line a pattern
//! (or the attestation rules) recognised, then a summary (lines starting
//! `# `). See [`run`] for the format and the exit status.
//! Trusts: nothing in the lines. Each line goes through the daemon's own
//! [`decide`], on a unix-socket listener not declared attested, with
//! `require-attestation` off: a file carries no transport credential, so
//! the sender check is not made (every line is taken as written by its
//! pattern's own process), and a line that carries an attestation
//! element is refused as a forgery, as the daemon refuses it there.
//! Every other rule is the daemon's: two-line pairing (by the order of
//! the lines), cut lines, ambiguity, the address rules.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::grants::addr::AddressPolicy;
use crate::ingest::receiver::Peer;
use crate::logging::escape;
use crate::recognise::matcher::{AddressMemory, CutLines, Login};
use crate::recognise::pipeline::{Decided, Decision, Settings, Transport, decide};
use crate::service::config::EX_CONFIG;

/// Exit status when an input cannot be read (sysexits.h EX_NOINPUT).
pub const EX_NOINPUT: i32 = 66;
/// Exit status when the verdicts cannot be written (EX_IOERR).
pub const EX_IOERR: i32 = 74;

/// What `match` says about attestation, first line of its summary.
pub const ASSUMED: &str = "attestation not checked: a file carries no sender credential, so each line is judged as if its pattern's own process sent it (on a listener not declared attested, require-attestation off)";

/// The counts the summary gives.
#[derive(Default)]
struct Summary {
    lines: u64,
    recognised: BTreeMap<String, u64>,
    granted: u64,
    refused: BTreeMap<&'static str, u64>,
    remembered: u64,
    logouts: u64,
    unmatched: BTreeMap<String, u64>,
    not_syslog: u64,
}

/// Runs `match` on `files` (standard input when empty), with the rules of
/// `config` (the defaults without one). Prints, for each recognised line,
/// tab-separated: VERDICT (`grant`, `refused`, `remembered` for the
/// address line of a two-line server, `logout`), ADDRESS, SERVER,
/// SERVICE, USER, PATTERN, FILE:LINE and, for `refused`, REASON: DETAIL
/// (`-` for a field the line does not give); then the summary. Returns
/// the exit status: 0 when every input was read (whatever the verdicts),
/// 66 when one could not be, 78 for a bad configuration, 74 when standard
/// output fails.
pub fn run(config: Option<PathBuf>, files: Vec<PathBuf>) -> i32 {
    let settings = match settings(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            crate::logging::write(crate::logging::Level::Fatal, format_args!("{e}"));
            return EX_CONFIG;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut scan = Scan {
        settings,
        memory: AddressMemory::new(),
        cut: CutLines::new(),
        peer: Peer::Unix(Arc::from("match")),
        summary: Summary::default(),
    };
    let mut status = 0;
    let mut read = |name: &str, reader: &mut dyn BufRead, out: &mut dyn Write| {
        scan.read(name, reader, out).map_err(|e| {
            crate::log_error!("{name}: {e}");
        })
    };
    if files.is_empty() && read("-", &mut std::io::stdin().lock(), &mut out).is_err() {
        status = EX_NOINPUT;
    }
    for f in &files {
        match std::fs::File::open(f) {
            Ok(file) => {
                let name = f.display().to_string();
                if read(&name, &mut std::io::BufReader::new(file), &mut out).is_err() {
                    status = EX_NOINPUT;
                }
            }
            Err(e) => {
                crate::log_error!("cannot open {}: {e}", f.display());
                status = EX_NOINPUT;
            }
        }
    }
    if scan.summary.write(&mut out).is_err() || out.flush().is_err() {
        return EX_IOERR;
    }
    status
}

/// The daemon's reloadable settings as `match` uses them.
fn settings(config: Option<&Path>) -> Result<Settings, crate::service::config::ConfigError> {
    let (matchers, never, trusted_proxy) = crate::service::config::match_rules(config)?;
    let mut no_grant = never;
    no_grant.extend(trusted_proxy.iter().copied());
    Ok(Settings {
        matchers,
        policy: AddressPolicy::new(no_grant),
        window: Duration::from_secs(120),
        require_attestation: false,
        trust_attestation_from: Vec::new(),
        trusted_proxy,
        hold_while_connected: false,
        hold_max: Duration::from_secs(3600),
    })
}

/// The state of one `match` run.
struct Scan {
    settings: Settings,
    memory: AddressMemory,
    cut: CutLines,
    peer: Peer,
    summary: Summary,
}

impl Scan {
    /// Judges every line of `reader`, printing verdicts to `out`.
    fn read(
        &mut self,
        name: &str,
        reader: &mut dyn BufRead,
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        let mut line = Vec::new();
        let mut n = 0u64;
        // Lines of a file carry no receive time: pairing is by order.
        let now = tokio::time::Instant::now();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            n += 1;
            self.summary.lines += 1;
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let transport = Transport {
                peer: &self.peer,
                attested: false,
            };
            let d = decide(
                &self.settings,
                &self.memory,
                &self.cut,
                text,
                transport,
                now,
            );
            // A line the prefilter skipped may still be one of a known
            // program's that no pattern recognised: the summary counts it.
            if matches!(d.decision, Decision::Skipped) {
                self.count_skipped(text);
            }
            if let Some(v) = self.summary.count(&self.settings, &d) {
                writeln!(out, "{v}\t{name}:{n}{}", reason_of(&d.decision))?;
            }
        }
    }
}

impl Scan {
    /// Counts a line the prefilter skipped among the lines of a known
    /// program that no pattern matched, if it is one: by the tag where it
    /// stands, else by parsing the record.
    fn count_skipped(&mut self, text: &[u8]) {
        let m = &self.settings.matchers;
        if !m.may_name_program(text) {
            return;
        }
        let program = match m.program_at_tag(text) {
            Some(p) => p,
            None => match crate::ingest::record::parse(text) {
                Ok(rec) if m.knows_program(rec.program) => rec.program,
                _ => return,
            },
        };
        match self.summary.unmatched.get_mut(program) {
            Some(n) => *n += 1,
            None => {
                self.summary.unmatched.insert(program.to_string(), 1);
            }
        }
    }
}

impl Summary {
    /// Counts a decision; returns its verdict line's fields up to the
    /// pattern, for a recognised line.
    fn count(&mut self, s: &Settings, d: &Decided<'_>) -> Option<String> {
        let (verdict, fields, pattern): (&str, Fields, Option<&str>) = match &d.decision {
            Decision::Skipped => return None,
            Decision::Dropped(_) => {
                self.not_syslog += 1;
                return None;
            }
            Decision::NoMatch => {
                if let Some(rec) = &d.rec
                    && s.matchers.knows_program(rec.program)
                {
                    *self.unmatched.entry(rec.program.to_string()).or_default() += 1;
                }
                return None;
            }
            Decision::Remembered { pattern } => {
                self.remembered += 1;
                ("remembered", Fields::default(), Some(pattern))
            }
            Decision::Logout(l) => {
                self.logouts += 1;
                let fields = Fields {
                    ip: l
                        .ip
                        .map(|ip| crate::grants::addr::canonical(ip).to_string()),
                    server: Some(l.server.to_string()),
                    service: None,
                    user: Some(l.user.clone()),
                };
                ("logout", fields, Some(&*l.pattern))
            }
            Decision::Grant(a) => {
                self.granted += 1;
                let mut fields = Fields::of(&a.login);
                fields.ip = Some(a.block.shown());
                ("grant", fields, Some(&*a.login.pattern))
            }
            Decision::Refused(r) => {
                *self.refused.entry(r.reason()).or_default() += 1;
                let fields = r.login().map(Fields::of).unwrap_or_default();
                ("refused", fields, r.pattern())
            }
        };
        // Refused before any pattern: an attestation element, a cut line.
        let key = pattern.unwrap_or("no pattern");
        *self.recognised.entry(key.to_string()).or_default() += 1;
        Some(format!("{verdict}\t{fields}\t{}", pattern.unwrap_or("-")))
    }

    /// The summary, each line starting `# `.
    fn write(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let total = |m: &mut dyn Iterator<Item = &u64>| m.sum::<u64>();
        let list = |m: Vec<(String, u64)>| {
            let v: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
            if v.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.join(", "))
            }
        };
        let owned = |m: &BTreeMap<String, u64>| m.iter().map(|(k, n)| (k.clone(), *n)).collect();
        let reasons = self.refused.iter().map(|(k, n)| (k.to_string(), *n));
        writeln!(out, "# {ASSUMED}")?;
        writeln!(out, "# lines read: {}", self.lines)?;
        writeln!(
            out,
            "# recognised: {}{}",
            total(&mut self.recognised.values()),
            list(owned(&self.recognised))
        )?;
        writeln!(out, "# granted: {}", self.granted)?;
        writeln!(
            out,
            "# refused: {}{}",
            total(&mut self.refused.values()),
            list(reasons.collect())
        )?;
        writeln!(out, "# address lines remembered: {}", self.remembered)?;
        writeln!(out, "# logout lines: {}", self.logouts)?;
        writeln!(
            out,
            "# lines of a known program that no pattern matched: {}{}",
            total(&mut self.unmatched.values()),
            list(owned(&self.unmatched))
        )?;
        writeln!(
            out,
            "# lines that are no syslog record (no program tag, too long, not UTF-8): {}",
            self.not_syslog
        )
    }
}

/// The refusal column of a verdict line: `\tREASON: DETAIL`, or nothing.
fn reason_of(d: &Decision) -> String {
    match d {
        Decision::Refused(r) => {
            let (reason, detail) = (r.reason(), r.detail());
            // The detail is the daemon's text, client text in it escaped
            // already; a tab or newline would break the line's fields.
            let detail = detail
                .strip_prefix(&format!("{reason}: "))
                .unwrap_or(&detail);
            format!("\t{reason}: {}", detail.replace(['\t', '\n', '\r'], " "))
        }
        _ => String::new(),
    }
}

/// ADDRESS, SERVER, SERVICE and USER of a verdict line.
#[derive(Default)]
struct Fields {
    ip: Option<String>,
    server: Option<String>,
    service: Option<&'static str>,
    user: Option<String>,
}

impl Fields {
    fn of(l: &Login) -> Fields {
        Fields {
            ip: Some(crate::grants::addr::canonical(l.ip).to_string()),
            server: Some(l.server.to_string()),
            service: Some(l.service.as_str()),
            user: Some(l.user.clone()),
        }
    }
}

impl std::fmt::Display for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dash = |v: &Option<String>| {
            v.as_deref()
                .map_or("-".to_string(), |v| escape(v).to_string())
        };
        write!(
            f,
            "{}\t{}\t{}\t{}",
            dash(&self.ip),
            dash(&self.server),
            self.service.unwrap_or("-"),
            dash(&self.user)
        )
    }
}
