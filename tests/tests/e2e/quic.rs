//! The QUIC transport from clients (DESIGN.md, "QUIC transport"), from a quinn client on
//! loopback against the real data plane: the same gate as TCP, streams for tcp services,
//! datagram flows for udp services, live decisions, drain, migration and the limits.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, Endpoint};
use serde_json::Value;
use ztp_tests::backend::{pseudo_random_bytes, sha256};
use ztp_tests::client::ClientOptions;
use ztp_tests::quic::{alert, connect, endpoint_for, flow_datagram, split_flow, with_alpn, Closed};
use ztp_tests::{closed_port, TestCert, TestPki, UdpBackend};

use crate::common::{proto_service_yaml, standard_snapshot, Extra, Fixture, STEP};

/// How soon a live decision must have closed a connection.
const LIVE_BOUND: Duration = Duration::from_secs(5);

impl Fixture {
    /// QUIC options (ALPN `ztp/1`) for `sni` with `cert`.
    fn quic_opts(&self, sni: &str, cert: &TestCert) -> ClientOptions {
        with_alpn(self.opts(sni, cert))
    }

    async fn quic(&self, ep: &Endpoint, sni: &str, cert: &TestCert) -> Result<Connection, Closed> {
        connect(ep, self.dp.addr(), &self.quic_opts(sni, cert)).await
    }
}

/// How a connection attempt was refused: in the handshake (the error `connect` returns),
/// or after it, when the server closes the connection it confirmed (HANDSHAKE_DONE comes
/// with the handshake, before admission decides). `None`: still open after a while.
async fn refusal_of(attempt: Result<Connection, Closed>) -> Option<Closed> {
    match attempt {
        Err(e) => Some(e),
        Ok(conn) => tokio::time::timeout(STEP, conn.closed())
            .await
            .ok()
            .map(|e| Closed::of(&e)),
    }
}

/// Writes `payload` on a new stream, finishes it, and reads the answer to its end.
async fn exchange(conn: &Connection, payload: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let write = async {
        send.write_all(payload).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())
    };
    let read = async { recv.read_to_end(64 << 20).await.map_err(|e| e.to_string()) };
    let (w, r) = tokio::time::timeout(STEP, async { tokio::join!(write, read) })
        .await
        .map_err(|_| "stream exchange timed out".to_string())?;
    w?;
    r
}

/// The data plane's `connection` events over QUIC.
fn quic_events(fx: &Fixture) -> Vec<Value> {
    fx.dp
        .logs()
        .into_iter()
        .filter(|v| v["message"] == "connection" && v["transport"] == "quic")
        .collect()
}

