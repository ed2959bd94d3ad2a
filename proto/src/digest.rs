//! The configuration digest: one 256-bit value for a configuration's content, whatever
//! the order of its records, kept up to date record by record.
//!
//! Each record (service, user, group, connector, revoked serial) is hashed alone with
//! SHA-256 over a fixed encoding of its fields; the digest is the sum of those hashes,
//! four 64-bit lanes each added modulo 2^64. Adding a record adds its hash; removing it
//! subtracts it. So the control plane and a node, which hold the same records in
//! different orders and reach them by different paths (whole snapshots, deltas), compute
//! equal digests exactly when they hold the same records, at a cost per change that does
//! not grow with the configuration. It detects corruption and divergence; it is not a
//! signature.

use std::fmt;

use crate::model::{Connector, Group, Service, Snapshot, User};
use crate::names::Serial;

/// The digest of a set of records.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Digest([u64; 4]);

/// One record, as the digest sees it.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    Service(&'a Service),
    User(&'a User),
    Group(&'a Group),
    Connector(&'a Connector),
    Revoked(&'a Serial),
}

impl Digest {
    /// The digest of a whole snapshot's records (its version is not part of it). A
    /// revoked serial that does not parse counts as nothing: a valid snapshot has none.
    pub fn of(snap: &Snapshot) -> Digest {
        let mut d = Digest::default();
        for s in &snap.services {
            d.add(Record::Service(s));
        }
        for u in &snap.users {
            d.add(Record::User(u));
        }
        for g in &snap.groups {
            d.add(Record::Group(g));
        }
        for c in &snap.connectors {
            d.add(Record::Connector(c));
        }
        for r in &snap.revoked {
            if let Ok(s) = Serial::parse_hex(r) {
                d.add(Record::Revoked(&s));
            }
        }
        d
    }

    pub fn add(&mut self, r: Record<'_>) {
        let h = hash(r);
        for (lane, x) in self.0.iter_mut().zip(h) {
            *lane = lane.wrapping_add(x);
        }
    }

    pub fn remove(&mut self, r: Record<'_>) {
        let h = hash(r);
        for (lane, x) in self.0.iter_mut().zip(h) {
            *lane = lane.wrapping_sub(x);
        }
    }

    /// The 32 bytes sent on the wire (each lane big endian).
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, lane) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&lane.to_be_bytes());
        }
        out
    }

    /// From [`Digest::to_bytes`]' form; `None` unless exactly 32 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Digest> {
        if b.len() != 32 {
            return None;
        }
        let mut d = Digest::default();
        for (lane, chunk) in d.0.iter_mut().zip(b.chunks_exact(8)) {
            *lane = u64::from_be_bytes(chunk.try_into().ok()?);
        }
        Some(d)
    }
}

impl fmt::Display for Digest {
    /// The first 8 bytes in hex: enough to tell two apart in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0[0])
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// The fixed encoding of a record's fields: a kind tag, then each field in order, each
/// string as its length (u32, big endian) and bytes, each list as its length and items,
/// each optional field as a presence byte and value. Changing it changes every digest:
/// both planes must agree, so it is versioned by the tag's first byte.
fn hash(r: Record<'_>) -> [u64; 4] {
    let mut e = Encoder(ring::digest::Context::new(&ring::digest::SHA256));
    match r {
        Record::Service(s) => {
            e.tag(b"1service");
            e.str(&s.name);
            e.str(s.protocol.as_str());
            e.opt(s.address.as_deref());
            e.list(&s.groups);
            e.list(&s.allow);
            e.list(&s.deny);
            e.opt(s.handler.as_deref());
            e.opt(s.connector.as_deref());
        }
        Record::User(u) => {
            e.tag(b"1user");
            e.str(&u.name);
            e.list(&u.identities);
            e.list(&u.groups);
            e.0.update(&[u8::from(u.disabled)]);
        }
        Record::Group(g) => {
            e.tag(b"1group");
            e.str(&g.name);
        }
        Record::Connector(c) => {
            e.tag(b"1connector");
            e.str(&c.name);
            e.str(&c.description);
        }
        Record::Revoked(s) => {
            e.tag(b"1revoked");
            e.str(&s.to_string());
        }
    }
    let d = e.0.finish();
    let mut lanes = [0u64; 4];
    for (lane, chunk) in lanes.iter_mut().zip(d.as_ref().chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *lane = u64::from_be_bytes(b);
    }
    lanes
}

struct Encoder(ring::digest::Context);

impl Encoder {
    fn tag(&mut self, t: &[u8]) {
        self.str_bytes(t);
    }

    fn str_bytes(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u32).to_be_bytes());
        self.0.update(b);
    }

    fn str(&mut self, s: &str) {
        self.str_bytes(s.as_bytes());
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.0.update(&[0]),
            Some(s) => {
                self.0.update(&[1]);
                self.str(s);
            }
        }
    }

    fn list(&mut self, l: &[String]) {
        self.0.update(&(l.len() as u32).to_be_bytes());
        for s in l {
            self.str(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(yaml: &str) -> Snapshot {
        Snapshot::from_yaml(yaml).unwrap()
    }

    #[test]
    fn equal_records_in_any_order_give_equal_digests_and_any_change_another() {
        let a = snap(
            "version: 1\nservices: [{name: a.svc, address: ':1', groups: [g]}]\nusers: [{name: u, identities: [x], groups: [g]}, {name: v, identities: [y]}]\ngroups: [{name: g}]\nrevoked: ['0a']\n",
        );
        let mut b = a.clone();
        b.users.reverse();
        b.version = 9;
        b.revoked = vec!["0x0A".into()];
        assert_eq!(
            Digest::of(&a),
            Digest::of(&b),
            "order, version, serial spelling"
        );
        type Change = Box<dyn Fn(&mut Snapshot)>;
        let changes: Vec<Change> = vec![
            Box::new(|s| s.users[0].disabled = true),
            Box::new(|s| s.users[0].identities.push("z".into())),
            Box::new(|s| s.users[0].groups.clear()),
            Box::new(|s| s.users.pop().map(drop).unwrap_or(())),
            Box::new(|s| s.services[0].allow.push("10.0.0.0/8".into())),
            Box::new(|s| s.services[0].deny.push("10.0.0.0/8".into())),
            Box::new(|s| s.services[0].address = Some(":2".into())),
            Box::new(|s| s.services[0].protocol = crate::Protocol::Udp),
            Box::new(|s| s.revoked.push("0b".into())),
            Box::new(|s| s.groups.push(Group { name: "h".into() })),
            // The same strings in another field: the encoding keeps fields apart.
            Box::new(|s| {
                let g = std::mem::take(&mut s.services[0].groups);
                s.services[0].allow = g;
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(Digest::of(&a), Digest::of(&c), "change {i}");
        }
    }

    #[test]
    fn removing_a_record_undoes_adding_it_and_bytes_round_trip() {
        let a = snap("version: 1\nusers: [{name: u, identities: [x]}]\n");
        let mut d = Digest::of(&a);
        let extra = User {
            name: "w".into(),
            identities: vec!["w@x".into()],
            groups: vec![],
            disabled: false,
        };
        d.add(Record::User(&extra));
        assert_ne!(d, Digest::of(&a));
        d.remove(Record::User(&extra));
        assert_eq!(d, Digest::of(&a));
        assert_eq!(Digest::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(Digest::from_bytes(&[0; 31]), None);
        assert_ne!(Digest::of(&a), Digest::default());
    }
}
