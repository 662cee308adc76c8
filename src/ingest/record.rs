//! Syslog records: one datagram's bytes become a typed [`Record`].
//!
//! Consumes: the raw bytes of one datagram (or one line of a log file).
//! Produces: a [`Record`] borrowing from those bytes: the program (syslog
//! tag), the process id, the hostname the sender claims, the message text and
//! any RFC 5424 structured data; or a [`ParseError`] saying why not.
//! Trusts: nothing. Every field is the sender's claim. The hostname is kept
//! for the log only; whether a record may speak for a mail server is decided
//! later from the transport and from attested structured data.
//!
//! Formats accepted: RFC 3164 with a hostname (what rsyslog and syslog-ng
//! forward), RFC 3164 without one (what a local program writes to a socket:
//! `<22>Nov 23 10:00:01 dovecot: ...`), RFC 5424, each with or without the
//! `<PRI>` part and with or without a trailing newline. The timestamp is
//! ignored: the receive time counts, so a sender in another time zone or a
//! date that cannot be placed loses nothing.

use std::fmt;

/// The largest datagram or line accepted, in bytes. Longer ones are dropped
/// and counted: no POP or IMAP login line comes near it, and a truncated
/// line must never be matched.
pub const MAX_RECORD: usize = 8192;

/// One syslog record, borrowing from the datagram it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The hostname the sender claims, if the format carries one.
    pub hostname: Option<&'a str>,
    /// The syslog tag (program name), e.g. `dovecot` or `cyrus/imap`.
    pub program: &'a str,
    /// The process id from `program[pid]` or the RFC 5424 PROCID field.
    pub pid: Option<u32>,
    /// The message text after the tag.
    pub message: &'a str,
    /// RFC 5424 structured data elements, in order: `(SD-ID, params)`.
    pub structured_data: Vec<(&'a str, Vec<(&'a str, String)>)>,
}

impl Record<'_> {
    /// The value of parameter `name` in the structured data element `id`.
    pub fn sd_param(&self, id: &str, name: &str) -> Option<&str> {
        self.structured_data
            .iter()
            .filter(|(sid, _)| *sid == id)
            .flat_map(|(_, params)| params.iter())
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a datagram is not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Longer than [`MAX_RECORD`].
    TooLong,
    /// Not valid UTF-8.
    InvalidUtf8,
    /// No program name could be found: not a syslog record we can use.
    NoProgram,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::TooLong => "longer than 8192 bytes",
            ParseError::InvalidUtf8 => "not valid UTF-8",
            ParseError::NoProgram => "no syslog tag (program name) found",
        })
    }
}

/// Parses one datagram or log line.
pub fn parse(bytes: &[u8]) -> Result<Record<'_>, ParseError> {
    if bytes.len() > MAX_RECORD {
        return Err(ParseError::TooLong);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError::InvalidUtf8)?;
    parse_str(text)
}

/// Parses one record already known to be text.
pub fn parse_str(text: &str) -> Result<Record<'_>, ParseError> {
    if text.len() > MAX_RECORD {
        return Err(ParseError::TooLong);
    }
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    // The timestamp is ignored, so it is placed without the clock or the
    // local time zone (which would cost a clock read and a time-zone
    // lookup per record): a date without a year in 2000 (a leap year, so
    // that Feb 29 places), one without an offset in UTC.
    let msg = syslog_loose::parse_message_with_year_tz(
        text,
        |_| 2000,
        Some(chrono::Utc),
        syslog_loose::Variant::Either,
    );
    if let Some(program) = msg.appname {
        let structured_data = msg
            .structured_data
            .iter()
            .map(|e| {
                let params = e.params().map(|(k, v)| (*k, v.to_string())).collect();
                (e.id, params)
            })
            .collect();
        return Ok(Record {
            hostname: msg.hostname,
            program,
            pid: msg.procid.and_then(|p| match p {
                syslog_loose::ProcId::PID(n) => u32::try_from(n).ok(),
                syslog_loose::ProcId::Name(s) => s.parse().ok(),
            }),
            message: msg.msg,
            structured_data,
        });
    }
    // syslog_loose reads the tag of a record without a hostname as the
    // hostname, and gives up on dates it cannot place; both are common from
    // local programs, so find the tag ourselves.
    fallback_3164(text).ok_or(ParseError::NoProgram)
}

