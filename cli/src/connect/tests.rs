//! connect's tests: the TCP client's messages, and the QUIC client against a small quinn
//! server (and a TLS-over-TCP one) run in the test, on loopback, with certificates made
//! here. Every test is bounded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use quinn::VarInt;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ztp_proto::quic::{decode_datagram, encode_datagram, ALPN, CLOSE_DONE, STREAM_ABORTED};

use super::*;

const SERVICE: &str = "echo.svc.internal";
/// No test runs longer.
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("the test finished within its bound")
}

fn client(via: String, not_after: Option<(i64, String)>) -> Client {
    let config = rustls::ClientConfig::builder_with_provider(ztp_infra::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Client::from_parts(config, SERVICE, via, Transport::Tcp, None, not_after).expect("a client")
}

/// A gateway shedding load (or stale under `--max-snapshot-age`) closes the TCP
/// connection before the handshake: said so, not `tls handshake eof`.
#[tokio::test]
async fn a_close_before_the_handshake_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let via = listener.local_addr().expect("address").to_string();
    let shed = tokio::spawn(async move {
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            drop(tcp);
        }
    });
    let c = client(via, None);
    for _ in 0..2 {
        let e = c
            .connect_tcp()
            .await
            .expect_err("closed before the handshake");
        assert!(
            matches!(
                e.downcast_ref::<Refused>(),
                Some(Refused::ClosedBeforeHandshake)
            ),
            "{e:#}"
        );
        assert!(
            format!("{e:#}").contains("closed the connection before the TLS handshake"),
            "{e:#}"
        );
    }
    shed.await.expect("the shedding listener");
}

/// A session ending after the client's certificate expired says so, whether it ended
/// cleanly or with a refusal; before expiry the end is left as it was.
#[test]
fn a_session_ending_after_expiry_names_it() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let expired = client(
        "127.0.0.1:1".into(),
        Some((now - 5, "2026-01-01T00:00:00Z".into())),
    );
    let e = expired.ended(Ok(())).expect_err("expired");
    assert_eq!(
        format!("{e:#}"),
        "the session ended: your certificate expired at 2026-01-01T00:00:00Z (the gateway \
         ends sessions when it does); renew it"
    );
    let e = expired
        .ended(Err(Refused::Line("403 forbidden".into()).into()))
        .expect_err("expired");
    let text = format!("{e:#}");
    assert!(
        text.starts_with(
            "the gateway refused the connection: 403 forbidden: your certificate expired"
        ),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);

    // The gateway's alert already names the cause.
    let e = expired
        .ended(Err(Refused::Alert("certificate expired".into()).into()))
        .expect_err("the alert");
    assert_eq!(
        format!("{e:#}"),
        "the gateway refused the handshake: certificate expired"
    );

    let valid = client("127.0.0.1:1".into(), Some((now + 3600, "later".into())));
    valid.ended(Ok(())).expect("a normal end");
    let e = valid
        .ended(Err(Refused::Line("403 forbidden".into()).into()))
        .expect_err("the refusal");
    assert_eq!(
        format!("{e:#}"),
        "the gateway refused the connection: 403 forbidden"
    );
    client("127.0.0.1:1".into(), None)
        .ended(Ok(()))
        .expect("no date known: a normal end");
}

#[test]
fn not_after_reads_the_certificate() {
    let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
    params.not_after = rcgen::date_time_ymd(2031, 2, 3);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let (t, text) = not_after(cert.der()).expect("parses");
    assert_eq!(text, "2031-02-03T00:00:00Z");
    assert_eq!(t, 1_927_843_200);
    assert!(not_after(b"not a certificate").is_none());
}

// ---- The QUIC client ----

/// A CA, the gateway's certificate for [`SERVICE`], and a client certificate with its key
/// and the CA in files, as `connect` reads them.
struct TestPki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    server: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn new_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("a key");
    let cert = p.self_signed(&key).expect("the CA");
    (cert, Issuer::new(p, key))
}

fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(vec![name.to_owned()]).expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("a key");
    let cert = p.signed_by(&key, issuer).expect("a certificate");
    (cert, key)
}

