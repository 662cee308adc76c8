//! Attestation: was a login record sent by a process allowed to speak for
//! the pattern that recognised it?
//!
//! Any local user can write to /dev/log, and `logger -t dovecot "pop3-login:
//! Login: ... rip=203.0.113.9 ..."` looks exactly like Dovecot. What a user
//! cannot forge is what the kernel says about the sending process: rsyslog's
//! imuxsock (with `Annotate` and `ParseTrusted`) reads the sender's
//! executable, uid and pid from the socket credentials and /proc, and our
//! shipped rule `rsyslog/smtp-after-popd-attested.conf` forwards them as
//! RFC 5424 structured data:
//!
//! ```text
//! <22>1 2026-11-24T15:36:30+00:00 mail dovecot 24424 - [attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="24424"] pop3-login: Login: ...
//! ```
//!
//! Consumes: a parsed [`Record`] (its structured data) and the
//! [`Speakers`] of the pattern that matched it.
//! Produces: a [`Verdict`]: attested by an allowed speaker, unattested, or
//! a forgery with the reason.
//! Trusts: the attestation element only on a listener declared to carry
//! the attested rule (`?attested=yes`), only from a peer trusted to speak
//! for it (a unix socket, whose permissions decide who may write, or a
//! `trust-attestation-from` network peer), and only in the exact form that
//! rule writes ([`attested_record`]): RFC 5424, the element in the header's
//! structured-data position, alone, with `exe`, `uid` and `pid` in that
//! order and the values cut down as the rule cuts them. Anywhere else, an
//! element with our SD-ID (in the text of an RFC 3164 record, which a
//! parser may read as structured data, in the message, as a second
//! element, on a listener not declared attested, from a peer not trusted)
//! is a forgery.
//!
//! The credential is the uid. The executable a sender runs is whatever it
//! runs when rsyslog looks: any user may start a server's binary with
//! `LD_PRELOAD`, or exec it just after sending. So a pattern names the
//! accounts that write its lines (`uids`, numbers or account names), and
//! the executable is a second check. A line that the server writes after
//! switching to the user who logged in (popa3d, UW, vm-pop3d, Solid POP3's
//! APOP) says nothing by its uid; its pattern says `credential =
//! "process"`, and it is believed only together with an attested address
//! line written earlier, before the switch, by the same process (the same
//! attested pid, which the kernel vouches for): see the pipeline.
//!
//! A sender that exited before rsyslog looked at it has no executable to
//! read, and the rule writes `exe="0"`; its uid and pid still come from the
//! kernel (SCM_CREDENTIALS), so they stay reliable. A line whose credential
//! is its uid is then refused: its executable, the second check, cannot be
//! made (fail closed: a root script running `logger` with text an attacker
//! chose must not pass). A line whose credential is its process is
//! accepted without one: its own executable proves nothing (any user can
//! run the server's binary), and what vouches for it, the attested address
//! line of the same pid written before the switch, is still required.
//! popa3d and Solid POP3 sessions whose client quits at once end before
//! rsyslog looks at their success line.
//!
//! What attestation cannot prove: that a process running as the server's
//! own account (root for Dovecot and Courier, `cyrus` for Cyrus) did not
//! forge the line. Anything that runs as that account can.

use std::fmt::Write as _;

use crate::ingest::record::Record;

/// The SD-ID of the attestation element (32473 is the private enterprise
/// number that RFC 5612 reserves for documentation and examples).
pub const SD_ID: &str = "attest@32473";

/// Who may speak for a pattern: the uids (the credential) and the
/// executables (absolute paths as the kernel reports them) of the
/// processes that write its lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Speakers {
    /// Allowed executables; empty means no attested record can match.
    pub executables: Vec<String>,
    /// Allowed uids, the accounts named resolved at start; empty means no
    /// attested record can match (unless `process`).
    pub uids: Vec<u32>,
    /// The line is written after the server switched to the user who
    /// logged in, so its uid is not checked: it is believed only with an
    /// attested address line of the same process before it, which the
    /// pipeline checks (`credential = "process"`).
    pub process: bool,
}

