use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use ztp_keyserver::keys::*;
use ztp_proto::keyless::{ErrorCode, Op};

use crate::support::{self as testkeys, pem};

/// SHA-256 of the SPKI of `cert_der`, read with x509-parser.
fn cert_spki_id(cert_der: &[u8]) -> KeyId {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).unwrap();
    key_id(cert.tbs_certificate.subject_pki.raw)
}

#[test]
fn key_ids_are_the_sha256_of_a_certificates_spki() {
    for kind in testkeys::Kind::ALL {
        let made = testkeys::generate(kind);
        let key = Key::from_pem("k", made.pem.as_bytes()).unwrap();
        assert_eq!(key.algorithm.to_string(), kind.algorithm(), "{kind:?}");
        let cert = testkeys::self_signed_cert(&made);
        assert_eq!(key.id, cert_spki_id(&cert), "{kind:?}");
    }
}

#[test]
fn sec1_and_pkcs1_files_name_the_same_key_as_pkcs8() {
    use p256::pkcs8::DecodePrivateKey as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    let ec = testkeys::generate(testkeys::Kind::P384);
    let pkcs8 = Key::from_pem("a", ec.pem.as_bytes()).unwrap();
    let der = PrivateKeyDer::from_pem_slice(ec.pem.as_bytes()).unwrap();
    let sec1 = p384::SecretKey::from_pkcs8_der(der.secret_der())
        .unwrap()
        .to_sec1_der()
        .unwrap();
    let sec1 = Key::from_pem("b", pem("EC PRIVATE KEY", &sec1).as_bytes()).unwrap();
    assert_eq!((sec1.id, sec1.algorithm), (pkcs8.id, pkcs8.algorithm));

    let rsa = testkeys::generate(testkeys::Kind::Rsa2048);
    let pkcs8 = Key::from_pem("a", rsa.pem.as_bytes()).unwrap();
    let der = PrivateKeyDer::from_pem_slice(rsa.pem.as_bytes()).unwrap();
    let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_der(der.secret_der())
        .unwrap()
        .to_pkcs1_der()
        .unwrap();
    let pkcs1 = Key::from_pem("b", pem("RSA PRIVATE KEY", pkcs1.as_bytes()).as_bytes()).unwrap();
    assert_eq!(
        (pkcs1.id, pkcs1.algorithm),
        (pkcs8.id, Algorithm::Rsa(2048))
    );
}

#[test]
fn signatures_verify_with_ring_over_the_message() {
    use ring::signature as rs;
    let message = b"the handshake transcript, or what TLS signs";
    let cases: [(testkeys::Kind, Op, &dyn rs::VerificationAlgorithm); 8] = [
        (
            testkeys::Kind::P256,
            Op::EcdsaSha256,
            &rs::ECDSA_P256_SHA256_ASN1,
        ),
        (
            testkeys::Kind::P256,
            Op::EcdsaSha384,
            &rs::ECDSA_P256_SHA384_ASN1,
        ),
        (
            testkeys::Kind::P384,
            Op::EcdsaSha384,
            &rs::ECDSA_P384_SHA384_ASN1,
        ),
        (
            testkeys::Kind::P384,
            Op::EcdsaSha256,
            &rs::ECDSA_P384_SHA256_ASN1,
        ),
        (
            testkeys::Kind::Rsa2048,
            Op::RsaPssSha256,
            &rs::RSA_PSS_2048_8192_SHA256,
        ),
        (
            testkeys::Kind::Rsa2048,
            Op::RsaPssSha384,
            &rs::RSA_PSS_2048_8192_SHA384,
        ),
        (
            testkeys::Kind::Rsa2048,
            Op::RsaPssSha512,
            &rs::RSA_PSS_2048_8192_SHA512,
        ),
        (testkeys::Kind::Ed25519, Op::Ed25519, &rs::ED25519),
    ];
    for (kind, op, alg) in cases {
        let made = testkeys::generate(kind);
        let key = Key::from_pem("k", made.pem.as_bytes()).unwrap();
        let payload = testkeys::payload(op, message);
        let sig = key.sign(op, &payload).unwrap();
        rs::UnparsedPublicKey::new(alg, testkeys::ring_public_key(&made))
            .verify(message, &sig)
            .unwrap_or_else(|_| panic!("{kind:?} {op:?}: the signature does not verify"));
    }
}

#[test]
fn an_op_that_does_not_fit_the_key_is_unexpected() {
    let ec = Key::from_pem("k", testkeys::generate(testkeys::Kind::P256).pem.as_bytes()).unwrap();
    let ed = Key::from_pem(
        "k",
        testkeys::generate(testkeys::Kind::Ed25519).pem.as_bytes(),
    )
    .unwrap();
    for (key, op) in [
        (&ec, Op::RsaPssSha256),
        (&ec, Op::Ed25519),
        (&ec, Op::Ping),
        (&ed, Op::EcdsaSha256),
    ] {
        assert_eq!(
            key.sign(op, &[0; 32]),
            Err(ErrorCode::UnexpectedOpcode),
            "{op:?}"
        );
    }
}