impl TestPki {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let (ca, issuer) = new_ca("connect test CA");
        let (server, server_key) = new_leaf(&issuer, SERVICE, ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) = new_leaf(
            &issuer,
            "alice.example",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let dir = std::env::temp_dir().join(format!(
            "ztpctl-connect-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
        std::fs::write(dir.join("client.pem"), client.pem()).expect("write client.pem");
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).expect("write key");
        TestPki {
            dir,
            ca: ca.der().clone(),
            server: server.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    /// A `connect` client of this PKI's user, through `Client::new` as the command builds it.
    fn client(&self, via: SocketAddr, transport: Transport, alpn: Option<&[u8]>) -> Client {
        let args = ConnectArgs {
            service: SERVICE.into(),
            via: None,
            cert: None,
            key: None,
            ca: None,
            listen: None,
            udp_listen: None,
            udp_idle: Duration::from_secs(60),
            transport,
        };
        let s = crate::settings::Settings {
            via: Some(via.to_string()),
            cert: Some(self.dir.join("client.pem")),
            key: Some(self.dir.join("client.key")),
            ca: Some(self.dir.join("ca.pem")),
            ..Default::default()
        };
        Client::new(&args, &s, alpn).expect("a client")
    }

    /// The gateway's TLS: client certificates from `client_ca` required.
    fn server_tls(&self, client_ca: &CertificateDer<'static>, alpn: &[u8]) -> rustls::ServerConfig {
        let provider = ztp_infra::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(client_ca.clone()).expect("a root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("a client verifier");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server.clone()], key)
            .expect("the server certificate");
        if !alpn.is_empty() {
            c.alpn_protocols = vec![alpn.to_vec()];
        }
        c
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the test gateway does with each connection and stream.
#[derive(Clone, Copy)]
enum Serve {
    /// A stream: everything until the client's FIN, then `got ` and it, then FIN.
    /// A datagram: back on its flow, with ` on flow N` added.
    Echo,
    /// The connection: closed with this code and reason once established.
    Close(u32, &'static str),
    /// A stream: its first chunk back; at its second, the connection closed so.
    CloseAtSecondChunk(u32, &'static str),
    /// A stream: after its first bytes, this and FIN.
    Line(&'static str),
    /// A stream: after its first bytes, reset with STREAM_ABORTED.
    Abort,
}

/// A QUIC gateway in the test.
struct QuicServer {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
    streams: Arc<AtomicUsize>,
}

impl QuicServer {
    fn start(pki: &TestPki, serve: Serve) -> Self {
        Self::start_with(pki, serve, &pki.ca)
    }

    fn start_with(pki: &TestPki, serve: Serve, client_ca: &CertificateDer<'static>) -> Self {
        let tls = pki.server_tls(client_ca, ALPN);
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut t = quinn::TransportConfig::default();
        t.datagram_receive_buffer_size(Some(1 << 20));
        config.transport_config(Arc::new(t));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("an address"))
            .expect("the server endpoint");
        let addr = endpoint.local_addr().expect("its address");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let streams = Arc::new(AtomicUsize::new(0));
        tokio::spawn(accept(
            endpoint.clone(),
            serve,
            conns.clone(),
            streams.clone(),
        ));
        QuicServer {
            addr,
            endpoint,
            conns,
            streams,
        }
    }

    /// Connections that completed the handshake (the client certificate accepted).
    fn connections(&self) -> usize {
        self.conns.lock().expect("conns").len()
    }

    fn close_all(&self, code: u32, reason: &[u8]) {
        for c in self.conns.lock().expect("conns").iter() {
            c.close(VarInt::from_u32(code), reason);
        }
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        self.endpoint.close(VarInt::from_u32(0), b"");
    }
}

async fn accept(
    endpoint: quinn::Endpoint,
    serve: Serve,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
    streams: Arc<AtomicUsize>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (conns, streams) = (conns.clone(), streams.clone());
        tokio::spawn(async move {
            // A refused client certificate fails here.
            let Ok(conn) = incoming.await else { return };
            conns.lock().expect("conns").push(conn.clone());
            if let Serve::Close(code, reason) = serve {
                conn.close(VarInt::from_u32(code), reason.as_bytes());
                return;
            }
            let datagrams = conn.clone();
            tokio::spawn(async move {
                while let Ok(d) = datagrams.read_datagram().await {
                    let Some((flow, payload)) = decode_datagram(&d) else {
                        continue;
                    };
                    let mut reply = payload.to_vec();
                    reply.extend_from_slice(format!(" on flow {flow}").as_bytes());
                    let frame = encode_datagram(flow, &reply).expect("a frame");
                    let _ = datagrams.send_datagram(frame.into());
                }
            });
            while let Ok((send, recv)) = conn.accept_bi().await {
                streams.fetch_add(1, SeqCst);
                tokio::spawn(serve_stream(serve, conn.clone(), send, recv));
            }
        });
    }
}

async fn serve_stream(
    serve: Serve,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut buf = [0u8; 4096];
    match serve {
        Serve::Echo => {
            let Ok(data) = recv.read_to_end(1 << 20).await else {
                return;
            };
            let mut reply = b"got ".to_vec();
            reply.extend_from_slice(&data);
            let _ = send.write_all(&reply).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
        Serve::CloseAtSecondChunk(code, reason) => {
            let Ok(Some(n)) = recv.read(&mut buf).await else {
                return;
            };
            let _ = send.write_all(&buf[..n]).await;
            let _ = recv.read(&mut buf).await;
            conn.close(VarInt::from_u32(code), reason.as_bytes());
        }
        Serve::Line(line) => {
            let _ = recv.read(&mut buf).await;
            let _ = send.write_all(line.as_bytes()).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
        Serve::Abort => {
            let _ = recv.read(&mut buf).await;
            let _ = send.reset(VarInt::from_u32(STREAM_ABORTED));
            let _ = recv.read(&mut buf).await;
        }
        Serve::Close(..) => {}
    }
}

/// A session through `carry` (as stdio mode runs it): writes `input` (then EOF if
/// `eof`), and returns the session's result and everything the program received.
async fn session(client: &Client, input: &[u8], eof: bool) -> (anyhow::Result<()>, Vec<u8>) {
    let (mut program, mut local) = tokio::io::duplex(64 * 1024);
    let carrying = async move {
        let r = carry(client, &mut local).await;
        drop(local);
        r
    };
    let talking = async {
        program.write_all(input).await.expect("write");
        if eof {
            program.shutdown().await.expect("EOF");
        }
        let mut out = Vec::new();
        let _ = program.read_to_end(&mut out).await;
        out
    };
    tokio::join!(carrying, talking)
}

fn refusal(r: &anyhow::Result<()>) -> Option<&Refused> {
    r.as_ref().err().and_then(|e| e.downcast_ref::<Refused>())
}

/// (1) A session is one stream: bytes both ways, and the program's EOF reaches the
/// gateway as FIN (the test gateway answers only after it), then the gateway's FIN ends
/// the session cleanly.
#[tokio::test]
async fn a_stream_carries_both_ways_and_passes_half_close() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Echo);
        let client = pki.client(server.addr, Transport::Quic, None);
        let (r, out) = session(&client, b"hello", true).await;
        r.expect("a clean end");
        assert_eq!(out, b"got hello");
        assert_eq!(server.streams.load(SeqCst), 1);
        client.close().await;
    })
    .await;
}

/// (2) A refusal after the handshake is a close with the code and the `ZTP-ERROR` line as
/// reason: the client names the line, and the program gets no byte. A live connection
/// closed so after data moved ends the same way, with a non-zero result.
#[tokio::test]
async fn an_application_close_is_the_refusal_line() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Close(403, "ZTP-ERROR 403 forbidden"));
        let client = pki.client(server.addr, Transport::Quic, None);
        let (r, out) = session(&client, b"hello", false).await;
        assert!(
            matches!(refusal(&r), Some(Refused::Line(l)) if l == "403 forbidden"),
            "{r:?}"
        );
        assert_eq!(
            format!("{:#}", r.expect_err("refused")),
            "the gateway refused the connection: 403 forbidden"
        );
        assert!(out.is_empty(), "{out:?}");

        let server = QuicServer::start(
            &pki,
            Serve::CloseAtSecondChunk(403, "ZTP-ERROR 403 forbidden"),
        );
        let client = pki.client(server.addr, Transport::Quic, None);
        let (mut program, mut local) = tokio::io::duplex(64 * 1024);
        let carrying = async move {
            let r = carry(&client, &mut local).await;
            drop(local);
            r
        };
        let talking = async {
            program.write_all(b"one").await.expect("write");
            let mut got = [0u8; 3];
            program.read_exact(&mut got).await.expect("the echo");
            assert_eq!(&got, b"one");
            program.write_all(b"two").await.expect("write");
            let mut rest = Vec::new();
            let _ = program.read_to_end(&mut rest).await;
            rest
        };
        let (r, rest) = tokio::join!(carrying, talking);
        assert!(
            matches!(refusal(&r), Some(Refused::Line(l)) if l == "403 forbidden"),
            "a live connection revoked: {r:?}"
        );
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await;
}

/// A backend the gateway cannot reach: the 502 line on that stream, then FIN; a backend
/// connection that breaks: the stream reset with STREAM_ABORTED, an error.
#[tokio::test]
async fn stream_lines_and_resets_are_errors() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Line("ZTP-ERROR 502 bad gateway\n"));
        let client = pki.client(server.addr, Transport::Quic, None);
        let (r, out) = session(&client, b"hello", false).await;
        assert!(
            matches!(refusal(&r), Some(Refused::Line(l)) if l == "502 bad gateway"),
            "{r:?}"
        );
        assert!(out.is_empty(), "{out:?}");

        let server = QuicServer::start(&pki, Serve::Abort);
        let client = pki.client(server.addr, Transport::Quic, None);
        let (r, _) = session(&client, b"hello", false).await;
        let e = r.expect_err("a reset stream is an error");
        assert!(
            format!("{e:#}").contains("the gateway cut the session"),
            "{e:#}"
        );
    })
    .await;
}