/// What the attestation of a record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent by an allowed executable (and uid).
    Attested,
    /// No attestation element, and none is required.
    Unattested,
    /// Refused; the reason names what was wrong.
    Forgery(String),
}

/// The sender properties carried by an attestation element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sender<'a> {
    /// The executable; `None` when the sender had exited before rsyslog
    /// looked (the rule writes `exe="0"`).
    pub exe: Option<&'a str>,
    /// The real uid.
    pub uid: u32,
    /// The process id.
    pub pid: u32,
}

/// Finds the record's attestation: `Ok(None)` without one, `Err` when the
/// element is malformed, repeated or not first.
pub fn sender<'a>(rec: &'a Record<'_>) -> Result<Option<Sender<'a>>, String> {
    let count = rec
        .structured_data
        .iter()
        .filter(|(id, _)| *id == SD_ID)
        .count();
    if count == 0 {
        return Ok(None);
    }
    if count > 1 {
        return Err(format!("{count} attestation elements in one record"));
    }
    let (id, params) = &rec.structured_data[0];
    if *id != SD_ID {
        return Err("the attestation element is not the first".into());
    }
    let get = |name: &str| -> Result<&str, String> {
        let mut found = params.iter().filter(|(n, _)| *n == name);
        match (found.next(), found.next()) {
            (Some((_, v)), None) => Ok(v.as_str()),
            (None, _) => Err(format!("the attestation has no {name}")),
            (Some(_), Some(_)) => Err(format!("the attestation has {name} twice")),
        }
    };
    // "0": the sender had exited (or its executable was unreadable) when
    // rsyslog looked.
    let exe = match get("exe")? {
        "0" => None,
        exe if exe.starts_with('/')
            && exe
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/+-".contains(&b)) =>
        {
            Some(exe)
        }
        exe => {
            return Err(format!(
                "the attested executable \"{}\" is not a plain absolute path",
                crate::logging::escape(exe)
            ));
        }
    };
    let number = |name: &str| -> Result<u32, String> {
        let v = get(name)?;
        v.parse().map_err(|_| {
            format!(
                "the attested {name} \"{}\" is not a number",
                crate::logging::escape(v)
            )
        })
    };
    Ok(Some(Sender {
        exe,
        uid: number("uid")?,
        pid: number("pid")?,
    }))
}

