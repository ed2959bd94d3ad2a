//! Shared fixture: a PKI, three echo backends, a standard snapshot and a data plane.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use ztp_tests::client::{alert_of, read_to_end_or_alert, ClientOptions};
use ztp_tests::{connect_with, Dataplane, EchoBackend, TestCert, TestPki};

/// Bound for a single step (connect, read, log wait) in a test.
pub const STEP: Duration = Duration::from_secs(15);

/// The identity of the `svc-x` user (a SAN URI).
pub const SPIFFE_X: &str = "spiffe://example.org/ns/x";

/// Extra pieces for the standard fixture.
#[derive(Default)]
pub struct Extra<'a> {
    /// YAML appended to `services:` (items indented by two spaces, like the standard ones).
    pub services: &'a str,
    /// Serials for `revoked:`, written as given.
    pub revoked: &'a [String],
    /// Extra data-plane flags.
    pub args: &'a [&'a str],
}

/// One service entry, as the YAML an operator would write.
pub fn service_yaml(name: &str, addr: SocketAddr) -> String {
    format!("  - name: {name}\n    protocol: tcp\n    address: \"{addr}\"\n")
}

/// One service entry with the given protocol (`None`: the field is left out, so the
/// service defaults to `auto`) and backend address as written (e.g. `":5353"`).
pub fn proto_service_yaml(name: &str, protocol: Option<&str>, address: &str) -> String {
    let protocol = protocol
        .map(|p| format!("    protocol: {p}\n"))
        .unwrap_or_default();
    format!("  - name: \"{name}\"\n{protocol}    address: \"{address}\"\n")
}

/// The standard snapshot:
///
/// - `echo.svc.internal` (no groups), `*.svc.internal` (no groups) and
///   `admins.svc.internal` (group `admins`) forward to echo backends;
/// - `whoami.svc.internal` runs the `identity-echo` handler;
/// - users `alice` (alice@example.com, admins), `bob` (bob@example.com), `carol` (CN
///   `carol`), `svc-x` (URI `spiffe://example.org/ns/x`), `dave` (dave@example.com, disabled).
pub fn standard_snapshot(
    version: u64,
    echo: SocketAddr,
    wild: SocketAddr,
    admins: SocketAddr,
    extra: &Extra<'_>,
) -> String {
    let revoked = extra
        .revoked
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"version: {version}
services:
  - name: echo.svc.internal
    protocol: tcp
    address: "{echo}"
  - name: "*.svc.internal"
    protocol: tcp
    address: "{wild}"
  - name: admins.svc.internal
    protocol: tcp
    address: "{admins}"
    groups: [admins]
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
{extra_services}users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [admins]
  - name: bob
    identities: ["bob@example.com"]
  - name: carol
    identities: ["carol"]
  - name: svc-x
    identities: ["{SPIFFE_X}"]
  - name: dave
    identities: ["dave@example.com"]
    disabled: true
groups:
  - name: admins
revoked: [{revoked}]
"#,
        extra_services = extra.services,
    )
}

/// A PKI, the standard backends and a data plane running the standard snapshot.
pub struct Fixture {
    pub pki: TestPki,
    /// Backend of `echo.svc.internal`.
    pub echo: EchoBackend,
    /// Backend of `*.svc.internal`.
    pub wild: EchoBackend,
    /// Backend of `admins.svc.internal`.
    pub admins: EchoBackend,
    pub dp: Dataplane,
}

impl Fixture {
    /// Fresh PKI, nothing extra.
    pub async fn start() -> Fixture {
        Fixture::start_with(TestPki::new(), Extra::default()).await
    }

    /// The given PKI (so certificates can be issued before the snapshot is written) and
    /// extra services, revoked serials and flags.
    pub async fn start_with(pki: TestPki, extra: Extra<'_>) -> Fixture {
        let echo = EchoBackend::start().await;
        let wild = EchoBackend::start().await;
        let admins = EchoBackend::start().await;
        let yaml = standard_snapshot(1, echo.addr(), wild.addr(), admins.addr(), &extra);
        let dp = Dataplane::start(&pki, &yaml, extra.args).await;
        Fixture {
            pki,
            echo,
            wild,
            admins,
            dp,
        }
    }

