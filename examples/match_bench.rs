//! Parse + match per line, in process, single-threaded: the daemon's path
//! (a prefilter on the text the patterns need and their program names, so
//! that most non-login lines are not even parsed, then syslog parse, then
//! only the patterns of the record's program) against a fixed, simple
//! baseline (one regex, `Login: |Logged in: `, on every line), on a
//! mail.log mix of ten kinds of lines (one login in 50); and a mix of
//! login lines only (Dovecot, Courier, Cyrus, perdition), where every line
//! is matched and checked for ambiguity. `examples/mix_bench` times the
//! mix of issue 17.
//!
//! ```sh
//! cargo build --release --examples && target/release/examples/match_bench
//! ```

use std::hint::black_box;
use std::time::Instant;

use smtp_after_popd::ingest::record;
use smtp_after_popd::recognise::matcher::{Matchers, Outcome};

fn mix() -> Vec<String> {
    let noise = [
        "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: connect from unknown[198.51.100.7]",
        "<22>Nov 24 10:00:01 mail1 postfix/smtpd[1234]: NOQUEUE: reject: RCPT from unknown[198.51.100.7]: 554 5.7.1 <x@example.org>: Relay access denied; from=<a@b> to=<x@example.org> proto=ESMTP helo=<h>",
        "<22>Nov 24 10:00:01 mail1 postfix/cleanup[2345]: 4F1A21234: message-id=<20261124100001.4F1A21234@mail1.example.net>",
        "<22>Nov 24 10:00:01 mail1 postfix/qmgr[345]: 4F1A21234: from=<alice@example.net>, size=1234, nrcpt=1 (queue active)",
        "<22>Nov 24 10:00:01 mail1 postfix/smtp[4567]: 4F1A21234: to=<bob@example.org>, relay=mx.example.org[203.0.113.25]:25, delay=0.5, delays=0.1/0/0.2/0.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)",
        "<22>Nov 24 10:00:01 mail1 dovecot: imap(alice)<4242><abcdefgh>: Disconnected: Logged out in=8 out=468 deleted=0 expunged=0",
        "<22>Nov 24 10:00:01 mail1 dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<bob>, method=PLAIN, rip=198.51.100.9, lip=192.0.2.1, session=<abcdefgh>",
        "<22>Nov 24 10:00:01 mail1 dovecot: lmtp(4711): Connect from local",
        "<30>Nov 24 10:00:01 mail1 systemd[1]: Started session 42 of user alice.",
        "<86>Nov 24 10:00:01 mail1 CRON[999]: pam_unix(cron:session): session opened for user root(uid=0) by (uid=0)",
    ];
    (0..50_000)
        .map(|i| {
            if i % 50 == 0 {
                format!(
                    "<22>Nov 24 10:00:01 mail1 dovecot: imap-login: Login: user=<u{i}>, method=PLAIN, rip=10.0.{}.{}, lip=192.0.2.1, mpid={i}, TLS, session=<abcdefgh>",
                    (i / 250) % 250,
                    i % 250
                )
            } else {
                noise[i % noise.len()].to_string()
            }
        })
        .collect()
}

fn main() {
    let lines = mix();
    let m = Matchers::builtin();
    let rounds = 20;
    let mut logins = 0;
    let t = Instant::now();
    for _ in 0..rounds {
        for l in &lines {
            if m.may_match_with(l.as_bytes(), false)
                && let Ok(rec) = record::parse(l.as_bytes())
                && let Outcome::Login(_) = m.match_record_with(&rec, false)
            {
                logins += 1;
            }
        }
    }
    let daemon = (rounds * lines.len()) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut parsed = 0;
    for _ in 0..rounds {
        for l in &lines {
            if let Ok(rec) = record::parse(l.as_bytes()) {
                parsed += black_box(rec.message.len()) & 1;
            }
        }
    }
    let parse_only = (rounds * lines.len()) as f64 / t.elapsed().as_secs_f64();
    let re = regex::bytes::Regex::new("Login: |Logged in: ").expect("regex");
    let t = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        for l in &lines {
            if re.is_match(l.as_bytes()) {
                found += 1;
            }
        }
    }
    let baseline = (rounds * lines.len()) as f64 / t.elapsed().as_secs_f64();
    black_box(parsed);
    println!("lines={} logins_per_round={}", lines.len(), logins / rounds);
    println!("daemon_parse_and_match_lines_per_s={daemon:.0}");
    println!("parse_only_lines_per_s={parse_only:.0}");
    println!(
        "baseline_one_regex_lines_per_s={baseline:.0} (found_per_round={})",
        found / rounds
    );
    println!("ratio_baseline_over_daemon={:.2}", baseline / daemon);

    // Logins only: what a line a pattern matched costs (the ambiguity
    // check of issue 13 runs on such lines only), in four formats.
    let logins_only: Vec<String> = (0..50_000)
        .map(|i| {
            let ip = format!("10.0.{}.{}", (i / 250) % 250, i % 250);
            match i % 4 {
                0 => format!("<22>Nov 24 10:00:01 mail1 dovecot: imap-login: Login: user=<u{i}>, method=PLAIN, rip={ip}, lip=192.0.2.1, mpid={i}, TLS, session=<abcdefgh>"),
                1 => format!("<22>Nov 24 10:00:01 mail1 imapd: LOGIN, user=u{i}, ip=[{ip}], port=[4242], protocol=IMAP"),
                2 => format!("<22>Nov 24 10:00:01 mail1 cyrus/imap[12]: login: client.example.net [{ip}] u{i} PLAIN User logged in"),
                _ => format!("<22>Nov 24 10:00:01 mail1 perdition.pop3[58]: Auth: {ip}:51242->198.51.100.1:110 client-secure=plaintext authorisation_id=NONE authentication_id=\"u{i}\" server=\"pop1.example.net:110\" protocol=POP3 server-secure=plaintext status=\"ok\""),
            }
        })
        .collect();
    let t = Instant::now();
    let mut granted = 0;
    for _ in 0..rounds {
        for l in &logins_only {
            if let Ok(rec) = record::parse(l.as_bytes())
                && let Outcome::Login(_) = m.match_record_with(&rec, false)
            {
                granted += 1;
            }
        }
    }
    let only = (rounds * logins_only.len()) as f64 / t.elapsed().as_secs_f64();
    println!(
        "logins_only_parse_and_match_lines_per_s={only:.0} (logins_per_round={})",
        granted / rounds
    );
}
