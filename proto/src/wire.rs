//! The gRPC contract (`proto/ztp/config/v1/config.proto`) and its conversions to and from
//! the domain model. A snapshot received from the wire is converted, then validated like
//! any other: the wire is never trusted more than a file.

use crate::model::{Connector, Group, Protocol, Service, Snapshot, User};
use crate::validate::{FieldError, Invalid};

/// The plain protobuf codec, for the calls whose messages are not pre-encoded
/// (`Tunnels`).
pub use tonic_prost::ProstCodec;

/// The generated messages, client and server.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ztp.config.v1");
}

/// The highest snapshot schema this build understands. A node refuses (nacks) a snapshot
/// of a higher schema and keeps serving its last good one, so a rolling upgrade updates
/// data planes first. A snapshot is written with the lowest schema that carries it: 1,
/// 2 when a service has `deny` ranges (an older node would ignore them and admit the
/// sources they refuse, so it must refuse the snapshot instead), 3 when a service names a
/// connector (an older node would dial its address itself); 4 is not a snapshot's but a
/// node's: it takes deltas ([`Delta`]), which carry schema 4 so that an older node refuses
/// one rather than read its changes as a whole configuration.
pub const SCHEMA: u32 = 4;

/// The schema of a delta, and the lowest a node must announce to be sent deltas.
pub const DELTA_SCHEMA: u32 = 4;

/// The lowest schema that carries `s`.
pub fn schema_of(s: &Snapshot) -> u32 {
    if s.services.iter().any(|s| s.connector.is_some()) {
        3
    } else if s.services.iter().any(|s| !s.deny.is_empty()) {
        2
    } else {
        1
    }
}

/// Largest gRPC message either side accepts: a 100,000-user snapshot is ~10 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

impl From<&Snapshot> for pb::Snapshot {
    fn from(s: &Snapshot) -> Self {
        pb::Snapshot {
            schema: schema_of(s),
            version: s.version,
            services: s
                .services
                .iter()
                .map(|s| pb::Service {
                    name: s.name.clone(),
                    protocol: s.protocol.as_str().to_owned(),
                    address: s.address.clone(),
                    groups: s.groups.clone(),
                    allow: s.allow.clone(),
                    handler: s.handler.clone(),
                    deny: s.deny.clone(),
                    connector: s.connector.clone(),
                })
                .collect(),
            users: s
                .users
                .iter()
                .map(|u| pb::User {
                    name: u.name.clone(),
                    identities: u.identities.clone(),
                    groups: u.groups.clone(),
                    disabled: u.disabled,
                })
                .collect(),
            groups: s
                .groups
                .iter()
                .map(|g| pb::Group {
                    name: g.name.clone(),
                })
                .collect(),
            revoked: s.revoked.clone(),
            connectors: s
                .connectors
                .iter()
                .map(|c| pb::Connector {
                    name: c.name.clone(),
                    description: c.description.clone(),
                })
                .collect(),
            ..pb::Snapshot::default()
        }
    }
}

/// What changed from one version to the next (or several later): records created or
/// replaced, records removed (by key), serials revoked and unrevoked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub version: u64,
    pub previous_version: u64,
    pub services: Vec<Service>,
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub connectors: Vec<Connector>,
    pub revoked: Vec<String>,
    /// Service keys (lowercase names).
    pub deleted_services: Vec<String>,
    pub deleted_users: Vec<String>,
    pub deleted_groups: Vec<String>,
    pub deleted_connectors: Vec<String>,
    pub unrevoked: Vec<String>,
}

/// Why a delta was not applied.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta from version {previous} does not follow the applied version {applied}; a full snapshot is needed")]
    Gap { previous: u64, applied: u64 },
    #[error("the configuration after the delta is invalid: {0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// A service's key: its lowercase name (as the control plane's store keys it).
fn service_key(name: &str) -> String {
    crate::names::ServiceName::parse(name)
        .map(|n| n.key())
        .unwrap_or_else(|_| name.to_ascii_lowercase())
}

