//! Keyless (DESIGN.md "Keyless", issue 20): a data plane started with no private key at
//! all serves handshakes signed by real `ztp-keyserver` processes, for ECDSA, RSA and
//! Ed25519 server keys; a node the key is not allowed for gets no signature; losing one
//! of two key servers under steady handshake load fails no handshake.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ztp_tests::keyserver::{KeyFile, Keyserver};
use ztp_tests::{
    connect_with, read_to_end_or_alert, ClientOptions, Dataplane, TempDir, TestCert, TestPki,
};

const SNAPSHOT: &str = r#"version: 1
services:
  - name: whoami.svc.internal
    handler: identity-echo
users:
  - name: alice
    identities: ["alice@example.com"]
"#;

/// A server certificate like the PKI's own (`localhost`, `*.svc.internal`), for `key`.
fn server_cert(pki: &TestPki, key: rcgen::KeyPair) -> TestCert {
    pki.builder()
        .cn("ztp-dataplane")
        .dns("localhost")
        .dns("*.svc.internal")
        .server_auth()
        .key(key)
        .issue()
}

/// An RSA-2048 key, PKCS#8 PEM, made by the openssl CLI (rcgen with ring cannot make
/// one).
fn rsa_key() -> rcgen::KeyPair {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("run openssl genpkey");
    assert!(out.status.success(), "{out:?}");
    rcgen::KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap()).expect("read the RSA key")
}

