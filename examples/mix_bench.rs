//! The mix of issue 17, side by side in one run: our parse + match as
//! `smtp-after-popd match` does it, the daemon's per-datagram path (the
//! pipeline's entry, without the socket), and the `match` command itself
//! on the same lines in a file, against issue 17's baseline, a one-regex
//! Perl loop over the file (`ratio_to_baseline`), and beside it `grep -cE`
//! with the same regex and one regex over the lines already in memory (a
//! floor no reader of a file reaches).
//!
//! The mix: 1,000,000 lines of a Dovecot host's mail log. One line in 50
//! is a Dovecot login; the rest is split evenly among Postfix `connect
//! from`, Postfix `qmgr` and Dovecot `Disconnected: Logged out` lines.
//! Every built-in pattern is on.
//!
//! Figures are CPU time of one thread (in process) or of the child (the
//! `match` command), so that other work on the machine does not count;
//! each in-process figure is the best of `--rounds` rounds.
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/mix_bench [--lines 1000000] [--rounds 3] [--bin target/release/smtp-after-popd]
//! ```

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use smtp_after_popd::grants::addr::AddressPolicy;
use smtp_after_popd::grants::table::GrantTable;
use smtp_after_popd::ingest::receiver::Peer;
use smtp_after_popd::ingest::record;
use smtp_after_popd::recognise::matcher::{Matchers, Outcome};
use smtp_after_popd::service::daemon::{Pipeline, Settings};
use smtp_after_popd::stats::Stats;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// The mix as one buffer of newline-terminated lines; (buffer, logins).
fn mix(n: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(n * 110);
    let mut logins = 0;
    for i in 0..n {
        let line = if i % 50 == 0 {
            logins += 1;
            format!(
                "Dec  2 01:00:{:02} mail1 dovecot: imap-login: Login: user=<u{i}>, method=PLAIN, rip=10.{}.{}.{}, lip=192.0.2.1, mpid={}, TLS, session=<k{:08x}>",
                i % 60,
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255,
                7000 + i % 1000,
                i
            )
        } else {
            match i % 3 {
                0 => format!(
                    "Dec  2 01:00:{:02} mail1 postfix/smtpd[{}]: connect from unknown[198.51.{}.{}]",
                    i % 60,
                    1000 + i % 500,
                    (i >> 8) & 255,
                    i & 255
                ),
                1 => format!(
                    "Dec  2 01:00:{:02} mail1 postfix/qmgr[345]: {:09X}: from=<alice@example.net>, size={}, nrcpt=1 (queue active)",
                    i % 60,
                    i,
                    1000 + i % 9000
                ),
                _ => format!(
                    "Dec  2 01:00:{:02} mail1 dovecot: imap(alice)<{}><k{:08x}>: Disconnected: Logged out in=12 out=477",
                    i % 60,
                    7000 + i % 1000,
                    i
                ),
            }
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    (out, logins)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) of the children waited for so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage into a zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Best CPU time of `rounds` runs of `f`, and what the last run returned.
fn best(rounds: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut found = 0;
    for _ in 0..rounds {
        let t = thread_cpu();
        found = black_box(f());
        best = best.min(thread_cpu() - t);
    }
    (best, found)
}

fn main() {
    smtp_after_popd::logging::set_level(smtp_after_popd::logging::Level::Fatal);
    let n: usize = arg("--lines", "1000000").parse().expect("--lines N");
    let rounds: usize = arg("--rounds", "3").parse().expect("--rounds N");
    let bin = PathBuf::from(arg("--bin", "target/release/smtp-after-popd"));
    let (buf, logins) = mix(n);
    let lines: Vec<&[u8]> = buf
        .split_inclusive(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\n").unwrap_or(l))
        .collect();
    println!(
        "lines={} logins={logins} bytes={} patterns=builtin (all)",
        lines.len(),
        buf.len()
    );
    let per_s = |d: Duration| lines.len() as f64 / d.as_secs_f64();

    // (a) The baseline: one fixed regex, counting the lines it matches.
    let re = regex::bytes::Regex::new("Login: |Logged in: ").expect("regex");
    let (t_base, found) = best(rounds, || lines.iter().filter(|l| re.is_match(l)).count());
    assert_eq!(found, logins, "the baseline must find every login");
    println!(
        "in_memory_regex cpu_s={:.3} lines_per_s={:.0} found={found} (one regex over lines already in memory: a floor, not the issue's baseline)",
        t_base.as_secs_f64(),
        per_s(t_base)
    );

    // (b) Parse + match per line, as `smtp-after-popd match` does: every
    // pattern on; the prefilter, then the record parse and the patterns
    // of the record's program.
    let m = Matchers::builtin();
    let (t_match, found) = best(rounds, || {
        let mut found = 0;
        for l in &lines {
            if m.may_match_with(l, false)
                && let Ok(rec) = record::parse(l)
                && let Outcome::Login(login) = m.match_record_with(&rec, false)
            {
                black_box(&login);
                found += 1;
            }
        }
        found
    });
    assert_eq!(found, logins, "parse + match must find every login");
    println!(
        "parse_and_match cpu_s={:.3} lines_per_s={:.0} found={found} ratio_to_in_memory_regex={:.2}",
        t_match.as_secs_f64(),
        per_s(t_match),
        t_match.as_secs_f64() / t_base.as_secs_f64()
    );

    // (c) The daemon's per-datagram path: the pipeline's entry (prefilter,
    // record parse, attestation checks, matcher, policy, grant), a fresh
    // table per round, without the socket.
    let settings = || Settings {
        matchers: m.clone(),
        policy: AddressPolicy::new(Vec::new()),
        window: Duration::from_secs(600),
        require_attestation: false,
        trust_attestation_from: Vec::new(),
        trusted_proxy: Vec::new(),
        hold_while_connected: false,
        hold_max: Duration::from_secs(3600),
    };
    let peer = Peer::Udp("127.0.0.1:40000".parse::<SocketAddr>().expect("addr"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let mut granted = 0;
    let mut t_daemon = Duration::MAX;
    for _ in 0..rounds {
        let p = Pipeline::new(
            settings(),
            Arc::new(GrantTable::new()),
            Arc::new(Stats::default()),
        );
        let t = thread_cpu();
        for l in &lines {
            p.handle(l, &peer);
        }
        t_daemon = t_daemon.min(thread_cpu() - t);
        granted = p.table.list().len();
    }
    assert_eq!(granted, logins, "the daemon's path must grant every login");
    println!(
        "daemon_path cpu_s={:.3} lines_per_s={:.0} granted={granted} ratio_to_in_memory_regex={:.2}",
        t_daemon.as_secs_f64(),
        per_s(t_daemon),
        t_daemon.as_secs_f64() / t_base.as_secs_f64()
    );

    // (d) The `match` command on the same lines in a file: its CPU time.
    let dir = std::env::temp_dir().join(format!("mix-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("mail.log");
    std::fs::write(&file, &buf).expect("write the mix");
    // The same scan as (a) by grep on the file, for the command: what a
    // process that reads the file and runs one regex costs.
    let mut t_grep = Duration::MAX;
    for _ in 0..rounds {
        let before = children_cpu();
        let out = Command::new("grep")
            .args(["-cE", "Login: |Logged in: "])
            .arg(&file)
            .output();
        let Ok(out) = out else {
            break;
        };
        t_grep = t_grep.min(children_cpu() - before);
        let count: usize = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(count, logins, "grep must find every login");
    }
    if t_grep != Duration::MAX {
        println!(
            "grep_command cpu_s={:.3} lines_per_s={:.0} (grep -cE 'Login: |Logged in: ' FILE)",
            t_grep.as_secs_f64(),
            per_s(t_grep)
        );
    }
    // Issue 17's own baseline: a one-regex Perl loop over the file.
    let mut t_perl = Duration::MAX;
    for _ in 0..rounds {
        let before = children_cpu();
        let out = Command::new("perl")
            .args([
                "-ne",
                "$n++ if /Login: |Logged in: /; END { print $n + 0, qq(\\n) }",
            ])
            .arg(&file)
            .output();
        let Ok(out) = out else {
            break;
        };
        t_perl = t_perl.min(children_cpu() - before);
        let count: usize = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(count, logins, "the Perl loop must find every login");
    }
    if t_perl != Duration::MAX {
        println!(
            "perl_loop cpu_s={:.3} lines_per_s={:.0} (perl -ne '$n++ if /Login: |Logged in: /' FILE)",
            t_perl.as_secs_f64(),
            per_s(t_perl)
        );
    }
    let mut t_cmd_seen = Duration::ZERO;
    if bin.exists() {
        let mut t_cmd = Duration::MAX;
        let mut printed = 0;
        for _ in 0..rounds {
            let before = children_cpu();
            let out = Command::new(&bin)
                .arg("match")
                .arg(&file)
                .stderr(Stdio::null())
                .output()
                .expect("run match");
            t_cmd = t_cmd.min(children_cpu() - before);
            // One verdict line per recognised line, then the summary
            // (lines starting "# ").
            printed = out
                .stdout
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b"grant\t"))
                .count();
        }
        assert_eq!(printed, logins, "match must grant every login");
        t_cmd_seen = t_cmd;
        println!(
            "match_command cpu_s={:.3} lines_per_s={:.0} granted={printed} ratio_to_in_memory_regex={:.2} ratio_to_grep={:.2} ratio_to_perl={:.2} (process start and file reading included)",
            t_cmd.as_secs_f64(),
            per_s(t_cmd),
            t_cmd.as_secs_f64() / t_base.as_secs_f64(),
            t_cmd.as_secs_f64() / t_grep.as_secs_f64(),
            t_cmd.as_secs_f64() / t_perl.as_secs_f64()
        );
    } else {
        println!(
            "match_command skipped: {} not found (build it with cargo build --release --bins, or pass --bin)",
            bin.display()
        );
    }
    if t_perl != Duration::MAX {
        // Against the issue's one-regex scan of the file. The in-process
        // paths read no file while the Perl loop's time includes reading
        // it: the command's ratio is the like-for-like one.
        println!(
            "ratio_to_baseline (issue 17's baseline, the one-regex Perl loop over the file): parse_and_match={:.2} daemon_path={:.2} match_command={:.2}",
            t_match.as_secs_f64() / t_perl.as_secs_f64(),
            t_daemon.as_secs_f64() / t_perl.as_secs_f64(),
            t_cmd_seen.as_secs_f64() / t_perl.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