impl Delta {
    /// Whether it changes nothing but the version.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.users.is_empty()
            && self.groups.is_empty()
            && self.connectors.is_empty()
            && self.revoked.is_empty()
            && self.deleted_services.is_empty()
            && self.deleted_users.is_empty()
            && self.deleted_groups.is_empty()
            && self.deleted_connectors.is_empty()
            && self.unrevoked.is_empty()
    }

    /// `base` with this delta applied, validated as a whole. Refused unless `base` is at
    /// `previous_version`.
    pub fn apply_to(&self, base: &Snapshot) -> Result<Snapshot, DeltaError> {
        use std::collections::{BTreeMap, BTreeSet};
        if base.version != self.previous_version {
            return Err(DeltaError::Gap {
                previous: self.previous_version,
                applied: base.version,
            });
        }
        fn merge<V: Clone>(
            base: &[V],
            upserts: &[V],
            deleted: &[String],
            key: impl Fn(&V) -> String,
        ) -> Vec<V> {
            let mut map: BTreeMap<String, V> = base.iter().map(|v| (key(v), v.clone())).collect();
            for k in deleted {
                map.remove(k);
            }
            for v in upserts {
                map.insert(key(v), v.clone());
            }
            map.into_values().collect()
        }
        let mut revoked: BTreeSet<String> = base.revoked.iter().cloned().collect();
        for s in &self.unrevoked {
            revoked.remove(s);
        }
        revoked.extend(self.revoked.iter().cloned());
        let snap = Snapshot {
            version: self.version,
            services: merge(
                &base.services,
                &self.services,
                &self.deleted_services,
                |s| service_key(&s.name),
            ),
            users: merge(&base.users, &self.users, &self.deleted_users, |u| {
                u.name.clone()
            }),
            groups: merge(&base.groups, &self.groups, &self.deleted_groups, |g| {
                g.name.clone()
            }),
            connectors: merge(
                &base.connectors,
                &self.connectors,
                &self.deleted_connectors,
                |c| c.name.clone(),
            ),
            revoked: revoked.into_iter().collect(),
        };
        snap.validate()?;
        Ok(snap)
    }
}

impl From<&Delta> for pb::Snapshot {
    fn from(d: &Delta) -> Self {
        let records = pb::Snapshot::from(&Snapshot {
            version: d.version,
            services: d.services.clone(),
            users: d.users.clone(),
            groups: d.groups.clone(),
            revoked: d.revoked.clone(),
            connectors: d.connectors.clone(),
        });
        pb::Snapshot {
            schema: DELTA_SCHEMA,
            delta: true,
            previous_version: d.previous_version,
            deleted_services: d.deleted_services.clone(),
            deleted_users: d.deleted_users.clone(),
            deleted_groups: d.deleted_groups.clone(),
            deleted_connectors: d.deleted_connectors.clone(),
            unrevoked: d.unrevoked.clone(),
            ..records
        }
    }
}

impl TryFrom<pb::Snapshot> for Delta {
    type Error = WireError;

    /// Converts the records (they are validated with the configuration they change,
    /// by [`Delta::apply_to`]).
    fn try_from(mut p: pb::Snapshot) -> Result<Self, WireError> {
        if p.schema > SCHEMA {
            return Err(WireError::TooNew {
                found: p.schema,
                known: SCHEMA,
            });
        }
        if !p.delta {
            return Err(Invalid(vec![FieldError {
                field: "delta".into(),
                message: "a whole snapshot where a delta was expected".into(),
            }])
            .into());
        }
        let (previous_version, unrevoked) = (p.previous_version, std::mem::take(&mut p.unrevoked));
        let deleted = (
            std::mem::take(&mut p.deleted_services),
            std::mem::take(&mut p.deleted_users),
            std::mem::take(&mut p.deleted_groups),
            std::mem::take(&mut p.deleted_connectors),
        );
        let records = convert(p)?;
        Ok(Delta {
            version: records.version,
            previous_version,
            services: records.services,
            users: records.users,
            groups: records.groups,
            connectors: records.connectors,
            revoked: records.revoked,
            deleted_services: deleted.0,
            deleted_users: deleted.1,
            deleted_groups: deleted.2,
            deleted_connectors: deleted.3,
            unrevoked,
        })
    }
}

