//! Service lookup: which service an SNI names.
//!
//! Exact name first, then the wildcard one label up: `*.svc.internal` matches
//! `a.svc.internal`, not `a.b.svc.internal`. Names compare case-insensitively. Both are
//! hash lookups, so the cost does not grow with the number of services.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use ztp_proto::names::{normalize_sni, parse_source_range, BackendAddr, ServiceName};
use ztp_proto::{Invalid, Protocol, Service};

use crate::handler::{Handler, Registry};

/// A service as the data plane serves it, parsed once per snapshot.
#[derive(Debug)]
pub struct Route {
    /// The name as configured (`*.svc.internal` for a wildcard).
    pub name: String,
    pub protocol: Protocol,
    pub backend: Option<BackendAddr>,
    /// Groups allowed in; empty admits every enabled directory user.
    pub groups: Vec<String>,
    /// Source ranges allowed; empty admits any source.
    pub allow: Vec<IpNet>,
    /// Source ranges refused, whatever `allow` says.
    pub deny: Vec<IpNet>,
    /// The handler the service names (or the tunnel forwarder, for a service served by
    /// a connector); `None` means the forwarder for the protocol.
    pub handler: Option<Arc<dyn Handler>>,
    /// The connector whose tunnels alone reach the backend.
    pub connector: Option<String>,
}

impl Route {
    fn compile(s: &Service, registry: &Registry) -> Result<Route, String> {
        Ok(Route {
            name: s.name.clone(),
            protocol: s.protocol,
            backend: s.address.as_deref().map(BackendAddr::parse).transpose()?,
            groups: s.groups.clone(),
            allow: s
                .allow
                .iter()
                .map(|r| parse_source_range(r))
                .collect::<Result<_, _>>()?,
            deny: s
                .deny
                .iter()
                .map(|r| parse_source_range(r))
                .collect::<Result<_, _>>()?,
            connector: s.connector.clone(),
            handler: match s.handler.as_deref() {
                None if s.connector.is_some() => Some(registry.tunnel().clone()),
                None => None,
                Some(name) => Some(
                    registry
                        .named(name)
                        .ok_or_else(|| format!("unknown handler {name:?}"))?
                        .clone(),
                ),
            },
        })
    }

    /// Whether a (canonical) source address may reach this service.
    pub fn admits_source(&self, ip: std::net::IpAddr) -> bool {
        ztp_proto::names::source_admitted(&self.allow, &self.deny, ip)
    }
}

/// The routing index of one snapshot.
#[derive(Debug, Default)]
pub struct Routes {
    exact: HashMap<String, Arc<Route>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<Route>>,
}

impl Routes {
    /// Indexes a validated snapshot's services.
    pub fn compile(services: &[Service], registry: &Registry) -> Result<Routes, Invalid> {
        let mut routes = Routes::default();
        for (i, s) in services.iter().enumerate() {
            let fail = |message: String| {
                Invalid(vec![ztp_proto::FieldError {
                    field: format!("services[{i}]"),
                    message,
                }])
            };
            let route = Arc::new(Route::compile(s, registry).map_err(fail)?);
            match ServiceName::parse(&s.name).map_err(fail)? {
                ServiceName::Exact(n) => routes.exact.insert(n, route),
                ServiceName::Wildcard(suffix) => routes.wildcard.insert(suffix, route),
            };
        }
        Ok(routes)
    }

    /// Finds the service an SNI names.
    pub fn lookup(&self, sni: &str) -> Option<&Arc<Route>> {
        let sni = normalize_sni(sni);
        if let Some(r) = self.exact.get(&sni) {
            return Some(r);
        }
        // One label up, and that label a DNS label: an empty or odd first label
        // (`.svc.internal`, `a b.svc.internal`) names nothing (rustls passes on valid
        // DNS names only; this holds whoever calls).
        let (first, parent) = sni.split_once('.')?;
        if !ztp_proto::names::is_dns_label(first) {
            return None;
        }
        self.wildcard.get(parent)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact.values().chain(self.wildcard.values())
    }

    /// What connector `name` serves: the services that name it, with the addresses it
    /// dials (sorted, so that an unchanged set compares equal).
    pub fn assignments(&self, name: &str) -> Vec<ztp_proto::tunnel::Assignment> {
        let mut out: Vec<_> = self
            .iter()
            .filter(|r| r.connector.as_deref() == Some(name))
            .filter_map(|r| {
                Some(ztp_proto::tunnel::Assignment {
                    name: r.name.clone(),
                    protocol: r.protocol,
                    address: r.backend.as_ref()?.to_string(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(names: &[&str]) -> Routes {
        let services: Vec<Service> = names
            .iter()
            .map(|n| Service {
                name: n.to_string(),
                protocol: Protocol::Tcp,
                address: Some(":1".into()),
                groups: vec![],
                allow: vec![],
                deny: vec![],
                handler: None,
                connector: None,
            })
            .collect();
        Routes::compile(&services, &Registry::builtin()).unwrap()
    }

    #[test]
    fn lookup_rules() {
        let r = routes(&[
            "ssh.svc.internal",
            "*.svc.internal",
            "*.b.svc.internal",
            "Top",
        ]);
        let table: &[(&str, Option<&str>)] = &[
            ("ssh.svc.internal", Some("ssh.svc.internal")),
            ("SSH.Svc.Internal", Some("ssh.svc.internal")),
            ("ssh.svc.internal.", Some("ssh.svc.internal")),
            ("a.svc.internal", Some("*.svc.internal")),
            ("x.b.svc.internal", Some("*.b.svc.internal")),
            ("x.y.svc.internal", None),
            ("svc.internal", None),
            ("internal", None),
            ("top", Some("Top")),
            ("x.top", None),
            ("", None),
            // found by fuzzing: the first label must be a DNS label
            (".svc.internal", None),
            ("-a.svc.internal", None),
            ("a b.svc.internal", None),
            ("*.svc.internal", None),
            ("\u{e9}.svc.internal", None),
            ("a.svc.internal\n", None),
        ];
        for (sni, want) in table {
            assert_eq!(r.lookup(sni).map(|r| r.name.as_str()), *want, "{sni:?}");
        }
    }

    #[test]
    fn source_ranges() {
        let mut s = Service {
            name: "a.b".into(),
            protocol: Protocol::Tcp,
            address: Some(":1".into()),
            groups: vec![],
            allow: vec![],
            deny: vec![],
            handler: None,
            connector: None,
        };
        let any = Route::compile(&s, &Registry::builtin()).unwrap();
        assert!(any.admits_source("192.0.2.1".parse().unwrap()));
        s.allow = vec!["10.0.0.0/8".into(), "::1".into()];
        let some = Route::compile(&s, &Registry::builtin()).unwrap();
        assert!(some.admits_source("10.9.9.9".parse().unwrap()));
        assert!(some.admits_source("::1".parse().unwrap()));
        assert!(!some.admits_source("11.0.0.1".parse().unwrap()));
        s.deny = vec!["10.9.0.0/16".into()];
        let denied = Route::compile(&s, &Registry::builtin()).unwrap();
        assert!(
            !denied.admits_source("10.9.9.9".parse().unwrap()),
            "deny wins"
        );
        assert!(denied.admits_source("10.8.9.9".parse().unwrap()));
        s.allow.clear();
        let deny_only = Route::compile(&s, &Registry::builtin()).unwrap();
        assert!(!deny_only.admits_source("10.9.0.1".parse().unwrap()));
        assert!(deny_only.admits_source("192.0.2.1".parse().unwrap()));
    }
}
