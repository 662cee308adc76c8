//! Address rules: what a client address looks like in the map, and which
//! addresses may never be granted.
//!
//! Consumes: an [`IpAddr`] a matcher took from a login line.
//! Produces: the canonical form Postfix looks up ([`canonical`]), or a
//! [`Refusal`] saying why the address must not be granted.
//! Trusts: nothing. The never-grant rules apply whatever the log says, so a
//! forged or mistaken line can never open the relay to loopback, to
//! "anyone" (the unspecified address), to a multicast or broadcast address,
//! or to a network the administrator listed with `--never`.
//!
//! IPv4 in IPv6 clothing. A rule means what it says whatever form an
//! address or a rule is written in:
//! - A rule in IPv4-mapped form (`::ffff:198.51.100.0/120`) is folded to
//!   the IPv4 block it names (`198.51.100.0/24`) when it is read, because
//!   Postfix, and [`canonical`], see such clients as IPv4.
//! - An IPv6 address that carries an IPv4 address in one of the forms
//!   translators and old stacks use is refused when the IPv4 address it
//!   carries lies in a never-grant network: IPv4-compatible (`::a.b.c.d`,
//!   RFC 4291, deprecated), IPv4-translated (`::ffff:0:a.b.c.d`, SIIT,
//!   RFC 6145), the NAT64 well-known prefix (`64:ff9b::a.b.c.d`, RFC 6052)
//!   and the local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215) in each
//!   RFC 6052 layout an operator may use there (/48, /56, /64, /96; a
//!   layout counts when its reserved octet and suffix are zero, /96
//!   always). Otherwise such an address is an IPv6 address like any other
//!   and is granted as written. 6to4 (`2002::/16`) and Teredo
//!   (`2001::/32`) carry a relay's or a router's IPv4 address, not the
//!   client's, and are not unpacked.
//! - A rule written in one of those IPv6 forms (`64:ff9b::/96`) is an IPv6
//!   block and matches IPv6 addresses only; to refuse the IPv4 clients
//!   behind it, list their IPv4 block.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block such as `192.0.2.0/24` or `2001:db8::/32`; a bare
/// address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address, with all host bits zero.
    addr: IpAddr,
    /// The prefix length, 0-32 for IPv4 and 0-128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// The block of `prefix` bits around `ip` (host bits cleared; a prefix
    /// longer than the family's is the whole address).
    pub fn new(ip: IpAddr, prefix: u8) -> Cidr {
        match ip {
            IpAddr::V4(a) => {
                let prefix = prefix.min(32);
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
                    prefix,
                }
            }
            IpAddr::V6(a) => {
                let prefix = prefix.min(128);
                Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
                    prefix,
                }
            }
        }
    }

    /// The block of one address.
    pub fn host(ip: IpAddr) -> Cidr {
        Cidr::new(ip, 128)
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether the block is one address.
    pub fn is_host(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The block as grants show it: a bare address for one address
    /// (`192.0.2.7`), else `ADDR/PREFIX`.
    pub fn shown(&self) -> String {
        if self.is_host() {
            self.addr.to_string()
        } else {
            self.to_string()
        }
    }

    /// Whether `ip` lies in this block. An IPv4-mapped IPv6 address is
    /// compared as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask32(self.prefix);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask128(self.prefix);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Parses `ADDR` or `ADDR/PREFIX`. Host bits must be zero, as Postfix
    /// insists for its cidr tables; the error suggests the corrected block.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IP address or CIDR block such as 192.0.2.0/24 or 2001:db8::/32"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "\"{s}\" has a bad prefix length \"{p}\": expected 0 to {max}"
                    ));
                }
            },
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        if network != addr {
            return Err(format!(
                "\"{s}\" has non-null host address bits, perhaps you should use \"{network}/{prefix}\" instead"
            ));
        }
        // An IPv4-mapped block names IPv4 clients, which Postfix and the
        // daemon see as IPv4: keep it as the IPv4 block it is, so that it
        // matches them (`::ffff:198.51.100.0/120` is 198.51.100.0/24).
        if let IpAddr::V6(a) = addr
            && prefix >= 96
            && let Some(v4) = a.to_ipv4_mapped()
        {
            return Ok(Cidr {
                addr: IpAddr::V4(v4),
                prefix: prefix - 96,
            });
        }
        Ok(Cidr { addr, prefix })
    }
}

