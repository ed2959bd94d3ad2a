//! `sni`: SNI normalization and service lookup (`ztp_dataplane::routing::Routes`).
//!
//! Input: text (invalid UTF-8 replaced), one item a line. A line starting with `+` adds
//! a service of that name (if `ServiceName::parse` accepts it and no service has the
//! same key); every other line is an SNI to look up. The routes always hold
//! `ssh.svc.internal`, `*.svc.internal`, `*.b.svc.internal`, `Top` and `*.internal`.
//!
//! Properties: no panic; `Routes::compile` accepts every service whose name parses; a
//! lookup answers what a model of DESIGN.md's rule answers (the exact name, lowercased
//! and without one trailing dot, else the wildcard one label up); a match is the exact
//! service or the wildcard exactly one label up (a name with a dot in the part the `*`
//! stands for never matches), and for an SNI the TLS layer can deliver (a valid DNS
//! name, as rustls checks it) that label is never empty; the answer does not depend on
//! ASCII case or on one trailing dot.

use std::collections::HashMap;

use ztp_dataplane::handler::Registry;
use ztp_dataplane::routing::Routes;
use ztp_proto::names::{normalize_sni, ServiceName};
use ztp_proto::Service;

const FIXED: &[&str] = &[
    "ssh.svc.internal",
    "*.svc.internal",
    "*.b.svc.internal",
    "Top",
    "*.internal",
];

/// Most services an input adds; most lookups it makes.
const MAX_SERVICES: usize = 16;
const MAX_LOOKUPS: usize = 64;

/// A plain TCP service. Built from JSON, like the API does, so that fields the model
/// gains later take their defaults here too.
fn service(name: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "protocol": "tcp",
        "address": ":1",
    }))
    .expect("a service")
}

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut services: Vec<Service> = Vec::new();
    let mut exact: HashMap<String, String> = HashMap::new();
    let mut wildcard: HashMap<String, String> = HashMap::new();
    let mut queries: Vec<&str> = Vec::new();

    let extra = text.lines().filter_map(|l| l.strip_prefix('+'));
    for name in FIXED.iter().copied().chain(extra.take(MAX_SERVICES)) {
        let Ok(parsed) = ServiceName::parse(name) else {
            continue;
        };
        let index = match &parsed {
            ServiceName::Exact(n) => (&mut exact, n.clone()),
            ServiceName::Wildcard(s) => (&mut wildcard, s.clone()),
        };
        if index.0.contains_key(&index.1) {
            continue; // validation refuses duplicate keys
        }
        index.0.insert(index.1, name.to_owned());
        services.push(service(name));
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('+'))
        .take(MAX_LOOKUPS)
    {
        queries.push(line);
    }

    let routes = Routes::compile(&services, &Registry::builtin())
        .unwrap_or_else(|e| panic!("services with parsed names refused: {e}"));
    assert_eq!(routes.len(), services.len());

    let lookup = |sni: &str| routes.lookup(sni).map(|r| r.name.clone());
    for q in queries {
        let got = lookup(q);

        // The model: DESIGN.md's rule, written out.
        let name = q.strip_suffix('.').unwrap_or(q).to_ascii_lowercase();
        assert_eq!(normalize_sni(q), name, "normalize_sni({q:?})");
        let want = exact.get(&name).cloned().or_else(|| {
            // One label up, and the first label a DNS label (1 to 63 of [a-z0-9-]).
            let (first, parent) = name.split_once('.')?;
            let label = !first.is_empty()
                && first.len() <= 63
                && first.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !first.starts_with('-')
                && !first.ends_with('-');
            if !label {
                return None;
            }
            wildcard.get(parent).cloned()
        });
        assert_eq!(got, want, "lookup({q:?})");

        // What the match is.
        if let Some(service) = &got {
            match ServiceName::parse(service).expect("a routed name parses") {
                ServiceName::Exact(n) => assert_eq!(n, name, "{q:?} matched {service:?}"),
                ServiceName::Wildcard(suffix) => {
                    let label = name
                        .strip_suffix(&suffix)
                        .and_then(|l| l.strip_suffix('.'))
                        .unwrap_or_else(|| panic!("{q:?} matched {service:?}"));
                    assert!(
                        !label.contains('.'),
                        "{q:?} matched {service:?} with more than one label"
                    );
                    assert!(!label.is_empty(), "{q:?} matched {service:?} with no label");
                }
            }
        }

        // Case and one trailing dot do not matter.
        assert_eq!(lookup(&q.to_ascii_uppercase()), got, "upper case of {q:?}");
        assert_eq!(lookup(&q.to_ascii_lowercase()), got, "lower case of {q:?}");
        if !q.ends_with('.') {
            assert_eq!(lookup(&format!("{q}.")), got, "{q:?} with a trailing dot");
        }
    }
}
