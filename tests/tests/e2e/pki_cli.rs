//! `ztpctl pki` as an operator uses it (README "Walkthrough: the operator's day"): `init`,
//! `issue`, `sign`, `node`, with relative paths from a working folder; the certificates
//! are checked with the openssl CLI (`openssl verify`, subjects, SANs, usages, lifetimes)
//! and used with a real data plane. Needs `openssl` (skipped with a note when missing,
//! failed under `ZTP_REQUIRE_TOOLS=1`).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use ztp_tests::backend::pseudo_random_bytes;
use ztp_tests::client::read_to_end_or_alert;
use ztp_tests::process::{describe_output, require_tools, run_bounded};
use ztp_tests::{connect_with, Bin, ClientOptions, Dataplane, EchoBackend, TempDir, TestCert};

use crate::common::STEP;
use crate::plane::assert_one_line_error;

/// Bound on one `ztpctl pki` or `openssl` run (P-256 keys: well under a second).
const RUN: Duration = Duration::from_secs(30);

/// Bound on `ztpctl pki init --rsa` (an RSA-4096 and an RSA-2048 key; prime search in a
/// debug build took 4 to 17 s on a 2-core machine).
const RSA_RUN: Duration = Duration::from_secs(120);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Runs `program ARGS` in `cwd` (bounded), without the ZTP_* client settings.
async fn run_in<S: AsRef<OsStr>>(
    program: &Path,
    cwd: &Path,
    args: &[S],
    bound: Duration,
) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.current_dir(cwd)
        .args(args)
        .env("XDG_CONFIG_HOME", cwd.join(".xdg"))
        .env_remove("RUST_LOG");
    for var in [
        "ZTP_SERVER",
        "ZTP_TOKEN",
        "ZTP_CERT",
        "ZTP_KEY",
        "ZTP_CA",
        "ZTP_VIA",
    ] {
        cmd.env_remove(var);
    }
    run_bounded(cmd, None, bound).await
}

async fn ztpctl<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> Output {
    run_in(&Bin::Ztpctl.path(), cwd, args, RUN).await
}

