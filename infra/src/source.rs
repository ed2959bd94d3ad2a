//! Per-source limits: what counts as one source, and live connections counted in all and
//! per source within caps (the listener's preauth gate and the admin ports both count
//! this way).
//!
//! A source is an IPv4 address (an IPv4-mapped IPv6 address counts as IPv4), or an IPv6
//! /64: one host's usual share, so that a client cannot escape a per-source cap by
//! hopping addresses within its own prefix.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// One source, for per-source limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    /// The /64 prefix: an address's high 64 bits.
    V6(u64),
}

impl Source {
    /// The source `ip` belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => Source::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The caps of a [`Counter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Live connections in all.
    pub total: usize,
    /// Live connections from one source.
    pub per_source: usize,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The cap in all.
    Total,
    /// The cap of the connection's source.
    Source,
}

/// Live connections, in all and per source. Cloning shares the counts.
#[derive(Debug, Clone)]
pub struct Counter {
    caps: Caps,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only sources with a live connection: at most `caps.total` entries.
    per_source: HashMap<Source, usize>,
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Place {
    counts: Arc<Mutex<Counts>>,
    source: Source,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

impl Counter {
    pub fn new(caps: Caps) -> Counter {
        Counter {
            caps,
            counts: Arc::default(),
        }
    }

    /// A place for one more connection from `source`, or the cap it would break (the
    /// total is checked first). A refusal counts nothing.
    pub fn admit(&self, source: Source) -> Result<Place, Over> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.caps.total {
            return Err(Over::Total);
        }
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.caps.per_source {
            return Err(Over::Source);
        }
        c.total += 1;
        *c.per_source.entry(source).or_insert(0) += 1;
        Ok(Place {
            counts: self.counts.clone(),
            source,
        })
    }

    /// Live connections in all.
    pub fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let source = |s: &str| Source::of(ip(s));
        assert_eq!(source("::ffff:192.0.2.7"), source("192.0.2.7"));
        assert_ne!(source("192.0.2.8"), source("192.0.2.7"));
        assert_eq!(source("2001:db8:1:2:aaaa::1"), source("2001:db8:1:2::"));
        assert_eq!(source("2001:db8:1:2:ffff::9"), source("2001:db8:1:2::1"));
        assert_ne!(source("2001:db8:1:3::1"), source("2001:db8:1:2::1"));
        assert_ne!(source("::1"), source("0.0.0.1"));
    }

    #[test]
    fn caps_count_live_places_in_all_and_per_source() {
        let c = Counter::new(Caps {
            total: 3,
            per_source: 2,
        });
        let a = Source::of(ip("192.0.2.1"));
        let b = Source::of(ip("192.0.2.2"));
        let a1 = c.admit(a).unwrap();
        let _a2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).unwrap_err(), Over::Source);
        let _b1 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).unwrap_err(), Over::Total);
        assert_eq!(c.total(), 3);
        drop(a1);
        assert_eq!(c.total(), 2);
        let _a3 = c.admit(a).unwrap();
        assert_eq!(c.counts.lock().unwrap().per_source.len(), 2);
    }

    #[test]
    fn a_source_with_nothing_live_is_forgotten() {
        let c = Counter::new(Caps {
            total: 10,
            per_source: 10,
        });
        let places: Vec<_> = (1..=5)
            .map(|i| c.admit(Source::of(ip(&format!("192.0.2.{i}")))).unwrap())
            .collect();
        drop(places);
        assert_eq!(c.total(), 0);
        assert!(c.counts.lock().unwrap().per_source.is_empty());
    }
}
