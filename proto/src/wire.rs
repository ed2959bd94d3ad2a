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
/// connector (an older node would dial its address itself).
pub const SCHEMA: u32 = 3;

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
        }
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
        snap.validate()?;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