async fn ztpctl_ok<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> String {
    let out = ztpctl(cwd, args).await;
    let shown: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    assert!(
        out.status.success(),
        "ztpctl {shown:?}: {}",
        describe_output(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The openssl CLI, run in a working folder.
struct Openssl {
    bin: PathBuf,
    cwd: PathBuf,
}

impl Openssl {
    async fn run(&self, args: &[&str]) -> Output {
        run_in(&self.bin, &self.cwd, args, RUN).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            describe_output(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Subject, SAN, extended key usage and basic constraints of a certificate, as
    /// openssl prints them.
    async fn describe(&self, cert: &str) -> String {
        self.ok(&[
            "x509",
            "-in",
            cert,
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,extendedKeyUsage,basicConstraints",
        ])
        .await
    }

    /// Whether `cert` is still valid `secs` seconds from now (`x509 -checkend`).
    async fn valid_in(&self, cert: &str, secs: u64) -> bool {
        let s = secs.to_string();
        let out = self
            .run(&["x509", "-in", cert, "-noout", "-checkend", &s])
            .await;
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("openssl x509 -checkend: {}", describe_output(&out)),
        }
    }

    /// `openssl verify -CAfile CA [-purpose P] CERTS...`: every one `OK`.
    async fn verify(&self, ca: &str, purpose: &str, certs: &[&str]) {
        let mut args = vec!["verify", "-CAfile", ca, "-purpose", purpose];
        args.extend_from_slice(certs);
        let out = self.ok(&args).await;
        for c in certs {
            assert!(
                out.lines().any(|l| l == format!("{c}: OK")),
                "openssl verify -purpose {purpose}: {c} is not OK:\n{out}"
            );
        }
    }

    /// The public key (PEM) of a certificate or a private key.
    async fn public_key(&self, path: &str, is_cert: bool) -> String {
        if is_cert {
            self.ok(&["x509", "-in", path, "-noout", "-pubkey"]).await
        } else {
            self.ok(&["pkey", "-in", path, "-pubout"]).await
        }
    }
}

/// The subject line openssl prints, e.g. `subject=CN = alice`.
fn subject_line(described: &str) -> &str {
    described
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
}

/// A snapshot for a data plane in front of `echo` with the `identity-echo` handler, and
/// the users whose certificates the PKI test makes (bob has none: his certificate's
/// identity is unknown).
fn snapshot(echo: std::net::SocketAddr) -> String {
    format!(
        r#"version: 1
services:
  - name: echo.svc.internal
    protocol: tcp
    address: "{echo}"
  - name: whoami.svc.internal
    protocol: tcp
    handler: identity-echo
users:
  - name: alice
    identities: ["alice@example.com"]
  - name: dave
    identities: ["dave@example.com"]
  - name: web
    identities: ["spiffe://example.org/ns/web"]
  - name: carol
    identities: ["carol"]
groups: []
revoked: []
"#
    )
}

/// Starts a data plane with `pki_dir`'s `ca.pem`, `server.pem` and `server.key`.
async fn dataplane_with(pki_dir: &Path, echo: &EchoBackend) -> Dataplane {
    let dir = TempDir::new("pki-cli-dp");
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(pki_dir.join(f), dir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    Dataplane::start_in(dir, &snapshot(echo.addr()), &[]).await
}

/// What `whoami.svc.internal` answers `cert`: the `key: value` lines, or the refusal.
async fn whoami(dp: &Dataplane, ca_pem: &str, cert: &TestCert) -> String {
    let opts = ClientOptions::new(ca_pem)
        .sni("whoami.svc.internal")
        .cert(cert);
    let mut s = connect_with(dp.addr(), &opts)
        .await
        .unwrap_or_else(|e| panic!("handshake to whoami: {e}"));
    let data = read_to_end_or_alert(&mut s)
        .await
        .unwrap_or_else(|e| panic!("whoami: {e}"));
    String::from_utf8_lossy(&data).into_owned()
}

/// An echo round trip of 1000 bytes through `dp` as `cert`, the server certificate checked
/// against `ca_pem` for `echo.svc.internal`.
async fn assert_echo(dp: &Dataplane, ca_pem: &str, cert: &TestCert, what: &str) {
    let opts = ClientOptions::new(ca_pem)
        .sni("echo.svc.internal")
        .cert(cert);
    let mut s = connect_with(dp.addr(), &opts)
        .await
        .unwrap_or_else(|e| panic!("{what}: handshake: {e}"));
    let payload = pseudo_random_bytes(1000, 3);
    tokio::time::timeout(STEP, async {
        s.write_all(&payload).await?;
        s.shutdown().await
    })
    .await
    .expect("bounded")
    .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let back = read_to_end_or_alert(&mut s)
        .await
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(back, payload, "{what}: the echo differs");
}

/// The operator's day, from a working folder with relative paths:
///
/// - `pki init pki` writes `ca.pem`, `ca.key` (0600), `server.pem`, `server.key` (0600);
///   again without `--force` it is one line naming the file and `--force`, and nothing
///   changes; with `--force` a new CA replaces the old one;
/// - `pki issue alice@example.com --ttl 4h` writes `alice.pem`/`alice.key` (0600): SAN
///   email, CN `alice`, clientAuth, valid for 4 h (not 3.5 h less, not 4.5 h more); a URI
///   gets its last segment as the name and CN, a plain name is the CN with no SAN;
///   `--name` picks the file name; an existing file is not overwritten without `--force`;
///   `--ttl 7d` is a week;
/// - `pki node n1` writes `node-n1.pem` with the URI SAN `spiffe://ztp.internal/node/n1`;
/// - `pki sign` turns an openssl CSR into a certificate for its email with the CSR's key
///   (and writes no key); a CSR asking for a node URI is refused;
/// - every certificate passes `openssl verify -CAfile ca.pem` with the right purpose;
/// - a data plane with the server certificate and key from `pki init` serves echo and
///   identity-echo to the issued and signed certificates, with the identities expected;
///   a certificate whose identity is no user's, and a node certificate, get the 403 line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_certificates_verify_with_openssl_and_work_with_a_data_plane() {
    let Some(tools) = require_tools(
        "pki_certificates_verify_with_openssl_and_work_with_a_data_plane",
        &["openssl"],
    ) else {
        return;
    };
    let work = TempDir::new("pki-cli");
    let cwd = work.path();
    let pki = work.join("pki");
    let openssl = Openssl {
        bin: tools[0].clone(),
        cwd: cwd.to_path_buf(),
    };

    // init
    let out = ztpctl_ok(cwd, &["pki", "init", "pki"]).await;
    assert!(out.contains("ca.pem"), "{out}");
    let four = ["ca.pem", "ca.key", "server.pem", "server.key"];
    for f in four {
        let m = mode(&pki.join(f));
        if f.ends_with(".key") {
            assert_eq!(m, 0o600, "{f} mode {m:o}");
        } else {
            assert_eq!(m & 0o022, 0, "{f} is writable by others: {m:o}");
        }
    }
    let first: Vec<Vec<u8>> = four.iter().map(|f| read(&pki.join(f))).collect();
    let out = ztpctl(cwd, &["pki", "init", "pki"]).await;
    assert_one_line_error(
        &out,
        "pki init over an existing PKI",
        &["exists", "--force"],
    );
    let again: Vec<Vec<u8>> = four.iter().map(|f| read(&pki.join(f))).collect();
    assert_eq!(first, again, "a refused init changed the files");
    ztpctl_ok(cwd, &["pki", "init", "pki", "--force"]).await;
    for (i, f) in four.iter().enumerate() {
        assert_ne!(read(&pki.join(f)), first[i], "--force did not replace {f}");
    }
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.join("server.key")), 0o600);

    // issue
    let out = ztpctl_ok(
        cwd,
        &[
            "pki",
            "issue",
            "alice@example.com",
            "--ttl",
            "4h",
            "--dir",
            "pki",
        ],
    )
    .await;
    assert!(out.contains("alice.pem"), "{out}");
    assert_eq!(mode(&pki.join("alice.key")), 0o600, "alice.key");
    assert!(
        openssl.valid_in("pki/alice.pem", 3 * 3600 + 1800).await,
        "--ttl 4h: not valid in 3.5 h"
    );
    assert!(
        !openssl.valid_in("pki/alice.pem", 4 * 3600 + 1800).await,
        "--ttl 4h: still valid in 4.5 h"
    );
    let before = read(&pki.join("alice.pem"));
    let out = ztpctl(cwd, &["pki", "issue", "alice@example.com", "--dir", "pki"]).await;
    assert_one_line_error(
        &out,
        "issue over an existing alice.pem",
        &["alice", "exists", "--force"],
    );
    assert_eq!(
        read(&pki.join("alice.pem")),
        before,
        "a refused issue overwrote alice.pem"
    );
    // --force replaces, and a key made readable meanwhile is 0600 again.
    std::fs::set_permissions(
        pki.join("alice.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod alice.key");
    ztpctl_ok(
        cwd,
        &[
            "pki",
            "issue",
            "alice@example.com",
            "--ttl",
            "4h",
            "--dir",
            "pki",
            "--force",
        ],
    )
    .await;
    assert_ne!(
        read(&pki.join("alice.pem")),
        before,
        "--force did not replace alice.pem"
    );
    assert_eq!(
        mode(&pki.join("alice.key")),
        0o600,
        "alice.key after --force"
    );
    // Days: `--ttl 7d` is a week.
    let said = ztpctl_ok(
        cwd,
        &[
            "pki",
            "issue",
            "erin@example.com",
            "--ttl",
            "7d",
            "--dir",
            "pki",
        ],
    )
    .await;
    assert!(said.contains("valid 7d"), "issue --ttl 7d said {said:?}");
    assert!(
        openssl.valid_in("pki/erin.pem", 6 * 86_400 + 43_200).await,
        "--ttl 7d: not valid in 6.5 days"
    );
    assert!(
        !openssl.valid_in("pki/erin.pem", 7 * 86_400 + 43_200).await,
        "--ttl 7d: still valid in 7.5 days"
    );
    ztpctl_ok(
        cwd,
        &[
            "pki",
            "issue",
            "spiffe://example.org/ns/web",
            "--dir",
            "pki",
        ],
    )
    .await;
    ztpctl_ok(cwd, &["pki", "issue", "carol", "--dir", "pki"]).await;
    ztpctl_ok(
        cwd,
        &[
            "pki",
            "issue",
            "bob@example.com",
            "--name",
            "bobby",
            "--dir",
            "pki",
        ],
    )
    .await;
    assert!(!pki.join("bob.pem").exists() && pki.join("bobby.pem").exists());
    assert_eq!(mode(&pki.join("bobby.key")), 0o600);

    // node
    let out = ztpctl_ok(cwd, &["pki", "node", "n1", "--dir", "pki"]).await;
    assert!(out.contains("node-n1.pem"), "{out}");
    assert_eq!(mode(&pki.join("node-n1.key")), 0o600);

    // sign: dave keeps his key.
    openssl
        .ok(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "dave.key",
            "-out",
            "dave.csr",
            "-subj",
            "/CN=dave",
            "-addext",
            "subjectAltName=email:dave@example.com",
        ])
        .await;
    let out = ztpctl_ok(cwd, &["pki", "sign", "dave.csr", "--dir", "pki"]).await;
    assert!(out.contains("dave@example.com"), "{out}");
    assert!(
        pki.join("dave.pem").exists(),
        "pki sign wrote no pki/dave.pem"
    );
    assert!(!pki.join("dave.key").exists(), "pki sign wrote a key");
    assert_eq!(
        openssl.public_key("pki/dave.pem", true).await,
        openssl.public_key("dave.key", false).await,
        "the signed certificate does not carry the CSR's key"
    );
    let out = ztpctl(cwd, &["pki", "sign", "dave.csr", "--dir", "pki"]).await;
    assert_one_line_error(
        &out,
        "signing over an existing dave.pem",
        &["exists", "--force"],
    );
    assert!(openssl.valid_in("pki/dave.pem", 11 * 3600).await);
    assert!(
        !openssl.valid_in("pki/dave.pem", 13 * 3600).await,
        "sign's default ttl is 12h"
    );
    // A CSR asking for a node's identity is refused.
    openssl
        .ok(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "evil.key",
            "-out",
            "evil.csr",
            "-subj",
            "/CN=evil",
            "-addext",
            "subjectAltName=URI:spiffe://ztp.internal/node/evil",
        ])
        .await;
    let out = ztpctl(cwd, &["pki", "sign", "evil.csr", "--dir", "pki"]).await;
    assert_one_line_error(&out, "signing a node CSR", &["node"]);
    assert!(
        !pki.join("evil.pem").exists(),
        "a refused sign wrote a certificate"
    );

    // What openssl sees.
    let expect: [(&str, &str, &[&str], &[&str]); 8] = [
        ("ca", "subject=CN = ZTP CA, O = ZTP", &["CA:TRUE"], &[]),
        (
            "server",
            "subject=CN = localhost",
            &[
                "DNS:localhost, DNS:*.svc.internal",
                "TLS Web Server Authentication",
            ],
            &["Client Authentication"],
        ),
        (
            "alice",
            "subject=CN = alice",
            &["email:alice@example.com", "TLS Web Client Authentication"],
            &["Server Authentication", "CA:TRUE"],
        ),
        (
            "web",
            "subject=CN = web",
            &[
                "URI:spiffe://example.org/ns/web",
                "TLS Web Client Authentication",
            ],
            &[],
        ),
        (
            "carol",
            "subject=CN = carol",
            &["TLS Web Client Authentication"],
            &["Subject Alternative Name"],
        ),
        ("bobby", "subject=CN = bob", &["email:bob@example.com"], &[]),
        (
            "node-n1",
            "subject=CN = node n1",
            &[
                "URI:spiffe://ztp.internal/node/n1",
                "TLS Web Client Authentication",
            ],
            &["email:"],
        ),
        (
            "dave",
            "subject=CN = dave",
            &["email:dave@example.com", "TLS Web Client Authentication"],
            &["CA:TRUE"],
        ),
    ];
    for (name, subject, has, lacks) in expect {
        let d = openssl.describe(&format!("pki/{name}.pem")).await;
        assert_eq!(subject_line(&d), subject, "{name}.pem:\n{d}");
        for h in has {
            assert!(d.contains(h), "{name}.pem lacks {h:?}:\n{d}");
        }
        for l in lacks {
            assert!(!d.contains(l), "{name}.pem has {l:?}:\n{d}");
        }
    }
    openssl
        .verify("pki/ca.pem", "sslserver", &["pki/server.pem"])
        .await;
    openssl
        .verify(
            "pki/ca.pem",
            "sslclient",
            &[
                "pki/alice.pem",
                "pki/web.pem",
                "pki/carol.pem",
                "pki/bobby.pem",
                "pki/node-n1.pem",
                "pki/dave.pem",
            ],
        )
        .await;

    // A real data plane with the server certificate from `pki init`.
    let echo = EchoBackend::start().await;
    let dp = dataplane_with(&pki, &echo).await;
    let ca_pem = String::from_utf8(read(&pki.join("ca.pem"))).expect("PEM is text");
    let dave = TestCert::from_pem(
        &String::from_utf8_lossy(&read(&pki.join("dave.pem"))),
        &String::from_utf8_lossy(&read(&work.join("dave.key"))),
    )
    .expect("dave's certificate and key");
    let alice = TestCert::read(&pki, "alice");
    assert_echo(&dp, &ca_pem, &alice, "alice").await;
    assert_echo(&dp, &ca_pem, &dave, "dave (signed CSR)").await;
    for (cert, identity, user) in [
        (alice.clone(), "alice@example.com", "alice"),
        (dave.clone(), "dave@example.com", "dave"),
        (
            TestCert::read(&pki, "web"),
            "spiffe://example.org/ns/web",
            "web",
        ),
        (TestCert::read(&pki, "carol"), "carol", "carol"),
    ] {
        let text = whoami(&dp, &ca_pem, &cert).await;
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.contains(&format!("identity: {identity}").as_str())
                && lines.contains(&format!("user: {user}").as_str())
                && lines.contains(&"service: whoami.svc.internal"),
            "whoami as {identity}: {text:?}"
        );
    }
    for name in ["bobby", "node-n1"] {
        let text = whoami(&dp, &ca_pem, &TestCert::read(&pki, name)).await;
        assert_eq!(text, "ZTP-ERROR 403 forbidden\n", "{name}");
    }
}

