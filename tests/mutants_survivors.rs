//! Tests written for mutants that the fast suites (`--lib --test samples
//! --test properties`) let survive (see TESTING.md, "Mutation testing").
//! Each goes through the library's public API only, so that it outlives
//! rewrites of the internals; each names the mutant it kills.

use std::net::{IpAddr, Ipv6Addr};

use smtp_after_popd::grants::addr::{AddressPolicy, Cidr, embedded_ipv4};
use smtp_after_popd::ingest::record::parse_str;
use smtp_after_popd::recognise::matcher::{
    AddressMemory, MEMORY_ENTRIES, Matchers, Outcome, ProcessKey, parse_pattern_specs,
    regex_delimiter,
};
use smtp_after_popd::service::daemon::Settings;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Loads custom patterns (beside the built-in ones) from a configuration
/// text.
fn custom(
    src: &str,
) -> Result<Matchers, (bool, smtp_after_popd::recognise::matcher::PatternError)> {
    let specs = parse_pattern_specs(src).unwrap();
    let pairs: Vec<_> = specs.into_iter().map(|s| (s, src)).collect();
    Matchers::new(&pairs)
}

/// `::1` is the loopback address, not the IPv4-compatible form of
/// 0.0.0.1 (nor is `::`, the unspecified address).
/// Kills `addr.rs: replace > with >= in embedded_ipv4`.
#[test]
fn loopback_and_unspecified_carry_no_ipv4_address() {
    assert_eq!(embedded_ipv4(Ipv6Addr::LOCALHOST), vec![]);
    assert_eq!(embedded_ipv4(Ipv6Addr::UNSPECIFIED), vec![]);
    let two: Ipv6Addr = "::2".parse().unwrap();
    assert_eq!(embedded_ipv4(two).len(), 1, "::2 is ::0.0.0.2");
}

/// A login grants its address alone, with no reason to log, when no
/// prefix was asked for (`--ipv6-prefix 128`, the default) and for every
/// IPv4 address; a reason is given only when a prefix was asked for and
/// the address alone is granted.
/// Kills `addr.rs: replace || with && in AddressPolicy::scope`.
#[test]
fn the_address_alone_is_granted_without_a_reason_when_no_prefix_was_asked() {
    let plain = AddressPolicy::new(vec!["192.0.2.0/24".parse::<Cidr>().unwrap()]);
    for a in [
        "::2",
        "64:ff9b::1",
        "2001:db8::5",
        "192.0.2.5",
        "198.51.100.5",
    ] {
        assert_eq!(plain.scope(ip(a)), (Cidr::host(ip(a)), None), "{a}");
    }
    let wide = plain.clone().with_ipv6_prefix(64, true);
    assert_eq!(
        wide.scope(ip("192.0.2.5")),
        (Cidr::host(ip("192.0.2.5")), None)
    );
    let (c, why) = wide.scope(ip("::2"));
    assert!(c.is_host() && why.is_some(), "{c} {why:?}");
}

/// The text that ends a user's group is found after the group's own
/// closing parenthesis, not after one inside a character class of the
/// group: `(?P<user>[^)]*)' logged` ends with `' logged`. Without it, a
/// custom pattern whose user group excludes `)` would have no delimiter,
/// and a user name holding the server's text would not be refused as
/// ambiguous.
/// Kills `matcher.rs: delete ! in regex_delimiter`.
#[test]
fn a_parenthesis_inside_a_class_does_not_close_the_user_group() {
    assert_eq!(
        regex_delimiter(r"User '(?P<user>[^)]*)' logged in from (?P<ip>\S+)", "user").as_deref(),
        Some("' logged in from ")
    );
    assert_eq!(
        regex_delimiter(r"login \((?P<user>[^()]+)\) from", "user").as_deref(),
        Some(") from")
    );
}