/// (3) A client certificate the gateway refuses: quinn's client handshake completes
/// first, then the gateway's close carries the TLS alert as a crypto error, which is
/// named like the TCP path's alert.
#[tokio::test]
async fn a_refused_certificate_is_the_alert_in_words() {
    bounded(async {
        let pki = TestPki::new();
        let (other_ca, _) = new_ca("another CA");
        let server = QuicServer::start_with(&pki, Serve::Echo, other_ca.der());
        let client = pki.client(server.addr, Transport::Quic, None);

        let conn = client
            .quic
            .handshake(server.addr)
            .await
            .expect("quinn's client handshake completes before the certificate is checked");
        let e = quic::confirmed(&conn).await.expect_err("refused");
        assert!(
            matches!(&e, quinn::ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == 0x130),
            "unknown_ca as a crypto error: {e:?}"
        );

        let Err(e) = client.link().await else {
            panic!("a refused certificate counted as connected");
        };
        assert!(
            matches!(e.downcast_ref::<Refused>(), Some(Refused::Alert(a)) if a == "certificate not issued by the gateway's CA"),
            "{e:#}"
        );
        assert_eq!(server.connections(), 0);
    })
    .await;
}

/// A UDP relay between a client and `server`: the client's first datagram passes, then
/// nothing more from the client until the gate opens; all of the server's pass.
async fn relay(server: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("the relay");
    let addr = sock.local_addr().expect("its address");
    let open = Arc::new(AtomicBool::new(false));
    let gate = open.clone();
    tokio::spawn(async move {
        let (mut client, mut from_client) = (None, 0usize);
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if from == server {
                if let Some(c) = client {
                    let _ = sock.send_to(&buf[..n], c).await;
                }
            } else {
                client = Some(from);
                from_client += 1;
                if from_client == 1 || gate.load(SeqCst) {
                    let _ = sock.send_to(&buf[..n], server).await;
                }
            }
        }
    });
    (addr, open)
}