    /// Client options trusting this PKI's CA with the given SNI and certificate.
    pub fn opts(&self, sni: &str, cert: &TestCert) -> ClientOptions {
        ClientOptions::new(&self.pki.ca_pem).sni(sni).cert(cert)
    }

    /// Connects with SNI `sni`, presenting `cert`.
    pub async fn connect(&self, sni: &str, cert: &TestCert) -> io::Result<TlsStream<TcpStream>> {
        connect_with(self.dp.addr(), &self.opts(sni, cert)).await
    }

    /// Connections accepted by the three standard backends together.
    pub fn backend_connections(&self) -> usize {
        self.echo.connections() + self.wild.connections() + self.admins.connections()
    }
}

/// Writes `payload`, half-closes (close_notify), reads to a clean end and returns what
/// came back.
pub async fn echo_roundtrip(mut s: TlsStream<TcpStream>, payload: &[u8]) -> Vec<u8> {
    tokio::time::timeout(STEP, s.write_all(payload))
        .await
        .expect("write bounded")
        .expect("write payload");
    tokio::time::timeout(STEP, s.shutdown())
        .await
        .expect("shutdown bounded")
        .expect("half-close");
    read_to_end_or_alert(&mut s)
        .await
        .unwrap_or_else(|e| panic!("reading the echo failed: {e}"))
}

/// Writes `payload` and reads exactly as many bytes back (bounded), leaving the
/// connection open.
pub async fn echo_step<S>(s: &mut S, payload: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(STEP, async {
        s.write_all(payload).await?;
        s.flush().await?;
        s.read_exact(&mut back).await
    })
    .await
    .unwrap_or_else(|_| panic!("no echo of {} bytes within {STEP:?}", payload.len()))
    .unwrap_or_else(|e| panic!("echo of {} bytes failed: {e}", payload.len()));
    assert_eq!(back, payload, "the echo differs from what was sent");
}

/// Connects to `sni` as `cert` until a round trip reaches `backend` (each attempt a full
/// echo round trip): the way to tell that a reload naming `sni` is in effect. Panics if
/// it is not within [`STEP`], or if the data plane exited.
pub async fn wait_until_served_by(
    fx: &mut Fixture,
    sni: &str,
    cert: &TestCert,
    backend: &EchoBackend,
) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(status) = fx.dp.try_wait() {
            panic!("ztp-dataplane exited ({status}) while waiting for {sni} to reach its backend");
        }
        let before = backend.connections();
        if let Ok(s) = fx.connect(sni, cert).await {
            let mut s = s;
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                s.write_all(b"probe").await?;
                s.shutdown().await?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await?;
                io::Result::Ok(back)
            })
            .await;
            if matches!(ok, Ok(Ok(ref b)) if b == b"probe") && backend.connections() > before {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sni} did not reach the expected backend within {STEP:?} (reload not in effect?)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that a handshake failed with the given alert from the server.
pub fn assert_handshake_alert<T>(r: io::Result<T>, expected: AlertDescription) {
    match r {
        Ok(_) => panic!("handshake succeeded; expected the server to refuse with {expected:?}"),
        Err(e) => assert_eq!(
            alert_of(&e),
            Some(expected),
            "handshake failed, but not with alert {expected:?}: {e} ({:?})",
            ztp_tests::client::rustls_error_of(&e)
        ),
    }
}

/// Asserts that a client-certificate refusal arrives as `expected`: either during
/// `connect` or (as TLS 1.3 usually has it) on the first read, with no data before it.
pub async fn assert_cert_refused(
    addr: SocketAddr,
    opts: &ClientOptions,
    expected: AlertDescription,
) {
    match connect_with(addr, opts).await {
        Err(e) => assert_eq!(
            alert_of(&e),
            Some(expected),
            "connect failed, but not with alert {expected:?}: {e}"
        ),
        Ok(mut s) => match read_to_end_or_alert(&mut s).await {
            Ok(data) => panic!(
                "the connection was accepted ({} bytes, then a clean end: {:?}); expected alert {expected:?}",
                data.len(),
                String::from_utf8_lossy(&data)
            ),
            Err(e) => {
                assert_eq!(e.alert(), Some(expected), "expected alert {expected:?}, got {e}");
                assert!(e.data().is_empty(), "data arrived before the alert: {:?}", e.data());
            }
        },
    }
}

