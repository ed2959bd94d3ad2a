//! Before any crypto: who may connect at all, and how much.
//!
//! Cheap refusals first, in this order: the listener's deny and allow ranges, the cap on
//! concurrent connections in total, the cap per source, and the rate of new connections
//! per source (a token bucket). A refused connection is closed at once (shed), never left
//! waiting in the kernel's backlog, and nothing is read from it. A source is an IPv4
//! address or an IPv6 /64 (one host's usual share), after IPv4-mapped addresses are turned
//! back into IPv4 ([`ztp_infra::source`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use ztp_infra::source::{self, Source};

/// What the listener admits.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Concurrent connections in total.
    pub max_connections: usize,
    /// Concurrent connections per source; 0: no limit.
    pub per_source: u32,
    /// New connections per second per source (and the burst allowed); 0: no limit.
    pub rate_per_source: u32,
    /// Sources admitted; empty: any (that `deny` does not name).
    pub allow: Vec<IpNet>,
    /// Sources refused, whatever `allow` says.
    pub deny: Vec<IpNet>,
}

/// Why a connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The source is in a deny range or outside the allow ranges.
    Denied,
    /// The cap on connections in total.
    Cap,
    /// The cap on connections from this source.
    SourceCap,
    /// Too many new connections from this source.
    Rate,
}

impl Shed {
    /// The metric label and log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Denied => "source not allowed",
            Shed::Cap => "connection cap",
            Shed::SourceCap => "source connection cap",
            Shed::Rate => "source rate",
        }
    }
}

/// Sources whose rate is tracked at most; past it, sources with a full bucket are
/// forgotten, and if none is full a new source is admitted without a rate (the caps still
/// hold).
const MAX_SOURCES: usize = 65_536;

/// A source's token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// The preauth gate of one listener.
#[derive(Debug, Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    permits: Arc<Semaphore>,
    /// Live connections per source, when capped.
    sources: Option<source::Counter>,
    /// Token buckets per source, when rated.
    rates: Mutex<HashMap<Source, Bucket>>,
}

/// Held for a session's life: a QUIC stream or datagram flow, which counts against
/// `--max-connections` like a connection (one QUIC connection can hold hundreds).
#[derive(Debug)]
pub struct SessionPermit {
    _total: OwnedSemaphorePermit,
}

/// Held for a connection's life.
#[derive(Debug)]
pub struct Permit {
    _total: OwnedSemaphorePermit,
    _source: Option<source::Place>,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        // The total is the semaphore's: the counter counts per source only.
        let sources = (limits.per_source > 0).then(|| {
            source::Counter::new(source::Caps {
                total: usize::MAX,
                per_source: limits.per_source as usize,
            })
        });
        Gate {
            inner: Arc::new(Inner {
                limits,
                permits,
                sources,
                rates: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether `ip` (canonical) is within the listener's ranges (`--allow`, `--deny`):
    /// the check a QUIC connection that moved to a new address must pass again.
    pub fn in_range(&self, ip: IpAddr) -> bool {
        let l = &self.inner.limits;
        ztp_proto::names::source_admitted(&l.allow, &l.deny, ip)
    }

    /// A place for one more session of an admitted connection under the total cap;
    /// `None` when the node is full.
    pub fn session(&self) -> Option<SessionPermit> {
        self.inner
            .permits
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| SessionPermit { _total: p })
    }

    /// Admits a connection from `ip` (canonical), or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Shed> {
        let l = &self.inner.limits;
        if !ztp_proto::names::source_admitted(&l.allow, &l.deny, ip) {
            return Err(Shed::Denied);
        }
        let total = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Shed::Cap)?;
        if l.per_source == 0 && l.rate_per_source == 0 {
            return Ok(Permit {
                _total: total,
                _source: None,
            });
        }
        let key = Source::of(ip);
        // The cap is checked before the rate spends a token; a refusal by the rate drops
        // `place`, so a refused connection holds nothing.
        let place = match &self.inner.sources {
            Some(counter) => Some(counter.admit(key).map_err(|_| Shed::SourceCap)?),
            None => None,
        };
        if l.rate_per_source > 0 && !self.take_token(key, l.rate_per_source) {
            return Err(Shed::Rate);
        }
        Ok(Permit {
            _total: total,
            _source: place,
        })
    }