/// (4) quinn's client is connected once it sent its Finished; the gateway has then not
/// checked the certificate. Here the Finished is held back: the connection must not count
/// as established until the gateway's HANDSHAKE_DONE arrives, after the Finished gets
/// through.
#[tokio::test]
async fn quic_is_established_only_at_handshake_done() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Echo);
        let (via, open) = relay(server.addr).await;
        let client = pki.client(via, Transport::Quic, None);
        let conn = client
            .quic
            .handshake(via)
            .await
            .expect("quinn's client handshake completes without the gateway's confirmation");
        let waited = tokio::time::timeout(Duration::from_millis(500), quic::confirmed(&conn)).await;
        assert!(
            waited.is_err(),
            "established without HANDSHAKE_DONE: {waited:?}"
        );
        assert_eq!(conn.stats().frame_rx.handshake_done, 0);
        assert_eq!(server.connections(), 0, "the gateway accepted nothing yet");

        open.store(true, SeqCst);
        quic::confirmed(&conn)
            .await
            .expect("established once the Finished got through");
        assert!(conn.stats().frame_rx.handshake_done > 0);
        while server.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn recv(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .expect("recv");
    buf.truncate(n);
    buf
}

async fn nothing_for(sock: &UdpSocket, d: Duration) {
    let mut buf = vec![0u8; 65536];
    if let Ok(r) = tokio::time::timeout(d, sock.recv_from(&mut buf)).await {
        let (n, _) = r.expect("recv");
        panic!(
            "unexpected datagram {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

/// (5) `--udp-listen` over QUIC: one connection, one flow per local peer (ids from 0),
/// answers back to the peer of their flow; a datagram too big for a DATAGRAM frame is
/// dropped; an idle flow is forgotten, and its peer's next datagram opens a new one.
#[tokio::test]
async fn local_udp_peers_are_flows_of_one_connection() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Echo);
        let client = Arc::new(pki.client(server.addr, Transport::Quic, Some(DGRAM_ALPN)));
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let listen = sock.local_addr().expect("its address");
        let idle = Duration::from_millis(500);
        let serving = tokio::spawn(udp(client, sock, idle, Transport::Quic));
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("peer a");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("peer b");

        a.send_to(b"from a", listen).await.expect("send");
        assert_eq!(recv(&a).await, b"from a on flow 0");
        b.send_to(b"from b", listen).await.expect("send");
        assert_eq!(recv(&b).await, b"from b on flow 1");
        a.send_to(b"a again", listen).await.expect("send");
        assert_eq!(recv(&a).await, b"a again on flow 0");
        nothing_for(&b, Duration::from_millis(100)).await;

        a.send_to(&[b'x'; 4000], listen).await.expect("send");
        nothing_for(&a, Duration::from_millis(200)).await;

        tokio::time::sleep(idle * 2).await;
        a.send_to(b"a later", listen).await.expect("send");
        assert_eq!(recv(&a).await, b"a later on flow 2");
        assert_eq!(server.connections(), 1);
        serving.abort();
    })
    .await;
}