async fn wait_quic_events(fx: &Fixture, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let events = quic_events(fx);
        if events.len() >= n || tokio::time::Instant::now() >= deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every refusal of the TCP gate, over QUIC: in the handshake with the TLS alert (an
/// unknown or missing SNI before the server signs anything), after it with the refusal's
/// code as the application error code and its line as the reason. Each is recorded with
/// `transport: quic` and its reason; no backend is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_over_quic_as_over_tcp() {
    let pki = TestPki::new();
    let revoked = pki.client_email("alice@example.com");
    let extra = Extra {
        revoked: std::slice::from_ref(&revoked.serial),
        ..Extra::default()
    };
    let fx = Fixture::start_with(pki, extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let bob = fx.pki.client_email("bob@example.com");
    let dave = fx.pki.client_email("dave@example.com");
    let expired = fx
        .pki
        .builder()
        .email("alice@example.com")
        .expired()
        .issue();
    let rogue = fx.pki.rogue("alice@example.com");
    let ca = fx.pki.ca_pem.clone();
    let echo = "echo.svc.internal";
    let cases: Vec<(&str, ClientOptions, Closed, &str)> = vec![
        (
            "unknown sni",
            fx.quic_opts("nothing.example.org", &alice),
            Closed::Alert(alert::ACCESS_DENIED),
            "unknown sni",
        ),
        (
            "no sni",
            with_alpn(ClientOptions::new(&ca).cert(&alice)),
            Closed::Alert(alert::ACCESS_DENIED),
            "no sni",
        ),
        (
            "no alpn",
            fx.opts(echo, &alice),
            Closed::Alert(alert::NO_APPLICATION_PROTOCOL),
            "no application protocol",
        ),
        (
            "other alpn",
            fx.opts(echo, &alice).alpn(&[b"h3"]),
            Closed::Alert(alert::NO_APPLICATION_PROTOCOL),
            "no application protocol",
        ),
        (
            "no certificate",
            with_alpn(ClientOptions::new(&ca).sni(echo)),
            Closed::Alert(alert::CERTIFICATE_REQUIRED),
            "no client certificate",
        ),
        (
            "untrusted ca",
            fx.quic_opts(echo, &rogue),
            Closed::Alert(alert::UNKNOWN_CA),
            "unknown ca",
        ),
        (
            "expired",
            fx.quic_opts(echo, &expired),
            Closed::Alert(alert::CERTIFICATE_EXPIRED),
            "certificate expired",
        ),
        (
            "revoked",
            fx.quic_opts(echo, &revoked),
            Closed::Alert(alert::CERTIFICATE_REVOKED),
            "certificate revoked",
        ),
        (
            "not in group",
            fx.quic_opts("admins.svc.internal", &bob),
            Closed::App(403, "ZTP-ERROR 403 forbidden".into()),
            "not in group",
        ),
        (
            "disabled",
            fx.quic_opts(echo, &dave),
            Closed::App(403, "ZTP-ERROR 403 forbidden".into()),
            "user disabled",
        ),
    ];
    let ep = endpoint_for(fx.dp.addr());
    for (what, opts, want, _) in &cases {
        let got = refusal_of(connect(&ep, fx.dp.addr(), opts).await).await;
        assert_eq!(got.as_ref(), Some(want), "{what}");
        if matches!(*what, "unknown sni" | "no sni") {
            assert!(!opts.server_cert_seen(), "{what}: the server signed");
        }
    }
    let events = wait_quic_events(&fx, cases.len()).await;
    let reasons: BTreeMap<&str, usize> = events.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["reason"].as_str().unwrap_or("?")).or_default() += 1;
        m
    });
    for (what, _, _, reason) in &cases {
        assert!(
            reasons.contains_key(reason),
            "{what}: {reason:?} not in {reasons:?}"
        );
    }
    assert_eq!(events.len(), cases.len(), "one record each: {events:#?}");
    // A refused certificate of our CA names who it claims to be, marked unverified.
    let claim = events
        .iter()
        .find(|e| e["reason"] == "certificate revoked")
        .expect("the revoked record");
    assert_eq!(claim["client.id"], "alice@example.com");
    assert_eq!(claim["client.id_unverified"], true);
    let refused_403 = events
        .iter()
        .find(|e| e["reason"] == "not in group")
        .expect("the 403 record");
    assert_eq!(refused_403["refusal.code"], 403);
    assert_eq!(refused_403["service.name"], "admins.svc.internal");
    assert_eq!(fx.backend_connections(), 0, "no backend reached");

    // The same client with everything right is served.
    let conn = fx.quic(&ep, echo, &alice).await.expect("alice over QUIC");
    assert_eq!(exchange(&conn, b"ping").await.unwrap(), b"ping");
}