#[test]
fn bad_key_files_are_named_and_never_quoted() {
    assert_eq!(
        Key::from_pem("k", b"").unwrap_err(),
        "no PEM private key in the file"
    );
    let garbage = pem("PRIVATE KEY", b"\x30\x03\x02\x01\x00");
    let e = Key::from_pem("k", garbage.as_bytes()).unwrap_err();
    assert!(e.starts_with("not a supported PKCS#8 key"), "{e}");
}

#[test]
fn nodes_files_list_ids_or_uris_with_comments() {
    let p = Path::new("k.nodes");
    let td = ztp_proto::names::DEFAULT_TRUST_DOMAIN;
    let nodes = parse_nodes(
        "# edge nodes\nedge-1\n  edge-2  # second\n\nspiffe://ztp.internal/node/edge-3\n",
        p,
        td,
    )
    .unwrap();
    let mut got: Vec<_> = nodes.into_iter().collect();
    got.sort();
    assert_eq!(got, ["edge-1", "edge-2", "edge-3"]);
    let e = parse_nodes("ok\nnot a node\n", p, td)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("k.nodes:2: \"not a node\" is not a node ID"),
        "{e}"
    );
    let e = parse_nodes("spiffe://elsewhere/node/a\n", p, td)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("k.nodes:1:"), "{e}");
    assert!(parse_nodes("# nobody\n", p, td).unwrap().is_empty());
}

#[test]
fn a_folder_loads_whole_with_authorization_or_not_at_all() {
    let dir = testkeys::TempDir::new("keys");
    let a = testkeys::generate(testkeys::Kind::P256);
    let b = testkeys::generate(testkeys::Kind::Ed25519);
    testkeys::write_key(dir.path(), "a", &a.pem, Some("edge-1\n"));
    testkeys::write_key(dir.path(), "b", &b.pem, None);
    std::fs::write(dir.path().join("README"), "not a key").unwrap();
    let td = ztp_proto::names::DEFAULT_TRUST_DOMAIN;
    let set = KeySet::load_dir(dir.path(), td).unwrap();
    assert_eq!(set.len(), 2);
    let a_id = Key::from_pem("a", a.pem.as_bytes()).unwrap().id;
    let b_id = Key::from_pem("b", b.pem.as_bytes()).unwrap().id;
    assert_eq!(set.lookup(&a_id, "edge-1").unwrap().name, "a");
    assert!(set.lookup(&a_id, "edge-2").is_none());
    assert!(set.lookup(&b_id, "edge-2").is_some());
    assert!(set.lookup(&[0; 32], "edge-1").is_none());

    // The same key twice.
    testkeys::write_key(dir.path(), "c", &a.pem, None);
    let e = KeySet::load_dir(dir.path(), td).unwrap_err().to_string();
    assert!(e.ends_with("c.key hold the same key"), "{e}");
    std::fs::remove_file(dir.path().join("c.key")).unwrap();

    // A key readable by others.
    let path = dir.path().join("b.key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = KeySet::load_dir(dir.path(), td).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{0} is readable by group or others (mode 0644); make it private with `chmod 600 {0}`",
            path.display()
        )
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A broken .nodes file.
    std::fs::write(dir.path().join("a.nodes"), "edge 1\n").unwrap();
    let e = KeySet::load_dir(dir.path(), td).unwrap_err().to_string();
    assert!(e.contains("a.nodes:1:"), "{e}");
}

#[test]
fn the_p256_table_signs_byte_for_byte_as_the_p256_crate() {
    use p256::ecdsa::signature::hazmat::PrehashSigner as _;
    use p256::pkcs8::DecodePrivateKey as _;
    use sha2::Digest as _;
    for i in 0..64u32 {
        let made = testkeys::generate(testkeys::Kind::P256);
        let der = PrivateKeyDer::from_pem_slice(made.pem.as_bytes()).unwrap();
        let key = p256::ecdsa::SigningKey::from_pkcs8_der(der.secret_der()).unwrap();
        let message = format!("message {i}");
        // SHA-256 and SHA-384 digests (the latter truncated to the curve's size).
        let digests = [
            sha2::Sha256::digest(message.as_bytes()).to_vec(),
            sha2::Sha384::digest(message.as_bytes()).to_vec(),
        ];
        for digest in digests {
            let want: p256::ecdsa::DerSignature = key.sign_prehash(&digest).unwrap();
            let got = p256_table::sign_prehash(key.as_nonzero_scalar(), &digest).unwrap();
            assert_eq!(
                got.as_bytes(),
                want.as_bytes(),
                "key {i}, a {}-byte digest",
                digest.len()
            );
        }
    }
    assert!(p256_table::sign_prehash(
        &p256::NonZeroScalar::from_uint(1u64.into()).unwrap(),
        &[1; 15]
    )
    .is_none());
}
