//! The protocol over real TLS on loopback, served in process.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use ring::signature as rs;
use ztp_keyserver::keys::KeySet;
use ztp_keyserver::metrics::Metrics;
use ztp_keyserver::server::{Limits, Server};
use ztp_keyserver::tls::TlsFiles;
use ztp_proto::keyless::{ErrorCode, Op, Outcome, Request};
use ztp_tests::keyserver::keyserver_cert;
use ztp_tests::TestPki;

use crate::support::{self, generate, id_of, payload, ping, request, Client, Kind, Made, TempDir};

/// A key server in this process, stopped on drop.
struct Running {
    addr: SocketAddr,
    server: Arc<Server>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: TempDir,
}

/// Starts a server with `keys` (name, key, .nodes text) and `limits`.
async fn serve(pki: &TestPki, keys: &[(&str, &Made, Option<&str>)], limits: Limits) -> Running {
    let dir = TempDir::new("keyserver-serving");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    keyserver_cert(pki).write(dir.path(), "ks").unwrap();
    std::fs::create_dir(dir.join("keys")).unwrap();
    for (name, made, nodes) in keys {
        support::write_key(&dir.join("keys"), name, &made.pem, *nodes);
    }
    let td = ztp_proto::names::DEFAULT_TRUST_DOMAIN;
    let files = TlsFiles {
        cert: dir.join("ks.pem"),
        key: dir.join("ks.key"),
        client_ca: dir.join("ca.pem"),
    };
    let tls = ztp_keyserver::tls::server_config(&files, td).unwrap();
    let keys = KeySet::load_dir(&dir.join("keys"), td).unwrap();
    let server = Server::new(keys, tls, limits, 2, td, Arc::new(Metrics::default())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        server,
        _stop: stop,
        _dir: dir,
    }
}

fn signature(outcome: &Outcome) -> &[u8] {
    match outcome {
        Outcome::Signature(s) => s,
        other => panic!("a signature was expected, got {other:?}"),
    }
}

fn verify(alg: &'static dyn rs::VerificationAlgorithm, made: &Made, message: &[u8], sig: &[u8]) {
    rs::UnparsedPublicKey::new(alg, support::ring_public_key(made))
        .verify(message, sig)
        .expect("the signature verifies");
}