/// A tcp service over QUIC: each stream is one backend connection, many at once on one
/// connection, byte-exact, with the half-close passed on; a backend failure is the 502
/// line on that stream only; a named handler answers on a stream; each stream is one
/// record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_tcp_sessions() {
    let dead = proto_service_yaml(
        "dead.svc.internal",
        Some("tcp"),
        &format!("127.0.0.1:{}", closed_port()),
    );
    let extra = Extra {
        services: &dead,
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice over QUIC");

    const STREAMS: usize = 24;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let payload = pseudo_random_bytes(32 * 1024 + i * 997, i as u64);
            let back = exchange(&conn, &payload).await.expect("a stream");
            assert_eq!(sha256(&back), sha256(&payload), "stream {i} byte-exact");
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
    assert_eq!(
        fx.echo.connections(),
        STREAMS,
        "one backend connection per stream"
    );
    // The half-close went through: the backend saw the end and closed its side, which is
    // how each exchange above read to its end.

    // The identity-echo handler over a stream of its own connection.
    let who = fx
        .quic(&ep, "whoami.svc.internal", &alice)
        .await
        .expect("whoami over QUIC");
    let text = String::from_utf8(exchange(&who, b"").await.unwrap()).unwrap();
    assert!(text.contains("identity: alice@example.com"), "{text}");

    // A dead backend: the 502 line on that stream; the connection goes on.
    let dead_conn = fx
        .quic(&ep, "dead.svc.internal", &alice)
        .await
        .expect("the dead service's connection");
    let line = exchange(&dead_conn, b"x").await.expect("the stream ends");
    assert_eq!(line, b"ZTP-ERROR 502 bad gateway\n");
    let line = exchange(&dead_conn, b"y").await.expect("a second stream");
    assert_eq!(line, b"ZTP-ERROR 502 bad gateway\n");
    assert!(
        dead_conn.close_reason().is_none(),
        "the connection stays up"
    );

    let events = wait_quic_events(&fx, STREAMS + 3).await;
    let echo_events: Vec<_> = events
        .iter()
        .filter(|e| e["service.name"] == "echo.svc.internal")
        .collect();
    assert_eq!(echo_events.len(), STREAMS, "a record per stream");
    let up: u64 = echo_events
        .iter()
        .map(|e| e["bytes.up"].as_u64().unwrap_or(0))
        .sum();
    let want: u64 = (0..STREAMS).map(|i| (32 * 1024 + i * 997) as u64).sum();
    assert_eq!(up, want, "bytes up recorded per stream");
    assert!(echo_events
        .iter()
        .all(|e| e["decision"] == "allow" && e["client.id"] == "alice@example.com"));
    let bad: Vec<_> = events
        .iter()
        .filter(|e| e["service.name"] == "dead.svc.internal")
        .collect();
    assert_eq!(bad.len(), 2);
    assert!(bad.iter().all(|e| e["refusal.code"] == 502), "{bad:#?}");

    // The metrics count each stream, under transport="quic".
    let metrics = ztp_tests::http::request(fx.dp.admin_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics")
        .text();
    let series = format!(
        "ztp_connections_total{{service=\"echo.svc.internal\",decision=\"allow\",\
         reason=\"closed\",transport=\"quic\"}} {STREAMS}"
    );
    assert!(
        metrics.lines().any(|l| l == series),
        "{series} in:\n{metrics}"
    );
}

/// A udp service over QUIC: DATAGRAM frames, each a varint flow id and one datagram; a
/// flow is one backend socket; answers carry their flow id. A stream to it gets the 501
/// line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_flows_carry_udp_sessions() {
    let udp = UdpBackend::echo().await;
    let svc = proto_service_yaml("dns.svc.internal", Some("udp"), &udp.addr().to_string());
    let extra = Extra {
        services: &svc,
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "dns.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    assert!(
        conn.max_datagram_size().unwrap_or(0) >= 1200,
        "datagrams on"
    );

    let flows: [(u64, &[u8]); 3] = [(0, b"zero"), (7, b"seven"), (300, b"three hundred")];
    let mut got = BTreeMap::new();
    for _round in 0..3 {
        for (flow, payload) in flows {
            conn.send_datagram(flow_datagram(flow, payload).into())
                .expect("send a datagram");
        }
        // Datagrams may be lost; a few rounds are enough on loopback.
        while got.len() < flows.len() {
            match tokio::time::timeout(Duration::from_secs(1), conn.read_datagram()).await {
                Ok(Ok(d)) => {
                    let (flow, payload) = split_flow(&d).expect("a flow id");
                    got.insert(flow, payload.to_vec());
                }
                Ok(Err(e)) => panic!("connection ended: {e}"),
                Err(_) => break,
            }
        }
        if got.len() == flows.len() {
            break;
        }
    }
    for (flow, payload) in flows {
        assert_eq!(
            got.get(&flow).map(Vec::as_slice),
            Some(payload),
            "flow {flow}"
        );
    }
    let sources: BTreeSet<SocketAddr> = udp.sources().into_iter().collect();
    assert_eq!(sources.len(), flows.len(), "one backend socket per flow");

    let line = exchange(&conn, b"not a datagram")
        .await
        .expect("the stream ends");
    assert_eq!(line, b"ZTP-ERROR 501 not implemented\n");
}

