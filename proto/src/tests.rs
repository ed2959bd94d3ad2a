//! Validation, table-driven: each case is a snapshot document and the field the first
//! error must name.

use super::*;

const VALID: &str = r#"
version: 7
services:
  - name: quic.svc.internal
    protocol: quic
    address: ":4433"
    groups: []
  - name: ssh.svc.internal
    protocol: tcp
    address: "127.0.0.1:22"
    groups: [admins]
    allow: ["10.0.0.0/8"]
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
  - name: "*.svc.internal"
    address: "backend.internal:8080"
users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [admins]
  - name: bob
    identities: ["bob@example.com", "spiffe://example.org/bob"]
    disabled: false
groups:
  - name: admins
revoked: ["0a1b2c3d"]
"#;

#[test]
fn design_example_is_valid() {
    let snap = Snapshot::from_yaml(VALID).unwrap();
    assert_eq!(snap.version, 7);
    assert_eq!(snap.services.len(), 4);
    assert_eq!(snap.services[3].protocol, Protocol::Auto);
    assert_eq!(snap.services[2].handler.as_deref(), Some("identity-echo"));
    assert!(!snap.users[1].disabled);
}

#[test]
fn yaml_round_trip() {
    let snap = Snapshot::from_yaml(VALID).unwrap();
    assert_eq!(Snapshot::from_yaml(&snap.to_yaml()).unwrap(), snap);
}

#[test]
fn empty_snapshot_is_valid() {
    let snap = Snapshot::from_yaml("version: 1\n").unwrap();
    assert!(snap.services.is_empty() && snap.users.is_empty());
}

/// Replaces `from` by `to` in the valid example and expects an error naming `field`.
fn assert_refused(from: &str, to: &str, field: &str) {
    assert!(
        VALID.contains(from),
        "test bug: {from:?} not in the example"
    );
    let doc = VALID.replacen(from, to, 1);
    let err = Snapshot::from_yaml(&doc).expect_err(&format!("accepted with {to:?}"));
    let errors = err.field_errors();
    assert!(
        errors.iter().any(|e| e.field == field),
        "replacing {from:?} by {to:?}: expected an error on {field}, got {errors:?}"
    );
}

#[test]
fn refusals_name_the_field() {
    let table: &[(&str, &str, &str)] = &[
        // unknown fields, at every level
        (
            "    protocol: quic",
            "    protocol: quic\n    adress: x",
            "services[0].adress",
        ),
        ("version: 7", "version: 7\nextra: 1", "extra"),
        (
            "    disabled: false",
            "    disabled: false\n    admin: true",
            "users[1].admin",
        ),
        (
            "  - name: admins",
            "  - name: admins\n    members: []",
            "groups[0].members",
        ),
        // wrong types and values
        ("version: 7", "version: seven", "version"),
        ("protocol: quic", "protocol: sctp", "services[0].protocol"),
        ("disabled: false", "disabled: maybe", "users[1].disabled"),
        // service names
        (
            "name: quic.svc.internal",
            "name: quic.*.internal",
            "services[0].name",
        ),
        (
            "name: quic.svc.internal",
            "name: \"quic svc\"",
            "services[0].name",
        ),
        (
            "name: quic.svc.internal",
            "name: ssh.svc.internal",
            "services[1].name",
        ),
        (
            "name: quic.svc.internal",
            "name: SSH.svc.internal",
            "services[1].name",
        ),
        // addresses
        (
            "address: \":4433\"",
            "address: \"127.0.0.1:notaport\"",
            "services[0].address",
        ),
        (
            "address: \":4433\"",
            "address: \"127.0.0.1\"",
            "services[0].address",
        ),
        (
            "address: \":4433\"",
            "address: \":0\"",
            "services[0].address",
        ),
        ("    address: \":4433\"\n", "", "services[0].address"),
        // handlers and ranges
        (
            "handler: identity-echo",
            "handler: teleport",
            "services[2].handler",
        ),
        (
            "allow: [\"10.0.0.0/8\"]",
            "allow: [\"10.0.0.0/40\"]",
            "services[1].allow[0]",
        ),
        // group references
        (
            "    groups: [admins]\n    allow",
            "    groups: [ops]\n    allow",
            "services[1].groups[0]",
        ),
        ("  - name: admins", "  - name: admin", "users[0].groups[0]"),
        (
            "  - name: admins",
            "  - name: \"bad group\"",
            "groups[0].name",
        ),
        // identities
        (
            "\"bob@example.com\", ",
            "\"ALICE@example.com\", ",
            "users[1].identities[0]",
        ),
        (
            "spiffe://example.org/bob",
            "spiffe://ztp.internal/node/n1",
            "users[1].identities[1]",
        ),
        (
            "spiffe://example.org/bob",
            "spiffe://ztp.internal/connector/c1",
            "users[1].identities[1]",
        ),
        ("\"bob@example.com\", ", "\"\", ", "users[1].identities[0]"),
        ("name: bob", "name: alice", "users[1].name"),
        // serials
        (
            "revoked: [\"0a1b2c3d\"]",
            "revoked: [\"0a1b2g\"]",
            "revoked[0]",
        ),
    ];
    for (from, to, field) in table {
        assert_refused(from, to, field);
    }
}