/// A login-after-address line may be written by the user who logged in
/// (popa3d, vm-pop3d write it after switching to that user), so its uid
/// proves nothing: a custom pattern that declares `credential = "uid"`
/// for one is refused at start, naming the pattern and the fix.
/// Kills `matcher.rs: replace match guard kind == Kind::LoginAfterAddress
/// with false in Matchers::add`.
#[test]
fn a_login_after_address_pattern_may_not_take_the_uid_as_credential() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nkind = \"login-after-address\"\ncredential = \"uid\"\nexecutables = [\"/usr/sbin/mypop\"]\nregex = 'Authentication passed for (?P<user>\\S+)'\n";
    let Err((builtin, e)) = custom(src) else {
        panic!("a login-after-address pattern with credential = \"uid\" was accepted");
    };
    assert!(!builtin);
    assert!(e.message.contains("pattern \"mine\""), "{}", e.message);
    assert!(e.message.contains("uid is no credential"), "{}", e.message);
    // The same pattern with the default credential (the process) loads.
    let src = src.replace("credential = \"uid\"\n", "");
    assert!(custom(&src).is_ok());
}

/// At start, with require-attestation, the daemon names the patterns
/// that grant nothing because every account they name is missing here,
/// and not the patterns that name no account at all (another note names
/// those).
/// Kills `matcher.rs: delete ! in Matchers::attestation_notes` (1120:60)
/// and `replace && with || in Matchers::attestation_notes` (1127:25): a
/// start-up note only, but the one that tells the administrator why a
/// server's logins are refused.
#[test]
fn the_start_up_note_names_the_patterns_whose_accounts_are_all_missing() {
    let src = "[[pattern]]\nid = \"h6mute\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nexecutables = [\"/usr/sbin/mypop\"]\nuids = [\"h6-no-such-account\"]\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n\n[[pattern]]\nid = \"h6unnamed\"\nserver = \"yourpop\"\nprogram = [\"yourpop\"]\nservice = \"pop3\"\nexecutables = [\"/usr/sbin/yourpop\"]\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n";
    let m = custom(src).unwrap();
    let notes = m.attestation_notes(true);
    let missing = notes
        .iter()
        .map(|(_, n)| n)
        .find(|n| n.starts_with("accounts named by patterns that do not exist"))
        .expect("a note on the missing account");
    assert!(missing.contains("h6-no-such-account (h6mute)"), "{missing}");
    let (_, mute) = missing
        .split_once(", so with require-attestation ")
        .unwrap_or_else(|| panic!("no patterns that grant nothing in: {missing}"));
    assert!(mute.contains("h6mute"), "{missing}");
    assert!(!mute.contains("h6unnamed"), "{missing}");
    // Without require-attestation those patterns still grant unattested
    // lines: the note does not say they grant nothing.
    let notes = m.attestation_notes(false);
    let missing = notes
        .iter()
        .map(|(_, n)| n)
        .find(|n| n.starts_with("accounts named by patterns that do not exist"))
        .expect("a note on the missing account");
    assert!(!missing.contains("grant nothing"), "{missing}");
}

/// The two-line memory (popa3d's `Session from IP`, then `Authentication
/// passed` from the same process) holds at most `MEMORY_ENTRIES`
/// addresses: a flood of address lines from new processes pushes the
/// oldest out (counted as dropped) instead of growing without bound.
/// Kills `matcher.rs: delete ! in AddressMemory::pair` (1347:60).
#[tokio::test(start_paused = true)]
async fn the_address_memory_stays_bounded_under_a_flood_of_new_processes() {
    let m = Matchers::builtin();
    let memory = AddressMemory::new();
    let now = tokio::time::Instant::now();
    let mut dropped = 0;
    for pid in 1..=(MEMORY_ENTRIES + 10) {
        let line = format!(
            "<22>Dec  1 21:33:29 mail popa3d[{pid}]: Session from 192.0.{}.{}",
            pid / 250,
            pid % 250 + 1
        );
        let rec = parse_str(&line).unwrap();
        let outcome = m.match_record(&rec);
        assert!(
            matches!(outcome, Outcome::Address { .. }),
            "{line}: {outcome:?}"
        );
        let key = ProcessKey::of("127.0.0.1".to_string(), &rec, rec.pid);
        let (_, d) = memory.pair(key, outcome, now, false);
        dropped += d;
    }
    assert_eq!(memory.len(), MEMORY_ENTRIES);
    assert_eq!(dropped, 10);
}