/// Refusals of `ztpctl pki`: one clear line and a failure exit, never a panic, and no
/// file written:
///
/// - `issue` before `init` points at `pki init`;
/// - a node identity (`spiffe://ztp.internal/node/x`) is refused by `issue`, with or
///   without `--name`;
/// - `--ttl 0s`, `0ms`, `1000000h`, `876001h` and `36501d` (over 100 years) on `issue` and
///   `node`;
/// - a ttl that is no duration (`99999999999999999999h`, `4 hours`, `1w`): a usage error
///   (exit 64) naming `--ttl`;
/// - a node id with a slash, a CSR file that is not a CSR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_refusals_are_one_clear_line() {
    let work = TempDir::new("pki-cli-refusals");
    let cwd = work.path();
    let pki = work.join("pki");
    let files = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };

    let out = ztpctl(cwd, &["pki", "issue", "alice@example.com", "--dir", "pki"]).await;
    assert_one_line_error(&out, "issue without a CA", &["pki init"]);
    ztpctl_ok(cwd, &["pki", "init", "pki"]).await;
    let initial = files(&pki);
    assert_eq!(initial, ["ca.key", "ca.pem", "server.key", "server.pem"]);

    for args in [
        vec![
            "pki",
            "issue",
            "spiffe://ztp.internal/node/x",
            "--dir",
            "pki",
        ],
        vec![
            "pki",
            "issue",
            "spiffe://ztp.internal/node/x",
            "--name",
            "x2",
            "--dir",
            "pki",
        ],
    ] {
        let out = ztpctl(cwd, &args).await;
        assert_one_line_error(&out, &format!("{args:?}"), &["node"]);
    }
    // A connector's identity is never a user's either.
    let args = [
        "pki",
        "issue",
        "spiffe://ztp.internal/connector/c1",
        "--dir",
        "pki",
    ];
    let out = ztpctl(cwd, &args).await;
    assert_one_line_error(&out, &format!("{args:?}"), &["connector"]);
    for ttl in ["0s", "0ms", "1000000h", "876001h", "36501d"] {
        let out = ztpctl(
            cwd,
            &[
                "pki",
                "issue",
                "t@example.com",
                "--ttl",
                ttl,
                "--dir",
                "pki",
            ],
        )
        .await;
        assert_one_line_error(&out, &format!("issue --ttl {ttl}"), &["--ttl"]);
        assert_eq!(out.status.code(), Some(1), "issue --ttl {ttl}");
        let out = ztpctl(cwd, &["pki", "node", "n9", "--ttl", ttl, "--dir", "pki"]).await;
        assert_one_line_error(&out, &format!("node --ttl {ttl}"), &["--ttl"]);
    }
    for ttl in ["99999999999999999999h", "4 hours", "1w"] {
        let out = ztpctl(
            cwd,
            &[
                "pki",
                "issue",
                "t@example.com",
                "--ttl",
                ttl,
                "--dir",
                "pki",
            ],
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "--ttl {ttl:?}: {}",
            describe_output(&out)
        );
        assert!(!stderr.contains("panicked"), "--ttl {ttl:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains("--ttl") && first.contains(ttl),
            "--ttl {ttl:?}: the first line does not name the flag and value: {stderr:?}"
        );
    }
    let out = ztpctl(cwd, &["pki", "node", "a/b", "--dir", "pki"]).await;
    assert_one_line_error(&out, "node a/b", &["a/b"]);
    std::fs::write(work.join("junk.csr"), "not a request\n").expect("write junk.csr");
    let out = ztpctl(cwd, &["pki", "sign", "junk.csr", "--dir", "pki"]).await;
    assert_one_line_error(&out, "sign junk.csr", &["junk.csr"]);
    assert_eq!(files(&pki), initial, "a refused command wrote files");
}

