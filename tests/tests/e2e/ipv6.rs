//! IPv6 listeners (DESIGN.md "Processes and flags": `--listen` defaults to `[::]:9743`,
//! dual-stack) and step 1: IPv4-mapped IPv6 peers are canonicalized before any address
//! rule, and logs show `127.0.0.1:PORT`, never `[::ffff:127.0.0.1]:PORT`.
//!
//! Tests that need `::1` skip, with a visible `SKIPPED` line, where it cannot be bound.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use ztp_tests::client::handshake;
use ztp_tests::TestPki;

use crate::common::{assert_denied, echo_roundtrip, Extra, Fixture, STEP};

/// Whether `::1` can be bound; if not, `test` is reported skipped (visibly; not a failure
/// under `ZTP_REQUIRE_TOOLS`: a host without IPv6 is not a missing tool).
fn ipv6_loopback_available(test: &str) -> bool {
    match std::net::TcpListener::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) => {
            ztp_tests::process::skip(test, &format!("cannot bind [::1]:0 ({e})"));
            false
        }
    }
}

/// Connects from a fresh socket to `addr`, does an echo round trip on
/// `echo.svc.internal`, and returns the client's local address.
async fn echo_from(fx: &Fixture, addr: SocketAddr, payload: &[u8]) -> SocketAddr {
    let bob = fx.pki.client_email("bob@example.com");
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect bounded")
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let local = tcp.local_addr().expect("local addr");
    let s = handshake(tcp, &fx.opts("echo.svc.internal", &bob))
        .await
        .unwrap_or_else(|e| panic!("handshake via {addr}: {e}"));
    assert_eq!(echo_roundtrip(s, payload).await, payload);
    local
}

/// The `client.addr` of the connection event for `local`, waiting for it.
async fn logged_client_addr(fx: &Fixture, local: SocketAddr) -> String {
    let ev = fx
        .dp
        .wait_for_log(
            |v| {
                v["message"] == "connection"
                    && v["client.addr"]
                        .as_str()
                        .is_some_and(|a| a.ends_with(&format!(":{}", local.port())))
            },
            STEP,
        )
        .await
        .unwrap_or_else(|| panic!("no `connection` event for the client at {local}"));
    ev["client.addr"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_clients_on_an_ipv6_loopback_listener() {
    if !ipv6_loopback_available("serves_clients_on_an_ipv6_loopback_listener") {
        return;
    }
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            args: &["--listen", "[::1]:0"],
            ..Extra::default()
        },
    )
    .await;
    let addr = fx.dp.addr();
    assert!(
        addr.is_ipv6() && addr.ip().is_loopback(),
        "logged listening address: {}",
        fx.dp.listen_addr()
    );
    let local = echo_from(&fx, addr, b"over ipv6").await;
    assert!(local.is_ipv6());
    assert_eq!(
        logged_client_addr(&fx, local).await,
        format!("[::1]:{}", local.port()),
        "client.addr of an IPv6 client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener_logs_ipv4_clients_canonically() {
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            // An IPv6 socket, not IPv6-only, bound to the IPv4-mapped loopback: IPv4
            // clients arrive IPv4-mapped as on `[::]`, and nothing leaves loopback.
            args: &["--listen", "[::ffff:127.0.0.1]:0"],
            ..Extra::default()
        },
    )
    .await;
    eprintln!("listening on {} (logged)", fx.dp.listen_addr());
    assert!(fx.dp.listen_addr().is_ipv6(), "{}", fx.dp.listen_addr());
    let v4 = SocketAddr::from(([127, 0, 0, 1], fx.dp.listen_addr().port()));
    let local = echo_from(&fx, v4, b"over ipv4 to a dual-stack listener").await;
    assert_eq!(
        logged_client_addr(&fx, local).await,
        format!("127.0.0.1:{}", local.port()),
        "an IPv4 client on a dual-stack listener is logged as IPv4, not IPv4-mapped"
    );

    for line in fx
        .dp
        .raw_logs()
        .iter()
        .filter(|l| l.contains("\"connection\""))
    {
        assert!(
            !line.to_ascii_lowercase().contains("::ffff:"),
            "an IPv4-mapped address was logged: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_source_ranges_see_canonical_ipv4() {
    let lan = ztp_tests::EchoBackend::start().await;
    let services = format!(
        "  - name: lan.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    allow: [\"10.0.0.0/8\"]\n\
         \x20 - name: local.svc.internal\n    protocol: tcp\n    address: \"{a}\"\n    allow: [\"127.0.0.0/8\"]\n",
        a = lan.addr()
    );
    let fx = Fixture::start_with(
        TestPki::new(),
        Extra {
            services: &services,
            args: &["--listen", "[::ffff:127.0.0.1]:0"],
            ..Extra::default()
        },
    )
    .await;
    let bob = fx.pki.client_email("bob@example.com");
    // fx.connect uses 127.0.0.1:PORT: the peer arrives as ::ffff:127.0.0.1 on a
    // dual-stack socket and must match 127.0.0.0/8.
    let s = fx
        .connect("local.svc.internal", &bob)
        .await
        .expect("handshake");
    assert_eq!(
        echo_roundtrip(s, b"mapped peer admitted").await,
        b"mapped peer admitted",
        "an IPv4 client on a dual-stack listener matches an IPv4 `allow` range"
    );
    let how = assert_denied(&fx, "lan.svc.internal", &bob).await;
    eprintln!("outside `allow`: {how}");
    assert_eq!(lan.connections(), 1);
}