/// With a Postfix map (and no memcached), an IPv6 prefix is granted only
/// when it has a key Postfix tries for every address in it: 2001:0:0:1::/64
/// has none (a run of zero groups), so its login grants the address alone.
/// Kills `pipeline.rs: replace || with && in Settings::of`.
#[test]
fn with_a_map_a_prefix_without_postfix_keys_grants_the_address_alone() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("access");
    let args = <smtp_after_popd::service::config::Cli as clap::Parser>::try_parse_from([
        "smtp-after-popd",
        "--map",
        map.to_str().unwrap(),
        "--ipv6-prefix",
        "64",
    ])
    .unwrap()
    .daemon;
    let config = smtp_after_popd::service::config::Config::from_args(&args).unwrap();
    let s = Settings::of(&config);
    let (scope, why) = s.policy.scope(ip("2001:0:0:1::5"));
    assert!(scope.is_host(), "{scope}");
    assert!(why.is_some_and(|w| w.contains("no key")));
    let (scope, _) = s.policy.scope(ip("2001:db8:1:2::5"));
    assert_eq!(scope.to_string(), "2001:db8:1:2::/64");
}

// ---- From the full run (TESTING.md, "The whole set") ----

/// A login is never widened into a prefix that lies in the NAT64 block
/// (64:ff9b::/32: its addresses carry an IPv4 address each, so the /64
/// of one is a range of other IPv4 hosts) or in multicast (ff00::/8).
/// Kills `addr.rs: replace << with >>` in `NOT_WIDENED` (both shifts).
#[test]
fn nat64_and_multicast_addresses_are_never_widened_into_a_prefix() {
    let wide = AddressPolicy::new(vec![]).with_ipv6_prefix(64, false);
    for a in ["64:ff9b::c000:205", "ff02::1", "ff05::1:3"] {
        let (c, why) = wide.scope(ip(a));
        assert!(c.is_host(), "{a} was widened to {c}");
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("which is never granted by prefix")),
            "{a}: {why:?}"
        );
    }
    // An ordinary address is widened, so the above is the block, not the policy.
    let (c, _) = wide.scope(ip("2001:db8:7::5"));
    assert_eq!(c.to_string(), "2001:db8:7::/64");
}

/// A block that ends in more than two zero groups (`2001:db8:1::/96`)
/// has no key that Postfix tries for every address in it, so no keys are
/// given for it; a block ending in two zero groups still has one.
/// Kills `addr.rs: replace - with / in postfix_keys`.
#[test]
fn a_block_ending_in_three_zero_groups_has_no_postfix_keys() {
    use smtp_after_popd::grants::addr::postfix_keys;
    for c in ["2001:db8:1::/96", "2001:db8:1::/112", "2001:db8:1:2::/112"] {
        let c: Cidr = c.parse().unwrap();
        assert_eq!(postfix_keys(&c), None, "{c}");
    }
    let c: Cidr = "2001:db8:1:2:3::/112".parse().unwrap();
    assert!(postfix_keys(&c).is_some(), "{c}");
}

/// User names are shared (one copy per distinct name) up to
/// `Names::MAX`; past it a name is still returned, but not kept.
/// Kills `table.rs: replace < with == in Names::get` and `< with <=`.
#[test]
fn names_are_shared_up_to_the_bound_and_not_kept_past_it() {
    use smtp_after_popd::grants::table::Names;
    use std::sync::Arc;
    let names = Names::default();
    let a = names.get("alice");
    assert!(
        Arc::ptr_eq(&a, &names.get("alice")),
        "the first name is kept"
    );
    for i in 1..Names::MAX {
        names.get(&format!("user{i}"));
    }
    // MAX names are kept now: one more is returned but not kept.
    let over = names.get("one-too-many");
    assert_eq!(&*over, "one-too-many");
    assert!(!Arc::ptr_eq(&over, &names.get("one-too-many")));
    assert!(Arc::ptr_eq(&a, &names.get("alice")));
}