/// A data plane whose folder holds the CA and the server certificate and no private key,
/// signing through `servers` as node `node`.
async fn keyless_dataplane(
    pki: &TestPki,
    cert: &TestCert,
    servers: &[&Keyserver],
    node: &str,
) -> Dataplane {
    let dir = TempDir::new("dataplane-keyless");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("server.pem"), &cert.cert_pem).unwrap();
    pki.node(node).write(dir.path(), "node").unwrap();
    let url = format!(
        "keyless://{}",
        servers
            .iter()
            .map(|s| s.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let ca = servers[0].ca_path();
    let (node_pem, node_key) = (dir.join("node.pem"), dir.join("node.key"));
    let args = [
        "--key".to_owned(),
        url,
        "--keyless-cert".to_owned(),
        node_pem.display().to_string(),
        "--keyless-key".to_owned(),
        node_key.display().to_string(),
        "--keyless-ca".to_owned(),
        ca.display().to_string(),
        "--threads".to_owned(),
        "2".to_owned(),
        "--handshake-rate-per-source".to_owned(),
        "0".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dp = Dataplane::start_in(dir, SNAPSHOT, &args).await;
    // No private key anywhere in its folder but the node's own identity.
    for entry in std::fs::read_dir(dp.dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.ends_with(".key") || name == "node.key",
            "a key file in the data plane's folder: {name}"
        );
    }
    dp
}

/// One handshake and the identity-echo answer; `Err` says what failed.
async fn whoami(dp: &Dataplane, pki: &TestPki, alice: &TestCert) -> Result<String, String> {
    let opts = ClientOptions::new(&pki.ca_pem)
        .sni("whoami.svc.internal")
        .cert(alice)
        .timeout(Duration::from_secs(5));
    let mut s = connect_with(dp.addr(), &opts)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let data = read_to_end_or_alert(&mut s)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// The data plane's `/metrics`, and one sample's value in it.
async fn metrics(dp: &Dataplane) -> String {
    let r = ztp_tests::http::request(dp.admin_addr(), "GET", "/metrics", &[], None)
        .await
        .expect("GET /metrics");
    r.text().to_string()
}

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_with_ecdsa_rsa_and_ed25519_keys_held_by_a_key_server() {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let keys: [(&str, rcgen::KeyPair); 4] = [
        (
            "p256",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        ),
        (
            "p384",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        ),
        ("rsa", rsa_key()),
        (
            "ed25519",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        ),
    ];
    for (name, key) in keys {
        let cert = server_cert(&pki, key);
        let ks = Keyserver::start(
            &pki,
            &[KeyFile {
                name,
                pem: &cert.key_pem,
                nodes: None,
            }],
            &[],
        )
        .await;
        let dp = keyless_dataplane(&pki, &cert, &[&ks], "dp-1").await;
        let answer = whoami(&dp, &pki, &alice)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{:?}", dp.raw_logs()));
        assert!(answer.contains("alice@example.com"), "{name}: {answer}");
        // Over QUIC too: its handshake's signature is waited for inside quinn's tasks.
        let opts = ztp_tests::quic::with_alpn(
            ClientOptions::new(&pki.ca_pem)
                .sni("whoami.svc.internal")
                .cert(&alice),
        );
        let ep = ztp_tests::quic::endpoint_for(dp.addr());
        let conn = ztp_tests::quic::connect(&ep, dp.addr(), &opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: QUIC handshake: {e:?}"));
        conn.close(0u32.into(), b"done");
        // Both handshakes were signed for, each naming its SNI.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let named = ks
                .logs()
                .iter()
                .filter(|l| l["message"] == "signed" && l["tls.sni"] == "whoami.svc.internal")
                .count();
            if named >= 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {named} signatures named the SNI: {:?}",
                ks.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            ks.signatures(name).await >= 1,
            "{name}: the key server signed nothing"
        );
        // The key server's log names the node, the key and the SNI, never the payload.
        let line = ks
            .wait_for_log(
                |l| l["message"] == "signed" && l["client.id"] == "dp-1",
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|| panic!("{name}: no signature logged: {:?}", ks.logs()));
        assert_eq!(line["tls.sni"], "whoami.svc.internal", "{line}");
        assert_eq!(line["key.name"], name, "{line}");
        assert!(line.get("payload").is_none(), "{line}");
        // The node counts and times its signatures.
        let m = metrics(&dp).await;
        let ok = sample(&m, "ztp_keyless_signatures_total{outcome=\"ok\"}");
        assert!(ok >= 2.0, "{name}: {ok} signatures counted\n{m}");
        assert_eq!(
            sample(&m, "ztp_keyless_signatures_total{outcome=\"failed\"}"),
            0.0
        );
        assert_eq!(sample(&m, "ztp_keyless_servers_connected"), 1.0, "{m}");
        assert_eq!(sample(&m, "ztp_keyless_signature_seconds_count"), ok, "{m}");
        assert_eq!(
            sample(&m, "ztp_keyless_signature_seconds_bucket{le=\"+Inf\"}"),
            ok,
            "{m}"
        );
        assert!(sample(&m, "ztp_keyless_signature_seconds_sum") > 0.0, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_key_is_not_allowed_for_gets_no_signature() {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let ks = Keyserver::start(
        &pki,
        &[KeyFile {
            name: "server",
            pem: &pki.server.key_pem,
            nodes: Some(&["dp-allowed"]),
        }],
        &[],
    )
    .await;
    let refused = keyless_dataplane(&pki, &pki.server, &[&ks], "dp-other").await;
    let e = whoami(&refused, &pki, &alice).await.unwrap_err();
    assert!(e.starts_with("handshake"), "{e}");
    let line = refused
        .wait_for_log(
            |l| l["message"] == "no signature from the key servers",
            Duration::from_secs(5),
        )
        .await
        .expect("the refusal is logged");
    assert!(
        line["error"].as_str().unwrap().contains("key not found"),
        "{line}"
    );
    let m = metrics(&refused).await;
    assert!(
        sample(&m, "ztp_keyless_signatures_total{outcome=\"failed\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "ztp_keyless_signatures_total{outcome=\"ok\"}"),
        0.0,
        "{m}"
    );
    // The node it is allowed for signs.
    let allowed = keyless_dataplane(&pki, &pki.server, &[&ks], "dp-allowed").await;
    whoami(&allowed, &pki, &alice).await.unwrap();
}

/// Steady handshakes through a data plane with two key servers; midway `fault` is done
/// to the first: every handshake succeeds.
async fn steady_handshakes_survive(fault: &str) {
    let pki = TestPki::new();
    let alice = pki.client_email("alice@example.com");
    let key = [KeyFile {
        name: "server",
        pem: &pki.server.key_pem,
        nodes: None,
    }];
    let mut a = Keyserver::start(&pki, &key, &[]).await;
    let b = Keyserver::start(&pki, &key, &[]).await;
    let dp = keyless_dataplane(&pki, &pki.server, &[&a, &b], "dp-1").await;
    // Both connected before the load starts.
    whoami(&dp, &pki, &alice).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dp
        .raw_logs()
        .iter()
        .filter(|l| l.contains("connected to the key server"))
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            dp.raw_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (ok, failed) = (ok.clone(), failed.clone());
        let (addr, ca, alice) = (dp.addr(), pki.ca_pem.clone(), alice.clone());
        clients.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < stop {
                // Options (and so a client config) of its own: no session to resume, a
                // full handshake signed by a key server every time.
                let opts = ClientOptions::new(&ca)
                    .sni("whoami.svc.internal")
                    .cert(&alice)
                    .timeout(Duration::from_secs(5));
                let r = async {
                    let mut s = connect_with(addr, &opts).await.map_err(|e| e.to_string())?;
                    read_to_end_or_alert(&mut s)
                        .await
                        .map_err(|e| e.to_string())
                        .map(drop)
                }
                .await;
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed handshake: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = ok.load(Ordering::Relaxed);
    let signed_before = b.signatures("server").await;
    match fault {
        "kill" => a.kill(),
        other => a.signal(other),
    }
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed, 0,
        "{fault}: {ok} handshakes succeeded, {failed} failed"
    );
    assert!(
        before > 0 && ok > before + 10,
        "{fault}: handshakes went on after it: {before} before, {ok} in all"
    );
    // The other server signed the handshakes after it.
    let signed_after = b.signatures("server").await;
    eprintln!("{fault}: {before} handshakes before, {ok} in all; b signed {signed_before} before, {signed_after} in all");
    assert!(
        signed_after > signed_before + 10,
        "{fault}: b signed {signed_before} before, {signed_after} in all"
    );
    if fault == "STOP" {
        a.signal("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_key_servers_under_load_fails_no_handshake() {
    steady_handshakes_survive("kill").await;
}

/// A key server that stops answering (SIGSTOP: its sockets stay open) is routed around:
/// requests on it are hedged to the other, and new ones go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_key_server_is_routed_around_under_load() {
    steady_handshakes_survive("STOP").await;
}
