//! Writes the seed corpus under `seeds/` (committed; run again only to change it):
//!
//! ```sh
//! cargo test --manifest-path fuzz/Cargo.toml --no-default-features \
//!     --test make_seeds -- --ignored
//! ```
//!
//! Certificates are made with throw-away keys: only their DER is written, never a key.

use std::path::{Path, PathBuf};

use prost::Message;
use rcgen::{CertificateParams, DnType, KeyPair, SanType, SerialNumber};
use ztp_fuzz::rest::{encode_request, BASELINE};
use ztp_proto::wire::pb;
use ztp_proto::Snapshot;

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(target: &str, name: &str, data: impl AsRef<[u8]>) {
    std::fs::write(dir(target).join(name), data).unwrap();
}

/// DESIGN.md's example snapshot (as in `proto/src/tests.rs`).
const DESIGN: &str = r#"version: 7
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

/// The flow-style document of `proto/src/wire.rs`'s test.
const FLOW: &str = "version: 3\nservices:\n  - {name: a.b, protocol: udp, address: ':1', groups: [g], allow: ['10.0.0.0/8']}\n  - {name: w.b, handler: identity-echo}\nusers: [{name: u, identities: [u@x], groups: [g], disabled: true}]\ngroups: [{name: g}]\nrevoked: ['0a']\n";

fn yaml_seeds() {
    let t = "snapshot_yaml";
    write(t, "design.yaml", DESIGN);
    write(t, "flow.yaml", FLOW);
    write(t, "baseline.yaml", BASELINE.trim_start());
    write(t, "empty.yaml", "version: 1\n");
    write(
        t,
        "refused_unknown_field.yaml",
        DESIGN.replacen("    protocol: quic", "    protocol: quic\n    adress: x", 1),
    );
    write(
        t,
        "refused_bad_values.yaml",
        "version: 2\nservices:\n  - {name: 'a.*.b', address: 'x:0', allow: [ten]}\nusers: [{name: 'a b', identities: ['spiffe://ztp.internal/node/n1'], groups: [nope]}]\nrevoked: ['xyz']\n",
    );
}