/// A `name=` inside a character class is no field of the server's text:
/// the class runs to its `]`, whatever its first character.
/// Kills `matcher.rs: replace != with == in regex_fields`.
#[test]
fn a_name_and_equals_sign_inside_a_class_is_no_field() {
    use smtp_after_popd::recognise::matcher::regex_fields;
    assert!(regex_fields(r"[xy=]+").is_empty());
    assert!(regex_fields(r"(?P<user>[a-z=]+)").is_empty());
    assert_eq!(regex_fields(r"[^=]+ rip=(?P<ip>\S+)"), ["rip="]);
}

/// An escaped parenthesis inside the user's group does not close it: the
/// text after the group is read from the group's own `)`.
/// Kills `matcher.rs: delete match arm b'\\' in group_end`.
#[test]
fn an_escaped_parenthesis_does_not_close_the_user_group() {
    assert_eq!(
        regex_delimiter(r"login (?P<user>\w+\)) logged in", "user").as_deref(),
        Some(" logged in")
    );
}

/// A `+` after a literal character of the text that follows the user's
/// group keeps that character (one or more of it is still there).
/// Kills `matcher.rs: replace += with -= in regex_delimiter` (the `+` arm).
#[test]
fn a_repeated_literal_after_the_user_group_stays_in_its_delimiter() {
    assert_eq!(
        regex_delimiter(r"user (?P<user>\S+):+ from (?P<ip>\S+)", "user").as_deref(),
        Some(": from ")
    );
}

/// The `match` command counts lines of unknown programs without parsing
/// them: a known program name where a syslog tag stands (after a space,
/// before `:` or `[`) is read straight from the bytes; anywhere else it
/// is left to the parser.
/// Kills `matcher.rs: replace Needles::find -> Option<Range<usize>> with None`.
#[test]
fn a_known_program_at_the_tag_is_read_without_parsing() {
    let m = Matchers::builtin();
    assert_eq!(
        m.program_at_tag(b"<22>Nov 24 15:36:30 mail dovecot: imap-login: x"),
        Some("dovecot")
    );
    assert_eq!(
        m.program_at_tag(b"<22>Nov 24 15:36:30 mail dovecot[77]: x"),
        Some("dovecot")
    );
    assert_eq!(
        m.program_at_tag(b"<22>Nov 24 15:36:30 mail dovecotx: x"),
        None
    );
    assert_eq!(
        m.program_at_tag(b"<22>Nov 24 15:36:30 mail xdovecot: x"),
        None
    );
}

/// A custom pattern without an id is named after its server and its
/// place among all patterns, counted from 1 (the built-in ones first), as
/// the logs and `match` report it.
/// Kills `matcher.rs: replace + with * in Matchers::add`.
#[test]
fn a_pattern_without_an_id_is_named_after_its_server_and_place() {
    use smtp_after_popd::recognise::matcher::BUILTIN_PATTERNS;
    let builtins = parse_pattern_specs(BUILTIN_PATTERNS).unwrap().len();
    let src = "[[pattern]]\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n";
    let m = custom(src).unwrap();
    let rec = parse_str("<22>Nov 24 15:36:30 mail mypop[3]: OK login bob from 192.0.2.9").unwrap();
    let Outcome::Login(login) = m.match_record(&rec) else {
        panic!("no login");
    };
    assert_eq!(&*login.pattern, format!("mypop-{}", builtins + 1));
}

/// A pattern must name the syslog tags it applies to: an empty list, or
/// an empty name in it, is refused at start with the fix.
/// Kills `matcher.rs: replace || with && in Matchers::add`.
#[test]
fn a_pattern_with_no_program_is_refused() {
    for program in ["[]", "[\"\"]", "[\"mypop\", \"\"]"] {
        let src = format!(
            "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = {program}\nservice = \"pop3\"\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n"
        );
        let Err((_, e)) = custom(&src) else {
            panic!("program = {program} was accepted");
        };
        assert!(
            e.message.contains("program must list the syslog tags"),
            "{}",
            e.message
        );
    }
}

