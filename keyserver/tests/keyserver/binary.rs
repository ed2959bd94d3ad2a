//! The `ztp-keyserver` binary, through the `ztp_tests::keyserver` harness: flags and
//! files refused with one line, SIGHUP reloads, SIGKILL.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use ztp_proto::keyless::{ErrorCode, Op, Outcome};
use ztp_tests::bins::{run_bounded_with, Bin};
use ztp_tests::keyserver::{keyserver_cert, KeyFile, Keyserver};
use ztp_tests::TestPki;

use crate::support::{generate, id_of, request, Client, Kind, TempDir};

/// This package's binary, for the harness (no nested build).
fn use_this_binary() {
    std::env::set_var(
        Bin::Keyserver.env_override(),
        env!("CARGO_BIN_EXE_ztp-keyserver"),
    );
}

/// A folder with the TLS files and `keys/`; the flags that use them.
fn files(pki: &TestPki) -> (TempDir, Vec<String>) {
    let dir = TempDir::new("keyserver-bin");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    keyserver_cert(pki).write(dir.path(), "ks").unwrap();
    std::fs::create_dir(dir.join("keys")).unwrap();
    let p = |n: &str| dir.join(n).display().to_string();
    let args = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--cert".into(),
        p("ks.pem"),
        "--key".into(),
        p("ks.key"),
        "--client-ca".into(),
        p("ca.pem"),
        "--keys".into(),
        p("keys"),
    ];
    (dir, args)
}

fn run(args: &[String]) -> (Option<i32>, String) {
    use_this_binary();
    let out = run_bounded_with(Bin::Keyserver, args, &[], Duration::from_secs(20));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_key_file_readable_by_others_stops_the_start_naming_it() {
    let pki = TestPki::new();
    let (dir, args) = files(&pki);
    let path = dir.join("keys").join("edge.key");
    crate::support::write_key(&dir.join("keys"), "edge", &generate(Kind::P256).pem, None);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = run(&args);
    assert_eq!(code, Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [format!(
            "ztp-keyserver: {0} is readable by group or others (mode 0644); make it private \
             with `chmod 600 {0}`",
            path.display()
        )],
        "{stderr}"
    );
}

#[test]
fn bad_flags_and_files_are_one_line_and_exit_64() {
    let pki = TestPki::new();
    let (dir, args) = files(&pki);
    let without_keys: Vec<String> = args[..args.len() - 2].to_vec();
    let (code, stderr) = run(&without_keys);
    assert_eq!(code, Some(64));
    assert_eq!(stderr, "ztp-keyserver: --keys is required (see --help)\n");

    let bad = dir.join("keys").join("bad.key");
    crate::support::write_key(&dir.join("keys"), "bad", "not a key\n", None);
    let (code, stderr) = run(&args);
    assert_eq!(code, Some(64));
    assert_eq!(
        stderr,
        format!(
            "ztp-keyserver: {}: no PEM private key in the file\n",
            bad.display()
        )
    );
    std::fs::remove_file(&bad).unwrap();

    let mut wrong_ca = args.clone();
    let at = wrong_ca.iter().position(|a| a == "--client-ca").unwrap();
    wrong_ca[at + 1] = dir.join("missing.pem").display().to_string();
    let (code, stderr) = run(&wrong_ca);
    assert_eq!(code, Some(64));
    assert!(
        stderr.starts_with("ztp-keyserver: cannot read ") && stderr.contains("missing.pem"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn sighup_picks_up_a_new_key_and_a_broken_folder_keeps_the_old_keys() {
    use_this_binary();
    let pki = TestPki::new();
    let a = generate(Kind::P256);
    let b = generate(Kind::Ed25519);
    let mut ks = Keyserver::start(
        &pki,
        &[KeyFile {
            name: "a",
            pem: &a.pem,
            nodes: None,
        }],
        &[],
    )
    .await;
    let node = pki.node("edge-1");
    let mut client = Client::connect(ks.addr(), &pki, &node).await;
    let sign_b = request(2, Op::Ed25519, id_of(&b), b"hello".to_vec());
    assert_eq!(
        client.call(&sign_b).await.outcome,
        Outcome::Error(ErrorCode::KeyNotFound)
    );

    ks.write_key(&KeyFile {
        name: "b",
        pem: &b.pem,
        nodes: Some(&["edge-1"]),
    });
    assert!(ks.reload().await, "the reload was refused");
    // The live connection uses the new keys.
    assert!(matches!(
        client.call(&sign_b).await.outcome,
        Outcome::Signature(_)
    ));
    assert_eq!(ks.signatures("b").await, 1);

    // A broken key file: the reload is refused and the keys in use stay.
    ks.write_key(&KeyFile {
        name: "c",
        pem: "garbage",
        nodes: None,
    });
    assert!(!ks.reload().await, "a broken key folder was taken");
    assert!(matches!(
        client.call(&sign_b).await.outcome,
        Outcome::Signature(_)
    ));
    let refusal = ks
        .wait_for_log(
            |v| v["message"] == "reload: keys refused; keeping the running ones",
            Duration::from_secs(5),
        )
        .await
        .expect("the refusal is logged");
    assert!(
        refusal["error"].as_str().unwrap().contains("c.key"),
        "{refusal}"
    );

    // Every signature is logged with the node, the key and the SNI, never the payload.
    let signed = ks
        .wait_for_log(|v| v["message"] == "signed", Duration::from_secs(5))
        .await
        .expect("a signed line");
    assert_eq!(signed["client.id"], "edge-1", "{signed}");
    assert_eq!(signed["key.name"], "b", "{signed}");
    assert_eq!(signed["tls.sni"], "app.svc.internal", "{signed}");
    assert_eq!(signed["client.ip"], "192.0.2.7", "{signed}");
    assert_eq!(signed["key.id"], hex8(&id_of(&b)), "{signed}");

    // SIGKILL by PID: the port stops answering.
    let pid = ks.pid();
    ks.kill();
    assert!(ks.try_wait().is_some(), "pid {pid} still runs");
    assert!(client.try_recv().await.is_err());
}

fn hex8(id: &[u8; 32]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}
