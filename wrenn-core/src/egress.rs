//! Egress policy of a capsule: which destinations its guest may open
//! connections to.
//!
//! Semantics (E2B's): everything is allowed unless denied; a destination that
//! matches an `allow` entry is allowed even when a `deny` entry matches too.
//! `allow` holds IPv4 networks and domain names (`example.com` exactly,
//! `*.example.com` any name below it); `deny` holds IPv4 networks only. A domain
//! allows the addresses that name resolved to through the capsule's filtering
//! resolver, for the answer's TTL. Destinations in [`ALWAYS_DENIED`] and the
//! host itself are unreachable whatever the policy says.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Networks no capsule may reach, whatever its policy: "this" network,
/// loopback, link-local (which holds the metadata address 169.254.169.254, the
/// slots' own links and every other capsule's guest and veth addresses),
/// multicast, reserved and broadcast.
pub const ALWAYS_DENIED: [Ipv4Net; 5] = [
    Ipv4Net::new_unchecked(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Net::new_unchecked(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Net::new_unchecked(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_unchecked(Ipv4Addr::new(224, 0, 0, 0), 4),
    Ipv4Net::new_unchecked(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Nameserver a capsule may reach when its allow list has a domain and the
/// caller named no DNS servers (E2B's default).
pub const DEFAULT_DNS_SERVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// Most entries one list may hold.
pub const MAX_ENTRIES: usize = 1024;
/// Most DNS servers a policy may name.
pub const MAX_DNS_SERVERS: usize = 10;

/// An IPv4 network in canonical form (host bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `addr/prefix` with the host bits of `addr` cleared; `None` if `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self::new_unchecked(addr, prefix))
    }

    const fn new_unchecked(addr: Ipv4Addr, prefix: u8) -> Self {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Self {
            addr: Ipv4Addr::from_bits(addr.to_bits() & mask),
            prefix,
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        *self == Self::new_unchecked(ip, self.prefix)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 32 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl FromStr for Ipv4Net {
    type Err = InvalidEgress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidEgress::Address(s.to_owned());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => {
                let p: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
                (ip, p)
            }
            None => (s, 32),
        };
        if ip.contains(':') {
            return Err(InvalidEgress::Ipv6(s.to_owned()));
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        Ok(Self::new_unchecked(ip, prefix))
    }
}

/// A domain rule: one name exactly, or (`*.name`) every name below it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPattern {
    /// Lower case, no trailing dot.
    name: String,
    wildcard: bool,
}

impl DomainPattern {
    /// Whether `query` (any case, optional trailing dot) matches.
    pub fn matches(&self, query: &str) -> bool {
        let q = query.strip_suffix('.').unwrap_or(query);
        if self.wildcard {
            q.len() > self.name.len() + 1
                && q[q.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
                && q.as_bytes()[q.len() - self.name.len() - 1] == b'.'
        } else {
            q.eq_ignore_ascii_case(&self.name)
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl FromStr for DomainPattern {
    type Err = InvalidEgress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidEgress::Domain(s.to_owned());
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let labels: Vec<&str> = name.split('.').collect();
        // A bare label ("localhost") or an all-numeric name is not a domain rule.
        if name.len() > 253
            || labels.len() < 2
            || !labels.iter().all(|l| label_ok(l))
            || labels
                .last()
                .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad());
        }
        Ok(Self { name, wildcard })
    }
}

/// One `allow` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllowRule {
    Net(Ipv4Net),
    Domain(DomainPattern),
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowRule::Net(n) => n.fmt(f),
            AllowRule::Domain(d) => d.fmt(f),
        }
    }
}

impl FromStr for AllowRule {
    type Err = InvalidEgress;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let looks_like_ip = s.contains(':')
            || s.contains('/')
            || s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if looks_like_ip {
            s.parse().map(AllowRule::Net)
        } else {
            s.parse().map(AllowRule::Domain)
        }
    }
}

/// Why a policy was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEgress {
    #[error("{0:?} is not an IPv4 address or CIDR block")]
    Address(String),
    #[error(
        "{0:?} is an IPv6 rule; capsules have no IPv6 connectivity, so IPv6 rules are refused"
    )]
    Ipv6(String),
    #[error("{0:?} is not a domain name (use name.example or *.name.example)")]
    Domain(String),
    #[error("denyOut takes IPv4 addresses and CIDR blocks only, not the domain {0:?}")]
    DomainInDeny(String),
    #[error("{list} has {got} entries; at most {max} are allowed")]
    TooMany {
        list: &'static str,
        got: usize,
        max: usize,
    },
    #[error("{0} is not supported by this server and cannot be enforced")]
    Unsupported(String),
}

/// A capsule's egress policy. The default allows everything (no filtering).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EgressPolicyWire", into = "EgressPolicyWire")]
pub struct EgressPolicy {
    allow: Vec<AllowRule>,
    deny: Vec<Ipv4Net>,
    /// `None`: the default ([`DEFAULT_DNS_SERVER`] when a domain is allowed).
    dns_servers: Option<Vec<Ipv4Addr>>,
}