/// `pki init --rsa`: an RSA-4096 CA and an RSA-2048 server key that openssl verifies; a
/// P-256 client certificate issued by the RSA CA verifies too, and a data plane serving
/// the RSA server certificate echoes for it. (Slow in debug builds: RSA key generation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_init_rsa_makes_a_working_rsa_pki() {
    let Some(tools) = require_tools("pki_init_rsa_makes_a_working_rsa_pki", &["openssl"]) else {
        return;
    };
    let work = TempDir::new("pki-cli-rsa");
    let cwd = work.path();
    let pki = work.join("pki");
    let openssl = Openssl {
        bin: tools[0].clone(),
        cwd: cwd.to_path_buf(),
    };
    let start = Instant::now();
    let out = run_in(
        &Bin::Ztpctl.path(),
        cwd,
        &["pki", "init", "pki", "--rsa"],
        RSA_RUN,
    )
    .await;
    assert!(
        out.status.success(),
        "pki init --rsa: {}",
        describe_output(&out)
    );
    eprintln!("ztpctl pki init --rsa took {:?}", start.elapsed());
    for (file, bits) in [("pki/ca.pem", 4096), ("pki/server.pem", 2048)] {
        let text = openssl.ok(&["x509", "-in", file, "-noout", "-text"]).await;
        assert!(
            text.contains("rsaEncryption") && text.contains(&format!("Public-Key: ({bits} bit)")),
            "{file} is not RSA-{bits}:\n{text}"
        );
    }
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.join("server.key")), 0o600);
    ztpctl_ok(cwd, &["pki", "issue", "alice@example.com", "--dir", "pki"]).await;
    openssl
        .verify("pki/ca.pem", "sslserver", &["pki/server.pem"])
        .await;
    openssl
        .verify("pki/ca.pem", "sslclient", &["pki/alice.pem"])
        .await;

    let echo = EchoBackend::start().await;
    let dp = dataplane_with(&pki, &echo).await;
    let ca_pem = String::from_utf8(read(&pki.join("ca.pem"))).expect("PEM is text");
    assert_echo(
        &dp,
        &ca_pem,
        &TestCert::read(&pki, "alice"),
        "alice under the RSA CA",
    )
    .await;
}