/// The record in the exact form `rsyslog/smtp-after-popd-attested.conf`
/// writes,
///
/// ```text
/// <PRI>1 TIMESTAMP HOSTNAME APP-NAME - - [attest@32473 exe="EXE" uid="UID" pid="PID"] MSG
/// ```
///
/// with APP-NAME made of `[A-Za-z0-9._/-]`, EXE `0` or an absolute path of
/// `[A-Za-z0-9._/+-]`, UID and PID digits, and no other element, nor our
/// SD-ID anywhere in MSG; or why not. The record's pid is the attested
/// one (the rule writes no PROCID). The values are then read by
/// [`sender`].
pub fn attested_record(text: &str) -> Result<Record<'_>, String> {
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    let form = |what: &str| {
        format!(
            "not in the form of the attested rule ({what}): only rsyslog/smtp-after-popd-attested.conf may write to a listener declared attested"
        )
    };
    let rest = text.strip_prefix('<').ok_or_else(|| form("no <PRI>"))?;
    let (pri, rest) = rest.split_once('>').ok_or_else(|| form("no <PRI>"))?;
    if pri.is_empty() || pri.len() > 3 || !pri.bytes().all(|b| b.is_ascii_digit()) {
        return Err(form("no <PRI>"));
    }
    let rest = rest
        .strip_prefix("1 ")
        .ok_or_else(|| form("not RFC 5424"))?;
    fn token<'a>(rest: &mut &'a str) -> Option<&'a str> {
        let (t, r) = rest.split_once(' ')?;
        *rest = r;
        (!t.is_empty()).then_some(t)
    }
    let mut rest: &str = rest;
    let _time = token(&mut rest).ok_or_else(|| form("no timestamp"))?;
    let host = token(&mut rest).ok_or_else(|| form("no hostname"))?;
    let app = token(&mut rest).ok_or_else(|| form("no APP-NAME"))?;
    let clean = |v: &str, extra: &[u8]| {
        v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b) || extra.contains(&b))
    };
    if !clean(app, b"") {
        return Err(form("an APP-NAME the rule would have cut"));
    }
    let rest = rest
        .strip_prefix("- - [attest@32473 exe=\"")
        .ok_or_else(|| form("no attestation element where the header's structured data goes"))?;
    let (exe, rest) = rest.split_once('"').ok_or_else(|| form("exe"))?;
    if !(exe == "0" || (exe.starts_with('/') && exe.len() > 1 && clean(exe, b"+"))) {
        return Err(form("an executable the rule would have cut"));
    }
    let digits = |v: &str| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit());
    let rest = rest.strip_prefix(" uid=\"").ok_or_else(|| form("uid"))?;
    let (uid, rest) = rest.split_once('"').ok_or_else(|| form("uid"))?;
    let rest = rest.strip_prefix(" pid=\"").ok_or_else(|| form("pid"))?;
    let (pid, rest) = rest.split_once('"').ok_or_else(|| form("pid"))?;
    if !digits(uid) || !digits(pid) {
        return Err(form("a uid or pid that is not a number"));
    }
    let message = rest
        .strip_prefix("] ")
        .ok_or_else(|| form("more than the one element"))?;
    // rsyslog's msg property keeps the space after an RFC 3164 tag.
    let message = message.strip_prefix(' ').unwrap_or(message);
    if message.contains(SD_ID) {
        return Err(format!(
            "a second attestation element ({SD_ID}) in the message text, which the sender wrote"
        ));
    }
    Ok(Record {
        hostname: Some(host),
        program: app,
        pid: pid.parse().ok(),
        message,
        structured_data: vec![(
            SD_ID,
            vec![
                ("exe", exe.to_string()),
                ("uid", uid.to_string()),
                ("pid", pid.to_string()),
            ],
        )],
    })
}

/// Whether a record's bytes hold our SD-ID anywhere: on a listener or from
/// a peer whose attestation is not believed, such a record is a forgery.
pub fn names_sd_id(text: &str) -> bool {
    text.contains(SD_ID)
}

