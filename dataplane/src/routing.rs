//! Service lookup: which service an SNI names.
//!
//! Exact name first, then the wildcard one label up: `*.svc.internal` matches
//! `a.svc.internal`, not `a.b.svc.internal`. Names compare case-insensitively. Both are
//! hash lookups, so the cost does not grow with the number of services.

use std::sync::Arc;

use ipnet::IpNet;
use ztp_proto::config::{Change, Config, ParsedService};
use ztp_proto::names::{normalize_sni, BackendAddr, ServiceName};
use ztp_proto::{Invalid, Protocol, Service};

use crate::cowmap::CowMap;

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
    /// The route of a parsed service: only the handler's name is looked up (the
    /// registry holds every handler validation accepts).
    fn compile(s: &ParsedService, registry: &Registry) -> Result<Route, String> {
        let spec = &s.spec;
        Ok(Route {
            name: spec.name.clone(),
            protocol: spec.protocol,
            backend: s.backend.clone(),
            groups: spec.groups.clone(),
            allow: s.allow.clone(),
            deny: s.deny.clone(),
            connector: spec.connector.clone(),
            handler: match spec.handler.as_deref() {
                None if spec.connector.is_some() => Some(registry.tunnel().clone()),
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

/// The routing index of one configuration. Copies share their storage: a delta updates
/// a copy at a cost that grows with the services it changes.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    exact: CowMap<Arc<Route>>,
    /// Keyed by the suffix after `*.`.
    wildcard: CowMap<Arc<Route>>,
}

impl Routes {
    /// Indexes a validated configuration's services.
    pub fn from_config(config: &Config, registry: &Registry) -> Result<Routes, Invalid> {
        let mut routes = Routes::default();
        for s in config.services() {
            routes.put(s, registry)?;
        }
        Ok(routes)
    }

    /// Indexes services (each parsed; cross-record rules are not checked): for tests and
    /// tools.
    pub fn compile(services: &[Service], registry: &Registry) -> Result<Routes, Invalid> {
        let mut routes = Routes::default();
        for (i, s) in services.iter().enumerate() {
            let s = ParsedService::parse(s.clone()).map_err(|message| {
                Invalid(vec![ztp_proto::FieldError {
                    field: format!("services[{i}]"),
                    message,
                }])
            })?;
            routes.put(&s, registry)?;
        }
        Ok(routes)
    }

    /// This index with a delta's service changes (removals first).
    pub fn update(
        &self,
        changes: &[Change<ParsedService>],
        registry: &Registry,
    ) -> Result<Routes, Invalid> {
        let mut routes = self.clone();
        for old in changes.iter().filter_map(|c| c.old.as_ref()) {
            match &old.name {
                ServiceName::Exact(n) => routes.exact.remove(n),
                ServiceName::Wildcard(suffix) => routes.wildcard.remove(suffix),
            };
        }
        for new in changes.iter().filter_map(|c| c.new.as_ref()) {
            routes.put(new, registry)?;
        }
        Ok(routes)
    }

    fn put(&mut self, s: &ParsedService, registry: &Registry) -> Result<(), Invalid> {
        let route = Arc::new(Route::compile(s, registry).map_err(|message| {
            Invalid(vec![ztp_proto::FieldError {
                field: format!("services[{:?}]", s.spec.name),
                message,
            }])
        })?);
        match &s.name {
            ServiceName::Exact(n) => self.exact.insert(n.clone(), route),
            ServiceName::Wildcard(suffix) => self.wildcard.insert(suffix.clone(), route),
        };
        Ok(())
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
        let any = Route::compile(
            &ParsedService::parse(s.clone()).unwrap(),
            &Registry::builtin(),
        )
        .unwrap();
        assert!(any.admits_source("192.0.2.1".parse().unwrap()));
        s.allow = vec!["10.0.0.0/8".into(), "::1".into()];
        let some = Route::compile(
            &ParsedService::parse(s.clone()).unwrap(),
            &Registry::builtin(),
        )
        .unwrap();
        assert!(some.admits_source("10.9.9.9".parse().unwrap()));
        assert!(some.admits_source("::1".parse().unwrap()));
        assert!(!some.admits_source("11.0.0.1".parse().unwrap()));
        s.deny = vec!["10.9.0.0/16".into()];
        let denied = Route::compile(
            &ParsedService::parse(s.clone()).unwrap(),
            &Registry::builtin(),
        )
        .unwrap();
        assert!(
            !denied.admits_source("10.9.9.9".parse().unwrap()),
            "deny wins"
        );
        assert!(denied.admits_source("10.8.9.9".parse().unwrap()));
        s.allow.clear();
        let deny_only = Route::compile(
            &ParsedService::parse(s.clone()).unwrap(),
            &Registry::builtin(),
        )
        .unwrap();
        assert!(!deny_only.admits_source("10.9.0.1".parse().unwrap()));
        assert!(deny_only.admits_source("192.0.2.1".parse().unwrap()));
    }
}
