//! What a client is told when it is refused after the handshake.
//!
//! [`Refusal`] is the only error a client ever sees: a code and a fixed reason, written as
//! one `ZTP-ERROR` line of TLS application data (DESIGN.md "Refusals"). Internal details
//! stay in the logs. Delivery is careful: the line, then close_notify, then our write side
//! shut, then a short drain of what the client still sends, so that the client reads the
//! line instead of a TCP reset.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A refusal after the handshake, before the first forwarded byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No user for the identity, user disabled, not in the service's groups.
    Forbidden,
    /// The service vanished between handshake and lookup.
    Misdirected,
    /// The service's handler does not support its protocol.
    NotImplemented,
    /// The backend refused or is unreachable.
    BadGateway,
    /// The backend connect timed out.
    GatewayTimeout,
    /// The service's connector has no live tunnel to any replica.
    Unavailable,
}

impl Refusal {
    pub fn code(self) -> u16 {
        match self {
            Refusal::Forbidden => 403,
            Refusal::Misdirected => 421,
            Refusal::NotImplemented => 501,
            Refusal::BadGateway => 502,
            Refusal::GatewayTimeout => 504,
            Refusal::Unavailable => 503,
        }
    }

    /// The exact line of DESIGN.md, newline included.
    pub fn line(self) -> &'static str {
        match self {
            Refusal::Forbidden => "ZTP-ERROR 403 forbidden\n",
            Refusal::Misdirected => "ZTP-ERROR 421 misdirected\n",
            Refusal::NotImplemented => "ZTP-ERROR 501 not implemented\n",
            Refusal::BadGateway => "ZTP-ERROR 502 bad gateway\n",
            Refusal::GatewayTimeout => "ZTP-ERROR 504 gateway timeout\n",
            Refusal::Unavailable => "ZTP-ERROR 503 unavailable\n",
        }
    }
}

/// How long a refused client may keep us busy while it reads the line.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of what a refused client still sends is read and dropped.
const DRAIN_LIMIT: usize = 1 << 20;

/// Writes the refusal line and closes gracefully; never fails (a client that is gone is
/// gone).
pub async fn deliver<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(stream: &mut S, refusal: Refusal) {
    send_and_close(stream, refusal.line().as_bytes()).await
}

/// Writes `bytes`, sends close_notify and shuts the write side, then drains briefly.
pub async fn send_and_close<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    bytes: &[u8],
) {
    let _ = tokio::time::timeout(DELIVERY_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.shutdown().await?;
        drain(stream).await;
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Reads and drops until end of stream, error, or the limit; keeps the kernel from
/// answering unread bytes with a reset that would destroy the line in flight.
async fn drain<S: AsyncRead + Unpin + ?Sized>(stream: &mut S) {
    // On the heap: an array here would make every connection's task 4 KiB bigger for
    // its whole life, refused or not.
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    while total < DRAIN_LIMIT {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_design() {
        for r in [
            Refusal::Forbidden,
            Refusal::Misdirected,
            Refusal::NotImplemented,
            Refusal::BadGateway,
            Refusal::GatewayTimeout,
        ] {
            let line = r.line();
            assert!(line.starts_with(&format!("ZTP-ERROR {} ", r.code())));
            assert!(line.ends_with('\n') && line.len() < 40);
        }
    }
}
