//! `snapshot_yaml` and `snapshot_proto`: the two snapshot decoders.
//!
//! - `snapshot_yaml`: `Snapshot::from_yaml` on the input (as UTF-8, invalid sequences
//!   replaced) never panics; a refusal names at least one field.
//! - `snapshot_proto`: the input decoded as the wire message `pb::Snapshot` (prost) and
//!   converted with `Snapshot::try_from` never panics; the data plane's configuration
//!   digest of what it decoded ignores exactly version, schema and revoked serials.
//!
//! Whatever either accepts must also: validate again; survive the YAML round trip
//! (`to_yaml` then `from_yaml` gives it back); survive the wire round trip (to
//! `pb::Snapshot`, encoded, decoded, converted back); and compile into a data-plane
//! `Policy` (validation accepts exactly what a data plane can index).

use prost::Message;
use ztp_dataplane::handler::Registry;
use ztp_dataplane::snapshot::grpc::config_digest;
use ztp_dataplane::snapshot::Policy;
use ztp_proto::wire::pb;
use ztp_proto::Snapshot;

/// `snapshot_yaml`.
pub fn yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Snapshot::from_yaml(&text) {
        Ok(snap) => accepted(&snap),
        Err(e) => assert!(
            !e.field_errors().is_empty(),
            "a refused snapshot names no field: {e:?}"
        ),
    }
}

/// `snapshot_proto`.
pub fn proto(data: &[u8]) {
    let Ok(msg) = pb::Snapshot::decode(data) else {
        return;
    };
    digest_properties(&msg);
    if let Ok(snap) = Snapshot::try_from(msg) {
        accepted(&snap);
    }
}

/// The data plane's configuration digest (a snapshot with the digest of the one it
/// serves reuses its compiled services and users): defined for every message prost
/// encodes, the same whatever the version, schema and revoked serials, different when
/// the services, users or groups differ.
fn digest_properties(msg: &pb::Snapshot) {
    let digest = |m: &pb::Snapshot| {
        config_digest(&m.encode_to_vec())
            .unwrap_or_else(|| panic!("no digest for prost's own encoding of {m:#?}"))
    };
    let base = digest(msg);
    let mut moved = msg.clone();
    moved.version = moved.version.wrapping_add(1);
    moved.schema = moved.schema.wrapping_add(1);
    moved.revoked.push("0a".into());
    assert_eq!(digest(&moved), base, "version, schema or revoked moved the digest");
    let mut changed = msg.clone();
    changed.groups.push(pb::Group { name: "fuzz".into() });
    assert_ne!(digest(&changed), base, "a group added kept the digest");
    if let Some(u) = msg.users.first() {
        let mut changed = msg.clone();
        changed.users[0].disabled = !u.disabled;
        assert_ne!(digest(&changed), base, "a user's disabled flag kept the digest");
    }
}

/// The properties of a snapshot a decoder accepted.
fn accepted(snap: &Snapshot) {
    if let Err(e) = snap.validate() {
        panic!("an accepted snapshot does not validate: {e}\n{snap:#?}");
    }

    let yaml = snap.to_yaml();
    match Snapshot::from_yaml(&yaml) {
        Ok(back) => assert_eq!(
            &back, snap,
            "the YAML round trip changed the snapshot:\n{yaml}"
        ),
        Err(e) => panic!("to_yaml wrote a document from_yaml refuses: {e}\n{yaml}"),
    }

    let bytes = pb::Snapshot::from(snap).encode_to_vec();
    let msg = pb::Snapshot::decode(bytes.as_slice())
        .unwrap_or_else(|e| panic!("the wire form does not decode: {e}\n{snap:#?}"));
    match Snapshot::try_from(msg) {
        Ok(back) => assert_eq!(&back, snap, "the wire round trip changed the snapshot"),
        Err(e) => panic!("the wire form of an accepted snapshot is refused: {e}\n{snap:#?}"),
    }

    if let Err(e) = Policy::compile(snap, &Registry::builtin()) {
        panic!("a valid snapshot does not compile for the data plane: {e}\n{snap:#?}");
    }
}
