//! Connectors' tunnels (DESIGN.md, "Connectors"), with the real data plane and the real
//! `ztpctl connector run`: a service that names a connector is reached only through the
//! connector's tunnel (the data plane never dials its address), `ZTP-ERROR 503
//! unavailable` without one, and a connector's certificate revoked, or a user's
//! certificate presented as a connector's, ends or refuses the tunnel.

use std::process::Command;
use std::time::Duration;

use ztp_tests::client::{parse_ztp_error, read_to_end_or_alert_within};
use ztp_tests::process::{Process, Stream};
use ztp_tests::quic::{connect, endpoint_for, with_alpn};
use ztp_tests::{Bin, EchoBackend, TempDir, TestCert, TestPki};

use crate::common::{echo_step, standard_snapshot, Extra, Fixture, STEP};

pub(crate) const LAB: &str = "lab.svc.internal";

/// The standard snapshot with connector `lab` serving `lab.svc.internal` at `backend`.
fn snapshot(fx: &Fixture, version: u64, backend: &EchoBackend, revoked: &[String]) -> String {
    let services = format!(
        "  - name: {LAB}\n    protocol: tcp\n    address: \"{}\"\n    connector: lab\n",
        backend.addr()
    );
    let mut yaml = standard_snapshot(
        version,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            services: &services,
            revoked,
            ..Extra::default()
        },
    );
    yaml.push_str("connectors:\n  - name: lab\n    description: the lab\n");
    yaml
}

/// `ztpctl connector run` with `cert`, to the fixture's data plane.
fn run_connector(fx: &Fixture, files: &TempDir, cert: &TestCert, name: &str) -> Process {
    run_connector_to(fx.dp.addr().port(), files, cert, name)
}

/// `ztpctl connector run` with `cert` (files in `files`, beside its `ca.pem`), to the
/// data plane on loopback `port`.
pub(crate) fn run_connector_to(port: u16, files: &TempDir, cert: &TestCert, name: &str) -> Process {
    cert.write(files.path(), name)
        .expect("write the connector's files");
    let mut cmd = Command::new(Bin::Ztpctl.path());
    cmd.args(["connector", "run", "--tunnels", "1", "--via"])
        .arg(format!("localhost:{port}"))
        .arg("--cert")
        .arg(files.join(format!("{name}.pem")))
        .arg("--key")
        .arg(files.join(format!("{name}.key")))
        .arg("--ca")
        .arg(files.join("ca.pem"));
    cmd.env_remove("RUST_LOG");
    Process::spawn(&format!("ztpctl connector run ({name})"), cmd)
}

/// Connector `lab` and `LAB` behind it (group `admins`, forwarding to `backend`) through
/// the plane's control plane, acked by every replica; a folder holding the CA and the
/// connector's certificate to come.
async fn lab_on_plane(
    p: &crate::plane::Plane,
    backend: &EchoBackend,
    folder: &str,
) -> (TempDir, TestCert) {
    p.control.ztpctl_ok(["connector", "add", "lab"]).await;
    let addr = backend.addr().to_string();
    p.control
        .ztpctl_ok([
            "service",
            "add",
            LAB,
            "--proto",
            "tcp",
            "--addr",
            &addr,
            "--connector",
            "lab",
            "--group",
            "admins",
        ])
        .await;
    p.wait_current().await;
    let files = TempDir::new(folder);
    std::fs::write(files.join("ca.pem"), &p.pki.ca_pem).expect("write ca.pem");
    let cert = p
        .pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue();
    (files, cert)
}

/// What a TCP client of `LAB` through the data plane at `addr` gets: the echo of
/// `payload`, or the refusal code.
pub(crate) async fn lab_via(
    addr: std::net::SocketAddr,
    opts: &ztp_tests::ClientOptions,
    payload: &[u8],
) -> Result<Vec<u8>, u16> {
    let (_, s) = crate::plane::dial(addr, opts).await;
    let mut s = s.expect("the handshake");
    tokio::io::AsyncWriteExt::write_all(&mut s, payload)
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::shutdown(&mut s)
        .await
        .expect("close_notify");
    let data = match read_to_end_or_alert_within(&mut s, STEP).await {
        Ok(d) => d,
        Err(e) => e.data().to_vec(),
    };
    match parse_ztp_error(&data) {
        Some((code, _)) => Err(code),
        None => Ok(data),
    }
}

