//! `snapshot_yaml` and `snapshot_proto`: the two snapshot decoders.
//!
//! - `snapshot_yaml`: `Snapshot::from_yaml` on the input (as UTF-8, invalid sequences
//!   replaced) never panics; a refusal names at least one field.
//! - `snapshot_proto`: the input decoded as the wire message `pb::Snapshot` (prost) and
//!   converted with `Snapshot::try_from` never panics.
//!
//! Whatever either accepts must also: validate again; survive the YAML round trip
//! (`to_yaml` then `from_yaml` gives it back); survive the wire round trip (to
//! `pb::Snapshot`, encoded, decoded, converted back); and compile into a data-plane
//! `Policy` (validation accepts exactly what a data plane can index).

use prost::Message;
use ztp_dataplane::handler::Registry;
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
    if let Ok(snap) = Snapshot::try_from(msg) {
        accepted(&snap);
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