/// The node's end of the stream: its messages encoded with prost; snapshots taken as the
/// raw bytes of each message, to be decoded off the node's workers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeCodec;

impl tonic::codec::Codec for NodeCodec {
    type Encode = pb::NodeMessage;
    type Decode = bytes::Bytes;
    type Encoder = tonic_prost::ProstEncoder<pb::NodeMessage>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// The control plane's end: a snapshot is sent as parts of an encoded `pb::Snapshot`
/// (fields may come in any order, so the parts of one message may be encoded apart and
/// shared between versions and nodes); node messages decoded with prost.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerCodec;

impl tonic::codec::Codec for ServerCodec {
    type Encode = [bytes::Bytes; 2];
    type Decode = pb::NodeMessage;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::NodeMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// A message's bytes, as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        use bytes::Buf as _;
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Parts of one message, already encoded, sent one after the other as one message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = [bytes::Bytes; 2];
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut as _;
        for part in &item {
            dst.put_slice(part);
        }
        Ok(())
    }
}

/// Why a received snapshot cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("snapshot schema {found} is newer than this node understands ({known})")]
    TooNew { found: u32, known: u32 },
    #[error("{0}")]
    Invalid(#[from] Invalid),
}

impl TryFrom<pb::Snapshot> for Snapshot {
    type Error = WireError;

    /// Converts and validates.
    fn try_from(p: pb::Snapshot) -> Result<Self, WireError> {
        if p.schema > SCHEMA {
            return Err(WireError::TooNew {
                found: p.schema,
                known: SCHEMA,
            });
        }
        if p.delta {
            return Err(Invalid(vec![FieldError {
                field: "delta".into(),
                message: "a delta where a whole snapshot was expected".into(),
            }])
            .into());
        }
        let snap = convert(p)?;
        snap.validate()?;
        Ok(snap)
    }
}