/// The IPv4 addresses an IPv6 address carries in the forms translators and
/// old stacks write (see the module doc), each with the name of its form;
/// empty for any other address. IPv4-mapped addresses are not among them:
/// [`canonical`] turns those into IPv4 before anything else looks.
pub fn embedded_ipv4(v6: Ipv6Addr) -> Vec<(Ipv4Addr, &'static str)> {
    let o = v6.octets();
    let s = v6.segments();
    let v4 = |b: [u8; 4]| Ipv4Addr::from(b);
    let low = v4([o[12], o[13], o[14], o[15]]);
    let mut out = Vec::new();
    if s[..6] == [0, 0, 0, 0, 0, 0] && u128::from(v6) > 1 {
        out.push((low, "IPv4-compatible ::a.b.c.d"));
    } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        out.push((low, "IPv4-translated ::ffff:0:a.b.c.d"));
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        out.push((low, "NAT64 64:ff9b::/96"));
    } else if s[..3] == [0x64, 0xff9b, 1] {
        // RFC 6052 layouts: octet 8 is reserved (zero) and the suffix
        // after the IPv4 octets is zero, but for /96.
        out.push((low, "NAT64 64:ff9b:1::/48, /96 layout"));
        let zero = |r: std::ops::Range<usize>| o[r].iter().all(|&b| b == 0);
        if o[8] == 0 {
            if zero(13..16) {
                out.push((
                    v4([o[9], o[10], o[11], o[12]]),
                    "NAT64 64:ff9b:1::/48, /64 layout",
                ));
            }
            if zero(12..16) {
                out.push((
                    v4([o[7], o[9], o[10], o[11]]),
                    "NAT64 64:ff9b:1::/48, /56 layout",
                ));
            }
            if zero(11..16) {
                out.push((
                    v4([o[6], o[7], o[9], o[10]]),
                    "NAT64 64:ff9b:1::/48, /48 layout",
                ));
            }
        }
    }
    out
}

/// The form of `ip` that Postfix looks up for a client: an IPv4-mapped IPv6
/// address (`::ffff:192.0.2.7`) becomes plain IPv4, because Postfix reports
/// such clients as IPv4. IPv6 addresses print lowercase and compressed
/// (RFC 5952), as Postfix writes them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why an address was not granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 0.0.0.0 or ::, which would stand for "any address", or another
    /// address of 0.0.0.0/8 ("this network"), never a packet's source.
    Unspecified,
    /// A multicast group is never a mail client.
    Multicast,
    /// 255.255.255.255 is never a mail client.
    Broadcast,
    /// The address lies in a network listed with `--never`.
    Never(Cidr),
    /// An IPv6 address carrying an IPv4 address (NAT64, SIIT,
    /// IPv4-compatible) that lies in a network listed with `--never`.
    Embedded {
        /// The IPv4 address it carries.
        v4: Ipv4Addr,
        /// The form it was read in.
        form: &'static str,
        /// The never-grant network of the IPv4 address.
        net: Cidr,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unspecified => f.write_str("unspecified address (0.0.0.0/8 or ::)"),
            Refusal::Multicast => f.write_str("multicast address"),
            Refusal::Broadcast => f.write_str("broadcast address"),
            Refusal::Never(c) => write!(f, "address in never-grant network {c}"),
            Refusal::Embedded { v4, form, net } => write!(
                f,
                "IPv6 address carrying the IPv4 address {v4} ({form}), which is in never-grant network {net}"
            ),
        }
    }
}