/// A live connection refused by a later decision (its certificate revoked after data
/// moved) is closed with 403 and the line, within the TCP bound; its streams end with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_connection_and_its_streams() {
    let fx = Fixture::start().await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    // Two live streams that have moved data.
    let mut live = Vec::new();
    for i in 0..2u8 {
        let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
        send.write_all(&[i; 5]).await.expect("write");
        let mut buf = [0u8; 5];
        recv.read_exact(&mut buf).await.expect("echoed");
        assert_eq!(buf, [i; 5]);
        live.push((send, recv));
    }
    let yaml = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            revoked: std::slice::from_ref(&alice.serial),
            ..Extra::default()
        },
    );
    fx.dp.reload_snapshot(&yaml);
    let closed = tokio::time::timeout(LIVE_BOUND, conn.closed())
        .await
        .expect("closed within the bound");
    assert_eq!(
        Closed::of(&closed),
        Closed::App(403, "ZTP-ERROR 403 forbidden".into())
    );
    for (mut send, mut recv) in live {
        assert!(send.write_all(b"more").await.is_err(), "the stream ended");
        assert!(recv.read_to_end(1024).await.is_err(), "the stream ended");
    }
    let events = wait_quic_events(&fx, 2).await;
    let ended: Vec<_> = events
        .iter()
        .filter(|e| e["reason"] == "certificate revoked")
        .collect();
    assert_eq!(ended.len(), 2, "each stream's record says why: {events:#?}");
    // And a new connection is refused in the handshake.
    let again = refusal_of(fx.quic(&ep, "echo.svc.internal", &alice).await).await;
    assert_eq!(again, Some(Closed::Alert(alert::CERTIFICATE_REVOKED)));
}

