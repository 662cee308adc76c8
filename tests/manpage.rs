//! The man page, smtp-after-popd(8), is generated from the same clap
//! definitions as `--help` (NAME, SYNOPSIS, DESCRIPTION, OPTIONS and
//! SUBCOMMANDS), plus the sections below. This test fails when
//! doc/smtp-after-popd.8 is not what the definitions give; regenerate it
//! with
//!
//!     UPDATE_MANPAGE=1 cargo test --test manpage
//!
//! It also renders the page with man(1), as a reader would.

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};
use smtp_after_popd::service::config::Cli;

fn section(roff: &mut Roff, title: &str, paragraphs: &[&str]) {
    roff.control("SH", [title]);
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(*p)]);
    }
}

fn tagged(roff: &mut Roff, items: &[(&str, &str)]) {
    for (tag, text) in items {
        roff.control("TP", []);
        roff.text([bold(*tag)]);
        roff.text([roman(*text)]);
    }
}

fn example(roff: &mut Roff, intro: &str, lines: &[&str]) {
    roff.control("PP", []);
    roff.text([roman(intro)]);
    roff.control("PP", []);
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for l in lines {
        roff.text([roman(*l)]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
}

/// SUBCOMMANDS: each one's synopsis, description and options, here (there
/// is no page per subcommand).
fn subcommands(roff: &mut Roff) {
    let cmd = Cli::command().disable_help_subcommand(true);
    roff.control("SH", ["SUBCOMMANDS"]);
    for sub in cmd.get_subcommands() {
        let mut usage = format!("smtp-after-popd {}", sub.get_name());
        for a in sub.get_arguments() {
            if a.get_id() == "help" {
                continue;
            }
            let value = a
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| v.to_string())
                .unwrap_or_default();
            let many = matches!(a.get_action(), clap::ArgAction::Append);
            let item = match a.get_long() {
                Some(l) => format!("[--{l} {value}]"),
                None if many => format!("[{value}...]"),
                None => value,
            };
            usage.push(' ');
            usage.push_str(&item);
        }
        roff.control("TP", []);
        roff.text([bold(usage)]);
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        for (i, para) in about.split("\n\n").enumerate() {
            if i > 0 {
                roff.control("br", []);
            }
            roff.text([roman(para.replace('\n', " "))]);
        }
        for a in sub.get_arguments() {
            let (Some(long), Some(help)) = (a.get_long(), a.get_help()) else {
                continue;
            };
            if long == "help" {
                continue;
            }
            roff.control("br", []);
            roff.text([bold(format!("--{long}")), roman(format!(": {help}"))]);
        }
    }
}

fn render() -> Vec<u8> {
    let cmd = Cli::command().disable_help_subcommand(true);
    let man = Man::new(cmd)
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("smtp-after-popd {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();

    let mut r = Roff::new();
    subcommands(&mut r);
    section(&mut r, "FILES", &[]);
    tagged(
        &mut r,
        &[
            (
                "/etc/smtp-after-popd/smtp-after-popd.toml",
                "The configuration file the packaged unit passes with --config. Its keys are the long option names; [[pattern]] tables add login patterns.",
            ),
            (
                "/var/lib/smtp-after-popd/authenticated_ips",
                "The Postfix access map source (the default --map, and the packaged configuration's), built into authenticated_ips.db by postmap. Postfix reads it with check_client_access hash:/var/lib/smtp-after-popd/authenticated_ips in smtpd_relay_restrictions; at start-up the daemon warns when main.cf looks up a map of that name elsewhere. postmap runs with MAIL_CONFIG set to the directory .smtp-after-popd-postfix next to the map, whose main.cf links to /etc/postfix/main.cf (or is empty on a host without one); set the same MAIL_CONFIG to look the map up by hand with postmap -q.",
            ),
            (
                "/var/lib/smtp-after-popd/state",
                "The state file (--state): live grants kept across restarts and crashes, mode 0600.",
            ),
            (
                "/run/smtp-after-popd/syslog.sock",
                "The unix datagram socket rsyslog forwards to (/usr/share/doc/smtp-after-popd/rsyslog/); mode 0600, root (rsyslog) only.",
            ),
            (
                "/var/spool/postfix/smtp-after-popd/policy",
                "The policy socket inside Postfix's chroot, group postfix, mode 0660 (check_policy_service unix:smtp-after-popd/policy); under the packaged unit it needs the drop-in /usr/share/doc/smtp-after-popd/systemd/postfix-policy.conf in /etc/systemd/system/smtp-after-popd.service.d/.",
            ),
            (
                "/etc/smtp-after-popd/auth-policy.secret",
                "With --auth-policy: USER:PASSWORD, the HTTP Basic credentials of Dovecot's auth-policy requests (auth_policy_server_api_header); mode 0600, owned by root or the daemon's user, or the daemon refuses to start.",
            ),
            (
                "/run/smtp-after-popd/smtp-after-popd.pid",
                "A pid file, when --pid-file names it (for init systems other than systemd). Without systemd, the daemon creates /run/smtp-after-popd and /var/lib/smtp-after-popd when they are missing, for --user when it starts as root.",
            ),
            (
                "/run/smtp-after-popd/control",
                "The control socket of list, revoke and stats; mode 0660, root and the daemon's group.",
            ),
            (
                "/usr/lib/systemd/system/smtp-after-popd.service, smtp-after-popd.socket",
                "The hardened service (Type=notify, reload with SIGHUP) and the socket unit that holds the syslog socket across restarts of the service, so that nothing rsyslog forwards meanwhile is lost; the package enables both.",
            ),
        ],
    );
    section(
        &mut r,
        "SIGNALS",
        &[
            "SIGHUP re-reads the configuration. Patterns, window, never-grant rules, allow-lists, attestation, hold-while-connected, max-grants and logging change at once and live grants stay, except those the new never-grant rules refuse, which end at once; a configuration that does not validate is refused with a log line naming the file, line and value, and the old one stays in force. Settings that need sockets or files opened again (listen, map, policy, socketmap, auth-policy, auth-policy-secret, a socket's owner=, group= or mode=, state, control, metrics, user) are reported and wait for a restart. SIGTERM and SIGINT write the state file and stop within a second.",
        ],
    );
    section(
        &mut r,
        "SECURITY",
        &[
            "Every syslog record is hostile until proven otherwise. Trust comes from the transport: a peer outside --allow-from (or the listener's ?allow=) is dropped before parsing; a unix socket is trusted as far as its owner, group and mode reach, each socket its own (a syslog socket is writable by root alone unless its URL names a group, never by every user). No peer can shut out another: each stream service bounds the connections of one peer (a local one by its uid) and of a listener, closing the one that has waited longest without completing a request to make room, and cuts requests that take longer than Postfix's own policy client allows. With --require-attestation, a login is granted only when rsyslog attests (imuxsock's trusted properties, forwarded in the attest@32473 element by the attested rule) that the pattern's own uid (the credential) and executable sent it, so a local user's logger(1), or a server binary a user runs with LD_PRELOAD, cannot forge a login; attestation is believed only on listeners declared ?attested=yes, from unix sockets and --trust-attestation-from peers, in the attested rule's exact form, and an attestation element anywhere else is a forgery. A line whose user name or other client text could stand for a field the server writes is refused as ambiguous.",
            "Dovecot's auth-policy reports (--auth-policy) are no log lines: they come over HTTP from allow-listed peers, and only with the shared secret of --auth-policy-secret (compared in constant time; the file must be readable by its owner alone). No local user can forge one as a log line can be forged; whoever can read the secret file, or Dovecot's configuration holding its base64, can. Across networks, put TLS in front of the listener (stunnel, a reverse proxy, Dovecot's https:// URL).",
            "Addresses are taken only from text the server writes, never from inside a user name; every pattern ships with injection samples that must not grant (tests/samples/*.log, each annotated with the id of the pattern it attacks; tests/samples.rs fails on a pattern without one). Loopback and --never networks, unspecified, multicast and broadcast addresses are never granted. The table is bounded by --max-grants, TCP connections and frames are bounded, and bad input is counted and logged at a limited rate, never fatal.",
            "The map Postfix reads is never empty or half-written: postmap builds a copy that is renamed into place, and the file's modification time is moved to a new second so smtpd notices. Run the daemon as its own user (the packaged unit does); see SECURITY.md in the documentation for the threat model and the test of each claim.",
        ],
    );
    section(&mut r, "EXAMPLES", &[]);
    example(
        &mut r,
        "Try it on loopback (UDP port 5514, the map in a scratch directory it creates, no Postfix configuration needed):",
        &["smtp-after-popd --map /tmp/smtp-after-popd/authenticated_ips --control none"],
    );
    example(
        &mut r,
        "Check what the daemon would do with each login of a real log (grant, or refused and why), before relying on it:",
        &["smtp-after-popd match /var/log/mail.log"],
    );
    example(
        &mut r,
        "The Postfix side (main.cf), then postfix reload:",
        &[
            "smtpd_relay_restrictions = permit_mynetworks,",
            "    permit_sasl_authenticated,",
            "    check_client_access hash:/var/lib/smtp-after-popd/authenticated_ips,",
            "    reject_unauth_destination",
        ],
    );
    example(
        &mut r,
        "Dovecot reporting its logins itself (auth-policy), with the lines Dovecot needs (BASE64: the base64 of the secret file's USER:PASSWORD; NONCE: from openssl rand -hex 16):",
        &[
            "smtp-after-popd --auth-policy tcp://127.0.0.1:12999 \\",
            "    --auth-policy-secret /etc/smtp-after-popd/auth-policy.secret ...",
            "",
            "auth_policy_server_url = http://127.0.0.1:12999/",
            "auth_policy_server_api_header = Authorization: Basic BASE64",
            "auth_policy_hash_nonce = NONCE",
            "auth_policy_check_before_auth = no",
            "auth_policy_check_after_auth = no",
            "auth_policy_report_after_auth = yes",
        ],
    );
    example(
        &mut r,
        "The service: live grants, one revoked at once, counters:",
        &[
            "smtp-after-popd list",
            "smtp-after-popd revoke 192.0.2.7",
            "smtp-after-popd stats",
            "systemctl reload smtp-after-popd",
        ],
    );
    section(
        &mut r,
        "EXIT STATUS",
        &[
            "0 after SIGTERM or SIGINT; 78 (EX_CONFIG) for a configuration error, or a map that cannot be built at start-up (a map type whose package is missing, no postmap, a directory the daemon may not write: the message says what to install or change); 71 (EX_OSERR) when a socket cannot be bound or root cannot be given up; 66 when match cannot read a file (its verdicts do not change its status); 1 when list, revoke or stats cannot reach the daemon or the daemon refuses.",
        ],
    );
    section(
        &mut r,
        "BUGS",
        &[
            "Attestation needs rsyslog's imuxsock; syslog-ng and remote senders without it can be trusted only as far as the network path to them. A login line forwarded over UDP from another host can be forged by anyone who can spoof that host's address: prefer TCP or a unix socket. Windows are measured from the daemon's receipt of the line, not the server's timestamp. Report bugs with the daemon's log lines and the output of smtp-after-popd match on the line concerned.",
        ],
    );
    r.control("SH", ["SEE ALSO"]);
    r.text([
        italic("postfix"),
        roman("(1), "),
        italic("postmap"),
        roman("(1), "),
        italic("access"),
        roman("(5), "),
        italic("rsyslog.conf"),
        roman("(5), "),
        italic("systemd.service"),
        roman("(5), "),
        italic("systemd.socket"),
        roman("(5)"),
    ]);
    r.to_writer(&mut out).unwrap();
    man.render_version_section(&mut out).unwrap();
    out
}

#[test]
fn man_page_is_generated_from_the_cli_definitions() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/smtp-after-popd.8");
    let want = render();
    if std::env::var_os("UPDATE_MANPAGE").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    let have = std::fs::read(path).unwrap_or_default();
    assert!(
        have == want,
        "doc/smtp-after-popd.8 is out of date with the --help definitions: run\n    UPDATE_MANPAGE=1 cargo test --test manpage\nand commit the result"
    );
}

#[test]
fn man_page_renders_with_every_section() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/doc/smtp-after-popd.8");
    let out = std::process::Command::new("man")
        .args(["--warnings", "-l", "-P", "cat", path])
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .expect("man (package man-db)");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.trim().is_empty(), "groff warnings:\n{err}");
    for s in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "SUBCOMMANDS",
        "FILES",
        "SIGNALS",
        "SECURITY",
        "EXAMPLES",
        "EXIT STATUS",
        "BUGS",
        "SEE ALSO",
    ] {
        assert!(text.lines().any(|l| l == s), "section {s} missing:\n{text}");
    }
    // Every long option of --help is in the page.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-after-popd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in help.split_whitespace() {
        if let Some(opt) = word.strip_prefix("--") {
            let opt = opt.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
            if !opt.is_empty() {
                assert!(
                    text.contains(&format!("--{opt}")),
                    "--{opt} missing from the man page"
                );
            }
        }
    }
}
