//! The framed-datagram extension (ALPN `ztp-dgram`): many datagrams both ways in one
//! session, each a 2-byte big-endian length and that many bytes (at most 16,384).
//!
//! The framing itself (a pure decoder, bounded) lives in `ztp_proto::framing`, shared
//! with `ztpctl connect`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use ztp_proto::framing::{encode, Decoder, MAX_FRAME};

use super::ClientStream;

/// How a framed session ended, with datagram bytes each way.
#[derive(Debug, Clone, Copy)]
pub struct FramedResult {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: &'static str,
}

/// Carries datagrams between the client's frames and a connected UDP socket until
/// either side closes, an error, or `idle` passes with nothing moving.
pub async fn relay(
    client: &mut ClientStream,
    sock: &UdpSocket,
    idle: Duration,
    revoked: &mut crate::reauth::Revoked,
) -> FramedResult {
    let mut res = FramedResult {
        bytes_up: 0,
        bytes_down: 0,
        end: "closed",
    };
    let mut dec = Decoder::default();
    let mut rbuf = vec![0u8; 16 * 1024];
    // One byte more than a frame can carry, to tell an oversize datagram.
    let mut ubuf = vec![0u8; MAX_FRAME + 1];
    let mut out = Vec::with_capacity(MAX_FRAME + 2);
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = client.read(&mut rbuf) => {
                let n = match r {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => { res.end = "connection error"; break }
                };
                dec.push(&rbuf[..n]);
                loop {
                    match dec.frame() {
                        Ok(Some(frame)) => {
                            // Datagrams are lossy; a refused send is a lost datagram.
                            if let Err(e) = sock.send(frame).await {
                                tracing::debug!(error = %e, "datagram to backend lost");
                            }
                            res.bytes_up += frame.len() as u64;
                            dec.consume_frame();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "bad frame from client");
                            res.end = "bad frame";
                            return finish(client, res).await;
                        }
                    }
                }
            }
            r = sock.recv(&mut ubuf) => {
                match r {
                    Ok(n) if n > MAX_FRAME => {
                        tracing::debug!(bytes = n, "backend datagram too large for a frame; dropped");
                    }
                    Ok(n) => {
                        encode(&ubuf[..n], &mut out);
                        // Bounded: a client that stops reading must not hold the session
                        // past the idle timeout.
                        let write = async {
                            client.write_all(&out).await?;
                            client.flush().await
                        };
                        if !matches!(tokio::time::timeout(idle, write).await, Ok(Ok(()))) {
                            res.end = "connection error";
                            break;
                        }
                        res.bytes_down += n as u64;
                    }
                    // An ICMP error from an earlier send: the datagram was lost.
                    Err(e) => tracing::debug!(error = %e, "backend datagram error"),
                }
            }
            _ = &mut timer => { res.end = "idle timeout"; break }
            reason = revoked.as_mut() => {
                res.end = reason;
                if res.bytes_up == 0 && res.bytes_down == 0 {
                    crate::refusal::deliver(client, crate::refusal::Refusal::Forbidden).await;
                    return res;
                }
                break;
            }
        }
        timer.as_mut().reset(Instant::now() + idle);
    }
    finish(client, res).await
}

async fn finish(client: &mut ClientStream, res: FramedResult) -> FramedResult {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
    res
}
