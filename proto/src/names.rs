//! Typed parsers for the snapshot's strings: service names, backend addresses,
//! identities, serials and source ranges. Validation and every consumer use these same
//! functions, so what validation accepts is exactly what a data plane indexes.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A parsed service name (SNI pattern), lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServiceName {
    /// Matches exactly this name.
    Exact(String),
    /// `*.suffix`: matches one label followed by `suffix` (which is stored without `*.`).
    Wildcard(String),
}

impl ServiceName {
    pub fn parse(name: &str) -> Result<Self, String> {
        if let Some(suffix) = name.strip_prefix("*.") {
            check_dns_name(suffix).map_err(|e| format!("invalid wildcard {name:?}: {e}"))?;
            return Ok(ServiceName::Wildcard(suffix.to_ascii_lowercase()));
        }
        if name.contains('*') {
            return Err(format!(
                "invalid name {name:?}: a wildcard is allowed only as the whole first label (\"*.example.com\")"
            ));
        }
        check_dns_name(name).map_err(|e| format!("invalid name {name:?}: {e}"))?;
        Ok(ServiceName::Exact(name.to_ascii_lowercase()))
    }

    /// The form used as a lookup key: the exact name, or `*.suffix`.
    pub fn key(&self) -> String {
        match self {
            ServiceName::Exact(n) => n.clone(),
            ServiceName::Wildcard(s) => format!("*.{s}"),
        }
    }
}

/// Checks a DNS host name as TLS SNI carries it: letters, digits and hyphens in labels of
/// 1 to 63 characters, at most 253 in all, no empty label, no trailing dot.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    for label in name.split('.') {
        if let Some(e) = label_error(label) {
            return Err(e);
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("an IP address is not a host name".into());
    }
    Ok(())
}

/// What is wrong with one DNS label, if anything: 1 to 63 letters, digits and hyphens,
/// not starting or ending with a hyphen.
fn label_error(label: &str) -> Option<String> {
    if label.is_empty() {
        return Some("empty label".into());
    }
    if label.len() > 63 {
        return Some("a label is longer than 63 characters".into());
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Some(format!(
            "label {label:?} may hold only letters, digits and '-'"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some(format!("label {label:?} starts or ends with '-'"));
    }
    None
}

/// Whether `label` is one DNS label (the label a wildcard service stands for).
pub fn is_dns_label(label: &str) -> bool {
    label_error(label).is_none()
}

/// Normalizes an SNI value for lookup: ASCII lowercase, one trailing dot removed.
pub fn normalize_sni(sni: &str) -> String {
    sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase()
}

/// A backend address: where a forwarder connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    pub host: BackendHost,
    pub port: u16,
}

/// The host part of a [`BackendAddr`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendHost {
    /// Written `:port`: this machine's loopback.
    Localhost,
    Ip(IpAddr),
    /// A DNS name, resolved at connect time.
    Name(String),
}

impl BackendAddr {
    /// Parses `host:port`, `[v6]:port` or `:port`.
    pub fn parse(addr: &str) -> Result<Self, String> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{addr:?} is not host:port (write \":port\" for localhost)"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{addr:?}: port must be a number from 1 to 65535"))?;
        let host = if host.is_empty() {
            BackendHost::Localhost
        } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            BackendHost::Ip(IpAddr::V6(
                v6.parse()
                    .map_err(|_| format!("{addr:?}: {v6:?} is not an IPv6 address"))?,
            ))
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_ipv6() {
                return Err(format!("{addr:?}: write an IPv6 host in brackets, [{ip}]"));
            }
            BackendHost::Ip(ip)
        } else {
            check_backend_host(host).map_err(|e| format!("{addr:?}: {e}"))?;
            BackendHost::Name(host.to_ascii_lowercase())
        };
        Ok(BackendAddr { host, port })
    }
}

/// Backend host names may carry underscores (internal DNS does), unlike SNI.
fn check_backend_host(host: &str) -> Result<(), String> {
    if host.len() > 253 {
        return Err("host name longer than 253 characters".into());
    }
    let ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            BackendHost::Localhost => write!(f, "localhost:{}", self.port),
            BackendHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            BackendHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            BackendHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// The key under which an identity is looked up.
///
/// Email identities compare case-insensitively, everything else exactly. The same
/// function is applied to a directory user's identities and to what a certificate
/// yields, so both sides agree: a string with an `@` and no URI scheme is an email.
pub fn identity_key(identity: &str) -> String {
    if identity.contains('@') && uri_scheme(identity).is_none() {
        identity.to_lowercase()
    } else {
        identity.to_owned()
    }
}

/// The scheme of a URI (`spiffe` of `spiffe://…`), if the string starts with one.
pub fn uri_scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic()
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
    .then_some(scheme)
}

/// Whether an identity is a data-plane node's URI (`…/node/ID`), which no directory user
/// may claim.
pub fn is_node_uri(identity: &str) -> bool {
    is_machine_uri(identity, "node")
}

/// Whether an identity is a connector's URI (`…/connector/NAME`), which no directory
/// user may claim.
pub fn is_connector_uri(identity: &str) -> bool {
    is_machine_uri(identity, "connector")
}