/// Flows by hand: answers go to the peer of their flow, unknown or truncated ones
/// nowhere, idle flows are forgotten, and a datagram too big is dropped without a flow.
#[tokio::test]
async fn flows_demultiplex_and_expire() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Echo);
        let client = pki.client(server.addr, Transport::Quic, None);
        let Link::Quic(conn) = client.link().await.expect("connected") else {
            panic!("not QUIC");
        };
        let mut flows = quic::Flows::new(conn);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1001".parse().expect("a"),
            "127.0.0.1:1002".parse().expect("b"),
        );
        let t0 = Instant::now();
        flows.send(a, b"x", t0).expect("sent");
        flows.send(b, b"y", t0).expect("sent");
        assert_eq!(flows.deliver(&[0, b'p'], t0), Some((a, &b"p"[..])));
        assert_eq!(flows.deliver(&[1, b'q'], t0), Some((b, &b"q"[..])));
        assert_eq!(flows.deliver(&[7, b'r'], t0), None, "an unknown flow");
        assert_eq!(flows.deliver(&[0x40], t0), None, "a truncated flow id");
        // b's answer keeps it alive; a has been silent.
        let later = t0 + Duration::from_secs(2);
        flows.deliver(&[1, b'q'], t0 + Duration::from_secs(1));
        flows.expire(Duration::from_millis(1500), later);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows.deliver(&[0, b'p'], later), None, "a's flow is gone");
        assert_eq!(flows.deliver(&[1, b'q'], later), Some((b, &b"q"[..])));
        let e = flows
            .send(a, &[0u8; 70_000], later)
            .expect_err("too big for a datagram");
        assert!(format!("{e}").contains("does not fit"), "{e}");
        assert_eq!(flows.len(), 1, "no flow for a dropped datagram");
    })
    .await;
}

/// `--listen` over QUIC: local connections share one QUIC connection, a stream each; once
/// that connection is gone, the next local connection opens a new one.
#[tokio::test]
async fn listen_shares_one_connection_and_reconnects() {
    bounded(async {
        let pki = TestPki::new();
        let server = QuicServer::start(&pki, Serve::Echo);
        let client = Arc::new(pki.client(server.addr, Transport::Quic, None));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listen = listener.local_addr().expect("its address");
        let serving = tokio::spawn(tcp(client.clone(), listener, Transport::Quic));
        let once = |text: &'static str| async move {
            let mut s = TcpStream::connect(listen).await.expect("connect");
            s.write_all(text.as_bytes()).await.expect("write");
            s.shutdown().await.expect("EOF");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read");
            String::from_utf8(out).expect("text")
        };
        let (one, two) = tokio::join!(once("one"), once("two"));
        assert_eq!((one.as_str(), two.as_str()), ("got one", "got two"));
        assert_eq!(once("three").await, "got three");
        assert_eq!(
            server.connections(),
            1,
            "one QUIC connection for three sessions"
        );
        assert_eq!(server.streams.load(SeqCst), 3);

        server.close_all(CLOSE_DONE, b"");
        loop {
            let gone = client
                .shared
                .lock()
                .await
                .conn
                .as_ref()
                .is_none_or(|c| c.close_reason().is_some());
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(once("four").await, "got four");
        assert_eq!(server.connections(), 2);
        serving.abort();
    })
    .await;
}