/// Checks the sender of a record that `pattern` recognised against its
/// speakers: `None` when no attestation is believed for the record, in
/// which case `required` (require-attestation) decides, and `missing` says
/// why none is believed.
pub fn check(
    sender: Option<&Sender<'_>>,
    pattern: &str,
    speakers: &Speakers,
    required: bool,
    missing: &str,
) -> Verdict {
    let Some(s) = sender else {
        return if required {
            Verdict::Forgery(format!(
                "no attestation of the sending process (require-attestation is on; {missing})"
            ))
        } else {
            Verdict::Unattested
        };
    };
    // A sender that had exited is accepted only where its executable is
    // no credential anyway (see the module doc).
    let exe_ok = match s.exe {
        Some(exe) => speakers.executables.iter().any(|e| e == exe),
        None => speakers.process && !speakers.executables.is_empty(),
    };
    let uid_ok = speakers.process || speakers.uids.contains(&s.uid);
    if exe_ok && uid_ok {
        return Verdict::Attested;
    }
    let mut why = match s.exe {
        Some(exe) => format!(
            "sent by {exe} (uid {}, pid {}), which may not speak for pattern {pattern}",
            s.uid, s.pid
        ),
        None => format!(
            "sent by a process that had exited before rsyslog looked (uid {}, pid {}, no executable attested), which may not speak for pattern {pattern}",
            s.uid, s.pid
        ),
    };
    if s.exe.is_none() && !speakers.process && !speakers.executables.is_empty() {
        why.push_str(
            " (its credential is the uid, and the executable, the second check, cannot be checked: fail closed)",
        );
    } else if speakers.executables.is_empty() {
        why.push_str(" (the pattern names no executables)");
    } else if speakers.uids.is_empty() && !speakers.process {
        why.push_str(
            " (the pattern names no uids, or none of its accounts exists here: the uid is the credential)",
        );
    } else {
        let _ = write!(why, " (");
        if !speakers.process {
            let uids: Vec<String> = speakers.uids.iter().map(u32::to_string).collect();
            let _ = write!(why, "uids {}; ", uids.join(", "));
        }
        let _ = write!(why, "executables {})", speakers.executables.join(", "));
    }
    Verdict::Forgery(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dovecot() -> Speakers {
        Speakers {
            executables: vec!["/usr/lib/dovecot/log".into()],
            uids: vec![0],
            process: false,
        }
    }

    const LINE: &str = "pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<abc>";

    /// What the attested rule writes (rsyslog keeps the space after the
    /// tag in msg, hence two spaces).
    fn with_sd(sd: &str) -> String {
        format!("<22>1 2026-11-24T15:36:30.123456+00:00 mail dovecot - - {sd}  {LINE}")
    }

    fn verdict(text: &str, speakers: &Speakers, required: bool) -> Verdict {
        match attested_record(text) {
            Err(why) => Verdict::Forgery(why),
            Ok(rec) => match sender(&rec) {
                Err(why) => Verdict::Forgery(why),
                Ok(s) => check(s.as_ref(), "dovecot-login", speakers, required, "test"),
            },
        }
    }

    #[test]
    fn dovecots_log_process_is_attested() {
        let text = with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="24424"]"#);
        assert_eq!(verdict(&text, &dovecot(), true), Verdict::Attested);
        let rec = attested_record(&text).unwrap();
        assert_eq!(rec.program, "dovecot");
        assert_eq!(rec.hostname, Some("mail"));
        assert_eq!(rec.pid, Some(24424));
        assert_eq!(rec.message, LINE);
    }

    #[test]
    fn logger_is_a_forgery() {
        let text = with_sd(r#"[attest@32473 exe="/usr/bin/logger" uid="1000" pid="4242"]"#);
        let Verdict::Forgery(why) = verdict(&text, &dovecot(), false) else {
            panic!("granted");
        };
        assert!(
            why.contains("sent by /usr/bin/logger (uid 1000, pid 4242)"),
            "{why}"
        );
    }

    #[test]
    fn the_right_executable_as_the_wrong_user_is_a_forgery() {
        // A local user running Dovecot's log binary with LD_PRELOAD.
        let text = with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="1000" pid="4242"]"#);
        assert!(matches!(
            verdict(&text, &dovecot(), true),
            Verdict::Forgery(_)
        ));
    }

    #[test]
    fn missing_attestation_depends_on_the_setting() {
        assert_eq!(
            check(None, "dovecot-login", &dovecot(), false, "x"),
            Verdict::Unattested
        );
        let Verdict::Forgery(why) = check(None, "dovecot-login", &dovecot(), true, "because")
        else {
            panic!()
        };
        assert!(
            why.ends_with("(require-attestation is on; because)"),
            "{why}"
        );
    }

    #[test]
    fn anything_but_the_rules_exact_form_is_refused() {
        let good = r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#;
        assert!(attested_record(&with_sd(good)).is_ok());
        for text in [
            // Two elements, or another first.
            with_sd(&format!("{good}{good}")),
            with_sd(&format!(r#"[other@32473 a="b"]{good}"#)),
            // A repeated or missing parameter, parameters in another order.
            with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" uid="1000" pid="1"]"#),
            with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" pid="1"]"#),
            with_sd(r#"[attest@32473 uid="0" exe="/usr/lib/dovecot/log" pid="1"]"#),
            // Values the rule cuts to "0".
            with_sd(r#"[attest@32473 exe="/tmp/x"y" uid="0" pid="1"]"#),
            with_sd(r#"[attest@32473 exe="/tmp/x y" uid="0" pid="1"]"#),
            with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="root" pid="1"]"#),
            with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="" pid="1"]"#),
            // RFC 3164, where a parser reads a leading [...] as structured
            // data: the plain rule's form.
            format!("<22>Nov 24 15:36:30 mail dovecot: {good} {LINE}"),
            // A PROCID or MSGID the rule does not write.
            format!("<22>1 2026-11-24T15:36:30Z mail dovecot 4242 - {good}  {LINE}"),
            // A second element in the message text.
            with_sd(&format!("{good} {good}")),
            format!("<22>1 2026-11-24T15:36:30Z mail dovecot - - {good}  x {SD_ID} y"),
            // An APP-NAME the rule would have cut.
            format!("<22>1 2026-11-24T15:36:30Z mail dove\"cot - - {good}  {LINE}"),
            "garbage".to_string(),
            String::new(),
        ] {
            assert!(attested_record(&text).is_err(), "{text}");
        }
        // exe "0" (the sender exited before rsyslog looked) has the form,
        // and reads as no executable.
        let exited = with_sd(r#"[attest@32473 exe="0" uid="0" pid="1"]"#);
        let rec = attested_record(&exited).unwrap();
        assert_eq!(
            sender(&rec),
            Ok(Some(Sender {
                exe: None,
                uid: 0,
                pid: 1
            }))
        );
    }

    #[test]
    fn an_exited_sender_is_believed_only_where_its_process_is_the_credential() {
        // rsyslog attests a sender that has already exited as exe "0"; its
        // uid and pid come from the kernel all the same.
        let exited =
            |uid: u32| with_sd(&format!(r#"[attest@32473 exe="0" uid="{uid}" pid="4242"]"#));
        // A line whose credential is its uid: refused, even as root.
        let Verdict::Forgery(why) = verdict(&exited(0), &dovecot(), false) else {
            panic!("an exited sender passed a uid credential");
        };
        assert!(
            why.contains("had exited before rsyslog looked") && why.contains("fail closed"),
            "{why}"
        );
        // A line whose credential is its process's address line: its own
        // executable proves nothing, so an exited sender passes this check
        // (the pipeline still needs the attested address line of pid 4242).
        let popa3d = Speakers {
            executables: vec!["/usr/sbin/popa3d".into()],
            uids: Vec::new(),
            process: true,
        };
        assert_eq!(verdict(&exited(1000), &popa3d, true), Verdict::Attested);
        // But not for a pattern that names no executables at all.
        let none = Speakers {
            executables: Vec::new(),
            ..popa3d
        };
        assert!(matches!(
            verdict(&exited(1000), &none, true),
            Verdict::Forgery(_)
        ));
    }

    #[test]
    fn a_pattern_without_executables_or_uids_never_accepts_an_attested_record() {
        let text = with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#);
        let Verdict::Forgery(why) = verdict(&text, &Speakers::default(), false) else {
            panic!("granted");
        };
        assert!(why.contains("names no executables"), "{why}");
        let no_uids = Speakers {
            uids: Vec::new(),
            ..dovecot()
        };
        let Verdict::Forgery(why) = verdict(&text, &no_uids, false) else {
            panic!("granted");
        };
        assert!(why.contains("the uid is the credential"), "{why}");
    }

    #[test]
    fn a_process_credential_does_not_check_the_uid() {
        let text = with_sd(r#"[attest@32473 exe="/usr/sbin/popa3d" uid="1000" pid="1"]"#);
        let popa3d = Speakers {
            executables: vec!["/usr/sbin/popa3d".into()],
            uids: Vec::new(),
            process: true,
        };
        assert_eq!(verdict(&text, &popa3d, true), Verdict::Attested);
        let text = with_sd(r#"[attest@32473 exe="/usr/bin/logger" uid="1000" pid="1"]"#);
        assert!(matches!(verdict(&text, &popa3d, true), Verdict::Forgery(_)));
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// A record from a peer whose attestation is believed
    /// (trust-attestation-from) is parsed as any RFC 5424 record, not by
    /// [`attested_record`]: `sender` alone then refuses a second
    /// attestation element and an executable that is not a plain absolute
    /// path, whatever else the record holds.
    #[test]
    fn sender_refuses_two_elements_and_an_executable_that_is_no_plain_path() {
        let parse = |sd: &str| {
            let text = format!("<22>1 2026-11-24T15:36:30Z mail dovecot - - {sd} {LINE}");
            let rec = crate::ingest::record::parse_str(&text).expect("an RFC 5424 record");
            sender(&rec).map(|s| s.map(|s| (s.exe.map(str::to_string), s.uid, s.pid)))
        };
        let good = r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#;
        assert_eq!(
            parse(good),
            Ok(Some((Some("/usr/lib/dovecot/log".to_string()), 0, 1)))
        );
        let Err(why) = parse(&format!("{good}{good}")) else {
            panic!("two attestation elements were accepted");
        };
        assert_eq!(why, "2 attestation elements in one record");
        for exe in ["usr/lib/dovecot/log", "/usr/lib/dove cot", "/tmp/a;b"] {
            let sd = format!(r#"[attest@32473 exe="{exe}" uid="0" pid="1"]"#);
            let got = parse(&sd);
            assert!(
                got.as_ref()
                    .is_err_and(|w| w.contains("is not a plain absolute path")),
                "{exe}: {got:?}"
            );
        }
    }

    /// The PRI of the attested form is one to three digits, and its
    /// executable a path longer than `/`: anything else is not what
    /// rsyslog writes.
    #[test]
    fn a_pri_or_executable_the_rule_never_writes_is_not_the_attested_form() {
        let good = r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#;
        let with_pri =
            |pri: &str| format!("<{pri}>1 2026-11-24T15:36:30Z mail dovecot - - {good}  {LINE}");
        assert!(attested_record(&with_pri("22")).is_ok());
        assert!(attested_record(&with_pri("191")).is_ok());
        for pri in ["", "0022", "1910", "2a"] {
            assert!(
                attested_record(&with_pri(pri)).is_err(),
                "<{pri}> was accepted"
            );
        }
        // An executable of "/" alone is no path rsyslog writes.
        let root = with_sd(r#"[attest@32473 exe="/" uid="0" pid="1"]"#);
        assert!(attested_record(&root).is_err(), "{root}");
        let one = with_sd(r#"[attest@32473 exe="/x" uid="0" pid="1"]"#);
        assert!(attested_record(&one).is_ok(), "{one}");
    }

    /// A refusal says what the pattern would have accepted: the uids and
    /// executables where the uid is the credential, only the executables
    /// where the process is.
    #[test]
    fn a_refusal_names_what_the_pattern_accepts() {
        let logger = Sender {
            exe: Some("/usr/bin/logger"),
            uid: 1000,
            pid: 7,
        };
        let why = |speakers: &Speakers| match check(Some(&logger), "p", speakers, true, "x") {
            Verdict::Forgery(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            why(&dovecot()).ends_with("(uids 0; executables /usr/lib/dovecot/log)"),
            "{}",
            why(&dovecot())
        );
        let popa3d = Speakers {
            executables: vec!["/usr/sbin/popa3d".into()],
            uids: Vec::new(),
            process: true,
        };
        assert!(
            why(&popa3d)
                .ends_with("which may not speak for pattern p (executables /usr/sbin/popa3d)"),
            "{}",
            why(&popa3d)
        );
        let no_uids = Speakers {
            executables: vec!["/usr/sbin/x".into()],
            uids: Vec::new(),
            process: false,
        };
        assert!(
            why(&no_uids).ends_with("(the pattern names no uids, or none of its accounts exists here: the uid is the credential)"),
            "{}",
            why(&no_uids)
        );
    }
}