/// IPv6 blocks a login's address is never widened into a prefix grant in:
/// IPv4-compatible, mapped and translated forms and loopback (`::/8`), the
/// NAT64 prefixes (`64:ff9b::/32`), multicast.
const NOT_WIDENED: [(u128, u8); 3] = [(0, 8), (0x0064_ff9b_u128 << 96, 32), (0xff_u128 << 120, 8)];

/// The keys Postfix's `check_client_access` looks up for every address of
/// block `c`, when there are such keys, for a map or memcached.
///
/// smtpd tries the client's address as it prints it (lowercase,
/// compressed as RFC 5952, as inet_ntop writes it), then that text cut
/// short at each `:` from the right (`split_at_right(addr, ':')` in
/// smtpd_check.c's `check_addr_access`). So a block that ends on a group
/// boundary has the key of its groups (`2001:db8:1:2` for
/// 2001:db8:1:2::/64), which every address of the block whose text writes
/// those groups out tries; when the block ends in one or two zero groups,
/// an address whose `::` starts there tries the groups before them and a
/// colon (`2001:db8:1:` for 2001:db8:1::/64, as 2001:db8:1::5 does), and
/// that key is tried by no address outside the block. A block with a run
/// of two or more zero groups before its end (2001:0:0:1::/64), or with
/// three or more at its end, has addresses whose only keys are shared
/// with other blocks: no key is safe, and `None` says so. A block that
/// does not end on a group boundary has no key either. One address's key
/// is the address itself.
pub fn postfix_keys(c: &Cidr) -> Option<Vec<String>> {
    let IpAddr::V6(net) = c.addr else {
        return Some(vec![c.addr.to_string()]);
    };
    if c.is_host() {
        return Some(vec![net.to_string()]);
    }
    if !c.prefix.is_multiple_of(16) || c.prefix == 0 {
        return None;
    }
    let groups = &net.segments()[..usize::from(c.prefix / 16)];
    let n = groups.len();
    // The zero run that ends the block, if any, starts at `tail`.
    let tail = groups.iter().rposition(|&g| g != 0).map_or(0, |i| i + 1);
    if tail == 0 || n - tail > 2 {
        return None;
    }
    // A run of two or more zero groups before the end.
    let mut run = 0;
    for &g in &groups[..tail] {
        run = if g == 0 { run + 1 } else { 0 };
        if run >= 2 {
            return None;
        }
    }
    let join = |gs: &[u16]| {
        gs.iter()
            .map(|g| format!("{g:x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut keys = vec![join(groups)];
    if tail < n {
        keys.push(format!("{}:", join(&groups[..tail])));
    }
    Some(keys)
}

/// The never-grant rules, and how wide a grant is.
#[derive(Clone, Debug)]
pub struct AddressPolicy {
    /// Networks the administrator never wants granted (`--never`).
    never: Vec<Cidr>,
    /// The prefix length an IPv6 login grants (`--ipv6-prefix`; 128: the
    /// address alone).
    ipv6_prefix: u8,
    /// Whether grants must have keys Postfix tries (a map or memcached is
    /// written): a prefix without one grants the address alone.
    map_keys: bool,
}

impl AddressPolicy {
    /// A policy refusing the fixed classes plus the given networks.
    pub fn new(never: Vec<Cidr>) -> Self {
        AddressPolicy {
            never,
            ipv6_prefix: 128,
            map_keys: false,
        }
    }

    /// The same rules, granting each IPv6 login its `/prefix`; with
    /// `map_keys`, only prefixes [`postfix_keys`] finds keys for.
    pub fn with_ipv6_prefix(mut self, prefix: u8, map_keys: bool) -> Self {
        self.ipv6_prefix = prefix;
        self.map_keys = map_keys;
        self
    }

    /// What a login from `ip` (which passed [`AddressPolicy::check`])
    /// grants: its IPv6 prefix, or the address alone, with the reason
    /// when a prefix was asked for but the address alone is granted.
    pub fn scope(&self, ip: IpAddr) -> (Cidr, Option<String>) {
        let host = Cidr::host(ip);
        if !ip.is_ipv6() || self.ipv6_prefix >= 128 {
            return (host, None);
        }
        let wide = Cidr::new(ip, self.ipv6_prefix);
        let why = if let Some(&(net, len)) = NOT_WIDENED
            .iter()
            .find(|&&(net, len)| wide.overlaps(&Cidr::new(IpAddr::V6(net.into()), len)))
        {
            format!(
                "{wide} lies in {}, which is never granted by prefix",
                Cidr::new(IpAddr::V6(net.into()), len)
            )
        } else if let Some(n) = self.never.iter().find(|n| n.overlaps(&wide)) {
            format!("{wide} overlaps never-grant network {n}")
        } else if self.map_keys && postfix_keys(&wide).is_none() {
            format!(
                "{wide} has no key that Postfix's check_client_access tries for every address in it (a run of zero groups)"
            )
        } else {
            return (wide, None);
        };
        (host, Some(why))
    }

    /// Whether a live grant of block `c` may stay under these rules.
    pub fn check_scope(&self, c: &Cidr) -> Result<(), Refusal> {
        self.check(c.addr)?;
        if !c.is_host()
            && let Some(n) = self.never.iter().find(|n| n.overlaps(c))
        {
            return Err(Refusal::Never(*n));
        }
        Ok(())
    }

    /// The canonical address if it may be granted, else why not.
    pub fn check(&self, ip: IpAddr) -> Result<IpAddr, Refusal> {
        let ip = canonical(ip);
        if ip.is_unspecified() || matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 0) {
            return Err(Refusal::Unspecified);
        }
        if ip.is_multicast() {
            return Err(Refusal::Multicast);
        }
        if let IpAddr::V4(v4) = ip
            && v4.is_broadcast()
        {
            return Err(Refusal::Broadcast);
        }
        if let Some(c) = self.never.iter().find(|c| c.contains(ip)) {
            return Err(Refusal::Never(*c));
        }
        if let IpAddr::V6(v6) = ip {
            for (v4, form) in embedded_ipv4(v6) {
                if let Some(net) = self.never.iter().find(|c| c.contains(IpAddr::V4(v4))) {
                    return Err(Refusal::Embedded {
                        v4,
                        form,
                        net: *net,
                    });
                }
            }
        }
        Ok(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parses_and_contains() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(c.contains(ip("192.0.2.200")));
        assert!(c.contains(ip("::ffff:192.0.2.1")));
        assert!(!c.contains(ip("192.0.3.1")));
        let c6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c6.contains(ip("2001:db8:ffff::1")));
        assert!(!c6.contains(ip("2001:db9::1")));
        let host: Cidr = "::1".parse().unwrap();
        assert!(host.contains(ip("::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
    }

    #[test]
    fn cidr_rejects_host_bits_with_suggestion() {
        let e = "172.16.1.3/21".parse::<Cidr>().unwrap_err();
        assert!(
            e.contains("perhaps you should use \"172.16.0.0/21\""),
            "{e}"
        );
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("prefix")
        );
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn canonical_folds_mapped_and_compresses() {
        assert_eq!(canonical(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7");
        assert_eq!(
            canonical(ip("2001:DB8:0:0:0:0:0:1")).to_string(),
            "2001:db8::1"
        );
        assert_eq!(
            canonical(ip("2001:db8:0:1:0:0:0:1")).to_string(),
            "2001:db8:0:1::1"
        );
    }

    #[test]
    fn policy_refuses_fixed_classes_and_never_list() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(p.check(ip("0.0.0.0")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("::")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("::ffff:0.0.0.0")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("224.0.0.1")), Err(Refusal::Multicast));
        assert_eq!(p.check(ip("ff02::1")), Err(Refusal::Multicast));
        assert_eq!(p.check(ip("255.255.255.255")), Err(Refusal::Broadcast));
        assert!(matches!(p.check(ip("127.0.0.5")), Err(Refusal::Never(_))));
        assert!(matches!(
            p.check(ip("::ffff:127.0.0.5")),
            Err(Refusal::Never(_))
        ));
        assert!(matches!(p.check(ip("::1")), Err(Refusal::Never(_))));
        assert_eq!(p.check(ip("::ffff:192.0.2.7")), Ok(ip("192.0.2.7")));
    }

    #[test]
    fn an_ipv4_mapped_rule_is_the_ipv4_block_it_names() {
        let c: Cidr = "::ffff:198.51.100.0/120".parse().unwrap();
        assert_eq!(c.to_string(), "198.51.100.0/24");
        assert!(c.contains(ip("198.51.100.9")));
        assert!(c.contains(ip("::ffff:198.51.100.9")));
        assert!(!c.contains(ip("198.51.101.9")));
        let one: Cidr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        let all: Cidr = "::ffff:0.0.0.0/96".parse().unwrap();
        assert_eq!(all.to_string(), "0.0.0.0/0");
        // The reproducer: accepted and echoed, yet 198.51.100.9
        // was granted.
        let p = AddressPolicy::new(vec!["::ffff:198.51.100.0/120".parse().unwrap()]);
        assert!(matches!(
            p.check(ip("198.51.100.9")),
            Err(Refusal::Never(_))
        ));
        // Host bits are still refused in the form given.
        assert!("::ffff:198.51.100.1/120".parse::<Cidr>().is_err());
        // Wider IPv6 blocks stay IPv6.
        let wide: Cidr = "::/64".parse().unwrap();
        assert_eq!(wide.to_string(), "::/64");
    }

    #[test]
    fn ipv6_forms_carrying_a_never_granted_ipv4_address_are_refused() {
        let p = AddressPolicy::new(vec![
            "198.51.100.0/24".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ]);
        for a in [
            "::198.51.100.9",
            "::127.0.0.1",
            "::ffff:0:198.51.100.9",
            "::ffff:0:127.0.0.1",
            "64:ff9b::198.51.100.9",
            "64:ff9b::7f00:1",
            "64:ff9b:1::198.51.100.9",
            "64:ff9b:1:abcd::c633:6409",
            // 64:ff9b:1::/48 in the /48, /56 and /64 layouts of RFC 6052.
            "64:ff9b:1:c633:64:900::",
            "64:ff9b:1:abc6:33:6409::",
            "64:ff9b:1:abcd:c6:3364:900:0",
        ] {
            assert!(
                matches!(p.check(ip(a)), Err(Refusal::Embedded { .. })),
                "{a}: {:?}",
                p.check(ip(a))
            );
        }
        let Err(why) = p.check(ip("64:ff9b::198.51.100.9")) else {
            panic!()
        };
        assert_eq!(
            why.to_string(),
            "IPv6 address carrying the IPv4 address 198.51.100.9 (NAT64 64:ff9b::/96), which is in never-grant network 198.51.100.0/24"
        );
        // The same forms of an address that may be granted are granted as
        // written; so are 6to4 and Teredo, and loopback's own ::1 is what
        // the rules say about it.
        for a in [
            "::203.0.113.9",
            "::ffff:0:203.0.113.9",
            "64:ff9b::203.0.113.9",
            "64:ff9b:1::203.0.113.9",
            "2002:c633:6409::1",
            "2001:0:c633:6409::1",
            "::2",
        ] {
            assert_eq!(p.check(ip(a)), Ok(ip(a)), "{a}");
        }
        assert_eq!(p.check(ip("::1")), Ok(ip("::1")));
    }

    #[test]
    fn postfix_keys_are_the_forms_smtpd_tries() {
        let keys = |s: &str| postfix_keys(&s.parse().unwrap());
        let v = |k: &[&str]| Some(k.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(keys("192.0.2.7"), v(&["192.0.2.7"]));
        assert_eq!(keys("2001:db8::1"), v(&["2001:db8::1"]));
        assert_eq!(keys("2001:db8:1:2::/64"), v(&["2001:db8:1:2"]));
        assert_eq!(keys("2001:db8:1::/64"), v(&["2001:db8:1:0", "2001:db8:1:"]));
        assert_eq!(keys("2001:db8::/64"), v(&["2001:db8:0:0", "2001:db8:"]));
        assert_eq!(keys("2001:db8:0:1::/64"), v(&["2001:db8:0:1"]));
        assert_eq!(keys("2001:db8:1:2:3::/80"), v(&["2001:db8:1:2:3"]));
        // A run of zero groups before the end, three at the end, all zero,
        // a prefix inside a group: no key is safe.
        assert_eq!(keys("2001:0:0:1::/64"), None);
        assert_eq!(keys("2001::/64"), None);
        assert_eq!(keys("::/64"), None);
        assert_eq!(keys("2001:db8:1:200::/56"), None);
    }

    /// Every address of a block tries one of its keys, and no address
    /// outside it does: the keys checked against smtpd's own walk
    /// (compressed text, then cut at each colon from the right).
    #[test]
    fn postfix_keys_cover_their_block_and_nothing_else() {
        fn tried(ip: Ipv6Addr) -> Vec<String> {
            let mut t = ip.to_string();
            let mut out = vec![t.clone()];
            while let Some(i) = t.rfind(':') {
                t.truncate(i);
                out.push(t.clone());
            }
            out
        }
        let nets = [
            "2001:db8:1:2::/64",
            "2001:db8:1::/64",
            "2001:db8::/64",
            "2001:db8:0:1::/64",
            "2001:db8:1:2:3::/80",
            "2001:db8:1:2::/48",
        ];
        // Addresses with every pattern of zero groups in groups 1-7.
        for net in nets {
            let Ok(c) = net.parse::<Cidr>() else {
                continue;
            };
            let Some(keys) = postfix_keys(&c) else {
                continue;
            };
            for bits in 0u32..128 {
                let mut seg = [0x2001u16, 0xdb8, 1, 2, 3, 4, 5, 6];
                for (i, s) in seg.iter_mut().enumerate().skip(1) {
                    if bits & (1 << (i - 1)) != 0 {
                        *s = 0;
                    }
                }
                let ip = Ipv6Addr::from(seg);
                let hit = tried(ip).iter().any(|t| keys.contains(t));
                assert_eq!(hit, c.contains(IpAddr::V6(ip)), "{net} {ip} {keys:?}");
            }
        }
    }

    #[test]
    fn scope_widens_ipv6_to_its_prefix_unless_it_must_not() {
        let p =
            AddressPolicy::new(vec!["2001:db8:9:9::5".parse().unwrap()]).with_ipv6_prefix(64, true);
        assert_eq!(
            p.scope(ip("2001:db8:1:2::5")).0.to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(p.scope(ip("192.0.2.7")).0.shown(), "192.0.2.7");
        for narrowed in ["2001:db8:9:9::1", "2001:0:0:1::5", "::2", "64:ff9b::1"] {
            let (c, why) = p.scope(ip(narrowed));
            assert!(c.is_host() && why.is_some(), "{narrowed}");
        }
        // Without a map, any prefix Postfix never needs a key for.
        let policy_only = AddressPolicy::new(Vec::new()).with_ipv6_prefix(64, false);
        assert!(!policy_only.scope(ip("2001:0:0:1::5")).0.is_host());
        assert!(
            p.check_scope(&"2001:db8:9:9::/64".parse().unwrap())
                .is_err()
        );
        assert!(p.check_scope(&"2001:db8:9:8::/64".parse().unwrap()).is_ok());
    }

    #[test]
    fn this_network_is_never_granted() {
        let p = AddressPolicy::new(Vec::new());
        assert_eq!(p.check(ip("0.0.0.1")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("::ffff:0.1.2.3")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("1.0.0.1")), Ok(ip("1.0.0.1")));
    }
}