/// Waits (within `STEP`) until a session through the data plane at `addr` gets the echo
/// of `payload`: the tunnel (or the relay to it) may not be known there yet.
pub(crate) async fn lab_echoes_via(
    addr: std::net::SocketAddr,
    opts: &ztp_tests::ClientOptions,
    payload: &[u8],
    connector: &Process,
) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match lab_via(addr, opts, payload).await {
            Ok(d) => {
                assert_eq!(d, payload);
                return;
            }
            Err(code) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "through {addr}: {code}; {}",
                    connector.output_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connector `lab`'s rendezvous weight for the replica listening at `addr` (advertised as
/// `127.0.0.1:PORT`), as `ztpctl connector run` computes it: the highest ranks first.
fn rank_score(addr: std::net::SocketAddr) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"spiffe://ztp.internal/connector/lab");
    h.update([0u8]);
    h.update(format!("127.0.0.1:{}", addr.port()).as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

/// What a TCP client of `LAB` gets: the echo of `payload`, or the refusal code.
async fn try_lab(fx: &Fixture, alice: &TestCert, payload: &[u8]) -> Result<Vec<u8>, u16> {
    let mut s = fx.connect(LAB, alice).await.expect("the handshake");
    tokio::io::AsyncWriteExt::write_all(&mut s, payload)
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::shutdown(&mut s)
        .await
        .expect("close_notify");
    let data = match read_to_end_or_alert_within(&mut s, STEP).await {
        Ok(d) => d,
        Err(e) => e.data().to_vec(),
    };
    match parse_ztp_error(&data) {
        Some((code, _)) => Err(code),
        None => Ok(data),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_behind_a_connector_is_reached_only_through_its_tunnel() {
    let pki = TestPki::new();
    let lab_cert = pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue();
    let backend = EchoBackend::start().await;
    let fx = Fixture::start_with(pki, Extra::default()).await;
    fx.dp.reload_snapshot(&snapshot(&fx, 2, &backend, &[]));
    let alice = fx.pki.client_email("alice@example.com");
    let files = TempDir::new("connector");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");

    // No tunnel: 503, and the data plane never dialled the backend.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match try_lab(&fx, &alice, b"x").await {
            Err(503) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "before the connector: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(
        backend.connections(),
        0,
        "the data plane dialled the backend"
    );

    // A user's certificate cannot serve as a connector's.
    let mut impostor = run_connector(&fx, &files, &alice, "alice");
    let refused = fx
        .dp
        .wait_for_log(
            |v| v["message"] == "connection" && v["reason"] == "not a connector",
            STEP,
        )
        .await;
    assert!(refused.is_some(), "{}", impostor.output_text());
    impostor.kill();

    // The connector's tunnel: sessions reach the backend through it, over TCP and QUIC.
    let mut connector = run_connector(&fx, &files, &lab_cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match try_lab(&fx, &alice, b"through the tunnel").await {
            Ok(d) => {
                assert_eq!(d, b"through the tunnel");
                break;
            }
            Err(code) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "with the connector up: {code}; {}",
                    connector.output_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut s = fx.connect(LAB, &alice).await.expect("the handshake");
    echo_step(&mut s, b"a live session").await;
    let ep = endpoint_for(fx.dp.addr());
    let conn = connect(&ep, fx.dp.addr(), &with_alpn(fx.opts(LAB, &alice)))
        .await
        .expect("QUIC");
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    send.write_all(b"quic through the tunnel")
        .await
        .expect("write");
    send.finish().expect("finish");
    let back = recv.read_to_end(1024).await.expect("the echo");
    assert_eq!(back, b"quic through the tunnel");
    assert!(backend.connections() >= 3, "the backend saw the sessions");
    let event = fx
        .dp
        .wait_for_log(
            |v| {
                v["message"] == "connection" && v["service.name"] == LAB && v["decision"] == "allow"
            },
            STEP,
        )
        .await
        .expect("a session's record");
    assert_ne!(
        event["backend.addr"],
        backend.addr().to_string(),
        "the record names the tunnel, not the backend: {event}"
    );

    // The connector's certificate revoked: its tunnel and the live session end.
    fx.dp.reload_snapshot(&snapshot(
        &fx,
        3,
        &backend,
        std::slice::from_ref(&lab_cert.serial),
    ));
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("ended"), STEP)
        .await;
    // The session through the tunnel ends with it (cut: no clean close, which would say
    // the service ended it), well within the bound.
    if let Err(ztp_tests::ReadError::Io { error, .. }) =
        read_to_end_or_alert_within(&mut s, STEP).await
    {
        assert_ne!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "the live session through the revoked tunnel is still open"
        );
    }
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match try_lab(&fx, &alice, b"x").await {
            Err(503) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "after the revocation: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    connector.kill();
}

/// Through the control plane: `ztpctl connector list` (the REST record's `tunnels`)
/// shows a connector's live tunnel, with its replica and transport, and loses it when
/// the connector stops; a session through the tunnel is audited with the connector's
/// name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_list_shows_live_tunnels_and_the_audit_names_the_connector() {
    use crate::plane::{dial, send_and_drain, wait_items, Plane};

    let p = Plane::start(&["tun-a"], &[]).await;
    let backend = EchoBackend::start().await;
    let (files, cert) = lab_on_plane(&p, &backend, "connector-plane").await;
    let mut connector = run_connector_to(p.replicas[0].addr().port(), &files, &cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;
    let items = wait_items(&p.control, "/v1/connectors", "the live tunnel", |items| {
        items
            .first()
            .and_then(|c| c["tunnels"].as_array())
            .is_some_and(|t| t.len() == 1)
    })
    .await;
    let tunnel = &items[0]["tunnels"][0];
    assert_eq!(tunnel["replica"], "tun-a", "{tunnel}");
    assert_eq!(tunnel["transport"], "quic", "{tunnel}");
    assert!(tunnel["since_ms"].as_u64().unwrap_or(0) > 0, "{tunnel}");

    let (_, s) = dial(p.replicas[0].addr(), &p.opts(LAB, &p.alice)).await;
    let mut s = s.expect("alice's handshake");
    assert_eq!(
        send_and_drain(&mut s, b"audited", Duration::ZERO).await,
        b"audited"
    );
    let records = wait_items(
        &p.control,
        "/v1/audit?service=lab.svc.internal&limit=10",
        "the session's record",
        |items| !items.is_empty(),
    )
    .await;
    assert_eq!(records[0]["connector"], "lab", "{}", records[0]);
    assert_eq!(records[0]["decision"], "allow", "{}", records[0]);

    connector.kill();
    wait_items(&p.control, "/v1/connectors", "the tunnel gone", |items| {
        items
            .first()
            .and_then(|c| c["tunnels"].as_array())
            .is_some_and(|t| t.is_empty())
    })
    .await;
}

/// Relay: a client lands on replica B while the connector's only tunnel is on replica A;
/// B learns through the control plane where the tunnel is and carries the session to A
/// over mutual TLS with node certificates (QUIC, `ztp-relay/1`). When the connector
/// stops, B answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_tunnel_relays_to_one_with_it() {
    use crate::plane::Plane;

    let p = Plane::start(&["relay-a", "relay-b"], &[]).await;
    let backend = EchoBackend::start().await;
    let (files, cert) = lab_on_plane(&p, &backend, "connector-relay").await;
    let (a, b) = (&p.replicas[0], &p.replicas[1]);
    let mut connector = run_connector_to(a.addr().port(), &files, &cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;

    // Through B, which holds no tunnel: relayed to A (once B has heard where it is).
    let opts = p.opts(LAB, &p.alice);
    lab_echoes_via(b.addr(), &opts, b"relayed", &connector).await;
    let event = b
        .wait_for_log(
            |v| {
                v["message"] == "connection"
                    && v["service.name"] == LAB
                    && v["decision"] == "allow"
                    && v["refusal.code"].is_null()
            },
            STEP,
        )
        .await
        .expect("B's record of the relayed session");
    assert_eq!(
        event["backend.addr"],
        a.addr().to_string(),
        "relayed to A: {event}"
    );
    assert_eq!(event["service.connector"], "lab", "{event}");

    // The connector gone: B answers 503 once the tunnel's end is known.
    connector.kill();
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match lab_via(b.addr(), &opts, b"x").await {
            Err(503) => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "after the connector stopped: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Failover: a connector holding two tunnels over three replicas (placed by rendezvous
/// hashing: which two is the connector's choice); one holder is killed with SIGKILL while
/// new sessions keep arriving through the other: none of them fails, and the connector
/// re-establishes its second tunnel on the third replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_moves_its_tunnel_and_no_session_through_another_fails() {
    use crate::plane::{wait_items, Plane};

    let mut p = Plane::start(&["fo-a", "fo-b", "fo-c"], &[]).await;
    let backend = EchoBackend::start().await;
    let (files, cert) = lab_on_plane(&p, &backend, "connector-failover").await;
    cert.write(files.path(), "lab")
        .expect("write the connector's files");
    let vias = p
        .replicas
        .iter()
        .map(|r| format!("localhost:{}", r.addr().port()))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(Bin::Ztpctl.path());
    cmd.args(["connector", "run", "--tunnels", "2", "--via", &vias])
        .arg("--cert")
        .arg(files.join("lab.pem"))
        .arg("--key")
        .arg(files.join("lab.key"))
        .arg("--ca")
        .arg(files.join("ca.pem"));
    let mut connector = Process::spawn("ztpctl connector run (failover)", cmd);
    let tunnels_on = |items: &[serde_json::Value]| -> Vec<String> {
        let mut on: Vec<String> = items
            .first()
            .and_then(|c| c["tunnels"].as_array())
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["replica"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        on.sort();
        on
    };
    // The connector knows the three replicas (the control plane publishes the set once
    // its nodes had time to reconnect after its start), and its tunnels settle on the two
    // that rank first for it.
    connector
        .wait_for_line(
            Stream::Stderr,
            |l| l.contains("the data planes are at") && l.matches(", ").count() == 2,
            STEP,
        )
        .await;
    let ids = ["fo-a", "fo-b", "fo-c"];
    let mut ranked: Vec<usize> = (0..3).collect();
    ranked.sort_by_key(|i| std::cmp::Reverse(rank_score(p.replicas[*i].addr())));
    let mut best = vec![ids[ranked[0]].to_owned(), ids[ranked[1]].to_owned()];
    best.sort();
    let items = wait_items(
        &p.control,
        "/v1/connectors",
        "two tunnels, placed",
        |items| tunnels_on(items) == best,
    )
    .await;
    let holders = tunnels_on(&items);
    let index = |id: &str| ids.iter().position(|i| *i == id).expect("a replica's id");
    let (victim, survivor) = (index(&holders[0]), index(&holders[1]));
    let free = (0..3).find(|i| *i != victim && *i != survivor).unwrap();
    let mut after = vec![ids[survivor].to_owned(), ids[free].to_owned()];
    after.sort();

    // A steady stream of new sessions through the holder that stays.
    let opts = p.opts(LAB, &p.alice);
    let b = p.replicas[survivor].addr();
    let deadline = tokio::time::Instant::now() + STEP;
    while lab_via(b, &opts, b"warm").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "B never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sessions = {
        let (opts, stop) = (opts.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match lab_via(b, &opts, b"steady").await {
                    Ok(d) if d == b"steady" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.replicas[victim].signal("KILL");
    // The connector learns from the surviving replicas that the victim left (within the
    // control plane's second), and moves at once rather than after its tunnel's 3 s of
    // silence.
    connector
        .wait_for_line(
            Stream::Stderr,
            |l| l.contains("left the data planes' replica set"),
            STEP,
        )
        .await;
    let items = wait_items(
        &p.control,
        "/v1/connectors",
        "the tunnel moved to the third replica",
        |items| tunnels_on(items) == after,
    )
    .await;
    assert_eq!(tunnels_on(&items), after);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = sessions.await.expect("the sessions' task");
    assert!(ok > 10, "only {ok} sessions");
    assert!(
        failed.is_empty(),
        "{} of {} sessions through the surviving holder failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    connector.kill();
}

/// Placement: a connector dialled to the replica that ranks lower for it (rendezvous
/// hashing of its name over the replicas' advertised addresses, as `ztpctl connector
/// run` computes it) learns the replica set from the data plane and moves its idle tunnel
/// to the better-placed replica, the new tunnel up first; sessions through either replica
/// are served before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_moves_its_idle_tunnel_to_the_replica_that_ranks_first() {
    use crate::plane::{wait_items, Plane};

    let p = Plane::start(&["rank-a", "rank-b"], &[]).await;
    let backend = EchoBackend::start().await;
    let (files, cert) = lab_on_plane(&p, &backend, "connector-rank").await;
    let score = rank_score;
    let (a, b) = (p.replicas[0].addr(), p.replicas[1].addr());
    let (low, high, high_id) = if score(a) > score(b) {
        (b, a, "rank-a")
    } else {
        (a, b, "rank-b")
    };
    let mut connector = run_connector_to(low.port(), &files, &cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("moved from"), STEP)
        .await;
    let items = wait_items(
        &p.control,
        "/v1/connectors",
        "the tunnel on the first",
        |items| {
            items
                .first()
                .and_then(|c| c["tunnels"].as_array())
                .is_some_and(|t| t.len() == 1 && t[0]["replica"] == high_id)
        },
    )
    .await;
    assert_eq!(items[0]["tunnels"][0]["replica"], high_id, "{items:?}");
    let opts = p.opts(LAB, &p.alice);
    for via in [high, low] {
        lab_echoes_via(via, &opts, b"placed", &connector).await;
    }
    connector.kill();
}

/// UDP blocked between the connector and the data plane (the replica serves no QUIC,
/// and its UDP port swallows every packet, as a firewall that drops them): the
/// connector's tunnel falls back to TCP + TLS (HTTP/2 streams), `connector list` says
/// so, sessions (one of 4 MiB, byte-exact both ways) go through it, a user's
/// certificate is refused as a connector there too, and revoking the connector's
/// certificate closes the tunnel and the session through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_the_tunnel_falls_back_to_tcp() {
    use crate::plane::{wait_items, Plane};
    use ztp_tests::Dataplane;

    let mut p = Plane::start(&[], &[]).await;
    let mut dp = Dataplane::start_control(
        &p.pki,
        &p.control.grpc_url(),
        "tcp-only",
        &["--quic-listen", "off"],
    )
    .await;
    assert!(dp.wait_ready(STEP).await, "the replica is not ready");
    let port = dp.addr().port();
    p.replicas.push(dp);
    // Whatever comes to the replica's port by UDP is swallowed: no answer, no ICMP.
    let black_hole = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("bind the UDP port");
    let backend = EchoBackend::start().await;
    let (files, cert) = lab_on_plane(&p, &backend, "connector-tcp").await;

    // A user's certificate, over TCP: refused, and the connector says why.
    let mut impostor = run_connector_to(port, &files, &p.alice, "alice");
    impostor
        .wait_for_line(
            Stream::Stderr,
            |l| l.contains("refused: ZTP-ERROR 403 forbidden"),
            STEP,
        )
        .await;
    impostor.kill();

    let mut connector = run_connector_to(port, &files, &cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("(tcp)"), STEP)
        .await;
    let items = wait_items(&p.control, "/v1/connectors", "the live tunnel", |items| {
        items
            .first()
            .and_then(|c| c["tunnels"].as_array())
            .is_some_and(|t| t.len() == 1)
    })
    .await;
    assert_eq!(items[0]["tunnels"][0]["transport"], "tcp", "{items:?}");

    let opts = p.opts(LAB, &p.alice);
    let addr = p.replicas[0].addr();
    lab_echoes_via(addr, &opts, b"over tcp", &connector).await;
    // 4 MiB up and its echo down: more than every window, byte-exact.
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let (_, s) = crate::plane::dial(addr, &opts).await;
    let s = s.expect("the handshake");
    let (mut r, mut w) = tokio::io::split(s);
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut w, &payload)
                .await
                .expect("write");
            // TLS may hold the last records until flushed.
            tokio::io::AsyncWriteExt::flush(&mut w)
                .await
                .expect("flush");
            w
        })
    };
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read_exact(&mut r, &mut back))
        .await
        .expect("the echo in time")
        .expect("the echo");
    assert!(back == payload, "the echo differs");
    let w = writer.await.expect("the writer");
    let mut live = r.unsplit(w);

    // Revoked: the tunnel closes, and the live session through it ends.
    let body = format!("{{\"serials\":[\"{}\"]}}", cert.serial);
    let r = p
        .control
        .request(
            "POST",
            "/v1/revoked",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
        .await
        .expect("POST /v1/revoked");
    assert!(r.status < 300, "POST /v1/revoked: {r:?}");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("ended"), STEP)
        .await;
    if let Err(ztp_tests::ReadError::Io { error, .. }) =
        read_to_end_or_alert_within(&mut live, STEP).await
    {
        assert_ne!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "the live session through the revoked tunnel is still open"
        );
    }
    wait_items(&p.control, "/v1/connectors", "no tunnel", |items| {
        items
            .first()
            .and_then(|c| c["tunnels"].as_array())
            .is_some_and(|t| t.is_empty())
    })
    .await;
    connector.kill();
    drop(black_hole);
}