/// A URI (any scheme and authority) whose path is `kind` or starts with `kind/`.
fn is_machine_uri(identity: &str, kind: &str) -> bool {
    uri_scheme(identity).is_some()
        && identity
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .is_some_and(|(_, path)| {
                path.strip_prefix(kind)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
}

/// The default trust domain of node identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "ztp.internal";

/// The node ID of a node URI `spiffe://TRUST_DOMAIN/node/ID` in `trust_domain`: IDs are
/// short names of letters, digits, `-`, `_` and `.`.
pub fn node_id<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    machine_id(uri, trust_domain, "node/")
}

/// The connector name of a connector URI `spiffe://TRUST_DOMAIN/connector/NAME` in
/// `trust_domain` (names as node IDs).
pub fn connector_name<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    machine_id(uri, trust_domain, "connector/")
}

/// The connector name a certificate carries: exactly one URI SAN, a connector's, and no
/// email (so that no certificate is both a connector and a user).
pub fn connector_name_of_cert(der: &[u8], trust_domain: &str) -> Option<String> {
    let uri = sole_uri(der)?;
    connector_name(&uri, trust_domain).map(str::to_owned)
}

fn machine_id<'a>(uri: &'a str, trust_domain: &str, kind: &str) -> Option<&'a str> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/')?;
    let id = path.strip_prefix(kind)?;
    let ok = domain.eq_ignore_ascii_case(trust_domain)
        && !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(id)
}

/// The node ID a certificate carries: its URI SAN `spiffe://TRUST_DOMAIN/node/ID`. A
/// node's certificate names nothing else a user's could: it must carry exactly one URI
/// and no email, so that no certificate is both a node and a user.
pub fn node_id_of_cert(der: &[u8], trust_domain: &str) -> Option<String> {
    let uri = sole_uri(der)?;
    node_id(&uri, trust_domain).map(str::to_owned)
}

/// A certificate's one URI SAN, when it carries exactly one and no email.
fn sole_uri(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    if names
        .iter()
        .any(|n| matches!(n, GeneralName::RFC822Name(_)))
    {
        return None;
    }
    let mut uris = names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return None;
    };
    Some(uri.to_owned())
}

/// A certificate serial number, normalized so that equal integers compare equal: big
/// endian, no leading zero bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// RFC 5280 allows at most 20 octets.
    pub const MAX_LEN: usize = 20;

    /// Parses hex as operators copy it: `0a1b2c`, `0A:1B:2C`, `0x0a1b2c`.
    pub fn parse_hex(s: &str) -> Result<Self, String> {
        let digits: String = s
            .trim()
            .trim_start_matches("0x")
            .trim_start_matches("0X")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a hex serial number"));
        }
        let digits = digits.trim_start_matches('0');
        // Left-pad to whole bytes.
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits.to_owned()
        };
        let bytes: Vec<u8> = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{s:?} is not a hex serial number"))?;
        if bytes.len() > Self::MAX_LEN {
            return Err(format!("{s:?} is longer than {} bytes", Self::MAX_LEN));
        }
        Ok(Serial(bytes))
    }

    /// From a certificate's DER serial bytes (which may carry a leading zero for sign).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The one rule for source ranges, for a listener and for a service alike: no `deny`
/// range holds `ip`, and `allow` is empty or one of its ranges holds it.
pub fn source_admitted(allow: &[IpNet], deny: &[IpNet], ip: IpAddr) -> bool {
    !deny.iter().any(|n| n.contains(&ip))
        && (allow.is_empty() || allow.iter().any(|n| n.contains(&ip)))
}