#[test]
fn user_group_must_exist() {
    let doc = VALID.replace(
        "identities: [\"alice@example.com\"]\n    groups: [admins]",
        "identities: [\"alice@example.com\"]\n    groups: [nobody]",
    );
    let err = Snapshot::from_yaml(&doc).unwrap_err();
    assert_eq!(err.field_errors()[0].field, "users[0].groups[0]");
    assert!(err.to_string().contains("unknown group \"nobody\""));
}

#[test]
fn same_identity_in_one_user_is_not_a_conflict() {
    let doc = VALID.replace(
        "identities: [\"alice@example.com\"]",
        "identities: [\"alice@example.com\", \"Alice@Example.com\"]",
    );
    Snapshot::from_yaml(&doc).unwrap();
}

#[test]
fn identity_echo_needs_no_address_but_forwarders_do() {
    let doc = "version: 1\nservices:\n  - name: a.b\n    handler: identity-echo\n";
    Snapshot::from_yaml(doc).unwrap();
    let doc = "version: 1\nservices:\n  - name: a.b\n    protocol: tcp\n";
    let err = Snapshot::from_yaml(doc).unwrap_err();
    assert_eq!(err.field_errors()[0].field, "services[0].address");
}

#[test]
fn all_errors_reported() {
    let doc = "version: 1\nservices:\n  - name: \"*\"\n    address: x\n    groups: [g]\n";
    let err = Snapshot::from_yaml(doc).unwrap_err();
    let fields: Vec<_> = err.field_errors().into_iter().map(|e| e.field).collect();
    assert_eq!(
        fields,
        [
            "services[0].name",
            "services[0].address",
            "services[0].groups[0]"
        ]
    );
}

/// Connectors (schema 3): a service served by one names it, has an address (which the
/// connector dials) and no handler; the connector must be in the snapshot; names are
/// plain and unique. The wire carries them, and such a snapshot is schema 3.
#[test]
fn connectors_and_the_services_they_serve() {
    let base = "version: 1\nconnectors:\n  - {name: lab, description: the lab}\nservices:\n  - {name: db.svc, protocol: tcp, address: '10.9.0.5:5432', connector: lab}\n";
    let snap = Snapshot::from_yaml(base).expect("valid");
    assert_eq!(snap.services[0].connector.as_deref(), Some("lab"));
    assert_eq!(snap.connectors[0].description, "the lab");
    let wire = crate::wire::pb::Snapshot::from(&snap);
    assert_eq!(
        wire.schema, 3,
        "older nodes must refuse it, not dial the address"
    );
    let back = Snapshot::try_from(wire).expect("round trip");
    assert_eq!(back, snap);

    for (what, yaml, field) in [
        (
            "unknown connector",
            base.replace("connector: lab", "connector: elsewhere"),
            "services[0].connector",
        ),
        (
            "no address",
            base.replace("address: '10.9.0.5:5432', ", ""),
            "services[0].address",
        ),
        (
            "a handler",
            base.replace("connector: lab", "connector: lab, handler: identity-echo"),
            "services[0].handler",
        ),
        (
            "a bad connector name",
            base.replace("{name: lab,", "{name: 'l ab',"),
            "connectors[0].name",
        ),
        (
            "a name no certificate URI can carry",
            base.replace("{name: lab,", "{name: 'lab@home',")
                .replace("connector: lab", "connector: 'lab@home'"),
            "connectors[0].name",
        ),
        (
            "a duplicate",
            base.replace(
                "  - {name: lab, description: the lab}\n",
                "  - {name: lab}\n  - {name: lab}\n",
            ),
            "connectors[1].name",
        ),
        (
            "a control character",
            base.replace("description: the lab", "description: \"a\\u0007b\""),
            "connectors[0].description",
        ),
        (
            "an unknown field",
            base.replace("description: the lab", "descr: the lab"),
            "connectors[0]",
        ),
    ] {
        let e = Snapshot::from_yaml(&yaml).expect_err(what);
        let fields: Vec<String> = e.field_errors().into_iter().map(|f| f.field).collect();
        assert!(
            fields.iter().any(|f| f.starts_with(field)),
            "{what}: {fields:?}"
        );
    }
    // No connector named: the lowest schema still.
    let plain = Snapshot::from_yaml("version: 1\nconnectors: [{name: lab}]\n").unwrap();
    assert_eq!(crate::wire::pb::Snapshot::from(&plain).schema, 1);
}