/// A udp service behind a connector: datagrams reach the backend only through the
/// connector's tunnel (framed on the session's stream), from a QUIC client's datagram
/// flow and from a TLS client's framed session (ALPN `ztp-dgram`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_behind_a_connector_is_served_through_its_tunnel() {
    use ztp_tests::quic::{flow_datagram, split_flow};
    use ztp_tests::{DgramEvent, DgramSession, UdpBackend};

    let pki = TestPki::new();
    let lab_cert = pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue();
    let udp = UdpBackend::echo().await;
    let fx = Fixture::start_with(pki, Extra::default()).await;
    let services = format!(
        "  - name: dns.svc.internal\n    protocol: udp\n    address: \"{}\"\n    connector: lab\n",
        udp.addr()
    );
    let mut yaml = standard_snapshot(
        2,
        fx.echo.addr(),
        fx.wild.addr(),
        fx.admins.addr(),
        &Extra {
            services: &services,
            ..Extra::default()
        },
    );
    yaml.push_str("connectors:\n  - name: lab\n");
    fx.dp.reload_snapshot(&yaml);
    let alice = fx.pki.client_email("alice@example.com");
    let files = TempDir::new("connector-udp");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
    let mut connector = run_connector(&fx, &files, &lab_cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;

    // A QUIC client's flow (datagrams may be lost: a few tries).
    let ep = endpoint_for(fx.dp.addr());
    let conn = connect(
        &ep,
        fx.dp.addr(),
        &with_alpn(fx.opts("dns.svc.internal", &alice)),
    )
    .await
    .expect("QUIC");
    let mut answered = false;
    for _ in 0..20 {
        conn.send_datagram(flow_datagram(9, b"over quic").into())
            .expect("send");
        if let Ok(Ok(d)) =
            tokio::time::timeout(Duration::from_millis(500), conn.read_datagram()).await
        {
            assert_eq!(split_flow(&d), Some((9, &b"over quic"[..])));
            answered = true;
            break;
        }
    }
    assert!(
        answered,
        "no answer through the tunnel: {}",
        connector.output_text()
    );

    // A TLS client's framed session.
    let s = ztp_tests::connect_with(fx.dp.addr(), &fx.opts("dns.svc.internal", &alice).dgram())
        .await
        .expect("the handshake");
    let mut session = DgramSession::new(s);
    session.send(b"framed").await.expect("send");
    match session.recv(STEP).await.expect("an answer") {
        DgramEvent::Datagram(d) => assert_eq!(d, b"framed"),
        other => panic!("{other:?}"),
    }
    assert!(udp.datagrams() >= 2, "the backend saw the datagrams");
    connector.kill();
}

