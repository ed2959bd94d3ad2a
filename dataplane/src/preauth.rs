//! Before any crypto: the connection cap and the source address as rules see it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The cap on concurrent connections. A connection over the cap is closed at once
/// (shed), rather than left waiting in the kernel's backlog.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionCap {
    pub fn new(max: usize) -> Self {
        ConnectionCap {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit held for the connection's life, or `None` when at the cap.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Live connections.
    pub fn active(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Waits until every connection has ended.
    pub async fn all_closed(&self) {
        // The semaphore is never closed, and max fits u32 (the flag is checked).
        let _ = self.permits.acquire_many(self.max as u32).await;
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

    #[test]
    fn mapped_addresses_are_canonicalized() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:5".parse().unwrap());
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn cap_sheds_over_the_limit() {
        let cap = ConnectionCap::new(2);
        let a = cap.try_admit().unwrap();
        let _b = cap.try_admit().unwrap();
        assert!(cap.try_admit().is_none());
        assert_eq!(cap.active(), 2);
        drop(a);
        assert!(cap.try_admit().is_some());
    }
}
