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

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block such as `192.0.2.0/24` or `2001:db8::/32`; a bare
/// address is a block of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address, with all host bits zero.
    addr: IpAddr,
    /// The prefix length, 0-32 for IPv4 and 0-128 for IPv6.
    prefix: u8,
}

impl Cidr {
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
        Ok(Cidr { addr, prefix })
    }
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
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unspecified => f.write_str("unspecified address (0.0.0.0/8 or ::)"),
            Refusal::Multicast => f.write_str("multicast address"),
            Refusal::Broadcast => f.write_str("broadcast address"),
            Refusal::Never(c) => write!(f, "address in never-grant network {c}"),
        }
    }
}

/// The never-grant rules.
#[derive(Clone, Debug)]
pub struct AddressPolicy {
    /// Networks the administrator never wants granted (`--never`).
    never: Vec<Cidr>,
}

impl AddressPolicy {
    /// A policy refusing the fixed classes plus the given networks.
    pub fn new(never: Vec<Cidr>) -> Self {
        AddressPolicy { never }
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
    fn this_network_is_never_granted() {
        let p = AddressPolicy::new(Vec::new());
        assert_eq!(p.check(ip("0.0.0.1")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("::ffff:0.1.2.3")), Err(Refusal::Unspecified));
        assert_eq!(p.check(ip("1.0.0.1")), Ok(ip("1.0.0.1")));
    }
}