/// Drain: a node holding a connector's tunnel that carries no session stops at once on
/// SIGTERM (the tunnel does not hold the drain up to `--drain-timeout`), and the
/// connector says its tunnel ended (it then dials another replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_does_not_hold_the_drain() {
    let pki = TestPki::new();
    let lab_cert = pki
        .builder()
        .uri("spiffe://ztp.internal/connector/lab")
        .issue();
    let backend = EchoBackend::start().await;
    let extra = Extra {
        args: &["--drain-timeout", "60s"],
        ..Extra::default()
    };
    let mut fx = Fixture::start_with(pki, extra).await;
    fx.dp.reload_snapshot(&snapshot(&fx, 2, &backend, &[]));
    let files = TempDir::new("connector-drain");
    std::fs::write(files.join("ca.pem"), &fx.pki.ca_pem).expect("write ca.pem");
    let mut connector = run_connector(&fx, &files, &lab_cert, "lab");
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("serving 1 service"), STEP)
        .await;
    let alice = fx.pki.client_email("alice@example.com");
    let deadline = tokio::time::Instant::now() + STEP;
    while try_lab(&fx, &alice, b"once").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = tokio::time::Instant::now();
    fx.dp.terminate();
    let status = fx.dp.wait_exit(STEP).await.expect("the node exits");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the tunnel held the drain: {:?}",
        started.elapsed()
    );
    connector
        .wait_for_line(Stream::Stderr, |l| l.contains("ended"), STEP)
        .await;
    connector.kill();
}