/// Serialised form: the caller's strings, as the APIs show them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EgressPolicyWire {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
}

impl TryFrom<EgressPolicyWire> for EgressPolicy {
    type Error = InvalidEgress;

    fn try_from(w: EgressPolicyWire) -> Result<Self, Self::Error> {
        EgressPolicy::new(&w.allow_out, &w.deny_out, w.dns_servers.as_deref())
    }
}

impl From<EgressPolicy> for EgressPolicyWire {
    fn from(p: EgressPolicy) -> Self {
        EgressPolicyWire {
            allow_out: p.allow.iter().map(ToString::to_string).collect(),
            deny_out: p.deny.iter().map(ToString::to_string).collect(),
            dns_servers: p
                .dns_servers
                .map(|v| v.iter().map(ToString::to_string).collect()),
        }
    }
}

impl EgressPolicy {
    /// Parses the caller's lists (E2B's `allowOut`, `denyOut`, `dnsServers`).
    pub fn new<S: AsRef<str>>(
        allow_out: &[S],
        deny_out: &[S],
        dns_servers: Option<&[S]>,
    ) -> Result<Self, InvalidEgress> {
        let check_len = |list, got: usize, max| {
            if got > max {
                Err(InvalidEgress::TooMany { list, got, max })
            } else {
                Ok(())
            }
        };
        check_len("allowOut", allow_out.len(), MAX_ENTRIES)?;
        check_len("denyOut", deny_out.len(), MAX_ENTRIES)?;
        let mut allow = allow_out
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<AllowRule>, _>>()?;
        let mut deny = deny_out
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                match s.parse::<Ipv4Net>() {
                    Err(InvalidEgress::Address(_)) if s.parse::<DomainPattern>().is_ok() => {
                        Err(InvalidEgress::DomainInDeny(s.to_owned()))
                    }
                    r => r,
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dns_servers = match dns_servers {
            None => None,
            Some(list) => {
                check_len("dnsServers", list.len(), MAX_DNS_SERVERS)?;
                let parsed = list
                    .iter()
                    .map(|s| {
                        let s = s.as_ref().trim();
                        if s.contains(':') {
                            return Err(InvalidEgress::Ipv6(s.to_owned()));
                        }
                        s.parse::<Ipv4Addr>()
                            .map_err(|_| InvalidEgress::Address(s.to_owned()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(parsed)
            }
        };
        allow.sort();
        allow.dedup();
        deny.sort();
        deny.dedup();
        Ok(Self {
            allow,
            deny,
            dns_servers,
        })
    }

    /// The policy E2B's `allow_internet_access=false` asks for.
    pub fn deny_all() -> Self {
        Self {
            deny: vec![Ipv4Net::new_unchecked(Ipv4Addr::UNSPECIFIED, 0)],
            ..Self::default()
        }
    }

    /// Adds `0.0.0.0/0` to the deny list (E2B's `allow_internet_access=false`).
    pub fn with_internet_denied(mut self) -> Self {
        let all = Ipv4Net::new_unchecked(Ipv4Addr::UNSPECIFIED, 0);
        if !self.deny.contains(&all) {
            self.deny.insert(0, all);
        }
        self
    }

    /// True when nothing is filtered beyond [`ALWAYS_DENIED`].
    pub fn is_open(&self) -> bool {
        self.deny.is_empty()
    }

    /// Whether the internet as a whole is denied (`0.0.0.0/0` in the deny list).
    pub fn internet_denied(&self) -> bool {
        self.deny.iter().any(|n| n.prefix == 0)
    }

    pub fn allow(&self) -> &[AllowRule] {
        &self.allow
    }

    pub fn deny(&self) -> &[Ipv4Net] {
        &self.deny
    }

    /// Allowed networks (the IP entries of the allow list, plus the DNS servers
    /// when a domain is allowed).
    pub fn allowed_nets(&self) -> Vec<Ipv4Net> {
        let mut nets: Vec<Ipv4Net> = self
            .allow
            .iter()
            .filter_map(|r| match r {
                AllowRule::Net(n) => Some(*n),
                AllowRule::Domain(_) => None,
            })
            .collect();
        if self.filters_dns() {
            nets.extend(
                self.dns_servers()
                    .iter()
                    .map(|ip| Ipv4Net::new_unchecked(*ip, 32)),
            );
        }
        nets.sort();
        nets.dedup();
        nets
    }

    pub fn domains(&self) -> impl Iterator<Item = &DomainPattern> {
        self.allow.iter().filter_map(|r| match r {
            AllowRule::Domain(d) => Some(d),
            AllowRule::Net(_) => None,
        })
    }

    /// Whether DNS goes through the capsule's filtering resolver: a domain is
    /// allowed and something is denied (otherwise the domain changes nothing).
    pub fn filters_dns(&self) -> bool {
        !self.is_open() && self.domains().next().is_some()
    }

    /// Whether the filtering resolver answers `name`.
    pub fn allows_name(&self, name: &str) -> bool {
        self.domains().any(|d| d.matches(name))
    }

    /// DNS servers open to the capsule when it filters DNS.
    pub fn dns_servers(&self) -> Vec<Ipv4Addr> {
        self.dns_servers
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_DNS_SERVER])
    }

    /// The verdict for a connection to `ip` that no allowed name resolved to.
    pub fn allows_ip(&self, ip: Ipv4Addr) -> bool {
        if ALWAYS_DENIED.iter().any(|n| n.contains(ip)) {
            return false;
        }
        self.allowed_nets().iter().any(|n| n.contains(ip))
            || !self.deny.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy::new(allow, deny, None).unwrap()
    }

    #[test]
    fn nets_parse_canonically() {
        assert_eq!(
            "10.1.2.3/8".parse::<Ipv4Net>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("1.2.3.4".parse::<Ipv4Net>().unwrap().to_string(), "1.2.3.4");
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().prefix(), 0);
        for bad in ["1.2.3.4/33", "1.2.3/8", "1.2.3.4/", "x", "1.2.3.4/-1", ""] {
            assert!(
                matches!(bad.parse::<Ipv4Net>(), Err(InvalidEgress::Address(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "::/0".parse::<Ipv4Net>(),
            Err(InvalidEgress::Ipv6(_))
        ));
    }

    #[test]
    fn domains_match_exactly_or_below() {
        let exact: DomainPattern = "Example.COM.".parse().unwrap();
        assert!(exact.matches("example.com"));
        assert!(exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("www.example.com"));
        assert!(!exact.matches("badexample.com"));
        let wild: DomainPattern = "*.example.com".parse().unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("aexample.com"));
        for bad in [
            "localhost",
            "*.com.",
            "-a.com",
            "a..com",
            "*",
            "a.*.com",
            "1.2.3.a4/x",
        ] {
            assert!(bad.parse::<DomainPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_beats_deny_and_always_denied_beats_both() {
        let p = policy(&["198.18.0.0/24"], &["0.0.0.0/0"]);
        assert!(p.allows_ip(Ipv4Addr::new(198, 18, 0, 7)));
        assert!(!p.allows_ip(Ipv4Addr::new(198, 18, 1, 7)));
        let open = EgressPolicy::default();
        assert!(open.allows_ip(Ipv4Addr::new(1, 1, 1, 1)));
        let everything = policy(&["0.0.0.0/0"], &[]);
        for ip in [
            Ipv4Addr::new(169, 254, 169, 254),
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(169, 254, 128, 1),
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            assert!(!everything.allows_ip(ip), "{ip}");
            assert!(!open.allows_ip(ip), "{ip}");
        }
    }

    #[test]
    fn domains_need_a_deny_to_matter() {
        let p = policy(&["example.com"], &[]);
        assert!(!p.filters_dns());
        let p = policy(&["example.com", "1.1.1.1"], &["0.0.0.0/0"]);
        assert!(p.filters_dns());
        assert!(p.allows_name("example.com"));
        assert!(!p.allows_name("other.com"));
        assert!(p.allows_ip(DEFAULT_DNS_SERVER));
        let p = EgressPolicy::new(&["example.com"], &["0.0.0.0/0"], Some(&[])).unwrap();
        assert!(!p.allows_ip(DEFAULT_DNS_SERVER));
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry() {
        let e = EgressPolicy::new(&["ok.example"], &["example.com"], None).unwrap_err();
        assert_eq!(e, InvalidEgress::DomainInDeny("example.com".into()));
        assert!(e.to_string().contains("example.com"));
        let e = EgressPolicy::new(&["2001:db8::/32"], &[], None).unwrap_err();
        assert!(matches!(e, InvalidEgress::Ipv6(_)));
        let many: Vec<String> = (0..1025)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(matches!(
            EgressPolicy::new(&many, &[], None),
            Err(InvalidEgress::TooMany { .. })
        ));
        let e = EgressPolicy::new::<&str>(&[], &[], Some(&["8.8.8"])).unwrap_err();
        assert!(matches!(e, InvalidEgress::Address(_)));
    }

    #[test]
    fn round_trips_through_json() {
        let p = EgressPolicy::new(
            &["*.example.com", "10.0.0.1/8"],
            &["0.0.0.0/0"],
            Some(&["1.1.1.1"]),
        )
        .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), p);
        assert_eq!(
            serde_json::to_string(&EgressPolicy::default()).unwrap(),
            "{}"
        );
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"deny_out":["a.com"]}"#).is_err());
        assert_eq!(
            EgressPolicy::deny_all(),
            EgressPolicy::default().with_internet_denied()
        );
    }
}