/// Parses a source range: a CIDR (`10.0.0.0/8`) or a single address.
pub fn parse_source_range(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address range like 10.0.0.0/8 or an address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        let table: &[(&str, Option<ServiceName>)] = &[
            (
                "a.svc.internal",
                Some(ServiceName::Exact("a.svc.internal".into())),
            ),
            (
                "A.Svc.Internal",
                Some(ServiceName::Exact("a.svc.internal".into())),
            ),
            ("localhost", Some(ServiceName::Exact("localhost".into()))),
            (
                "*.svc.internal",
                Some(ServiceName::Wildcard("svc.internal".into())),
            ),
            ("*.internal", Some(ServiceName::Wildcard("internal".into()))),
            ("*", None),
            ("*.", None),
            ("a.*.internal", None),
            ("*a.internal", None),
            ("**.internal", None),
            ("a..internal", None),
            ("a.internal.", None),
            ("-a.internal", None),
            ("a_b.internal", None),
            ("a b.internal", None),
            ("10.0.0.1", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(ServiceName::parse(input).ok(), *want, "{input:?}");
        }
        assert!(ServiceName::parse(&format!("{}.x", "a".repeat(64))).is_err());
    }

    #[test]
    fn backend_addresses() {
        use BackendHost::*;
        let table: &[(&str, Option<(BackendHost, u16)>)] = &[
            (":4433", Some((Localhost, 4433))),
            ("127.0.0.1:22", Some((Ip("127.0.0.1".parse().unwrap()), 22))),
            ("[::1]:22", Some((Ip("::1".parse().unwrap()), 22))),
            ("db.internal:5432", Some((Name("db.internal".into()), 5432))),
            ("My_Host:1", Some((Name("my_host".into()), 1))),
            ("::1:22", None),
            ("127.0.0.1", None),
            ("127.0.0.1:notaport", None),
            ("127.0.0.1:0", None),
            ("127.0.0.1:65536", None),
            ("[nope]:22", None),
            ("bad host:22", None),
            ("", None),
        ];
        for (input, want) in table {
            let got = BackendAddr::parse(input).ok().map(|a| (a.host, a.port));
            assert_eq!(got, *want, "{input:?}");
        }
    }

    #[test]
    fn identity_keys() {
        assert_eq!(identity_key("Alice@Example.COM"), "alice@example.com");
        assert_eq!(
            identity_key("spiffe://Example.org/Alice"),
            "spiffe://Example.org/Alice"
        );
        assert_eq!(identity_key("mailto:Bob@x"), "mailto:Bob@x");
        assert_eq!(identity_key("Carol"), "Carol");
    }

    #[test]
    fn node_uris() {
        assert!(is_node_uri("spiffe://ztp.internal/node/n1"));
        assert!(is_node_uri("spiffe://other.domain/node/n1"));
        assert!(!is_node_uri("spiffe://ztp.internal/nodes/n1"));
        assert!(!is_node_uri("spiffe://ztp.internal/user/node/x"));
        assert!(!is_node_uri("alice@example.com"));
        assert!(!is_node_uri("spiffe://ztp.internal/connector/c1"));
    }

    #[test]
    fn connector_uris() {
        assert!(is_connector_uri("spiffe://ztp.internal/connector/c1"));
        assert!(is_connector_uri("spiffe://other.domain/connector"));
        assert!(!is_connector_uri("spiffe://ztp.internal/connectors/c1"));
        assert!(!is_connector_uri("spiffe://ztp.internal/user/connector/x"));
        assert!(!is_connector_uri("spiffe://ztp.internal/node/n1"));
        assert!(!is_connector_uri("connector/c1"));
    }

    #[test]
    fn node_ids() {
        let td = DEFAULT_TRUST_DOMAIN;
        assert_eq!(node_id("spiffe://ztp.internal/node/n1", td), Some("n1"));
        assert_eq!(
            node_id("spiffe://ZTP.internal/node/edge-2.a", td),
            Some("edge-2.a")
        );
        assert_eq!(node_id("spiffe://other/node/n1", td), None);
        assert_eq!(node_id("spiffe://ztp.internal/node/", td), None);
        assert_eq!(node_id("spiffe://ztp.internal/node/a/b", td), None);
        assert_eq!(node_id("spiffe://ztp.internal/user/n1", td), None);
        assert_eq!(node_id("alice@example.com", td), None);
    }

    #[test]
    fn node_certificates_name_only_the_node() {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let cert = |sans: Vec<SanType>| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = sans;
            p.self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .to_vec()
        };
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let td = DEFAULT_TRUST_DOMAIN;
        let node = uri("spiffe://ztp.internal/node/n1");
        assert_eq!(
            node_id_of_cert(&cert(vec![node.clone()]), td).as_deref(),
            Some("n1")
        );
        let email = SanType::Rfc822Name("alice@x".try_into().unwrap());
        assert_eq!(node_id_of_cert(&cert(vec![node.clone(), email]), td), None);
        let other = uri("spiffe://ztp.internal/user/a");
        assert_eq!(node_id_of_cert(&cert(vec![node.clone(), other]), td), None);
        assert_eq!(
            node_id_of_cert(&cert(vec![uri("spiffe://elsewhere/node/n1")]), td),
            None
        );
        assert_eq!(node_id_of_cert(b"junk", td), None);
    }

    #[test]
    fn serials_compare_as_integers() {
        let a = Serial::parse_hex("0a1b2c3d").unwrap();
        assert_eq!(a, Serial::parse_hex("A1B2C3D").unwrap());
        assert_eq!(a, Serial::parse_hex("00:0A:1B:2C:3D").unwrap());
        assert_eq!(a, Serial::parse_hex("0x0a1b2c3d").unwrap());
        assert_eq!(a, Serial::from_be_bytes(&[0, 0x0a, 0x1b, 0x2c, 0x3d]));
        assert_eq!(a.to_string(), "0a1b2c3d");
        assert_ne!(a, Serial::parse_hex("0a1b2c3e").unwrap());
        assert!(Serial::parse_hex("xyz").is_err());
        assert!(Serial::parse_hex("").is_err());
        assert!(Serial::parse_hex(&"ff".repeat(21)).is_err());
        assert!(Serial::parse_hex(&format!("00{}", "ff".repeat(20))).is_ok());
    }

    #[test]
    fn source_ranges() {
        assert_eq!(
            parse_source_range("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(parse_source_range("::1").unwrap().to_string(), "::1/128");
        assert!(parse_source_range("10.0.0.0/33").is_err());
        assert!(parse_source_range("ten").is_err());
    }
}