#[tokio::test]
async fn signatures_of_every_kind_verify_with_ring() {
    let pki = TestPki::new();
    let made: Vec<(Kind, Made)> = Kind::ALL.iter().map(|&k| (k, generate(k))).collect();
    let keys: Vec<(&str, &Made, Option<&str>)> =
        made.iter().map(|(k, m)| (k.algorithm(), m, None)).collect();
    let ks = serve(&pki, &keys, Limits::default()).await;
    let mut client = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    let message = b"TLS 1.3, server CertificateVerify: the transcript hash";
    let cases: [(Kind, Op, &'static dyn rs::VerificationAlgorithm); 7] = [
        (Kind::P256, Op::EcdsaSha256, &rs::ECDSA_P256_SHA256_ASN1),
        (Kind::P384, Op::EcdsaSha384, &rs::ECDSA_P384_SHA384_ASN1),
        (
            Kind::Rsa2048,
            Op::RsaPssSha256,
            &rs::RSA_PSS_2048_8192_SHA256,
        ),
        (
            Kind::Rsa2048,
            Op::RsaPssSha384,
            &rs::RSA_PSS_2048_8192_SHA384,
        ),
        (
            Kind::Rsa2048,
            Op::RsaPssSha512,
            &rs::RSA_PSS_2048_8192_SHA512,
        ),
        (Kind::Ed25519, Op::Ed25519, &rs::ED25519),
        (Kind::P256, Op::EcdsaSha384, &rs::ECDSA_P256_SHA384_ASN1),
    ];
    for (i, (kind, op, alg)) in cases.into_iter().enumerate() {
        let m = &made.iter().find(|(k, _)| *k == kind).unwrap().1;
        let id = 100 + i as u32;
        let answer = client
            .call(&request(id, op, id_of(m), payload(op, message)))
            .await;
        assert_eq!(answer.id, id);
        verify(alg, m, message, signature(&answer.outcome));
    }
    let metrics = ks.server.metrics().render();
    assert!(
        metrics
            .contains("ztp_keyserver_signatures_total{key=\"rsa-2048\",op=\"rsa-pss-sha512\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("ztp_keyserver_signatures_total{key=\"ecdsa-p256\",op=\"ecdsa-sha256\"} 1"),
        "{metrics}"
    );
}

/// `n` requests written at once (signatures and pings), all answered with their ids.
async fn pipeline(limits: Limits, n: u32) {
    let pki = TestPki::new();
    let key = generate(Kind::P256);
    let ks = serve(&pki, &[("k", &key, None)], limits).await;
    let mut client = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    let mut all = Vec::new();
    for i in 0..n {
        let message = format!("message {i}");
        let req = if i % 10 == 9 {
            ping(i, message.as_bytes())
        } else {
            request(
                i,
                Op::EcdsaSha256,
                id_of(&key),
                payload(Op::EcdsaSha256, message.as_bytes()),
            )
        };
        all.extend_from_slice(&req.encode().unwrap());
    }
    client.send_raw(&all).await;
    let mut seen = HashSet::new();
    for _ in 0..n {
        let answer = client.recv().await;
        let message = format!("message {}", answer.id);
        match &answer.outcome {
            Outcome::Pong(p) => assert_eq!(p, message.as_bytes()),
            o => verify(
                &rs::ECDSA_P256_SHA256_ASN1,
                &key,
                message.as_bytes(),
                signature(o),
            ),
        }
        assert!(seen.insert(answer.id), "{} answered twice", answer.id);
    }
    assert_eq!(seen.len(), n as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_pipelined_requests_are_all_answered() {
    pipeline(Limits::default(), 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_inflight_the_connection_waits_and_all_are_answered() {
    let limits = Limits {
        max_inflight: 2,
        ..Limits::default()
    };
    pipeline(limits, 100).await;
}

/// Requests for every kind of key (P-256 and Ed25519 signed on the connection's task,
/// RSA and P-384 in the pool) and pings, written at once: every one answered by its id,
/// every signature verifies, every one counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_mixing_fast_and_slow_keys_are_all_answered_by_id() {
    let pki = TestPki::new();
    let made: Vec<(Kind, Made)> = Kind::ALL.iter().map(|&k| (k, generate(k))).collect();
    let keys: Vec<(&str, &Made, Option<&str>)> =
        made.iter().map(|(k, m)| (k.algorithm(), m, None)).collect();
    let ks = serve(&pki, &keys, Limits::default()).await;
    let mut client = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    type Alg = &'static dyn rs::VerificationAlgorithm;
    // The key and how to verify its signature; none for a ping.
    let kinds: [(Op, Option<(Kind, Alg)>); 5] = [
        (
            Op::RsaPssSha256,
            Some((Kind::Rsa2048, &rs::RSA_PSS_2048_8192_SHA256)),
        ),
        (
            Op::EcdsaSha256,
            Some((Kind::P256, &rs::ECDSA_P256_SHA256_ASN1)),
        ),
        (
            Op::EcdsaSha384,
            Some((Kind::P384, &rs::ECDSA_P384_SHA384_ASN1)),
        ),
        (Op::Ed25519, Some((Kind::Ed25519, &rs::ED25519))),
        (Op::Ping, None),
    ];
    let n = 40u32;
    let case = |id: u32| kinds[id as usize % kinds.len()];
    let made_for = |kind: Kind| &made.iter().find(|(k, _)| *k == kind).unwrap().1;
    let mut all = Vec::new();
    for id in 0..n {
        let message = format!("message {id}");
        let req = match case(id) {
            (op, Some((kind, _))) => request(
                id,
                op,
                id_of(made_for(kind)),
                payload(op, message.as_bytes()),
            ),
            (_, None) => ping(id, message.as_bytes()),
        };
        all.extend_from_slice(&req.encode().unwrap());
    }
    client.send_raw(&all).await;
    let mut seen = HashSet::new();
    for _ in 0..n {
        let answer = client.recv().await;
        let message = format!("message {}", answer.id);
        match case(answer.id) {
            (_, Some((kind, alg))) => verify(
                alg,
                made_for(kind),
                message.as_bytes(),
                signature(&answer.outcome),
            ),
            (_, None) => assert_eq!(answer.outcome, Outcome::Pong(message.into_bytes())),
        }
        assert!(seen.insert(answer.id), "{} answered twice", answer.id);
    }
    let metrics = ks.server.metrics().render();
    for line in [
        "ztp_keyserver_signatures_total{key=\"rsa-2048\",op=\"rsa-pss-sha256\"} 8",
        "ztp_keyserver_signatures_total{key=\"ecdsa-p256\",op=\"ecdsa-sha256\"} 8",
        "ztp_keyserver_signatures_total{key=\"ecdsa-p384\",op=\"ecdsa-sha384\"} 8",
        "ztp_keyserver_signatures_total{key=\"ed25519\",op=\"ed25519\"} 8",
        "ztp_keyserver_requests_inflight 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

#[tokio::test]
async fn each_malformed_request_gets_its_code_and_the_connection_goes_on() {
    let pki = TestPki::new();
    let ec = generate(Kind::P256);
    let ks = serve(&pki, &[("ec", &ec, None)], Limits::default()).await;
    let mut client = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    let good = request(
        7,
        Op::EcdsaSha256,
        id_of(&ec),
        payload(Op::EcdsaSha256, b"m"),
    );
    let frame = |major: u8, id: u32, body: &[u8]| {
        let mut f = vec![major, 0];
        f.extend_from_slice(&(body.len() as u16).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    let item = |tag: u8, value: &[u8]| {
        let mut i = vec![tag];
        i.extend_from_slice(&(value.len() as u16).to_be_bytes());
        i.extend_from_slice(value);
        i
    };
    let with_op = |op: u8| {
        let mut b = item(0x11, &[op]);
        b.extend(item(0x01, &id_of(&ec)));
        b.extend(item(0x12, &[0; 32]));
        b
    };
    let mut wrong_len = good.clone();
    wrong_len.payload = vec![1; 31];
    let mut no_key = good.clone();
    no_key.key_id = None;
    let rsa_on_ec = request(1, Op::RsaPssSha256, id_of(&ec), vec![0; 32]);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "unknown opcode",
            frame(1, 1, &with_op(0x99)),
            ErrorCode::BadOpcode,
        ),
        (
            "an answer's opcode",
            frame(1, 1, &with_op(0xF0)),
            ErrorCode::UnexpectedOpcode,
        ),
        (
            "an error's opcode",
            frame(1, 1, &with_op(0xFF)),
            ErrorCode::UnexpectedOpcode,
        ),
        (
            "version 2",
            frame(2, 1, &with_op(0x15)),
            ErrorCode::VersionMismatch,
        ),
        (
            "a truncated item",
            frame(1, 1, &[0x11, 0x00, 0x05, 0x15]),
            ErrorCode::FormatError,
        ),
        ("an empty body", frame(1, 1, &[]), ErrorCode::FormatError),
        (
            "an item twice",
            frame(1, 1, &[item(0x11, &[0xF1]), item(0x11, &[0xF1])].concat()),
            ErrorCode::FormatError,
        ),
        (
            "a digest of the wrong length",
            wrong_len.encode().unwrap(),
            ErrorCode::FormatError,
        ),
        (
            "no key id",
            no_key.encode().unwrap(),
            ErrorCode::FormatError,
        ),
        (
            "a short key id",
            frame(
                1,
                1,
                &[
                    item(0x11, &[0x15]),
                    item(0x01, &[1; 31]),
                    item(0x12, &[0; 32]),
                ]
                .concat(),
            ),
            ErrorCode::FormatError,
        ),
        (
            "a client IP of 5 bytes",
            frame(1, 1, &[with_op(0x15), item(0x03, &[1; 5])].concat()),
            ErrorCode::FormatError,
        ),
        (
            "a ping of 20,000 bytes (over the body limit)",
            ping(1, &[7; 20_000]).encode().unwrap(),
            ErrorCode::FormatError,
        ),
        (
            "RSA-PSS on an ECDSA key",
            rsa_on_ec.encode().unwrap(),
            ErrorCode::UnexpectedOpcode,
        ),
        (
            "an unknown key",
            request(1, Op::EcdsaSha256, [9; 32], vec![0; 32])
                .encode()
                .unwrap(),
            ErrorCode::KeyNotFound,
        ),
    ];
    for (what, bytes, code) in cases {
        client.send_raw(&bytes).await;
        let answer = client.recv().await;
        let id = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(answer.id, id, "{what}");
        assert_eq!(answer.outcome, Outcome::Error(code), "{what}");
        // The same connection serves the next request.
        let answer = client.call(&good).await;
        assert_eq!(answer.id, 7, "after {what}");
        verify(
            &rs::ECDSA_P256_SHA256_ASN1,
            &ec,
            b"m",
            signature(&answer.outcome),
        );
    }
    // A ping whose body is exactly the limit is served.
    let largest = ping(8, &[7; ztp_keyserver::server::MAX_BODY - 7]);
    assert_eq!(
        largest.encode().unwrap().len(),
        8 + ztp_keyserver::server::MAX_BODY
    );
    assert_eq!(
        client.call(&largest).await.outcome,
        Outcome::Pong(largest.payload.clone())
    );
    let metrics = ks.server.metrics().render();
    assert!(
        metrics.contains("ztp_keyserver_errors_total{code=\"format_error\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ztp_keyserver_errors_total{code=\"bad_opcode\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_not_listed_gets_key_not_found_like_an_unknown_key() {
    let pki = TestPki::new();
    let listed = generate(Kind::P256);
    let open = generate(Kind::Ed25519);
    let ks = serve(
        &pki,
        &[
            ("listed", &listed, Some("# only edge-1\nedge-1\n")),
            ("open", &open, None),
        ],
        Limits::default(),
    )
    .await;
    let sign = |key: &Made| request(3, Op::EcdsaSha256, id_of(key), vec![5; 32]);
    let mut edge1 = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    let mut edge2 = Client::connect(ks.addr, &pki, &pki.node("edge-2")).await;
    assert!(matches!(
        edge1.call(&sign(&listed)).await.outcome,
        Outcome::Signature(_)
    ));
    let refused = edge2.call(&sign(&listed)).await;
    let unknown = edge2
        .call(&request(3, Op::EcdsaSha256, [1; 32], vec![5; 32]))
        .await;
    assert_eq!(refused, unknown);
    assert_eq!(refused.outcome, Outcome::Error(ErrorCode::KeyNotFound));
    // A key without a .nodes file serves every node.
    let ed = request(4, Op::Ed25519, id_of(&open), b"hello".to_vec());
    assert!(matches!(
        edge2.call(&ed).await.outcome,
        Outcome::Signature(_)
    ));
}

#[tokio::test]
async fn certificates_that_are_not_a_nodes_are_refused() {
    let pki = TestPki::new();
    let key = generate(Kind::P256);
    let ks = serve(&pki, &[("k", &key, None)], Limits::default()).await;
    let rogue_pki = TestPki::with_ca_name("Rogue CA");
    for (what, cert) in [
        ("a user", pki.client_email("alice@example.com")),
        (
            "a connector",
            pki.client_uri("spiffe://ztp.internal/connector/c1"),
        ),
        (
            "a node of another trust domain",
            pki.client_uri("spiffe://elsewhere/node/n1"),
        ),
        ("a node of another CA", rogue_pki.node("edge-1")),
    ] {
        // TLS 1.3: the client learns of the refusal on its first read.
        let mut client = Client::connect(ks.addr, &pki, &cert).await;
        let sent: Request = ping(1, b"x");
        client.send(&sent).await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), client.try_recv())
            .await
            .unwrap();
        assert!(got.is_err(), "{what}: answered {got:?}");
    }
    // Counted once the server's side of the handshake ends, which may be just after the
    // client read the alert.
    wait_for_metric(
        &ks.server,
        "ztp_keyserver_handshake_failures_total{reason=\"not_node\"} 3",
    )
    .await;
    wait_for_metric(&ks.server, "ztp_keyserver_connections_total 0").await;
}

/// Waits (up to 5 s) for the metrics to show `line`.
async fn wait_for_metric(server: &Server, line: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let metrics = server.metrics().render();
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{line}: {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ping_answers_its_payload_without_a_key() {
    let pki = TestPki::new();
    let ks = serve(&pki, &[], Limits::default()).await;
    let mut client = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    let answer = client.call(&ping(42, b"are you there")).await;
    assert_eq!(answer.id, 42);
    assert_eq!(answer.outcome, Outcome::Pong(b"are you there".to_vec()));
}

#[tokio::test]
async fn the_connection_cap_and_the_handshake_and_idle_timeouts_close_connections() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt as _;
    let pki = TestPki::new();
    let limits = Limits {
        max_connections: 1,
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let ks = serve(&pki, &[], limits).await;
    let closed = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    };
    // A silent connection holds the only place until its handshake time is up.
    let start = Instant::now();
    let silent = tokio::net::TcpStream::connect(ks.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::net::TcpStream::connect(ks.addr).await.unwrap();
    assert!(closed(second).await, "a connection past the cap was served");
    assert!(closed(silent).await, "the silent connection was kept");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // Its place is given back when its task ends, just after the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A node that sends nothing after its handshake is closed after the idle timeout.
    let mut idle = Client::connect(ks.addr, &pki, &pki.node("edge-1")).await;
    assert!(idle.try_recv().await.is_err());
    for line in [
        "ztp_keyserver_handshake_failures_total{reason=\"timeout\"} 1",
        "ztp_keyserver_connections_refused_total 1",
        "ztp_keyserver_connections_total 1",
    ] {
        wait_for_metric(&ks.server, line).await;
    }
}