/// A field a custom pattern declares (`fields = [...]`, for a server that
/// writes one the regex does not spell out) is checked like the regex's
/// own: inside the user's text it makes the line ambiguous.
/// Kills `matcher.rs: delete ! in Matchers::add` (the declared fields).
#[test]
fn a_declared_field_inside_the_user_text_is_ambiguous() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nfields = [\"via=\"]\nregex = 'OK login (?P<user>\\S+) from (?P<ip>[0-9.]+)'\n";
    let m = custom(src).unwrap();
    let line =
        |user: &str| format!("<22>Nov 24 15:36:30 mail mypop[3]: OK login {user} from 192.0.2.9");
    let plain = line("bob");
    assert!(matches!(
        m.match_record(&parse_str(&plain).unwrap()),
        Outcome::Login(_)
    ));
    let forged = line("bob,via=198.51.100.7");
    let outcome = m.match_record(&parse_str(&forged).unwrap());
    assert!(matches!(outcome, Outcome::Ambiguous { .. }), "{outcome:?}");
}

/// The benchmarks' naive baseline tries every pattern whatever the
/// program: it finds a login under any tag, and nothing in other text.
/// Kills `matcher.rs: replace Matchers::match_every_pattern -> bool with false`.
#[test]
fn the_naive_baseline_finds_a_login_under_any_tag() {
    let m = Matchers::builtin();
    let login = "<22>Nov 24 15:36:30 mail nottheprogram: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1, mpid=1, session=<abc>";
    assert!(m.match_every_pattern(&parse_str(login).unwrap()));
    let other = "<22>Nov 24 15:36:30 mail dovecot: imap(bob): Disconnected: Logged out";
    assert!(!m.match_every_pattern(&parse_str(other).unwrap()));
}

/// A user group joined to the address by `:` (vchkpw's `USER@DOMAIN:IP`)
/// is ambiguous when the text splits into another address at any other
/// `:`, also one inside the address (`u:a:b::1` is also `b::1`), wherever
/// the user's group starts in the message.
/// Kills `matcher.rs: replace - with + in Pattern::split`.
#[test]
fn a_split_inside_the_address_is_ambiguous_wherever_the_user_starts() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nregex = 'x(?P<user>\\w+):(?P<ip>[0-9a-f:.]+)'\n";
    let m = custom(src).unwrap();
    let outcome = |msg: &str| {
        m.match_record(&parse_str(&format!("<22>Nov 24 15:36:30 mail mypop[3]: {msg}")).unwrap())
    };
    assert!(matches!(outcome("xu:192.0.2.9"), Outcome::Login(_)));
    let o = outcome("xu:a:b::1");
    assert!(matches!(o, Outcome::Ambiguous { .. }), "{o:?}");
}

/// An account of a pattern's `uids` is written as the configuration
/// writes it (a number or a name), in start-up notes and `match`.
/// Kills `matcher.rs: replace <impl Display for Account>::fmt with Ok(Default::default())`.
#[test]
fn an_account_is_written_as_configured() {
    use smtp_after_popd::recognise::matcher::Account;
    assert_eq!(Account::Uid(0).to_string(), "0");
    assert_eq!(Account::Name("dovenull".into()).to_string(), "dovenull");
}

/// `match` sums up the lines of known programs that no pattern took: a
/// program is known when some pattern is written for it, and the
/// prefilter's program half tells which raw lines may name one.
/// Kills `matcher.rs: Matchers::knows_program` (delete !, -> true) and
/// `Matchers::may_name_program -> false`.
#[test]
fn known_programs_are_told_from_others() {
    let m = Matchers::builtin();
    assert!(m.knows_program("dovecot"));
    assert!(m.knows_program("ipop3d"));
    assert!(!m.knows_program("sshd"));
    assert!(!m.knows_program(""));
    assert!(m.may_name_program(b"<22>Nov 24 15:36:30 mail dovecot: anything"));
    assert!(!m.may_name_program(b"<22>Nov 24 15:36:30 mail sshd[4]: Accepted password"));
}

