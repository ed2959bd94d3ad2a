//! Interop with the openssl CLI: an operator's PKI made with `openssl req`/`openssl x509`
//! (RSA and ECDSA), and `openssl s_client` as the client.
//!
//! Skipped, with a visible `SKIPPED` line, when `openssl` is missing; a failure under
//! `ZTP_REQUIRE_TOOLS=1` (`.ci/run` installs it and sets that).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztp_tests::process::require_tool;
use ztp_tests::{Dataplane, EchoBackend, TempDir};

use crate::common::STEP;

/// Key generation options for `openssl req -newkey`.
#[derive(Clone, Copy)]
enum Alg {
    Rsa(u32),
    P256,
}

impl Alg {
    fn newkey_args(self) -> Vec<String> {
        match self {
            Alg::Rsa(bits) => vec!["-newkey".into(), format!("rsa:{bits}")],
            Alg::P256 => vec![
                "-newkey".into(),
                "ec".into(),
                "-pkeyopt".into(),
                "ec_paramgen_curve:P-256".into(),
            ],
        }
    }
}

fn openssl(dir: &Path, args: &[String]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Makes ca.pem/ca.key, server.pem/server.key and alice.pem/alice.key the way an
/// operator would with the openssl CLI.
fn operator_pki(dir: &Path, ca: Alg, leaf: Alg) {
    let mut args = s(&["req", "-x509"]);
    args.extend(ca.newkey_args());
    args.extend(s(&[
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/O=ZTP operator/CN=ZTP Operator CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    openssl(dir, &args);

    for (name, subj, ext) in [
        (
            "server",
            "/CN=localhost",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,DNS:*.svc.internal\n",
        ),
        (
            "alice",
            "/CN=alice",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\nsubjectAltName=email:alice@example.com\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write extfile");
        let mut args = s(&["req"]);
        args.extend(leaf.newkey_args());
        args.extend(s(&[
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ]));
        openssl(dir, &args);
        openssl(
            dir,
            &s(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]),
        );
    }
}

async fn s_client_echo(test: &str, ca: Alg, leaf: Alg) {
    if require_tool(test, "openssl").is_none() {
        return;
    }
    let dir = TempDir::new("openssl");
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || operator_pki(&d, ca, leaf))
        .await
        .expect("openssl PKI");
    let echo = EchoBackend::start().await;
    let yaml = format!(
        r#"version: 1
services:
  - name: echo.svc.internal
    protocol: tcp
    address: "{}"
users:
  - name: alice
    identities: ["alice@example.com"]
"#,
        echo.addr()
    );
    let files = dir.path().to_path_buf();
    let dp = Dataplane::start_in(dir, &yaml, &[]).await;

    let mut child = tokio::process::Command::new("openssl")
        .current_dir(&files)
        .args(["s_client", "-connect"])
        .arg(dp.addr().to_string())
        .args([
            "-servername",
            "echo.svc.internal",
            "-cert",
            "alice.pem",
            "-key",
            "alice.key",
            "-CAfile",
            "ca.pem",
            "-verify_return_error",
            "-verify_hostname",
            "echo.svc.internal",
            "-quiet",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let line = b"hello through ztp from openssl s_client\n";
    stdin.write_all(line).await.expect("write to s_client");
    stdin.flush().await.expect("flush");

    // s_client -quiet keeps running after stdin ends; read until the echo is complete.
    let mut got = Vec::new();
    let result = tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 4096];
        while !got.windows(line.len()).any(|w| w == line) {
            let n = stdout.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    })
    .await;
    let _ = child.kill().await;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut stderr)).await;
    }
    assert!(
        matches!(result, Ok(Ok(()))) && got.windows(line.len()).any(|w| w == line),
        "the echo did not come back through s_client (read: {:?}); s_client stderr:\n{stderr}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(echo.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_rsa_pki_and_s_client() {
    s_client_echo(
        "openssl_rsa_pki_and_s_client",
        Alg::Rsa(4096),
        Alg::Rsa(2048),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_ecdsa_p256_pki_and_s_client() {
    s_client_echo("openssl_ecdsa_p256_pki_and_s_client", Alg::P256, Alg::P256).await;
}