fn proto_seeds() {
    let t = "snapshot_proto";
    for (name, doc) in [
        ("design", DESIGN),
        ("flow", FLOW),
        ("empty", "version: 1\n"),
    ] {
        let snap = Snapshot::from_yaml(doc).unwrap();
        write(
            t,
            &format!("{name}.pb"),
            pb::Snapshot::from(&snap).encode_to_vec(),
        );
    }
    let snap = Snapshot::from_yaml(FLOW).unwrap();
    let mut newer = pb::Snapshot::from(&snap);
    newer.schema = ztp_proto::wire::SCHEMA + 1;
    write(t, "refused_newer_schema.pb", newer.encode_to_vec());
    let mut bad = pb::Snapshot::from(&snap);
    bad.services[0].protocol = "sctp".into();
    bad.users[0].groups = vec!["missing".into()];
    write(t, "refused_bad_values.pb", bad.encode_to_vec());
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

fn framed_seeds() {
    let t = "framed";
    // [n][n % 8 + 1 chunk sizes][stream]
    let mut small = vec![];
    for p in [&b""[..], b"a", b"hello", &[7u8; 300][..]] {
        frame(p, &mut small);
    }
    let with = |sizes: &[u8], stream: &[u8]| {
        let mut v = vec![sizes.len() as u8 - 1];
        v.extend_from_slice(sizes);
        v.extend_from_slice(stream);
        v
    };
    write(t, "bytewise", with(&[0], &small));
    write(t, "chunks_3_7_whole", with(&[2, 6, 255], &small));
    write(t, "one_push", with(&[255], &small));
    let mut err = small.clone();
    err.extend_from_slice(b"ZTP-ERROR 403 forbidden\n");
    write(t, "error_line_after_frames", with(&[4, 130], &err));
    write(t, "oversize_length", with(&[0], &[0x40, 0x01, 1, 2, 3]));
    write(t, "partial_frame", with(&[1], &[0x00, 0x10, 1, 2, 3]));
    let mut big = vec![];
    frame(&[9; 16 * 1024], &mut big);
    frame(b"after the largest frame", &mut big);
    write(t, "largest_frame", with(&[190, 3], &big));
}

fn sni_seeds() {
    let t = "sni";
    write(
        t,
        "design_rules",
        "ssh.svc.internal\nSSH.Svc.Internal\nssh.svc.internal.\na.svc.internal\nx.b.svc.internal\nx.y.svc.internal\nsvc.internal\ninternal\ntop\nx.top\n\n",
    );
    write(
        t,
        "added_services",
        "+*.corp.example\n+db.corp.example\n+Mixed.Case.Example\ndb.corp.example\nDB.CORP.EXAMPLE.\nweb.corp.example\na.web.corp.example\nmixed.case.example\n",
    );
    write(
        t,
        "odd_names",
        "*.svc.internal\n.svc.internal\na..svc.internal\n-a.svc.internal\na_b.svc.internal\n10.0.0.1\n.\n..\nssh.svc.internal..\n\u{e9}.svc.internal\n",
    );
}

/// A self-signed certificate's DER; the key is dropped.
fn cert(cn: Option<&str>, sans: Vec<SanType>, serial: Option<&[u8]>) -> Vec<u8> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.subject_alt_names = sans;
    p.serial_number = serial.map(SerialNumber::from_slice);
    p.self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

fn identity_seeds() {
    let t = "identity";
    let email = |e: &str| SanType::Rfc822Name(e.try_into().unwrap());
    let uri = |u: &str| SanType::URI(u.try_into().unwrap());
    let dns = |d: &str| SanType::DnsName(d.try_into().unwrap());
    write(
        t,
        "email.der",
        cert(
            Some("Alice"),
            vec![email("alice@example.com")],
            Some(&[0x0a, 0x1b, 0x2c, 0x3d]),
        ),
    );
    write(
        t,
        "uri.der",
        cert(
            None,
            vec![dns("x.example"), uri("spiffe://example.org/bob")],
            Some(&[0x00, 0x80, 0x01]),
        ),
    );
    write(t, "cn_only.der", cert(Some("CN-Carol"), vec![], Some(&[1])));
    write(
        t,
        "email_and_uri.der",
        cert(
            Some("Dave"),
            vec![uri("spiffe://example.org/dave"), email("Dave@Example.COM")],
            None,
        ),
    );
    write(
        t,
        "node.der",
        cert(
            None,
            vec![uri("spiffe://ztp.internal/node/n1")],
            Some(&[0x7f; 20]),
        ),
    );
    write(
        t,
        "node_and_email.der",
        cert(
            None,
            vec![uri("spiffe://ztp.internal/node/n1"), email("x@y")],
            None,
        ),
    );
    write(
        t,
        "no_identity.der",
        cert(None, vec![dns("only.dns.example")], None),
    );
    // 21 bytes: over RFC 5280's limit, which webpki does not enforce.
    write(
        t,
        "long_serial.der",
        cert(None, vec![email("long@serial.example")], Some(&[0x11; 21])),
    );
}

fn rest_seeds() {
    let t = "rest_bodies";
    let one = |route: u8, flags: u8, body: &str| {
        let mut v = vec![];
        encode_request(route, flags, body.as_bytes(), &mut v);
        v
    };
    let service = r#"{"name":"new.svc.internal","protocol":"tcp","address":"db.internal:5432","groups":["ops"],"allow":["192.0.2.0/24"]}"#;
    write(t, "create_service", one(0, 0, service));
    write(
        t,
        "replace_service",
        one(
            1,
            0b0100,
            r#"{"name":"ssh.svc.internal","protocol":"udp","address":":22","groups":["admins","ops"]}"#,
        ),
    );
    write(
        t,
        "create_user",
        one(
            2,
            0,
            r#"{"name":"dave","identities":["dave@example.com","spiffe://example.org/dave"],"groups":["ops"]}"#,
        ),
    );
    write(
        t,
        "replace_user",
        one(
            3,
            0b1100,
            r#"{"name":"alice","identities":["Alice@Example.com"],"groups":[],"disabled":true}"#,
        ),
    );
    write(t, "create_group", one(4, 0, r#"{"name":"new"}"#));
    write(t, "replace_group", one(5, 2, r#"{"name":"empty"}"#));
    let snap = Snapshot::from_yaml(DESIGN).unwrap();
    let json = serde_json::to_string(&snap).unwrap();
    write(t, "import_json", one(6, 0, &json));
    write(t, "import_yaml", one(7, 0b0100, DESIGN));
    write(
        t,
        "revoke",
        one(8, 0, r#"{"serials":["0A:1B:2C","0x00ff","deadbeef"]}"#),
    );
    write(t, "create_token", one(9, 0, r#"{"name":"ci"}"#));
    // A sequence: a group, a service and a user in it, then a stale write.
    let mut seq = vec![];
    encode_request(4, 0, br#"{"name":"db"}"#, &mut seq);
    encode_request(
        0,
        0,
        br#"{"name":"db.svc.internal","address":":5432","groups":["db"]}"#,
        &mut seq,
    );
    encode_request(
        2,
        0,
        br#"{"name":"erin","identities":["erin@example.com"],"groups":["db"]}"#,
        &mut seq,
    );
    encode_request(5, 0b1001, br#"{"name":"ops"}"#, &mut seq);
    write(t, "sequence", seq);
    write(
        t,
        "refused_json",
        one(0, 0, r#"{"name":"x.svc","adress":":1"}"#),
    );
    write(
        t,
        "refused_yaml",
        one(7, 0, "version: 1\nservices: [{name: '*', address: x}]\n"),
    );
}

fn keyless_seeds() {
    use ztp_proto::keyless::{ErrorCode, Op, Outcome, Request, Response};
    let t = "keyless_frame";
    let req = |id: u32, op: Op, len: usize| Request {
        id,
        op,
        key_id: (op != Op::Ping).then_some([0x5a; 32]),
        sni: Some("app.svc.internal".into()),
        client_ip: Some(if id & 1 == 0 {
            "192.0.2.1".parse().unwrap()
        } else {
            "2001:db8::1".parse().unwrap()
        }),
        payload: vec![0xab; len],
    };
    let ops = [
        (Op::EcdsaSha256, 32),
        (Op::EcdsaSha384, 48),
        (Op::RsaPssSha256, 32),
        (Op::RsaPssSha384, 48),
        (Op::RsaPssSha512, 64),
        (Op::Ed25519, 130),
        (Op::Ping, 5),
    ];
    let mut pipeline = Vec::new();
    for (i, (op, len)) in ops.into_iter().enumerate() {
        let bytes = req(i as u32, op, len).encode().unwrap();
        write(t, &format!("request_{}", op.as_str()), &bytes);
        pipeline.extend_from_slice(&bytes);
    }
    write(t, "pipelined_requests", &pipeline);
    let mut answers = Vec::new();
    for (i, outcome) in [
        Outcome::Signature(vec![0x30; 71]),
        Outcome::Pong(b"ping".to_vec()),
        Outcome::Error(ErrorCode::KeyNotFound),
        Outcome::Error(ErrorCode::FormatError),
    ]
    .into_iter()
    .enumerate()
    {
        answers.extend(
            Response {
                id: i as u32,
                outcome,
            }
            .encode(),
        );
    }
    write(t, "answers", &answers);
    // Malformed: an unknown opcode, an answer's opcode as a request, version 2, a
    // truncated item, an item given twice, a body cut short.
    let msg = |major: u8, body: &[u8]| {
        let mut m = vec![major, 0];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&9u32.to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let mut bad = Vec::new();
    bad.extend(msg(1, &[0x11, 0, 1, 0x99, 0x12, 0, 1, 0]));
    bad.extend(msg(1, &[0x11, 0, 1, 0xF0, 0x12, 0, 1, 0]));
    bad.extend(msg(2, &[0x11, 0, 1, 0xF1]));
    bad.extend(msg(1, &[0x11, 0, 5, 0x15]));
    bad.extend(msg(1, &[0x11, 0, 1, 0xF1, 0x11, 0, 1, 0xF1]));
    bad.extend(&msg(1, &[0x11, 0, 1, 0xF1, 0x12, 0, 4, 1, 2, 3, 4])[..12]);
    write(t, "malformed", &bad);
}

#[test]
#[ignore = "writes the committed seeds; run by hand"]
fn make_seeds() {
    yaml_seeds();
    proto_seeds();
    framed_seeds();
    sni_seeds();
    identity_seeds();
    rest_seeds();
    keyless_seeds();
}