    /// Takes one of `key`'s tokens, if it has one; the bucket holds `rate` and refills
    /// `rate` a second.
    fn take_token(&self, key: Source, rate: u32) -> bool {
        let now = Instant::now();
        let burst = f64::from(rate);
        let mut map = self.inner.rates.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SOURCES && !map.contains_key(&key) {
            map.retain(|_, b| {
                b.tokens + now.duration_since(b.refilled).as_secs_f64() * burst < burst
            });
            if map.len() >= MAX_SOURCES {
                return true;
            }
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * burst).min(burst);
        b.refilled = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.inner.limits.max_connections - self.inner.permits.available_permits()
    }

    /// Waits until every connection has ended.
    pub async fn all_closed(&self) {
        // The semaphore is never closed, and max fits u32 (the flag is checked).
        let _ = self
            .inner
            .permits
            .acquire_many(self.inner.limits.max_connections as u32)
            .await;
    }
}

/// The peer address with an IPv4-mapped IPv6 address turned back into IPv4, so that
/// address rules and logs see `192.0.2.1`, not `::ffff:192.0.2.1`.
pub fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gate(f: impl FnOnce(&mut Limits)) -> Gate {
        let mut l = Limits {
            max_connections: 100,
            ..Limits::default()
        };
        f(&mut l);
        Gate::new(l)
    }

    #[test]
    fn mapped_addresses_are_canonicalized() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:5".parse().unwrap());
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn cap_sheds_over_the_limit() {
        let g = gate(|l| l.max_connections = 2);
        let a = g.admit(ip("192.0.2.1")).unwrap();
        let _b = g.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(g.admit(ip("192.0.2.3")).unwrap_err(), Shed::Cap);
        assert_eq!(g.active(), 2);
        drop(a);
        assert!(g.admit(ip("192.0.2.3")).is_ok());
    }

    #[test]
    fn per_source_cap_counts_live_connections_of_one_source() {
        let g = gate(|l| l.per_source = 2);
        let a = g.admit(ip("192.0.2.1")).unwrap();
        let _b = g.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Shed::SourceCap);
        assert!(g.admit(ip("192.0.2.9")).is_ok(), "other sources unaffected");
        drop(a);
        assert!(
            g.admit(ip("192.0.2.1")).is_ok(),
            "a closed one frees its place"
        );
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let g = gate(|l| l.per_source = 1);
        let _a = g.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            g.admit(ip("2001:db8:1:2::ffff")).unwrap_err(),
            Shed::SourceCap
        );
        assert!(g.admit(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn rate_refuses_past_the_burst_and_refills() {
        let g = gate(|l| l.rate_per_source = 5);
        let held: Vec<_> = (0..5).map(|_| g.admit(ip("192.0.2.1")).unwrap()).collect();
        drop(held);
        assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Shed::Rate);
        assert!(g.admit(ip("192.0.2.2")).is_ok(), "per source");
        std::thread::sleep(std::time::Duration::from_millis(450));
        assert!(g.admit(ip("192.0.2.1")).is_ok(), "refilled at 5/s");
    }

    #[test]
    fn deny_wins_over_allow() {
        let g = gate(|l| {
            l.allow = vec!["10.0.0.0/8".parse().unwrap()];
            l.deny = vec!["10.9.0.0/16".parse().unwrap()];
        });
        assert!(g.admit(ip("10.1.2.3")).is_ok());
        assert_eq!(g.admit(ip("10.9.2.3")).unwrap_err(), Shed::Denied);
        assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Shed::Denied);
    }

    #[test]
    fn refused_connections_hold_nothing() {
        let g = gate(|l| {
            l.max_connections = 1;
            l.per_source = 5;
        });
        let a = g.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(g.admit(ip("192.0.2.1")).unwrap_err(), Shed::Cap);
        drop(a);
        assert_eq!(g.active(), 0);
        assert_eq!(g.inner.sources.as_ref().unwrap().total(), 0);
    }
}
