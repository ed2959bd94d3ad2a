//! Prometheus metrics: the data plane's `GET /metrics` on its admin address (no token)
//! and the control plane's on its API address (admin token). The counters move exactly as
//! the traffic does, the gauges follow sessions and snapshots, and both texts are valid
//! exposition format (version 0.0.4).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rustls::AlertDescription;
use tokio::io::AsyncWriteExt;
use ztp_tests::backend::{pseudo_random_bytes, sha256};
use ztp_tests::client::{alert_of, read_to_end_or_alert_within};
use ztp_tests::http::{self, HttpResponse};
use ztp_tests::Dataplane;

use crate::common::{echo_step, STEP};
use crate::plane::{dial, send_and_drain, Plane, ECHO, HASH, UNKNOWN};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the samples in order, and each family's declared type.
#[derive(Debug, Clone)]
struct Exposition {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{k="v",...}` at the start of `s` (escapes `\\`, `\"`, `\n`); returns the labels
/// and the rest after `}`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("no `{`")?;
    let mut labels = BTreeMap::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("a label without `=`")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value is not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in a label value")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name:?} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by `,`".into());
        }
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// Parses the text exposition format strictly: every sample line is `name{labels} value`
/// (labels optional, an optional integer timestamp after the value); each family has one
/// `# TYPE` line, before its first sample; a family's samples are contiguous; no series
/// appears twice; the text ends with a newline.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut seen_series = BTreeSet::new();
    let mut finished_families: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = words
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at(format!("a second TYPE for {name}")));
                    }
                    if samples.iter().any(|s: &Sample| s.name == name) {
                        return Err(at(format!("TYPE of {name} after its samples")));
                    }
                    if let Some(prev) = current.replace(name.to_string()) {
                        finished_families.insert(prev);
                    }
                }
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !is_metric_name(name) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("more than a value and a timestamp".into()));
        }
        // Histogram and summary samples belong to their base family.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| {
                    matches!(
                        types.get(*base).map(String::as_str),
                        Some("histogram" | "summary")
                    )
                })
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(at(format!("sample of {name} without a preceding # TYPE")));
        }
        if finished_families.contains(family) || current.as_deref() != Some(family) {
            return Err(at(format!("the samples of {family} are not contiguous")));
        }
        if !seen_series.insert((name.to_string(), labels.clone())) {
            return Err(at("a series appears twice".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(Exposition { samples, types })
}

impl Exposition {
    /// The value of the series `name` with exactly `labels`, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Exposition::get`], 0 when the series is absent (a counter not yet moved).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over every series of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    fn assert_type(&self, name: &str, kind: &str) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(kind),
            "# TYPE of {name}: {:?}",
            self.types
        );
    }
}

/// Checks a `/metrics` response: 200, the text format's content type, and valid text.
fn exposition_of(r: &HttpResponse, what: &str) -> Exposition {
    assert_eq!(r.status, 200, "{what}: {r}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "{what}: content type {ct:?}"
    );
    let text = r.text();
    parse_exposition(&text).unwrap_or_else(|e| panic!("{what}: not valid exposition: {e}\n{text}"))
}