/// A QUIC echo gateway and a TCP listener on the same port number (a port the system
/// gave for UDP may be taken for TCP by a test running beside: another is tried).
async fn quic_and_tcp(pki: &TestPki) -> (QuicServer, TcpListener) {
    for _ in 0..50 {
        let server = QuicServer::start(pki, Serve::Echo);
        match TcpListener::bind(server.addr).await {
            Ok(listener) => return (server, listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("the same port over TCP: {e}"),
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// A TLS-over-TCP gateway in the test (client certificates required) that echoes; the
/// number of TCP connections it accepted.
fn tcp_server(pki: &TestPki, listener: TcpListener) -> Arc<AtomicUsize> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_tls(&pki.ca, b"")));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    accepted
}

/// (6) `auto` against a gateway whose UDP port swallows everything: QUIC goes first (its
/// Initial arrives), TCP starts 250 ms later and wins, within 300 ms of what TCP alone
/// takes; the winner is kept.
#[tokio::test]
async fn auto_takes_tcp_when_nothing_answers_on_udp() {
    bounded(async {
        let pki = TestPki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let via = listener.local_addr().expect("its address");
        // Nothing answers on UDP, not even with an ICMP error.
        let hole = UdpSocket::bind(via).await.expect("the same port over UDP");
        let accepted = tcp_server(&pki, listener);

        let tcp_only = pki.client(via, Transport::Tcp, None);
        let t0 = Instant::now();
        let link = tcp_only.link().await.expect("TCP alone");
        let tcp_took = t0.elapsed();
        assert!(matches!(link, Link::Tcp(_)));

        let auto = pki.client(via, Transport::Auto, None);
        let t0 = Instant::now();
        let link = auto.link().await.expect("auto");
        let auto_took = t0.elapsed();
        assert!(
            matches!(link, Link::Tcp(_)),
            "auto took QUIC with nothing on UDP"
        );
        assert!(
            auto_took >= TCP_DELAY,
            "TCP did not wait for QUIC: {auto_took:?}"
        );
        assert!(
            auto_took < tcp_took + Duration::from_millis(300),
            "auto took {auto_took:?}, TCP alone {tcp_took:?}"
        );
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), hole.recv_from(&mut buf))
            .await
            .expect("QUIC went first")
            .expect("recv");
        assert!(n >= 1200 && buf[0] & 0x80 != 0, "a QUIC Initial: {n} bytes");
        assert_eq!(accepted.load(SeqCst), 2);

        // Kept: the next session goes straight to TCP.
        assert_eq!(auto.kind().await, Some(Kind::Tcp));
        let t0 = Instant::now();
        assert!(matches!(auto.link().await.expect("again"), Link::Tcp(_)));
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "raced again: {:?}",
            t0.elapsed()
        );

        // And it carries a session.
        let (r, out) = session(&auto, b"ping", true).await;
        r.expect("a clean end");
        assert_eq!(out, b"ping");
    })
    .await;
}

/// `auto` against a gateway that speaks QUIC: QUIC wins before TCP is even tried, and
/// the sessions share its connection.
#[tokio::test]
async fn auto_takes_quic_when_it_answers() {
    bounded(async {
        let pki = TestPki::new();
        let (server, listener) = quic_and_tcp(&pki).await;
        let accepted = tcp_server(&pki, listener);
        let auto = pki.client(server.addr, Transport::Auto, None);
        let t0 = Instant::now();
        let Link::Quic(first) = auto.link().await.expect("auto") else {
            panic!("auto took TCP while QUIC answered");
        };
        assert!(t0.elapsed() < TCP_DELAY, "{:?}", t0.elapsed());
        let Link::Quic(again) = auto.link().await.expect("again") else {
            panic!("the winner was not kept");
        };
        assert_eq!(first.stable_id(), again.stable_id());
        let (r, out) = session(&auto, b"hi", true).await;
        r.expect("a clean end");
        assert_eq!(out, b"got hi");
        tokio::time::sleep(TCP_DELAY + Duration::from_millis(100)).await;
        assert_eq!(accepted.load(SeqCst), 0, "TCP was tried");
        assert_eq!(server.connections(), 1);
    })
    .await;
}

