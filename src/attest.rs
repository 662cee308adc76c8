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
//! Trusts: the attestation element only as far as the peer that delivered
//! the record is trusted (the receiver's allow-list and socket permissions
//! decide that); the rsyslog rule only lets through values made of
//! `[A-Za-z0-9._/+-]`, so an element holding anything else, a second
//! element, or one that is not the first is treated as a forgery.

use std::fmt::Write as _;

use crate::record::Record;

/// The SD-ID of the attestation element (32473 is the private enterprise
/// number that RFC 5612 reserves for documentation and examples).
pub const SD_ID: &str = "attest@32473";

/// Who may speak for a pattern: executables (absolute paths as the kernel
/// reports them) and, when given, the uids they must run as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Speakers {
    /// Allowed executables; empty means no attested record can match.
    pub executables: Vec<String>,
    /// Allowed uids; empty means any uid.
    pub uids: Vec<u32>,
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
    /// The executable.
    pub exe: &'a str,
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
    let exe = get("exe")?;
    if exe.is_empty() || exe == "0" {
        return Err(format!(
            "the attested executable is \"{exe}\": the sending process had exited before rsyslog looked up its executable (as a short-lived logger(1) does), so nothing says who sent it; a mail server's logging process lives on and is named"
        ));
    }
    if !exe.starts_with('/')
        || !exe
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/+-".contains(&b))
    {
        return Err(format!(
            "the attested executable \"{}\" is not a plain absolute path",
            crate::logging::escape(exe)
        ));
    }
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

/// The verdict on a record from a peer whose attestation is not believed
/// (a network peer outside `trust-attestation-from`): an attestation
/// element in it is a forgery, since any local user of that peer could
/// have written it; without one, it is unattested.
pub fn unbelieved(rec: &Record<'_>, required: bool) -> Verdict {
    if rec.structured_data.iter().any(|(id, _)| *id == SD_ID) {
        return Verdict::Forgery(
            "an attestation from a network peer that is not trusted for it (trust-attestation-from)".into(),
        );
    }
    if required {
        Verdict::Forgery(
            "no attestation believed from this peer (require-attestation is on; attestation is believed from unix sockets and trust-attestation-from peers)".into(),
        )
    } else {
        Verdict::Unattested
    }
}

/// Checks a record that `pattern` recognised against its speakers.
pub fn check(rec: &Record<'_>, pattern: &str, speakers: &Speakers, required: bool) -> Verdict {
    let sender = match sender(rec) {
        Ok(s) => s,
        Err(why) => return Verdict::Forgery(why),
    };
    let Some(s) = sender else {
        return if required {
            Verdict::Forgery(
                "no attestation of the sending process (require-attestation is on; forward with rsyslog/smtp-after-popd-attested.conf)".into(),
            )
        } else {
            Verdict::Unattested
        };
    };
    let exe_ok = speakers.executables.iter().any(|e| e == s.exe);
    let uid_ok = speakers.uids.is_empty() || speakers.uids.contains(&s.uid);
    if exe_ok && uid_ok {
        return Verdict::Attested;
    }
    let mut why = format!(
        "sent by {} (uid {}, pid {}), which may not speak for pattern {pattern}",
        s.exe, s.uid, s.pid
    );
    if speakers.executables.is_empty() {
        why.push_str(" (the pattern names no executables)");
    } else {
        let _ = write!(why, " (executables {}", speakers.executables.join(", "));
        if !speakers.uids.is_empty() {
            let uids: Vec<String> = speakers.uids.iter().map(u32::to_string).collect();
            let _ = write!(why, "; uids {}", uids.join(", "));
        }
        why.push(')');
    }
    Verdict::Forgery(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::parse_str;

    fn dovecot() -> Speakers {
        Speakers {
            executables: vec!["/usr/lib/dovecot/log".into()],
            uids: vec![0],
        }
    }

    const LINE: &str = "pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<abc>";

    fn with_sd(sd: &str) -> String {
        format!("<22>1 2026-11-24T15:36:30+00:00 mail dovecot 24424 - {sd} {LINE}")
    }

    #[test]
    fn dovecots_log_process_is_attested() {
        let text = with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="24424"]"#);
        let rec = parse_str(&text).unwrap();
        assert_eq!(
            check(&rec, "dovecot-login", &dovecot(), true),
            Verdict::Attested
        );
    }

    #[test]
    fn logger_is_a_forgery() {
        let text = with_sd(r#"[attest@32473 exe="/usr/bin/logger" uid="1000" pid="4242"]"#);
        let rec = parse_str(&text).unwrap();
        let Verdict::Forgery(why) = check(&rec, "dovecot-login", &dovecot(), false) else {
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
        let rec = parse_str(&text).unwrap();
        assert!(matches!(
            check(&rec, "dovecot-login", &dovecot(), true),
            Verdict::Forgery(_)
        ));
    }

    #[test]
    fn missing_attestation_depends_on_the_setting() {
        let text = format!("<22>Nov 24 15:36:30 mail dovecot: {LINE}");
        let rec = parse_str(&text).unwrap();
        assert_eq!(
            check(&rec, "dovecot-login", &dovecot(), false),
            Verdict::Unattested
        );
        assert!(matches!(
            check(&rec, "dovecot-login", &dovecot(), true),
            Verdict::Forgery(_)
        ));
    }

    #[test]
    fn repeated_misplaced_or_odd_elements_are_forgeries() {
        for sd in [
            r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"][attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#,
            r#"[other@32473 a="b"][attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#,
            r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" uid="1000" pid="1"]"#,
            r#"[attest@32473 exe="/tmp/x\"y" uid="0" pid="1"]"#,
            r#"[attest@32473 exe="0" uid="0" pid="1"]"#,
            r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="root" pid="1"]"#,
            r#"[attest@32473 exe="/usr/lib/dovecot/log" pid="1"]"#,
        ] {
            let text = with_sd(sd);
            let rec = parse_str(&text).unwrap();
            assert!(
                matches!(
                    check(&rec, "dovecot-login", &dovecot(), false),
                    Verdict::Forgery(_)
                ),
                "{sd}"
            );
        }
    }

    #[test]
    fn a_pattern_without_executables_never_accepts_an_attested_record() {
        let text = with_sd(r#"[attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]"#);
        let rec = parse_str(&text).unwrap();
        let Verdict::Forgery(why) = check(&rec, "custom-1", &Speakers::default(), false) else {
            panic!("granted");
        };
        assert!(why.contains("names no executables"), "{why}");
    }
}