/// Finds `TAG[PID]: ` or `TAG: ` in an RFC 3164 record: the first
/// whitespace-separated token that ends in a colon and looks like a tag.
/// The token before it, if it is not part of the timestamp, is the hostname.
fn fallback_3164(text: &str) -> Option<Record<'_>> {
    let body = strip_pri(text);
    let mut prev: Option<&str> = None;
    let mut offset = 0usize;
    for token in body.split(' ') {
        offset += token.len() + 1;
        if token.is_empty() {
            continue;
        }
        if let Some(tag) = token.strip_suffix(':')
            && let Some((program, pid)) = split_tag(tag)
        {
            let message = body.get(offset.min(body.len())..).unwrap_or("");
            let hostname = prev.filter(|h| !h.contains(':'));
            return Some(Record {
                hostname,
                program,
                pid,
                message,
                structured_data: Vec::new(),
            });
        }
        prev = Some(token);
    }
    None
}

fn strip_pri(text: &str) -> &str {
    if let Some(rest) = text.strip_prefix('<')
        && let Some(end) = rest.find('>')
        && end <= 3
        && rest[..end].bytes().all(|b| b.is_ascii_digit())
    {
        return &rest[end + 1..];
    }
    text
}

/// Splits `name[pid]` or `name`; `None` if it does not look like a tag.
fn split_tag(tag: &str) -> Option<(&str, Option<u32>)> {
    let (name, pid) = match tag.find('[') {
        Some(i) => {
            let pid = tag[i + 1..].strip_suffix(']')?.parse().ok()?;
            (&tag[..i], Some(pid))
        }
        None => (tag, None),
    };
    let first = name.bytes().next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
    {
        return None;
    }
    Some((name, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &str) -> Record<'_> {
        parse_str(s).unwrap()
    }

    #[test]
    fn rfc3164_with_hostname() {
        let r = rec("<22>Nov 23 10:00:01 mail dovecot[123]: pop3-login: Login: user=<a>\n");
        assert_eq!(r.hostname, Some("mail"));
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.pid, Some(123));
        assert_eq!(r.message, "pop3-login: Login: user=<a>");
    }

    #[test]
    fn rfc3164_without_hostname_finds_the_tag() {
        let r = rec("<22>Nov 23 10:00:01 dovecot: pop3-login: Login: user=<a>");
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.hostname, None);
        assert_eq!(r.message, "pop3-login: Login: user=<a>");
        let r = rec("<22>Nov 23 10:00:01 dovecot[12]: pop3-login: Login");
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.pid, Some(12));
    }

    #[test]
    fn mail_log_line_without_pri() {
        let r = rec("Nov 23 10:00:01 mail dovecot: imap-login: Login: user=<a>");
        assert_eq!(r.hostname, Some("mail"));
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.message, "imap-login: Login: user=<a>");
    }

    #[test]
    fn unplaceable_date_keeps_the_record() {
        let r = rec("<22>Foo 99 10:00:01 mail dovecot: pop3-login: Login: x");
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.hostname, Some("mail"));
        assert_eq!(r.message, "pop3-login: Login: x");
    }

    #[test]
    fn rfc5424_with_structured_data() {
        let r = rec(
            "<22>1 2026-11-23T10:00:01.123+01:00 mail dovecot 123 - [attest@32473 exe=\"/usr/lib/dovecot/log\" uid=\"0\"] pop3-login: Login: x",
        );
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.hostname, Some("mail"));
        assert_eq!(r.message, "pop3-login: Login: x");
        assert_eq!(
            r.sd_param("attest@32473", "exe"),
            Some("/usr/lib/dovecot/log")
        );
        assert_eq!(r.sd_param("attest@32473", "pid"), None);
    }

    #[test]
    fn cyrus_service_tag() {
        let r = rec("<22>Nov 23 10:00:01 mail cyrus/imap[12]: login: x");
        assert_eq!(r.program, "cyrus/imap");
        assert_eq!(r.pid, Some(12));
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        assert_eq!(parse(b"garbage"), Err(ParseError::NoProgram));
        assert_eq!(parse(b""), Err(ParseError::NoProgram));
        assert_eq!(parse(b"\xff\xfe"), Err(ParseError::InvalidUtf8));
        assert_eq!(parse(&vec![b'a'; 9000]), Err(ParseError::TooLong));
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn rsyslog_high_precision_file_format() {
        // RSYSLOG_FileFormat, the default of many current distributions.
        let r = parse_str("2026-11-23T10:00:01.123456+01:00 mail dovecot: pop3-login: Login: x")
            .unwrap();
        assert_eq!(r.program, "dovecot");
        assert_eq!(r.hostname, Some("mail"));
        assert_eq!(r.message, "pop3-login: Login: x");
    }

    #[test]
    fn sd_values_are_unescaped() {
        let r = parse_str(
            r#"<22>1 2026-11-23T10:00:01Z mail dovecot 1 - [a@32473 exe="/x\"y\]z\\w"] m"#,
        )
        .unwrap();
        assert_eq!(r.sd_param("a@32473", "exe"), Some(r#"/x"y]z\w"#));
    }

    // ---- Tests for mutants the full run let survive (TESTING.md) ----

    /// The fallback parser drops a PRI of up to three digits and its `>`,
    /// and nothing more; anything else stays, to be read as text.
    #[test]
    fn strip_pri_drops_the_pri_and_its_bracket_only() {
        assert_eq!(strip_pri("<22>Nov 24 mail x"), "Nov 24 mail x");
        assert_eq!(strip_pri("<191>mail x"), "mail x");
        assert_eq!(strip_pri("<>mail x"), "mail x");
        assert_eq!(strip_pri("<1234>mail x"), "<1234>mail x");
        assert_eq!(strip_pri("<2a>mail x"), "<2a>mail x");
        assert_eq!(strip_pri("mail x"), "mail x");
    }

    /// The length bound comes first, whatever the bytes are: an oversize
    /// datagram is "too long" even when it is not UTF-8 either; the bound
    /// itself is allowed.
    #[test]
    fn the_length_bound_is_checked_before_anything_else() {
        assert_eq!(parse(&vec![0xff; MAX_RECORD + 1]), Err(ParseError::TooLong));
        assert_eq!(parse(&vec![0xff; MAX_RECORD]), Err(ParseError::InvalidUtf8));
        let mut line = b"<22>Nov 24 15:36:30 mail dovecot: ".to_vec();
        line.resize(MAX_RECORD, b'x');
        assert!(parse(&line).is_ok());
        line.push(b'x');
        assert_eq!(parse(&line), Err(ParseError::TooLong));
        // The same bound for text already known to be UTF-8.
        let text = String::from_utf8(line).unwrap();
        assert_eq!(parse_str(&text), Err(ParseError::TooLong));
        assert!(parse_str(&text[..MAX_RECORD]).is_ok());
        assert_eq!(parse_str(&"x".repeat(9000)), Err(ParseError::TooLong));
    }

    /// What the daemon logs for a datagram that is no record.
    #[test]
    fn parse_errors_say_what_was_wrong() {
        assert_eq!(ParseError::TooLong.to_string(), "longer than 8192 bytes");
        assert_eq!(ParseError::InvalidUtf8.to_string(), "not valid UTF-8");
        assert_eq!(
            ParseError::NoProgram.to_string(),
            "no syslog tag (program name) found"
        );
    }
}