/// The race's rules, with stand-in attempts.
#[tokio::test]
async fn the_race_prefers_refusals_and_names_both_failures() {
    bounded(async {
        let ms = Duration::from_millis;
        let never = || std::future::pending::<anyhow::Result<()>>();

        // A QUIC refusal ends the race before TCP starts.
        let tcp_tried = AtomicBool::new(false);
        let r = race::<(), (), _, _>(
            async { Err(Refused::Alert("certificate revoked".into()).into()) },
            async {
                tcp_tried.store(true, SeqCst);
                Ok(())
            },
            ms(50),
            ms(1000),
        )
        .await;
        assert!(matches!(r, Err(ref e) if is_refusal(e)));
        assert!(!tcp_tried.load(SeqCst));

        // QUIC silent: TCP after the delay, and it wins.
        let t0 = Instant::now();
        let r = race::<(), (), _, _>(never(), async { Ok(()) }, ms(50), ms(1000)).await;
        assert!(matches!(r, Ok(Won::Tcp(()))));
        assert!(t0.elapsed() >= ms(50));

        // QUIC failing (not a refusal) starts TCP at once.
        let t0 = Instant::now();
        let r = race::<(), (), _, _>(
            async { Err(anyhow::anyhow!("no route")) },
            async { Ok(()) },
            ms(10_000),
            ms(1000),
        )
        .await;
        assert!(matches!(r, Ok(Won::Tcp(()))));
        assert!(t0.elapsed() < ms(1000));

        // A TCP refusal while QUIC is silent: the refusal, at once.
        let t0 = Instant::now();
        let r = race::<(), (), _, _>(
            never(),
            async { Err(Refused::Line("403 forbidden".into()).into()) },
            ms(0),
            ms(10_000),
        )
        .await;
        assert!(matches!(r, Err(ref e) if is_refusal(e)));
        assert!(t0.elapsed() < ms(1000));

        // Both fail: a close before the handshake says more than no answer.
        let r = race::<(), (), _, _>(
            async { Err(anyhow::anyhow!("no QUIC answer")) },
            async { Err(Refused::ClosedBeforeHandshake.into()) },
            ms(0),
            ms(1000),
        )
        .await;
        let e = r.err().expect("both failed");
        assert!(matches!(
            e.downcast_ref::<Refused>(),
            Some(Refused::ClosedBeforeHandshake)
        ));

        // TCP cannot reach, QUIC silent: QUIC gets its grace, then both are named.
        let t0 = Instant::now();
        let r = race::<(), (), _, _>(
            never(),
            async { Err(anyhow::anyhow!("cannot reach the gateway at x")) },
            ms(0),
            ms(100),
        )
        .await;
        let e = format!("{:#}", r.err().expect("both failed"));
        assert!(t0.elapsed() >= ms(100));
        assert!(
            e.contains("cannot reach the gateway at x") && e.contains("QUIC"),
            "{e}"
        );
    })
    .await;
}

#[test]
fn quic_closes_in_words() {
    use quinn::{ApplicationClose, ConnectionClose, ConnectionError as E, TransportErrorCode};
    let crypto = |alert: u8| {
        E::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: Default::default(),
        })
    };
    let app = |code: u32, reason: &'static [u8]| {
        E::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u32(code),
            reason: reason.into(),
        })
    };
    let alert = |e: &E| match quic::explain_connection(e).downcast_ref::<Refused>() {
        Some(Refused::Alert(a)) => a.clone(),
        other => panic!("{e:?}: {other:?}"),
    };
    let line = |e: &E| match quic::explain_connection(e).downcast_ref::<Refused>() {
        Some(Refused::Line(l)) => l.clone(),
        other => panic!("{e:?}: {other:?}"),
    };
    assert_eq!(alert(&crypto(44)), "certificate revoked");
    assert_eq!(alert(&crypto(45)), "certificate expired");
    assert_eq!(
        alert(&crypto(48)),
        "certificate not issued by the gateway's CA"
    );
    assert_eq!(alert(&crypto(49)), "unknown service");
    assert_eq!(alert(&crypto(112)), "unknown service");
    assert_eq!(alert(&crypto(116)), "no certificate");
    let no_alpn = quic::explain_connection(&crypto(120));
    assert!(
        no_alpn.downcast_ref::<quic::NotZtp>().is_some(),
        "{no_alpn:#}"
    );
    assert!(!is_refusal(&no_alpn), "auto still tries TCP");
    let shed = quic::explain_connection(&E::ConnectionClosed(ConnectionClose {
        error_code: TransportErrorCode::CONNECTION_REFUSED,
        frame_type: None,
        reason: Default::default(),
    }));
    assert!(matches!(
        shed.downcast_ref::<Refused>(),
        Some(Refused::ClosedBeforeHandshake)
    ));

    assert_eq!(line(&app(403, b"ZTP-ERROR 403 forbidden")), "403 forbidden");
    assert_eq!(
        line(&app(421, b"ZTP-ERROR 421 misdirected\n")),
        "421 misdirected"
    );
    assert_eq!(line(&app(501, b"not implemented")), "501 not implemented");
    assert_eq!(line(&app(503, b"")), "503");
    assert_eq!(
        line(&app(403, b"ZTP-ERROR 403 a\x1b[2Jb\nc")),
        "403 a [2Jb c"
    );
    let done = quic::explain_connection(&app(CLOSE_DONE, b""));
    assert!(done.downcast_ref::<Refused>().is_none(), "{done:#}");

    let cut = quic::explain_read(&quinn::ReadError::Reset(VarInt::from_u32(STREAM_ABORTED)));
    assert!(format!("{cut}").contains("cut the session"), "{cut}");
    let lost = quic::explain_read(&quinn::ReadError::ConnectionLost(app(
        403,
        b"ZTP-ERROR 403 forbidden",
    )));
    assert!(
        matches!(lost.downcast_ref::<Refused>(), Some(Refused::Line(l)) if l == "403 forbidden")
    );
}