/// Writes `junk_len` bytes (tolerating write errors, but not a stall), then reads to a
/// clean end and asserts that exactly the line `ZTP-ERROR <code> <reason>\n` arrived.
pub async fn assert_refusal_line(
    mut s: TlsStream<TcpStream>,
    junk_len: usize,
    code: u16,
    reason: &str,
) {
    if junk_len > 0 {
        let junk = vec![b'j'; junk_len];
        match tokio::time::timeout(STEP, async {
            s.write_all(&junk).await?;
            s.flush().await
        })
        .await
        {
            Err(_) => panic!(
                "writing {junk_len} bytes stalled for {STEP:?}: the proxy neither reads nor closes"
            ),
            Ok(Err(e)) => eprintln!("note: writing the {junk_len} bytes failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    let expected = format!("ZTP-ERROR {code} {reason}\n");
    match read_to_end_or_alert(&mut s).await {
        Ok(data) => assert_eq!(
            String::from_utf8_lossy(&data),
            expected,
            "expected exactly the refusal line, then a clean end"
        ),
        Err(e) => panic!(
            "expected {expected:?} then a clean end (close_notify); got {e}; data: {:?}",
            String::from_utf8_lossy(e.data())
        ),
    }
}

/// Connects to `whoami.svc.internal` with `cert` and reads the identity-echo answer
/// (`key: value` lines) up to a clean end. `Err` carries whatever arrived instead.
pub async fn whoami(fx: &Fixture, cert: &TestCert) -> Result<BTreeMap<String, String>, String> {
    let mut s = fx
        .connect("whoami.svc.internal", cert)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let data = read_to_end_or_alert(&mut s)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    let text = String::from_utf8_lossy(&data).to_string();
    if text.starts_with("ZTP-ERROR") {
        return Err(text);
    }
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("not a `key: value` line: {line:?} in {text:?}"))?;
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(map)
}

/// Connects to `whoami.svc.internal` and expects the identity-echo answer.
pub async fn whoami_ok(fx: &Fixture, cert: &TestCert) -> BTreeMap<String, String> {
    whoami(fx, cert)
        .await
        .unwrap_or_else(|e| panic!("identity-echo did not answer: {e}"))
}

/// Asserts that `cert` does not get through to `sni`, in whatever form the refusal takes
/// (a handshake alert, an alert on the first read, or the 403 line); returns a description
/// of the refusal.
pub async fn assert_denied(fx: &Fixture, sni: &str, cert: &TestCert) -> String {
    let before = fx.backend_connections();
    let how = match fx.connect(sni, cert).await {
        Err(e) => format!("handshake refused: {e}"),
        Ok(mut s) => match read_to_end_or_alert(&mut s).await {
            Ok(data) => {
                let text = String::from_utf8_lossy(&data).to_string();
                assert_eq!(text, "ZTP-ERROR 403 forbidden\n", "expected a refusal");
                text
            }
            Err(e) => {
                assert!(e.data().is_empty(), "data arrived before the refusal: {e}");
                format!("refused after the handshake: {e}")
            }
        },
    };
    assert_eq!(fx.backend_connections(), before, "a backend was contacted");
    how
}

/// `ztpctl connect echo.svc.internal --via VIA` as `who` (`DIR/WHO.pem` and `.key`, the CA
/// in `DIR/ca.pem`), with `extra` flags, the `ZTP_*` environment cleared and a private
/// config home in `DIR/xdg`; standard streams piped, killed on drop.
pub fn ztpctl_connect(
    dir: &std::path::Path,
    via: SocketAddr,
    who: &str,
    extra: &[&str],
) -> tokio::process::Command {
    std::fs::create_dir_all(dir.join("xdg")).expect("a config home");
    let mut cmd = tokio::process::Command::new(ztp_tests::Bin::Ztpctl.path());
    cmd.args(["connect", "echo.svc.internal"])
        .args(extra)
        .arg("--via")
        .arg(via.to_string())
        .arg("--cert")
        .arg(dir.join(format!("{who}.pem")))
        .arg("--key")
        .arg(dir.join(format!("{who}.key")))
        .arg("--ca")
        .arg(dir.join("ca.pem"));
    for k in ["ZTP_VIA", "ZTP_CERT", "ZTP_KEY", "ZTP_CA", "RUST_LOG"] {
        cmd.env_remove(k);
    }
    cmd.env("XDG_CONFIG_HOME", dir.join("xdg"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}
