//! Connection limits (DESIGN.md "Processes and flags" and "Security notes"):
//! `--max-connections N` closes connections over the cap at once. The handshake timeout
//! tests are in `tls_gate.rs`.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use ztp_tests::client::read_to_end_or_alert_within;
use ztp_tests::TestPki;

use crate::common::{echo_roundtrip, echo_step, Extra, Fixture, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_over_max_connections_is_closed_at_once() {
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--max-connections", "2"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    let mut c1 = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("first handshake");
    echo_step(&mut c1, b"one").await;
    let mut c2 = fx
        .connect("echo.svc.internal", &bob)
        .await
        .expect("second handshake");
    echo_step(&mut c2, b"two").await;

    // The third: closed during or right after the handshake, never served.
    let start = Instant::now();
    let how = match fx.connect("echo.svc.internal", &bob).await {
        Err(e) => format!("closed in the handshake: {e}"),
        Ok(mut c3) => {
            let _ = c3.write_all(b"three").await;
            let _ = c3.flush().await;
            match read_to_end_or_alert_within(&mut c3, Duration::from_secs(5)).await {
                Ok(data) => {
                    assert!(
                        data.is_empty(),
                        "the third connection was served: {:?}",
                        String::from_utf8_lossy(&data)
                    );
                    "closed after the handshake".to_string()
                }
                Err(e) => {
                    assert!(e.data().is_empty(), "the third connection was served: {e}");
                    if let ztp_tests::ReadError::Io { error, .. } = &e {
                        assert_ne!(
                            error.kind(),
                            std::io::ErrorKind::TimedOut,
                            "the third connection was neither served nor closed"
                        );
                    }
                    format!("closed after the handshake: {e}")
                }
            }
        }
    };
    let took = start.elapsed();
    eprintln!("third connection: {how} after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "the connection over the cap took {took:?} to be closed (should be at once)"
    );
    assert_eq!(fx.echo.connections(), 2, "the third reached the backend");

    // The first two still work.
    echo_step(&mut c1, b"one again").await;
    echo_step(&mut c2, b"two again").await;

    // One closes: a new connection is served (the slot is freed once the proxy has seen
    // the close; poll, bounded).
    assert_eq!(echo_roundtrip(c1, b"one bye").await, b"one bye");
    let deadline = Instant::now() + STEP;
    loop {
        let served = match fx.connect("echo.svc.internal", &bob).await {
            Ok(mut c4) => {
                let _ = c4.write_all(b"four").await;
                let _ = c4.shutdown().await;
                matches!(
                    read_to_end_or_alert_within(&mut c4, Duration::from_secs(5)).await,
                    Ok(ref d) if d == b"four"
                )
            }
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after one of the two connections closed, a new one was not served within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    echo_step(&mut c2, b"two still").await;
    assert_eq!(fx.echo.connections(), 3);
}

/// The control plane's API (DESIGN.md "Security notes": a limit on every resource a peer
/// can hold): one address holding 64 idle connections gets no more, closed before a
/// byte is read; other addresses are still served; a freed place is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_connections_are_capped_per_source() {
    use tokio::io::AsyncReadExt;
    use ztp_tests::control::Control;

    async fn from(src: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        sock.connect(to).await.unwrap()
    }
    /// One GET /healthz; the status line, or "" when closed unanswered.
    async fn healthz(mut s: tokio::net::TcpStream) -> String {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .ok();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the API neither answered nor closed");
        let text = String::from_utf8_lossy(&out);
        text.lines().next().unwrap_or("").to_owned()
    }

    let pki = TestPki::new();
    let control = Control::start_api_only(&pki).await;
    let api = control.api_addr();
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(from("127.0.0.1", api).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    assert_eq!(healthz(from("127.0.0.1", api).await).await, "");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "not closed at once"
    );
    assert_eq!(
        healthz(from("127.0.0.2", api).await).await,
        "HTTP/1.1 200 OK",
        "another source is still served"
    );
    held.truncate(63);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        healthz(from("127.0.0.1", api).await).await,
        "HTTP/1.1 200 OK"
    );
    assert!(
        control
            .raw_logs()
            .iter()
            .any(|l| l.contains("too many connections")),
        "the refusal is logged"
    );
}