#[test]
fn transport_is_a_flag_with_auto_by_default() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: ConnectArgs,
    }
    let parse = |extra: &[&str]| {
        Cmd::try_parse_from(["connect", SERVICE].iter().chain(extra)).map(|c| c.args.transport)
    };
    assert_eq!(parse(&[]).expect("default"), Transport::Auto);
    assert_eq!(
        parse(&["--transport", "quic"]).expect("quic"),
        Transport::Quic
    );
    assert_eq!(parse(&["--transport", "tcp"]).expect("tcp"), Transport::Tcp);
    assert!(parse(&["--transport", "udp"]).is_err());
}

/// Under `auto`, with QUIC the winner, a program that waits for the service to speak
/// first (it sends nothing within 250 ms) is carried over TCP: a QUIC stream would stay
/// invisible to the gateway until its first byte. A program that speaks at once stays on
/// QUIC. With `--transport quic` nothing falls back.
#[tokio::test]
async fn a_silent_program_is_carried_over_tcp_under_auto() {
    bounded(async {
        let pki = TestPki::new();
        let (server, listener) = quic_and_tcp(&pki).await;
        let accepted = tcp_server(&pki, listener);
        let auto = pki.client(server.addr, Transport::Auto, None);
        assert!(matches!(auto.link().await.expect("auto"), Link::Quic(_)));

        // Speaks at once: a QUIC stream (the QUIC test gateway answers "got …").
        let (r, out) = session(&auto, b"hi", true).await;
        r.expect("a clean end");
        assert_eq!(out, b"got hi");
        assert_eq!(accepted.load(SeqCst), 0);

        // Silent past the fallback, then speaks: carried over TCP (which echoes as is).
        let (mut program, mut local) = tokio::io::duplex(64 * 1024);
        let carrying = async {
            let r = carry(&auto, &mut local).await;
            drop(local);
            r
        };
        let talking = async {
            tokio::time::sleep(SILENT_FALLBACK + Duration::from_millis(150)).await;
            program.write_all(b"late").await.expect("write");
            program.shutdown().await.expect("EOF");
            let mut out = Vec::new();
            let _ = program.read_to_end(&mut out).await;
            out
        };
        let (r, out) = tokio::join!(carrying, talking);
        r.expect("a clean end");
        assert_eq!(out, b"late", "carried over TCP");
        assert_eq!(accepted.load(SeqCst), 1);

        // Forced QUIC waits for the program instead.
        let quic = pki.client(server.addr, Transport::Quic, None);
        let (mut program, mut local) = tokio::io::duplex(64 * 1024);
        let carrying = async {
            let r = carry(&quic, &mut local).await;
            drop(local);
            r
        };
        let talking = async {
            tokio::time::sleep(SILENT_FALLBACK + Duration::from_millis(150)).await;
            program.write_all(b"late").await.expect("write");
            program.shutdown().await.expect("EOF");
            let mut out = Vec::new();
            let _ = program.read_to_end(&mut out).await;
            out
        };
        let (r, out) = tokio::join!(carrying, talking);
        r.expect("a clean end");
        assert_eq!(out, b"got late", "stayed on QUIC");
        assert_eq!(accepted.load(SeqCst), 1);
    })
    .await;
}