/// The records of a wire snapshot or delta in the model's types, not yet validated.
fn convert(p: pb::Snapshot) -> Result<Snapshot, WireError> {
    {
        let mut errors = Vec::new();
        let services = p
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let protocol = match s.protocol.as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "quic" => Protocol::Quic,
                    "auto" | "" => Protocol::Auto,
                    other => {
                        errors.push(FieldError {
                            field: format!("services[{i}].protocol"),
                            message: format!("unknown protocol {other:?}"),
                        });
                        Protocol::Auto
                    }
                };
                Service {
                    name: s.name,
                    protocol,
                    address: s.address,
                    groups: s.groups,
                    allow: s.allow,
                    deny: s.deny,
                    handler: s.handler,
                    connector: s.connector,
                }
            })
            .collect();
        if !errors.is_empty() {
            return Err(Invalid(errors).into());
        }
        let snap = Snapshot {
            version: p.version,
            services,
            users: p
                .users
                .into_iter()
                .map(|u| User {
                    name: u.name,
                    identities: u.identities,
                    groups: u.groups,
                    disabled: u.disabled,
                })
                .collect(),
            groups: p
                .groups
                .into_iter()
                .map(|g| Group { name: g.name })
                .collect(),
            revoked: p.revoked,
            connectors: p
                .connectors
                .into_iter()
                .map(|c| Connector {
                    name: c.name,
                    description: c.description,
                })
                .collect(),
        };
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Snapshot {
        Snapshot::from_yaml(
            "version: 7\nservices:\n  - {name: A.svc.internal, address: ':1', groups: [ops]}\n  - {name: b.svc.internal, address: ':2'}\nusers:\n  - {name: alice, identities: [alice@x], groups: [ops]}\n  - {name: bob, identities: [bob@x]}\ngroups: [{name: ops}, {name: dev}]\nrevoked: ['0a', '0b']\n",
        )
        .unwrap()
    }

    #[test]
    fn a_delta_applies_to_its_base_and_nothing_else() {
        let base = base();
        let delta = Delta {
            version: 9,
            previous_version: 7,
            services: vec![Service {
                groups: vec!["dev".into()],
                ..base.services[0].clone()
            }],
            users: vec![User {
                name: "carol".into(),
                identities: vec!["carol@x".into()],
                groups: vec!["dev".into()],
                disabled: false,
            }],
            deleted_services: vec!["b.svc.internal".into()],
            deleted_users: vec!["bob".into()],
            revoked: vec!["0c".into()],
            unrevoked: vec!["0a".into()],
            ..Delta::default()
        };
        // Over the wire and back.
        let wire = pb::Snapshot::from(&delta);
        assert!(wire.delta);
        assert_eq!(wire.schema, DELTA_SCHEMA);
        let back = Delta::try_from(wire.clone()).unwrap();
        assert_eq!(back, delta);
        // A delta is never read as a whole snapshot, nor a snapshot as a delta.
        assert!(Snapshot::try_from(wire).is_err());
        assert!(Delta::try_from(pb::Snapshot::from(&base)).is_err());

        let next = delta.apply_to(&base).unwrap();
        assert_eq!(next.version, 9);
        let names: Vec<&str> = next.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["A.svc.internal"]);
        assert_eq!(next.services[0].groups, ["dev"]);
        let users: Vec<&str> = next.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(users, ["alice", "carol"]);
        assert_eq!(next.revoked, ["0b", "0c"]);
        // Replayed, or out of order: refused.
        assert!(matches!(
            delta.apply_to(&next),
            Err(DeltaError::Gap {
                previous: 7,
                applied: 9
            })
        ));
        // A delta that would leave the configuration invalid (a group still named).
        let bad = Delta {
            version: 10,
            previous_version: 9,
            deleted_groups: vec!["dev".into()],
            ..Delta::default()
        };
        assert!(matches!(bad.apply_to(&next), Err(DeltaError::Invalid(_))));
        // An older node (schema 3) refuses a delta as too new.
        let mut old = pb::Snapshot::from(&delta);
        old.schema = DELTA_SCHEMA;
        assert!(old.schema > 3);
    }

    #[test]
    fn round_trip_and_refusals() {
        let snap = Snapshot::from_yaml(
            "version: 3\nservices:\n  - {name: a.b, protocol: udp, address: ':1', groups: [g], allow: ['10.0.0.0/8']}\n  - {name: w.b, handler: identity-echo}\nusers: [{name: u, identities: [u@x], groups: [g], disabled: true}]\ngroups: [{name: g}]\nrevoked: ['0a']\n",
        )
        .unwrap();
        let wire = pb::Snapshot::from(&snap);
        assert_eq!(wire.schema, 1, "no deny ranges: readable by schema-1 nodes");
        let mut with_deny = snap.clone();
        with_deny.services[0].deny = vec!["10.9.0.0/16".into()];
        let w2 = pb::Snapshot::from(&with_deny);
        assert_eq!(w2.schema, 2, "deny ranges need a node that knows them");
        assert_eq!(Snapshot::try_from(w2).unwrap(), with_deny);
        assert_eq!(Snapshot::try_from(wire.clone()).unwrap(), snap);

        let mut newer = wire.clone();
        newer.schema = SCHEMA + 1;
        assert!(matches!(
            Snapshot::try_from(newer),
            Err(WireError::TooNew { .. })
        ));

        let mut bad = wire.clone();
        bad.services[0].protocol = "sctp".into();
        let e = Snapshot::try_from(bad).unwrap_err();
        assert!(e.to_string().contains("services[0].protocol"), "{e}");

        let mut bad = wire;
        bad.users[0].groups = vec!["missing".into()];
        let e = Snapshot::try_from(bad).unwrap_err();
        assert!(e.to_string().contains("users[0].groups[0]"), "{e}");
    }
}