/// An address line whose login never came is forgotten `MEMORY_TTL`
/// later, and counted as dropped.
/// Kills `matcher.rs: replace += with *= in AddressMemory::expire`.
#[tokio::test(start_paused = true)]
async fn an_unpaired_address_line_is_dropped_and_counted_after_its_ttl() {
    use smtp_after_popd::recognise::matcher::MEMORY_TTL;
    let m = Matchers::builtin();
    let memory = AddressMemory::new();
    let t0 = tokio::time::Instant::now();
    let session = |pid: u32, ip: &str, now| {
        let line = format!("<22>Dec  1 21:33:29 mail popa3d[{pid}]: Session from {ip}");
        let rec = parse_str(&line).unwrap();
        let outcome = m.match_record(&rec);
        let key = ProcessKey::of("127.0.0.1".to_string(), &rec, rec.pid);
        memory.pair(key, outcome, now, false).1
    };
    assert_eq!(session(1, "192.0.2.1", t0), 0);
    assert_eq!(session(2, "192.0.2.2", t0 + MEMORY_TTL / 2), 0);
    assert_eq!(memory.len(), 2);
    assert!(!memory.is_empty());
    // The first is a TTL old now; the second is not.
    assert_eq!(session(3, "192.0.2.3", t0 + MEMORY_TTL), 1);
    assert_eq!(memory.len(), 2);
}

/// The prefilter lets through the lines that may hold a login and skips
/// the others without parsing them.
/// Kills `matcher.rs: replace Matchers::may_match -> bool with true`.
#[test]
fn the_prefilter_skips_lines_that_hold_no_login_text() {
    let m = Matchers::builtin();
    assert!(m.may_match(b"<22>Nov 24 15:36:30 mail dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1, mpid=1, session=<abc>"));
    assert!(!m.may_match(
        b"<22>Nov 24 15:36:30 mail sshd[4]: Accepted password for bob from 192.0.2.6 port 22 ssh2"
    ));
}

/// A second address line from the same process replaces the first, which
/// is counted as dropped unused.
/// Kills `matcher.rs: replace += with *= in AddressMemory::pair` (the replaced entry).
#[tokio::test(start_paused = true)]
async fn a_replaced_address_line_is_counted_as_dropped() {
    let m = Matchers::builtin();
    let memory = AddressMemory::new();
    let now = tokio::time::Instant::now();
    let mut dropped = Vec::new();
    for ip in ["192.0.2.1", "192.0.2.2"] {
        let line = format!("<22>Dec  1 21:33:29 mail popa3d[7]: Session from {ip}");
        let rec = parse_str(&line).unwrap();
        let key = ProcessKey::of("127.0.0.1".to_string(), &rec, rec.pid);
        dropped.push(memory.pair(key, m.match_record(&rec), now, false).1);
    }
    assert_eq!(dropped, [0, 1]);
    assert_eq!(memory.len(), 1);
}

/// The sample harness checks that at most one pattern claims a line:
/// `all_matching` names every pattern of the program that matches.
/// Kills `matcher.rs: replace Matchers::all_matching -> Vec<Arc<str>> with vec![]`.
#[test]
fn all_matching_names_the_patterns_that_match() {
    let m = Matchers::builtin();
    let rec = parse_str("<22>Nov 24 15:36:30 mail dovecot: imap-login: Login: user=<bob>, method=PLAIN, rip=192.0.2.6, lip=192.0.2.1, mpid=1, session=<abc>").unwrap();
    let ids: Vec<String> = m.all_matching(&rec).iter().map(|s| s.to_string()).collect();
    assert_eq!(ids, ["dovecot-login"]);
    let other = parse_str("<22>Nov 24 15:36:30 mail dovecot: imap(bob): Logged out").unwrap();
    assert!(m.all_matching(&other).is_empty());
}