async fn scrape(dp: &Dataplane) -> Exposition {
    let r = http::request(dp.admin_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics on the admin address");
    exposition_of(&r, "data plane /metrics")
}

/// Scrapes `dp` (bounded by [`STEP`]) until `pred` holds.
async fn wait_metrics<F>(dp: &Dataplane, what: &str, pred: F) -> Exposition
where
    F: Fn(&Exposition) -> bool,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let m = scrape(dp).await;
        if pred(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {STEP:?}; last scrape: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const CONN: &str = "ztp_connections_total";
const HS: &str = "ztp_handshake_failures_total";
const BYTES: &str = "ztp_bytes_total";
const ACTIVE: &str = "ztp_active_connections";
const UP: [(&str, &str); 1] = [("direction", "up")];
const DOWN: [(&str, &str); 1] = [("direction", "down")];

/// A TCP connection's series.
fn conn_labels<'a>(
    service: &'a str,
    decision: &'a str,
    reason: &'a str,
) -> [(&'a str, &'a str); 4] {
    [
        ("service", service),
        ("decision", decision),
        ("reason", reason),
        ("transport", "tcp"),
    ]
}

/// The data plane's metrics on a replica of a control plane:
///
/// - the families and their types, with no token needed, and valid exposition;
/// - an allowed connection (1000 bytes up to the hash sink, 32 down) adds exactly one to
///   `ztp_connections_total{service,decision="allow",reason="closed"}` and exactly its
///   bytes to `ztp_bytes_total`; a 403 (bob, not in the group) one to the deny series
///   with reason `not in group` and no bytes; an unknown SNI one to
///   `ztp_handshake_failures_total{reason="unknown sni"}` and its deny series; nothing
///   else moves;
/// - `ztp_active_connections` is 1 while a session is open and 0 after;
/// - `ztp_snapshot_version` is the config version and follows a change; the snapshot age
///   is small; no audit record was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_counters_follow_the_traffic() {
    let p = Plane::start(&["metrics-n1"], &[]).await;
    let dp = &p.replicas[0];
    let version = p.wait_current().await;

    let m0 = scrape(dp).await;
    for (name, kind) in [
        (CONN, "counter"),
        (HS, "counter"),
        (BYTES, "counter"),
        (ACTIVE, "gauge"),
        ("ztp_snapshot_version", "gauge"),
        ("ztp_snapshot_age_seconds", "gauge"),
        ("ztp_audit_dropped_total", "counter"),
    ] {
        m0.assert_type(name, kind);
    }
    assert_eq!(m0.get("ztp_snapshot_version", &[]), Some(version as f64));
    let age = m0
        .get("ztp_snapshot_age_seconds", &[])
        .expect("snapshot age");
    assert!((0.0..60.0).contains(&age), "snapshot age {age}");
    assert_eq!(m0.get(ACTIVE, &[]), Some(0.0));
    assert_eq!(m0.get("ztp_audit_dropped_total", &[]), Some(0.0));
    assert!(
        m0.get(BYTES, &UP).is_some() && m0.get(BYTES, &DOWN).is_some(),
        "{m0:#?}"
    );
    // Nothing but the families above.
    let names: BTreeSet<&str> = m0.types.keys().map(String::as_str).collect();
    assert!(
        names.iter().all(|n| n.starts_with("ztp_")),
        "unexpected families: {names:?}"
    );

    // An allowed connection: 1000 bytes up, the 32-byte digest down.
    let payload = pseudo_random_bytes(1000, 7);
    let (_, s) = dial(dp.addr(), &p.opts(HASH, &p.alice)).await;
    let mut s = s.expect("alice's handshake");
    assert_eq!(
        send_and_drain(&mut s, &payload, Duration::ZERO).await,
        sha256(&payload)
    );
    let allow_hash = conn_labels(HASH, "allow", "closed");
    let m1 = wait_metrics(dp, "the allowed connection counted", |m| {
        m.count(CONN, &allow_hash) == m0.count(CONN, &allow_hash) + 1.0
    })
    .await;
    assert_eq!(
        m1.count(BYTES, &UP) - m0.count(BYTES, &UP),
        1000.0,
        "bytes up"
    );
    assert_eq!(
        m1.count(BYTES, &DOWN) - m0.count(BYTES, &DOWN),
        32.0,
        "bytes down"
    );
    assert_eq!(m1.sum(CONN) - m0.sum(CONN), 1.0, "one connection in all");
    assert_eq!(m1.sum(HS), m0.sum(HS), "no handshake failure");

    // A 403: bob is in no group.
    let (_, s) = dial(dp.addr(), &p.opts(ECHO, &p.bob)).await;
    let mut s = s.expect("bob's handshake");
    let got = read_to_end_or_alert_within(&mut s, STEP)
        .await
        .unwrap_or_else(|e| panic!("bob: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), "ZTP-ERROR 403 forbidden\n");
    let deny_echo = conn_labels(ECHO, "deny", "not in group");
    let m2 = wait_metrics(dp, "the 403 counted", |m| {
        m.count(CONN, &deny_echo) == m1.count(CONN, &deny_echo) + 1.0
    })
    .await;
    assert_eq!(m2.sum(CONN) - m1.sum(CONN), 1.0);
    assert_eq!(m2.sum(HS), m1.sum(HS), "a 403 is not a handshake failure");
    assert_eq!(m2.count(BYTES, &UP), m1.count(BYTES, &UP));
    assert_eq!(m2.count(BYTES, &DOWN), m1.count(BYTES, &DOWN));

    // An unknown SNI: refused in the handshake.
    let (_, r) = dial(dp.addr(), &p.opts(UNKNOWN, &p.alice)).await;
    match r {
        Ok(_) => panic!("a handshake for an unknown SNI succeeded"),
        Err(e) => assert_eq!(
            alert_of(&e),
            Some(AlertDescription::UnrecognisedName),
            "{e}"
        ),
    }
    let hs_unknown = [("reason", "unknown sni")];
    let m3 = wait_metrics(dp, "the handshake failure counted", |m| {
        m.count(HS, &hs_unknown) == m2.count(HS, &hs_unknown) + 1.0
    })
    .await;
    assert_eq!(m3.sum(HS) - m2.sum(HS), 1.0);
    let deny_unknown = conn_labels("", "deny", "unknown sni");
    assert_eq!(
        m3.count(CONN, &deny_unknown) - m2.count(CONN, &deny_unknown),
        1.0,
        "{m3:#?}"
    );
    assert_eq!(m3.sum(CONN) - m2.sum(CONN), 1.0);
    assert_eq!(m3.count(BYTES, &UP), m2.count(BYTES, &UP));
    assert_eq!(m3.count(BYTES, &DOWN), m2.count(BYTES, &DOWN));
    assert_eq!(m3.get(ACTIVE, &[]), Some(0.0));

    // The active gauge: 1 while a session is open, 0 after.
    let (_, s) = dial(dp.addr(), &p.opts(ECHO, &p.alice)).await;
    let mut s = s.expect("alice's handshake to echo");
    echo_step(&mut s, b"0123456789").await;
    wait_metrics(dp, "one active connection", |m| {
        m.get(ACTIVE, &[]) == Some(1.0)
    })
    .await;
    // Still 1 a moment later, and the session not yet counted as a connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m4 = scrape(dp).await;
    assert_eq!(m4.get(ACTIVE, &[]), Some(1.0));
    assert_eq!(m4.sum(CONN), m3.sum(CONN), "counted before its end");
    tokio::time::timeout(STEP, s.shutdown())
        .await
        .expect("bounded")
        .expect("half-close");
    let rest = read_to_end_or_alert_within(&mut s, STEP)
        .await
        .unwrap_or_else(|e| panic!("no clean end: {e}"));
    assert!(rest.is_empty());
    let allow_echo = conn_labels(ECHO, "allow", "closed");
    let m5 = wait_metrics(dp, "no active connection", |m| {
        m.get(ACTIVE, &[]) == Some(0.0)
            && m.count(CONN, &allow_echo) == m3.count(CONN, &allow_echo) + 1.0
    })
    .await;
    assert_eq!(m5.count(BYTES, &UP) - m3.count(BYTES, &UP), 10.0);
    assert_eq!(m5.count(BYTES, &DOWN) - m3.count(BYTES, &DOWN), 10.0);

    // The snapshot version follows a change.
    p.control.ztpctl_ok(["group", "add", "later"]).await;
    let v2 = p.control.config_version().await;
    assert_eq!(v2, version + 1);
    let m6 = wait_metrics(dp, "the new snapshot version", |m| {
        m.get("ztp_snapshot_version", &[]) == Some(v2 as f64)
    })
    .await;
    let age = m6.get("ztp_snapshot_age_seconds", &[]).expect("age");
    assert!((0.0..5.0).contains(&age), "the new snapshot's age: {age}");
    assert_eq!(m6.get("ztp_audit_dropped_total", &[]), Some(0.0));
}

/// The control plane's `GET /metrics`: 401 without a token or with a wrong one; with the
/// admin token valid exposition with `ztp_config_version`, `ztp_nodes_connected` and, per
/// node, the applied version (equal to the config version, also after a change), lag 0,
/// connected 1 and a recent last-seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_metrics_show_each_node_current() {
    let p = Plane::start(&["cm-a", "cm-b"], &[]).await;
    let control = &p.control;
    for token in [None, Some("ztp_not_a_token")] {
        let r = control
            .request_as(token, "GET", "/metrics", &[], None)
            .await
            .expect("answered");
        assert_eq!(r.status, 401, "GET /metrics with token {token:?}: {r}");
    }

    let check = |m: &Exposition, version: u64| -> bool {
        m.get("ztp_config_version", &[]) == Some(version as f64)
            && m.get("ztp_nodes_connected", &[]) == Some(2.0)
            && ["cm-a", "cm-b"].iter().all(|id| {
                let node = [("node", *id)];
                m.get("ztp_node_applied_version", &node) == Some(version as f64)
                    && m.get("ztp_node_lag_versions", &node) == Some(0.0)
                    && m.get("ztp_node_connected", &node) == Some(1.0)
                    && m.get("ztp_node_last_seen_seconds", &node)
                        .is_some_and(|s| (0.0..60.0).contains(&s))
            })
    };
    let scrape_control = || async {
        let r = control.api("GET", "/metrics", None).await;
        exposition_of(&r, "control plane /metrics")
    };
    let wait = |version: u64| async move {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let m = scrape_control().await;
            if check(&m, version) {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the control plane's metrics do not show both nodes at version {version} \
                 within {STEP:?}: {m:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let version = p.wait_current().await;
    let m = wait(version).await;
    for (name, kind) in [
        ("ztp_config_version", "gauge"),
        ("ztp_nodes_connected", "gauge"),
        ("ztp_node_applied_version", "gauge"),
        ("ztp_node_lag_versions", "gauge"),
        ("ztp_node_connected", "gauge"),
        ("ztp_node_last_seen_seconds", "gauge"),
    ] {
        m.assert_type(name, kind);
    }
    for name in [
        "ztp_node_applied_version",
        "ztp_node_lag_versions",
        "ztp_node_connected",
        "ztp_node_last_seen_seconds",
    ] {
        let nodes: BTreeSet<&str> = m
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get("node").map(String::as_str))
            .collect();
        assert_eq!(nodes, BTreeSet::from(["cm-a", "cm-b"]), "{name}");
    }

    // A change: the config version and both nodes' applied versions follow.
    p.control
        .ztpctl_ok(["user", "add", "carol", "--identity", "carol@example.com"])
        .await;
    let v2 = control.config_version().await;
    assert_eq!(v2, version + 1);
    wait(v2).await;
}

/// The exposition parser rejects what it must (a self-check of the test's strictness).
#[test]
fn exposition_parser_is_strict() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\na_total 4\n# TYPE b gauge\nb 1.5e3\n";
    let e = parse_exposition(ok).unwrap();
    assert_eq!(e.get("a_total", &[("x", "1"), ("y", "q\"\\\n")]), Some(3.0));
    assert_eq!(e.get("b", &[]), Some(1500.0));
    for bad in [
        "a 1\n",                                      // no TYPE
        "# TYPE a gauge\na 1",                        // no final newline
        "# TYPE a gauge\na{x=1} 1\n",                 // unquoted label
        "# TYPE a gauge\na 1 2 3\n",                  // extra field
        "# TYPE a gauge\na one\n",                    // bad value
        "# TYPE a gauge\na 1\na 2\n",                 // duplicate series
        "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n", // family not contiguous
        "# TYPE a gauge\na 1\n# TYPE a gauge\n",      // TYPE twice
        "# TYPE a wobbly\na 1\n",                     // unknown type
        "# TYPE 1a gauge\n1a 1\n",                    // bad name
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

/// `ztp_handshake_failures_total{reason}` names each incompatibility for what it is: a
/// TLS 1.2-only client, one whose only cipher suite, only key-exchange group or only
/// signature schemes the gate (TLS 1.3, ring) does not share are four causes, four
/// labels, never all "protocol version".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failures_are_counted_by_cause() {
    use rustls::{CipherSuite, NamedGroup, SignatureScheme};
    use ztp_tests::connect_with;

    use crate::common::Fixture;
    use incompatible::{only_group, only_schemes, only_suite, refused};

    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let sni = "echo.svc.internal";
    let m0 = scrape(&fx.dp).await;

    let tls12 = connect_with(fx.dp.addr(), &fx.opts(sni, &bob).tls12_only()).await;
    match tls12 {
        Ok(_) => panic!("a TLS 1.2-only handshake succeeded"),
        Err(e) => assert_eq!(alert_of(&e), Some(AlertDescription::ProtocolVersion), "{e}"),
    }
    let cases = [
        (
            "no shared cipher suite",
            only_suite(CipherSuite::TLS13_AES_128_CCM_SHA256),
        ),
        ("no shared group", only_group(NamedGroup::secp521r1)),
        (
            "no shared signature scheme",
            only_schemes(vec![
                SignatureScheme::ED448,
                SignatureScheme::RSA_PKCS1_SHA256,
            ]),
        ),
    ];
    for (reason, config) in &cases {
        let alert = refused(fx.dp.addr(), config.clone(), sni).await;
        assert_eq!(alert, AlertDescription::HandshakeFailure, "{reason}");
    }

    let mut want = vec![("protocol version", 1.0)];
    want.extend(cases.iter().map(|(reason, _)| (*reason, 1.0)));
    let counted = |m: &Exposition| {
        want.iter()
            .all(|(r, n)| m.count(HS, &[("reason", r)]) - m0.count(HS, &[("reason", r)]) == *n)
    };
    let m = wait_metrics(&fx.dp, "each incompatibility under its own reason", |m| {
        counted(m) || m.sum(HS) - m0.sum(HS) >= want.len() as f64
    })
    .await;
    let by_reason: BTreeMap<&str, f64> = m
        .samples
        .iter()
        .filter(|s| s.name == HS)
        .filter_map(|s| {
            let r = s.labels.get("reason")?;
            let n = s.value - m0.count(HS, &[("reason", r)]);
            (n > 0.0).then_some((r.as_str(), n))
        })
        .collect();
    let expected: BTreeMap<&str, f64> = want.iter().copied().collect();
    assert_eq!(by_reason, expected, "handshake failures by reason");
    assert_eq!(fx.backend_connections(), 0);
}

/// TLS 1.3 clients that offer what the gate does not share. They accept any server
/// certificate: what is under test is the offer, not whether the client trusts the gate.
mod incompatible {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{
        AlertDescription, CipherSuite, CipherSuiteCommon, ClientConfig, DigitallySignedStruct,
        NamedGroup, SignatureScheme, SupportedCipherSuite, Tls13CipherSuite,
    };
    use tokio::net::TcpStream;
    use ztp_tests::client::alert_of;

    use crate::common::STEP;

    #[derive(Debug)]
    struct AnyServer(Vec<SignatureScheme>);

    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        /// What the client offers in `signature_algorithms`.
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.clone()
        }
    }

    /// X25519 under another group's name: the client offers (and sends a key share for)
    /// only a group the gate lacks.
    #[derive(Debug)]
    struct Renamed(NamedGroup);

    struct RenamedKx(Box<dyn ActiveKeyExchange>, NamedGroup);

    impl SupportedKxGroup for Renamed {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
            let inner = rustls::crypto::ring::kx_group::X25519.start()?;
            Ok(Box::new(RenamedKx(inner, self.0)))
        }
        fn name(&self) -> NamedGroup {
            self.0
        }
    }

    impl ActiveKeyExchange for RenamedKx {
        fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
            self.0.complete(peer)
        }
        fn pub_key(&self) -> &[u8] {
            self.0.pub_key()
        }
        fn group(&self) -> NamedGroup {
            self.1
        }
    }

    fn client(provider: CryptoProvider, schemes: Vec<SignatureScheme>) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("a TLS 1.3 provider")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(schemes)))
            .with_no_client_auth();
        Arc::new(config)
    }

    fn ecdsa() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
        ]
    }

    /// Offers only `suite` (AES-128-GCM under that suite's code point).
    pub fn only_suite(suite: CipherSuite) -> Arc<ClientConfig> {
        let SupportedCipherSuite::Tls13(real) =
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!("a TLS 1.3 suite")
        };
        let fake = Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite,
                hash_provider: real.common.hash_provider,
                confidentiality_limit: real.common.confidentiality_limit,
            },
            hkdf_provider: real.hkdf_provider,
            aead_alg: real.aead_alg,
            quic: None,
        };
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![SupportedCipherSuite::Tls13(Box::leak(Box::new(fake)))];
        client(p, ecdsa())
    }

    /// Offers only secp521r1, which ring (and so the gate) lacks.
    pub fn only_group(group: NamedGroup) -> Arc<ClientConfig> {
        static SECP521R1: Renamed = Renamed(NamedGroup::secp521r1);
        assert_eq!(group, NamedGroup::secp521r1);
        let mut p = rustls::crypto::ring::default_provider();
        p.kx_groups = vec![&SECP521R1];
        client(p, ecdsa())
    }

    /// Accepts only `schemes` for the server's CertificateVerify.
    pub fn only_schemes(schemes: Vec<SignatureScheme>) -> Arc<ClientConfig> {
        client(rustls::crypto::ring::default_provider(), schemes)
    }

    /// Connects with `config` and SNI `sni`; the alert the gate refused the handshake with.
    pub async fn refused(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        sni: &str,
    ) -> AlertDescription {
        let name = ServerName::try_from(sni.to_owned()).expect("a DNS name");
        let r = tokio::time::timeout(STEP, async {
            let tcp = TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        })
        .await
        .expect("the handshake ends within STEP");
        match r {
            Ok(_) => panic!("the handshake succeeded"),
            Err(e) => alert_of(&e).unwrap_or_else(|| panic!("refused without an alert: {e}")),
        }
    }
}
