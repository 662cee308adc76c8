//! `smtp-after-popd match` gives each recognised line the daemon's own
//! verdict (the same `decide`): grant, or refused and why; then a summary
//! in the spirit of fail2ban-regex; `--config` changes the verdicts as
//! it changes the daemon's.

mod common;

use common::*;

/// Real sample lines (from tests/samples), one for each verdict.
const LOG: &str = "\
Nov 23 10:00:01 mail postfix/smtpd[100]: connect from unknown[192.0.2.50]
Nov 23 10:00:01 mail dovecot: pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=4242, session=<Vb0F8x8s4NzAAAAB>
Nov 23 10:00:02 mail dovecot: pop3-login: Login: user=<bob>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=4243, session=<Vb0F8x8s4NzAAAAC>
Nov 23 10:00:03 mail dovecot: pop3-login: Login: user=<carol>, method=PLAIN, rip=0.0.0.0, lip=192.0.2.1, mpid=4244, session=<Vb0F8x8s4NzAAAAD>
Nov 23 10:00:04 mail dovecot: [attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\" pid=\"1\"] pop3-login: Login: user=<eve>, method=PLAIN, rip=198.51.100.40, lip=192.0.2.1, mpid=1, session=<abc>
Dec  1 21:33:13 mail dovecot: imap-login: Login: user=<x rip=192.0.2.77 y>, method=PLAIN, rip=192.0.2.117, lip=127.0.0.1, mpid=128, session=<Bg0TRplhJ4vAAAJ1>
Nov 23 10:03:01 mail ipop3d[3470]: Login user=frank host=client.example.net nmsgs=2/2
Sep 18 00:21:21 mailstore21 mailbox: INFO  [Pop3Server-7] [name=carol@example.org;ip=198.51.100.31;oip=192.0.2.10;] pop - user carol@example.org authenticated, mechanism=LOGIN 
Dec  1 21:33:29 mail popa3d[80]: Session from 192.0.2.100
Dec  1 21:33:29 mail popa3d[80]: Authentication passed for alice
Dec  1 21:33:30 mail popa3d[81]: Authentication passed for mallory
Nov 23 10:00:02 mail dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<eve>, method=PLAIN, rip=192.0.2.66, lip=192.0.2.1, session=<Vb0F8x8s4NzAAAAE>
";

/// Runs `match` on the log (and a configuration file's text, if given):
/// exit status, verdict lines, summary lines.
fn run(log: &str, config: Option<&str>) -> (Option<i32>, Vec<String>, Vec<String>) {
    let s = Scratch::new();
    let path = s.path("mail.log");
    std::fs::write(&path, log).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("match");
    if let Some(text) = config {
        let c = s.path("smtp-after-popd.toml");
        std::fs::write(&c, text).unwrap();
        cmd.arg("--config").arg(c);
    }
    let out = cmd.arg(&path).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("{}:", path.display());
    let (summary, verdicts): (Vec<String>, Vec<String>) = text
        .lines()
        .map(|l| l.replace(&prefix, "mail.log:"))
        .partition(|l| l.starts_with("# "));
    (out.status.code(), verdicts, summary)
}

#[test]
fn each_recognised_line_gets_the_daemons_verdict() {
    let (status, verdicts, _) = run(LOG, None);
    assert_eq!(status, Some(0));
    let want = [
        "grant\t192.0.2.7\tdovecot\tpop3\talice\tdovecot-login\tmail.log:2",
        "refused\t127.0.0.5\tdovecot\tpop3\tbob\tdovecot-login\tmail.log:3\tnever-grant: address in never-grant network 127.0.0.0/8",
        "refused\t0.0.0.0\tdovecot\tpop3\tcarol\tdovecot-login\tmail.log:4\tunspecified-address: unspecified address (0.0.0.0/8 or ::)",
        "refused\t-\t-\t-\t-\t-\tmail.log:5\tforgery: an attestation element on a listener not declared attested: only a listener with ?attested=yes, fed by rsyslog/smtp-after-popd-attested.conf, carries attestation (add ?attested=yes to its listen URL if it is)",
    ];
    assert_eq!(verdicts[..4], want, "{verdicts:#?}");
    let rest = &verdicts[4..];
    assert!(
        rest[0].starts_with("refused\t-\t-\t-\t-\tdovecot-login\tmail.log:6\tambiguous: "),
        "{rest:#?}"
    );
    assert!(
        rest[1].starts_with("refused\t-\t-\t-\t-\tuw-login-unaddressed\tmail.log:7\tunaddressed: ")
            || rest[1].contains("\tmail.log:7\tunaddressed: "),
        "{rest:#?}"
    );
    assert_eq!(
        rest[2],
        "refused\t192.0.2.10\tzimbra\tpop3\tcarol@example.org\tzimbra-login-proxied\tmail.log:8\tuntrusted-proxy: the address was reported by the proxy 198.51.100.31, which is not a --trusted-proxy"
    );
    assert!(
        rest[3].starts_with("remembered\t-\t-\t-\t-\tpopa3d-") && rest[3].ends_with("mail.log:9"),
        "{rest:#?}"
    );
    assert!(
        rest[4].starts_with("grant\t192.0.2.100\tpopa3d\tpop3\talice\tpopa3d-")
            && rest[4].ends_with("\tmail.log:10"),
        "{rest:#?}"
    );
    assert!(
        rest[5].contains("\tmail.log:11\tno-address-line: "),
        "another process's success line takes no address: {rest:#?}"
    );
    assert_eq!(rest.len(), 6, "the failed login is no verdict: {rest:#?}");
}

#[test]
fn the_summary_counts_lines_patterns_grants_and_refusals() {
    let (_, _, summary) = run(LOG, None);
    let line = |start: &str| {
        summary
            .iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} in {summary:#?}"))
            .clone()
    };
    assert!(summary[0].starts_with("# attestation not checked: "));
    assert_eq!(line("# lines read: "), "# lines read: 12");
    assert!(line("# recognised: ").starts_with("# recognised: 10 ("));
    assert!(line("# recognised: ").contains("dovecot-login 4"));
    assert_eq!(line("# granted: "), "# granted: 2");
    assert_eq!(
        line("# refused: "),
        "# refused: 7 (ambiguous 1, forgery 1, never-grant 1, no-address-line 1, unaddressed 1, unspecified-address 1, untrusted-proxy 1)"
    );
    assert_eq!(
        line("# address lines remembered: "),
        "# address lines remembered: 1"
    );
    // postfix has no pattern; the failed Dovecot login names a known
    // program and matches none.
    assert_eq!(
        line("# lines of a known program that no pattern matched: "),
        "# lines of a known program that no pattern matched: 1 (dovecot 1)"
    );
}

#[test]
fn lines_the_prefilter_skips_still_count_as_a_known_programs_unmatched_lines() {
    // None of these holds the text of a login pattern, so the prefilter
    // skips them before any parse; two are of programs that have patterns.
    let log = "\
Nov 23 10:00:05 mail dovecot: imap(alice)<7002><Vb0F8x8s4NzAAAAB>: Disconnected: Logged out in=12 out=477
Nov 23 10:00:06 mail imapd: Connection, ip=[::ffff:192.0.2.126], port=[52487]
Nov 23 10:00:07 mail postfix/qmgr[200]: 4F2A1: removed
";
    let (status, verdicts, summary) = run(log, None);
    assert_eq!(status, Some(0));
    assert!(verdicts.is_empty(), "{verdicts:#?}");
    let line = summary
        .iter()
        .find(|l| l.starts_with("# lines of a known program that no pattern matched: "))
        .unwrap_or_else(|| panic!("{summary:#?}"));
    assert_eq!(
        line,
        "# lines of a known program that no pattern matched: 2 (dovecot 1, imapd 1)"
    );
}

#[test]
fn the_configuration_file_changes_the_verdicts_as_it_changes_the_daemons() {
    let config = "never = [\"192.0.2.0/29\"]\ntrusted-proxy = [\"198.51.100.31\"]\n";
    let (status, verdicts, summary) = run(LOG, Some(config));
    assert_eq!(status, Some(0));
    let of = |n: u32| {
        verdicts
            .iter()
            .find(|v| v.split('\t').nth(6) == Some(&format!("mail.log:{n}")))
            .unwrap_or_else(|| panic!("no verdict for line {n}: {verdicts:#?}"))
            .clone()
    };
    // The file's never replaces the default: loopback is granted, the
    // file's network is not.
    assert!(
        of(2).starts_with("refused\t192.0.2.7\t")
            && of(2).ends_with("never-grant: address in never-grant network 192.0.2.0/29"),
        "{}",
        of(2)
    );
    assert!(of(3).starts_with("grant\t127.0.0.5\t"), "{}", of(3));
    // The trusted proxy's oip= is believed.
    assert!(
        of(8).starts_with("grant\t192.0.2.10\tzimbra\t"),
        "{}",
        of(8)
    );
    assert!(
        summary.contains(&"# granted: 3".to_string()),
        "{summary:#?}"
    );
    // A proxy's own login is the proxy's connection.
    let own = "Dec  1 21:33:14 mail dovecot: pop3-login: Login: user=<bob>, method=PLAIN, rip=198.51.100.31, lip=192.0.2.1, mpid=163, session=<1RoXRplhR9LAAAKC>\n";
    let (_, verdicts, _) = run(own, Some(config));
    assert_eq!(verdicts.len(), 1);
    assert!(
        verdicts[0].contains("\tproxy-own-address: it is a --trusted-proxy (198.51.100.31/32)"),
        "{verdicts:#?}"
    );
    // Patterns from the file are used.
    let pattern = "[[pattern]]\nid = \"my-pop\"\nserver = \"mypopd\"\nprogram = [\"mypopd\"]\nservice = \"pop3\"\nregex = '^login ok user=(?P<user>\\S+) ip=(?P<ip>\\S+)$'\n";
    let (_, verdicts, _) = run(
        "Nov 23 10:00:01 mail mypopd[9]: login ok user=zoe ip=203.0.113.5\n",
        Some(pattern),
    );
    assert_eq!(
        verdicts,
        ["grant\t203.0.113.5\tmypopd\tpop3\tzoe\tmy-pop\tmail.log:1"]
    );
}

#[test]
fn exit_status_says_whether_every_input_was_read() {
    let out = std::process::Command::new(BIN)
        .args(["match", "/nonexistent/sap-match-verdicts.log"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot open /nonexistent/sap-match-verdicts.log"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Scratch::new();
    let bad = s.path("bad.toml");
    std::fs::write(&bad, "never = [\"not-an-address\"]\n").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("match")
        .arg("--config")
        .arg(&bad)
        .arg("/dev/null")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-an-address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_readmes_example_is_what_match_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("### 4. Check your logs").unwrap()..];
    let start = section.find("```text\n").unwrap() + "```text\n".len();
    let end = start + section[start..].find("```\n").unwrap();
    let shown: Vec<String> = section[start..end]
        .lines()
        .map(|l| l.replace("/var/log/mail.log:", "mail.log:"))
        .collect();
    let (_, verdicts, summary) = run(LOG, None);
    let printed: Vec<String> = verdicts.into_iter().chain(summary).collect();
    assert_eq!(shown, printed);
}