/// A one-line login whose credential is its process takes the address its
/// process remembered only when that address line is as believed as the
/// login: an attested login never takes an unattested address line
/// (anyone could have written that one), an unattested login takes it.
/// Kills `matcher.rs: delete ! in AddressMemory::take`.
#[tokio::test(start_paused = true)]
async fn an_attested_login_takes_no_unattested_address() {
    let m = Matchers::builtin();
    let now = tokio::time::Instant::now();
    let line = "<22>Dec  1 21:33:29 mail popa3d[7]: Session from 192.0.2.1";
    let rec = parse_str(line).unwrap();
    let key = || ProcessKey::of("127.0.0.1".to_string(), &rec, rec.pid);
    let remember = |memory: &AddressMemory, attested| {
        memory.pair(key(), m.match_record(&rec), now, attested);
    };
    let Outcome::Address { server, .. } = m.match_record(&rec) else {
        panic!("no address line");
    };
    let a = ip("192.0.2.1");
    let memory = AddressMemory::new();
    remember(&memory, false);
    assert!(!memory.take(key(), &server, a, now, true));
    assert!(memory.take(key(), &server, a, now, false));
    let memory = AddressMemory::new();
    remember(&memory, true);
    assert!(memory.take(key(), &server, a, now, true));
}

/// `hold` says which login a logout ends: on an address, login-after-
/// address or login-without-address pattern it means nothing, and is
/// refused at start.
/// Kills `matcher.rs: replace match guard matches!(kind, ...) with false in hold_of`.
#[test]
fn hold_on_a_pattern_that_is_no_login_is_refused() {
    for (kind, regex) in [
        ("address", r"Session from (?P<ip>[0-9.]+)"),
        (
            "login-after-address",
            r"Authentication passed for (?P<user>\S+)",
        ),
        (
            "login-without-address",
            r"Authentication passed for (?P<user>\S+)",
        ),
    ] {
        let src = format!(
            "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nkind = \"{kind}\"\nhold = \"pid\"\nregex = '{regex}'\n"
        );
        let Err((_, e)) = custom(&src) else {
            panic!("hold on a {kind} pattern was accepted");
        };
        assert!(
            e.message
                .contains("hold is only for login and logout patterns"),
            "{kind}: {}",
            e.message
        );
    }
}

/// A login pattern must say which service it grants for: no `service`
/// and no `(?P<service>...)` group is refused at start; the group alone
/// is enough.
/// Kills `matcher.rs: replace match guard names.contains(&"service") with true in service_of`.
#[test]
fn a_login_pattern_must_say_its_service() {
    let load = |regex: &str| {
        let src = format!(
            "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nregex = '{regex}'\n"
        );
        custom(&src).map(|_| ()).map_err(|(_, e)| e.message)
    };
    let Err(e) = load(r"OK login (?P<user>\w+) from (?P<ip>[0-9.]+)") else {
        panic!("a login pattern without a service was accepted");
    };
    assert!(e.contains("say which service it is"), "{e}");
    assert_eq!(
        load(r"OK (?P<service>pop3|imap) login (?P<user>\w+) from (?P<ip>[0-9.]+)"),
        Ok(())
    );
}

/// The second line of a two-line login (popa3d's `Authentication passed`)
/// takes the address its process remembered only when that address line
/// is as believed as it: an attested success line never takes an
/// unattested address line.
/// Kills `matcher.rs: replace && with || in AddressMemory::pair` (the success line).
#[tokio::test(start_paused = true)]
async fn an_attested_success_line_takes_no_unattested_address_line() {
    let m = Matchers::builtin();
    let now = tokio::time::Instant::now();
    let session =
        parse_str("<22>Mar 11 08:00:01 mail popa3d[3101]: Session from 192.0.2.100").unwrap();
    let passed =
        parse_str("<22>Mar 11 08:00:02 mail popa3d[3101]: Authentication passed for alice")
            .unwrap();
    let key = |rec| ProcessKey::of("127.0.0.1".to_string(), rec, rec.pid);
    let run = |address_attested, login_attested| {
        let memory = AddressMemory::new();
        memory.pair(
            key(&session),
            m.match_record(&session),
            now,
            address_attested,
        );
        memory
            .pair(key(&passed), m.match_record(&passed), now, login_attested)
            .0
    };
    assert!(matches!(run(false, false), Outcome::Login(_)));
    assert!(matches!(run(true, true), Outcome::Login(_)));
    assert!(matches!(run(true, false), Outcome::Login(_)));
    let o = run(false, true);
    assert!(matches!(o, Outcome::NoAddress { .. }), "{o:?}");
}

