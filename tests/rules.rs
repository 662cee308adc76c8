//! The shipped forwarding rules (rsyslog/) forward the mail facility and,
//! whatever their facility, exactly the syslog tags the built-in patterns
//! know: a server that logs on daemon or local0 (popa3d, Solid POP3) still
//! reaches the daemon, and no other program's records are sent. This test
//! keeps the rules' tag lists in step with src/recognise/patterns.toml.

use std::collections::BTreeSet;
use std::path::Path;

use smtp_after_popd::recognise::matcher::{BUILTIN_PATTERNS, parse_pattern_specs};

/// The tags the built-in patterns apply to, as rsyslog's `$programname`
/// and syslog-ng's `${PROGRAM}` give them (the part after a "/" prefix).
fn pattern_tags() -> BTreeSet<String> {
    parse_pattern_specs(BUILTIN_PATTERNS)
        .expect("built-in patterns")
        .iter()
        .flat_map(|p| p.program.iter())
        .map(|t| t.rsplit('/').next().unwrap_or(t).to_string())
        .collect()
}

fn rule(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rsyslog")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The quoted names in `$programname == [ ... ]`.
fn rsyslog_list(text: &str) -> BTreeSet<String> {
    let start = text
        .find("$programname == [")
        .expect("a $programname == [...] filter");
    let rest = &text[start + "$programname == [".len()..];
    let end = rest.find(']').expect("end of the list");
    rest[..end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The alternatives of the first `(a|b|c)` group after `marker`.
fn alternatives(text: &str, marker: &str) -> BTreeSet<String> {
    let start = text.find(marker).unwrap_or_else(|| panic!("{marker:?}"));
    let rest = &text[start + marker.len()..];
    let end = rest.find(')').expect("end of the group");
    rest[..end]
        .split('|')
        .map(|s| s.replace("[.]", "."))
        .collect()
}

#[test]
fn the_rsyslog_rules_forward_the_mail_facility_and_exactly_the_known_tags() {
    let tags = pattern_tags();
    for file in [
        "smtp-after-popd-attested.conf",
        "smtp-after-popd-local.conf",
        "smtp-after-popd-remote.conf",
    ] {
        let text = rule(file);
        assert!(
            text.contains("if $syslogfacility-text == \"mail\"\n   or $programname == ["),
            "{file}: the mail facility and the tags"
        );
        assert_eq!(
            rsyslog_list(&text),
            tags,
            "{file}: the $programname list must be the built-in patterns' tags"
        );
        // Tags with a prefix ("cyrus/imap": rsyslog's $programname stops
        // at the "/"), by their last part.
        let prefixed = alternatives(&text, "re_match($syslogtag, \"^[A-Za-z0-9._-]+/(");
        assert!(
            prefixed.is_subset(&tags),
            "{file}: prefixed tags {prefixed:?} must be patterns' tags"
        );
        for cyrus in ["imap", "imaps", "pop3", "pop3s", "imapd", "pop3d"] {
            assert!(prefixed.contains(cyrus), "{file}: PREFIX/{cyrus}");
        }
        assert!(
            !text.contains("*.*"),
            "{file}: nothing is forwarded wholesale"
        );
    }
}

#[test]
fn the_syslog_ng_rule_forwards_the_mail_facility_and_exactly_the_known_tags() {
    let tags = pattern_tags();
    let text = rule("syslog-ng-smtp-after-popd.conf");
    assert!(text.contains("facility(mail)"));
    assert_eq!(alternatives(&text, "program(\"^("), tags);
    let prefixed = alternatives(&text, "program(\"^[A-Za-z0-9._-]+/(");
    assert!(prefixed.is_subset(&tags));
    // In a syslog-ng string "\." is an escape for ".", which a regex reads
    // as any character: the rule writes a literal dot as "[.]".
    assert!(!text.contains("\\."), "write a literal dot as [.]");
}