/// A client that changes its address in the middle of a transfer keeps its connection
/// and its stream: the transfer completes byte-exact. One that moves to an address the
/// listener's ranges refuse is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_client_keeps_its_streams() {
    let extra = Extra {
        args: &["--allow", "127.0.0.1/32", "--allow", "127.0.0.2/32"],
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    let payload = pseudo_random_bytes(8 << 20, 42);
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    let moved = async {
        // Half-way, the client moves to another loopback address.
        send.write_all(&payload[..4 << 20])
            .await
            .expect("first half");
        let socket = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        ep.rebind(socket).expect("rebind");
        send.write_all(&payload[4 << 20..])
            .await
            .expect("second half");
        send.finish().expect("finish");
    };
    let read = async { recv.read_to_end(16 << 20).await.expect("the echo") };
    let ((), back) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(moved, read) })
            .await
            .expect("the transfer is bounded");
    assert_eq!(back.len(), payload.len());
    assert_eq!(
        sha256(&back),
        sha256(&payload),
        "byte-exact across the move"
    );
    assert!(
        fx.dp
            .wait_for_log(|v| v["message"] == "client migrated", STEP)
            .await
            .is_some(),
        "the data plane saw the move"
    );

    // Moving to an address outside the ranges closes the connection.
    let socket = std::net::UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3");
    ep.rebind(socket).expect("rebind");
    // The server learns the new address from the next packet.
    let probe = conn.clone();
    let _keep = tokio::spawn(async move {
        for _ in 0..50 {
            if probe.open_bi().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let closed = tokio::time::timeout(LIVE_BOUND, conn.closed())
        .await
        .expect("closed after moving out of range");
    assert_eq!(
        Closed::of(&closed),
        Closed::App(403, "ZTP-ERROR 403 forbidden".into())
    );
}

/// On SIGTERM the node stops accepting, live QUIC connections go on until the drain
/// deadline, then close cleanly (application code 0); the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_quic_connections_cleanly() {
    let extra = Extra {
        args: &["--drain-timeout", "1s"],
        ..Extra::default()
    };
    let mut fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    send.write_all(b"hi").await.expect("write");
    let mut buf = [0u8; 2];
    recv.read_exact(&mut buf).await.expect("echo");
    fx.dp.terminate();
    // Still served during the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send.write_all(b"yo").await.expect("write during the drain");
    recv.read_exact(&mut buf)
        .await
        .expect("echo during the drain");
    assert_eq!(&buf, b"yo");
    let closed = tokio::time::timeout(STEP, conn.closed())
        .await
        .expect("closed at the deadline");
    assert_eq!(Closed::of(&closed), Closed::App(0, "drained".into()));
    let status = fx.dp.wait_exit(STEP).await.expect("the node exits");
    assert!(status.success(), "{status:?}");
}

/// Limits: a Retry before crypto when asked (the handshake still completes), and a cap
/// on live connections per identity, given back when one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_per_identity_cap() {
    let extra = Extra {
        args: &[
            "--quic-retry-above",
            "0",
            "--quic-max-connections-per-identity",
            "1",
        ],
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let bob = fx.pki.client_email("bob@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let first = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice, after a Retry");
    assert_eq!(exchange(&first, b"a").await.unwrap(), b"a");
    let second = refusal_of(fx.quic(&ep, "echo.svc.internal", &alice).await).await;
    assert_eq!(
        second,
        Some(Closed::App(
            429,
            "ZTP-ERROR 429 too many connections".into()
        ))
    );
    let other = fx
        .quic(&ep, "echo.svc.internal", &bob)
        .await
        .expect("another identity has its own cap");
    drop(other);
    first.close(0u32.into(), b"bye");
    // The place is given back once the data plane has seen the close.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match fx.quic(&ep, "echo.svc.internal", &alice).await {
            Ok(c) => {
                assert_eq!(exchange(&c, b"b").await.unwrap(), b"b");
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still capped: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An independent QUIC stack (aioquic, from PyPI) speaks the contract from DESIGN.md
/// alone: a stream to a tcp service, a datagram flow to a udp service, and the gate's
/// refusals (an unknown service in the handshake, 403 after it) as the codes it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_quic_stack_is_served() {
    let test = "quic::an_independent_quic_stack_is_served";
    let Some(python) = ztp_tests::process::require_python_module(test, "aioquic", "aioquic") else {
        return;
    };
    let udp = UdpBackend::echo().await;
    let svc = proto_service_yaml("dns.svc.internal", Some("udp"), &udp.addr().to_string());
    let extra = Extra {
        services: &svc,
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let dir = fx.dp.dir().to_path_buf();
    fx.pki
        .client_email("alice@example.com")
        .write(&dir, "alice")
        .expect("write alice's files");
    fx.pki
        .client_email("bob@example.com")
        .write(&dir, "bob")
        .expect("write bob's files");
    let script = ztp_tests::bins::workspace_root().join("tests/tools/ztp_quic_peer.py");
    let peer = |who: &str, sni: &str, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(&script)
            .arg("--connect")
            .arg(fx.dp.addr().to_string())
            .arg("--sni")
            .arg(sni)
            .arg("--cert")
            .arg(dir.join(format!("{who}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{who}.key")))
            .arg("--ca")
            .arg(dir.join("ca.pem"))
            .args(args)
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(STEP, cmd.output())
                .await
                .expect("the aioquic peer is bounded")
                .expect("run the aioquic peer");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text.lines().last().unwrap_or_default().to_owned();
            serde_json::from_str::<Value>(&line).unwrap_or_else(|_| {
                panic!(
                    "aioquic peer printed {text:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        }
    };
    let echoed = peer(
        "alice",
        "echo.svc.internal",
        &["stream", "--data", "from aioquic"],
    )
    .await;
    assert_eq!(echoed["data"], "from aioquic", "{echoed}");
    let flow = peer(
        "alice",
        "dns.svc.internal",
        &["datagram", "--flow", "300", "--data", "a datagram"],
    )
    .await;
    assert_eq!(flow["flow"], 300, "{flow}");
    assert_eq!(flow["data"], "a datagram", "{flow}");
    let forbidden = peer("bob", "admins.svc.internal", &["stream", "--data", "x"]).await;
    assert_eq!(forbidden["error_code"], 403, "{forbidden}");
    assert_eq!(
        forbidden["reason"], "ZTP-ERROR 403 forbidden",
        "{forbidden}"
    );
    let unknown = peer("alice", "nothing.example.org", &["stream", "--data", "x"]).await;
    assert_eq!(
        unknown["error_code"],
        0x100 + u64::from(alert::ACCESS_DENIED),
        "{unknown}"
    );
}

/// Revocation through the control plane closes a live QUIC connection, and every stream
/// on it, on every replica (with 403 and the line), within the bound of a TCP session;
/// the audit trail records the streams with `transport: quic`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_quic_connections_on_every_replica() {
    let p = crate::plane::Plane::start(&["quic-a", "quic-b"], &[]).await;
    let alice = p.alice.clone();
    let mut live = Vec::new();
    for dp in &p.replicas {
        let ep = endpoint_for(dp.addr());
        let conn = connect(
            &ep,
            dp.addr(),
            &with_alpn(p.opts(crate::plane::ECHO, &alice)),
        )
        .await
        .expect("alice over QUIC");
        let mut streams = Vec::new();
        for i in 0..3u8 {
            let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
            send.write_all(&[i; 3]).await.expect("write");
            let mut buf = [0u8; 3];
            recv.read_exact(&mut buf).await.expect("echoed");
            streams.push((send, recv));
        }
        live.push((ep, conn, streams));
    }
    let files = ztp_tests::tempdir::TempDir::new("quic-revoke");
    std::fs::write(files.join("alice.pem"), &alice.cert_pem).expect("write alice.pem");
    p.control
        .ztpctl_ok([
            std::ffi::OsStr::new("pki"),
            std::ffi::OsStr::new("revoke"),
            files.join("alice.pem").as_os_str(),
        ])
        .await;
    for (i, (_ep, conn, streams)) in live.into_iter().enumerate() {
        let closed = tokio::time::timeout(LIVE_BOUND, conn.closed())
            .await
            .unwrap_or_else(|_| panic!("replica {i}: still open {LIVE_BOUND:?} after revoke"));
        assert_eq!(
            Closed::of(&closed),
            Closed::App(403, "ZTP-ERROR 403 forbidden".into()),
            "replica {i}"
        );
        for (mut send, mut recv) in streams {
            assert!(
                send.write_all(b"more").await.is_err(),
                "replica {i}: a stream lives"
            );
            assert!(
                recv.read_to_end(64).await.is_err(),
                "replica {i}: a stream lives"
            );
        }
    }
    let records = crate::plane::wait_items(
        &p.control,
        "/v1/audit?identity=alice@example.com&limit=100",
        "the streams' records",
        |items| {
            items
                .iter()
                .filter(|r| r["transport"] == "quic" && r["reason"] == "certificate revoked")
                .count()
                >= 6
        },
    )
    .await;
    assert!(
        records.iter().all(|r| r["transport"] == "quic"),
        "{records:#?}"
    );
}

/// `ztpctl connect` (`--transport auto`, the default) to a data plane that serves no
/// QUIC (`--quic-listen off`) falls back to TCP and carries the session; with a QUIC
/// listener it takes QUIC. The data plane's records say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_quic_or_falls_back_to_tcp() {
    for (args, want) in [(&["--quic-listen", "off"][..], "tcp"), (&[][..], "quic")] {
        let extra = Extra {
            args,
            ..Extra::default()
        };
        let fx = Fixture::start_with(TestPki::new(), extra).await;
        let files = ztp_tests::tempdir::TempDir::new("auto");
        std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
        fx.pki
            .client_email("alice@example.com")
            .write(files.path(), "alice")
            .expect("write alice's files");
        let mut cmd = crate::common::ztpctl_connect(files.path(), fx.dp.addr(), "alice", &[]);
        let mut child = cmd.spawn().expect("start ztpctl connect");
        let mut stdin = child.stdin.take().expect("stdin");
        tokio::io::AsyncWriteExt::write_all(&mut stdin, b"which way")
            .await
            .expect("write");
        drop(stdin);
        let out = tokio::time::timeout(STEP, child.wait_with_output())
            .await
            .expect("bounded")
            .expect("ztpctl's output");
        assert!(
            out.status.success(),
            "{want}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"which way", "{want}");
        let event = fx
            .dp
            .wait_for_log(
                |v| v["message"] == "connection" && v["service.name"] == "echo.svc.internal",
                STEP,
            )
            .await
            .expect("the session's record");
        assert_eq!(event["transport"], want, "{event}");
    }
}

/// A live `ztpctl connect` session (the default transport: QUIC here) whose certificate
/// is revoked after data moved both ways: it ends within the bound with one line naming
/// the refusal, and a non-zero exit (over TCP the same end is a clean close; see
/// README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztpctl_connect_ended_by_revocation_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let fx = Fixture::start().await;
    let files = ztp_tests::tempdir::TempDir::new("connect-revoked");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
    let alice = fx.pki.client_email("alice@example.com");
    alice
        .write(files.path(), "alice")
        .expect("write alice's files");
    let mut cmd = crate::common::ztpctl_connect(files.path(), fx.dp.addr(), "alice", &[]);
    let mut child = cmd.spawn().expect("start ztpctl connect");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    stdin.write_all(b"before").await.expect("write");
    stdin.flush().await.expect("flush");
    let mut got = [0u8; 6];
    tokio::time::timeout(STEP, stdout.read_exact(&mut got))
        .await
        .expect("the echo, bounded")
        .expect("the echo");
    assert_eq!(&got, b"before");

    let yaml = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            revoked: std::slice::from_ref(&alice.serial),
            ..Extra::default()
        },
    );
    fx.dp.reload_snapshot(&yaml);
    // Standard input stays open: only the gateway ends the session.
    let status = tokio::time::timeout(LIVE_BOUND, child.wait())
        .await
        .expect("ended within the bound")
        .expect("ztpctl's status");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    drop(stdin);
    assert!(!status.success(), "exit 0 after a revocation: {stderr:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(
        lines[0].starts_with("ztpctl: ") && lines[0].contains("403 forbidden"),
        "{stderr:?}"
    );
    let event = fx
        .dp
        .wait_for_log(
            |v| v["message"] == "connection" && v["reason"] == "certificate revoked",
            STEP,
        )
        .await
        .expect("the session's record");
    assert_eq!(event["transport"], "quic", "{event}");
}

/// A datagram flow whose client closes its connection is recorded at once (not after
/// `--udp-idle`), and the node's gauge of open sessions comes back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_records_its_flows_at_once() {
    let udp = UdpBackend::echo().await;
    let svc = proto_service_yaml("dns.svc.internal", Some("udp"), &udp.addr().to_string());
    let extra = Extra {
        services: &svc,
        ..Extra::default()
    };
    let fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "dns.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    let mut answered = false;
    for _ in 0..5 {
        conn.send_datagram(flow_datagram(3, b"q").into())
            .expect("send");
        if let Ok(Ok(d)) =
            tokio::time::timeout(Duration::from_millis(500), conn.read_datagram()).await
        {
            assert_eq!(split_flow(&d), Some((3, &b"q"[..])));
            answered = true;
            break;
        }
    }
    assert!(answered, "the flow was answered");
    conn.close(0u32.into(), b"done");
    let event = fx
        .dp
        .wait_for_log(
            |v| v["message"] == "connection" && v["service.name"] == "dns.svc.internal",
            Duration::from_secs(10),
        )
        .await
        .expect("the flow's record, well before --udp-idle (60 s)");
    assert_eq!(event["transport"], "quic", "{event}");
    assert_eq!(event["decision"], "allow", "{event}");
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let metrics = ztp_tests::http::request(fx.dp.admin_addr(), "GET", "/metrics", &[], None)
            .await
            .expect("GET /metrics")
            .text();
        if metrics.lines().any(|l| l == "ztp_active_connections 0") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions still counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that moves into a range the service refuses is closed (403), as is one whose
/// new address a later snapshot refuses: the service's ranges judge the address the
/// connection has now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_into_a_refused_range_of_the_service_closes() {
    let svc = "  - name: only-one.svc.internal\n    protocol: tcp\n    address: \"ECHO\"\n    allow: [\"127.0.0.1/32\"]\n";
    let fx = Fixture::start().await;
    let services = svc.replace("ECHO", &fx.echo.addr().to_string());
    let snapshot = |version, services: &str| {
        standard_snapshot(
            version,
            fx.echo.addr(),
            fx.wild.addr(),
            fx.admins.addr(),
            &Extra {
                services,
                ..Extra::default()
            },
        )
    };
    fx.dp.reload_snapshot(&snapshot(2, &services));
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    // The reload applies soon: retry the admission briefly.
    let deadline = tokio::time::Instant::now() + STEP;
    let conn = loop {
        match fx.quic(&ep, "only-one.svc.internal", &alice).await {
            Ok(c) if exchange(&c, b"in").await.as_deref() == Ok(b"in") => break c,
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "never admitted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    ep.rebind(std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2"))
        .expect("rebind");
    let probe = conn.clone();
    let _keep = tokio::spawn(async move {
        for _ in 0..100 {
            let _ = probe.open_bi().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let closed = tokio::time::timeout(LIVE_BOUND, conn.closed())
        .await
        .expect("closed after moving out of the service's range");
    assert_eq!(
        Closed::of(&closed),
        Closed::App(403, "ZTP-ERROR 403 forbidden".into())
    );

    // Moved first (allowed then), refused by the next snapshot.
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice to echo");
    ep.rebind(std::net::UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3"))
        .expect("rebind");
    assert_eq!(exchange(&conn, b"moved").await.unwrap(), b"moved");
    assert!(
        fx.dp
            .wait_for_log(|v| v["message"] == "client migrated", STEP)
            .await
            .is_some(),
        "the data plane saw the move"
    );
    let echo_only_from_1 = snapshot(3, &services).replace(
        "  - name: echo.svc.internal\n    protocol: tcp\n",
        "  - name: echo.svc.internal\n    protocol: tcp\n    allow: [\"127.0.0.1/32\"]\n",
    );
    assert!(echo_only_from_1.contains("allow: [\"127.0.0.1/32\"]\n    address"));
    fx.dp.reload_snapshot(&echo_only_from_1);
    let closed = tokio::time::timeout(LIVE_BOUND, conn.closed())
        .await
        .expect("closed once a snapshot refuses the new address");
    assert_eq!(
        Closed::of(&closed),
        Closed::App(403, "ZTP-ERROR 403 forbidden".into())
    );
}

/// Streams count against `--max-connections` like connections: with room for the
/// connection and two sessions, a third stream is reset and the connection goes on. On
/// SIGTERM a connection with no live session closes at once (code 0), so it does not hold
/// the drain up to `--drain-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_count_against_the_cap_and_idle_connections_do_not_hold_the_drain() {
    let extra = Extra {
        args: &["--max-connections", "3", "--drain-timeout", "60s"],
        ..Extra::default()
    };
    let mut fx = Fixture::start_with(TestPki::new(), extra).await;
    let alice = fx.pki.client_email("alice@example.com");
    let ep = endpoint_for(fx.dp.addr());
    let conn = fx
        .quic(&ep, "echo.svc.internal", &alice)
        .await
        .expect("alice over QUIC");
    let mut held = Vec::new();
    for i in 0..2u8 {
        let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
        send.write_all(&[i]).await.expect("write");
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.expect("echoed");
        held.push((send, recv));
    }
    let (mut send, mut recv) = conn.open_bi().await.expect("a third stream");
    send.write_all(b"x").await.expect("write");
    let third = tokio::time::timeout(STEP, recv.read_to_end(64))
        .await
        .expect("bounded");
    assert!(third.is_err(), "the third stream was served: {third:?}");
    drop(held);
    // Places come back as sessions end.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if exchange(&conn, b"again").await.as_deref() == Ok(b"again") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = tokio::time::Instant::now();
    fx.dp.terminate();
    let closed = tokio::time::timeout(STEP, conn.closed())
        .await
        .expect("closed at once: no live session");
    assert_eq!(Closed::of(&closed), Closed::App(0, "drained".into()));
    let status = fx.dp.wait_exit(STEP).await.expect("the node exits");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the idle connection held the drain: {:?}",
        started.elapsed()
    );
}