/// Without a map or memcached (only the policy service or socketmap,
/// which answer from the table for any address), an IPv6 prefix is
/// granted whole, keys or not: 2001:0:0:1::/64 has no key Postfix's
/// check_client_access tries, and needs none here.
/// Kills `pipeline.rs: delete ! in Settings::of`.
#[test]
fn without_a_map_a_prefix_needs_no_postfix_keys() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix://{}", dir.path().join("policy").display());
    let args = <smtp_after_popd::service::config::Cli as clap::Parser>::try_parse_from([
        "smtp-after-popd",
        "--policy",
        sock.as_str(),
        "--map",
        "none",
        "--ipv6-prefix",
        "64",
    ])
    .unwrap()
    .daemon;
    let config = smtp_after_popd::service::config::Config::from_args(&args).unwrap();
    assert!(config.map.is_none() && config.memcache.is_empty());
    let s = Settings::of(&config);
    let (scope, why) = s.policy.scope(ip("2001:0:0:1::5"));
    assert_eq!(scope.to_string(), "2001:0:0:1::/64", "{why:?}");
}

/// A login-without-address pattern recognises lines that carry no
/// address: one that captures `(?P<ip>...)` is refused at start.
/// Kills `matcher.rs: replace match guard names.contains(&"ip") with false in kind_of`.
#[test]
fn a_login_without_address_pattern_may_not_capture_an_address() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nkind = \"login-without-address\"\nregex = 'Authentication passed for (?P<user>\\S+) from (?P<ip>[0-9.]+)'\n";
    let Err((_, e)) = custom(src) else {
        panic!("a login-without-address pattern with an ip group was accepted");
    };
    assert!(
        e.message.contains("must not capture (?P<ip>...)"),
        "{}",
        e.message
    );
}

/// The same for a login-after-address pattern: its address is the one its
/// process's address line gave.
/// Kills `matcher.rs: replace match guard names.contains(&"ip") with false
/// in kind_of` (the login-after-address arm).
#[test]
fn a_login_after_address_pattern_may_not_capture_an_address() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nkind = \"login-after-address\"\nregex = 'Authentication passed for (?P<user>\\S+) from (?P<ip>[0-9.]+)'\n";
    let Err((_, e)) = custom(src) else {
        panic!("a login-after-address pattern with an ip group was accepted");
    };
    assert!(
        e.message.contains("must not capture (?P<ip>...) itself"),
        "{}",
        e.message
    );
}

/// `hold = "session"` needs the session id: without a `(?P<session>...)`
/// group it is refused at start, with one it loads.
/// Kills `matcher.rs: replace match guard names.contains(&"session") with true in hold_of`.
#[test]
fn hold_by_session_needs_a_session_group() {
    let load = |regex: &str| {
        let src = format!(
            "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\nhold = \"session\"\nregex = '{regex}'\n"
        );
        custom(&src).map(|_| ()).map_err(|(_, e)| e.message)
    };
    let Err(e) = load(r"OK login (?P<user>\w+) from (?P<ip>[0-9.]+)") else {
        panic!("hold = session without a session group was accepted");
    };
    assert!(e.contains("has no named group \"session\""), "{e}");
    assert_eq!(
        load(r"OK login (?P<user>\w+) from (?P<ip>[0-9.]+) session (?P<session>\w+)"),
        Ok(())
    );
}

/// A login pattern may name the uid as its credential (the default for
/// one-line logins); only login-after-address patterns may not.
/// Kills `matcher.rs: replace match guard kind == Kind::LoginAfterAddress with true in process_of`.
#[test]
fn a_login_pattern_may_take_the_uid_as_credential() {
    let src = "[[pattern]]\nid = \"mine\"\nserver = \"mypop\"\nprogram = [\"mypop\"]\nservice = \"pop3\"\ncredential = \"uid\"\nexecutables = [\"/usr/sbin/mypop\"]\nuids = [0]\nregex = 'OK login (?P<user>\\w+) from (?P<ip>[0-9.]+)'\n";
    if let Err((_, e)) = custom(src) {
        panic!("{}", e.message);
    }
}
