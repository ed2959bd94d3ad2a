//! TCP forwarding (DESIGN.md "Forwarding"): both directions, half-closes passed on, and
//! the 502/504 refusal lines when the backend cannot be reached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::backend::{pseudo_random_bytes, sha256};
use ztp_tests::{
    closed_port, read_to_end_or_alert, BlackholeListener, HashSinkBackend, ReadError,
    SourceBackend, TestPki,
};

use crate::common::{assert_refusal_line, echo_roundtrip, service_yaml, Extra, Fixture, STEP};

/// Bound on the 16 MiB round trip (debug builds included).
const BULK: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_with_client_half_close() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let data = Arc::new(pseudo_random_bytes(16 << 20, 0x5eed));
    let sent_hash = sha256(&data);

    let s = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    let (mut rd, mut wr) = tokio::io::split(s);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(100_000) {
            wr.write_all(chunk).await?;
        }
        // Half-close: close_notify, then FIN; reading goes on below.
        wr.shutdown().await?;
        std::io::Result::Ok(wr)
    });
    let reader = async {
        let mut hasher = Sha256::new();
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = rd.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            n += k;
        }
        std::io::Result::Ok((n, <[u8; 32]>::from(hasher.finalize())))
    };
    let (w, r) = tokio::time::timeout(BULK, async { tokio::join!(writer, reader) })
        .await
        .expect("16 MiB round trip finished in time");
    let _wr = w
        .expect("writer task")
        .expect("writing 16 MiB and half-closing");
    let (n, got_hash) = r.expect("reading the echo to a clean end");
    assert_eq!(n, data.len(), "every byte came back, then a clean end");
    assert_eq!(got_hash, sent_hash, "the bytes came back unchanged");
    assert_eq!(fx.echo.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_backend() {
    let sink = HashSinkBackend::start().await;
    let services = service_yaml("sink.svc.internal", sink.addr());
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let data = pseudo_random_bytes(1 << 20, 7);

    let mut s = fx
        .connect("sink.svc.internal", &bob)
        .await
        .expect("handshake");
    tokio::time::timeout(STEP, async {
        s.write_all(&data).await?;
        s.shutdown().await
    })
    .await
    .expect("write bounded")
    .expect("write and half-close");
    // The sink answers only once it has seen EOF.
    let answer = read_to_end_or_alert(&mut s)
        .await
        .unwrap_or_else(|e| panic!("reading the sink's hash: {e}"));
    assert_eq!(answer, sha256(&data), "the sink got every byte, then EOF");
    assert_eq!(sink.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_the_client_and_upstream_stays_open() {
    let mut source = SourceBackend::start(1 << 20, 99).await;
    let services = service_yaml("source.svc.internal", source.addr());
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");

    let mut s = fx
        .connect("source.svc.internal", &bob)
        .await
        .expect("handshake");
    let got = read_to_end_or_alert(&mut s)
        .await
        .unwrap_or_else(|e| panic!("reading the source to its end: {e}"));
    assert_eq!(got.len(), source.data.len());
    assert!(got == *source.data, "the source's bytes arrived unchanged");

    // The backend closed its side; ours is still open.
    let late = b"client still talking after the backend's EOF";
    tokio::time::timeout(STEP, async {
        s.write_all(late).await?;
        s.shutdown().await
    })
    .await
    .expect("write bounded")
    .expect("write after the backend's half-close");
    let received = source
        .received(STEP)
        .await
        .expect("the backend reported what it read after its half-close");
    assert_eq!(received, late.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_gets_502() {
    let port = closed_port();
    let services = service_yaml("down.svc.internal", ([127, 0, 0, 1], port).into());
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("down.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_refusal_line(s, 0, 502, "bad gateway").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connect_timeout_gets_504() {
    let hole = BlackholeListener::start()
        .await
        .expect("a loopback listener whose accept queue is full");
    let services = service_yaml("slow.svc.internal", hole.addr());
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--connect-timeout", "300ms"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let s = fx
        .connect("slow.svc.internal", &bob)
        .await
        .expect("handshake");
    let start = Instant::now();
    assert_refusal_line(s, 0, 504, "gateway timeout").await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "--connect-timeout 300ms was not honoured: the 504 took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_after_the_idle_timeout() {
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--idle-timeout", "1s"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut s = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("handshake");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(STEP, s.read_exact(&mut buf))
        .await
        .expect("echo bounded")
        .expect("echo");
    assert_eq!(&buf, b"ping");
    // Now nothing moves either way.
    let start = Instant::now();
    let r = ztp_tests::client::read_to_end_or_alert_within(&mut s, Duration::from_secs(8)).await;
    let took = start.elapsed();
    match &r {
        Ok(rest) => assert!(rest.is_empty(), "unexpected bytes: {rest:?}"),
        Err(ReadError::Io { error, .. }) if error.kind() == std::io::ErrorKind::TimedOut => {
            panic!("the idle connection was not closed within 8s (idle timeout 1s)")
        }
        Err(e) => assert!(e.data().is_empty(), "unexpected bytes: {e}"),
    }
    assert!(
        took < Duration::from_secs(6),
        "closed only after {took:?} (idle timeout 1s)"
    );
    eprintln!("idle connection closed after {took:?}: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_offered_to_a_tcp_service_is_ignored() {
    let fx = Fixture::start().await;
    let bob = fx.pki.client_email("bob@example.com");
    let opts = fx
        .opts("echo.svc.internal", &bob)
        .alpn(&[b"h2", b"ztp-dgram"]);
    let s = ztp_tests::connect_with(fx.dp.addr(), &opts)
        .await
        .expect("ALPN offered to a tcp service is not fatal");
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        None,
        "no ALPN is selected for a tcp service"
    );
    assert_eq!(echo_roundtrip(s, b"alpn ignored").await, b"alpn ignored");
}
