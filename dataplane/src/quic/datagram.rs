//! Datagram flows of a QUIC connection to a udp or quic service (RFC 9221 DATAGRAM
//! frames, each a varint flow id and one datagram).
//!
//! [`Flows`] demultiplexes the connection's datagrams by flow id: a new id is a new flow,
//! served as its own session (one backend socket, one connection record) by the
//! service's forwarder through [`QuicFlow`], a [`DatagramChannel`]. Answers carry the
//! flow id they answer. Bounded: [`MAX_FLOWS`] live flows per connection, each with a
//! queue of [`FLOW_QUEUE`] datagrams (a full queue drops, as a network would), and a flow
//! ends when idle for `--udp-idle`.

use std::collections::HashMap;
use std::io;

use bytes::Bytes;
use quinn::{Connection, SendDatagramError};
use tokio::sync::mpsc;
use ztp_proto::framing::MAX_FRAME;
use ztp_proto::quic::{decode_datagram, put_varint};

use crate::handler::{BoxIo, DatagramChannel};

/// Live flows per connection; datagrams that would open more are dropped.
pub const MAX_FLOWS: usize = ztp_proto::quic::MAX_FLOWS;
/// Datagrams queued towards one flow's backend socket.
pub const FLOW_QUEUE: usize = 64;

/// Where a connection's datagrams go, by flow id.
#[derive(Debug, Default)]
pub struct Flows {
    live: HashMap<u64, mpsc::Sender<Bytes>>,
}

/// What [`Flows::dispatch`] did with a datagram.
#[derive(Debug)]
pub enum Dispatched {
    /// Queued to its live flow (or dropped because that flow's queue is full).
    Queued,
    /// The first datagram of a new flow: serve the flow.
    New(QuicFlowStart),
    /// Dropped: no flow id, or too many flows.
    Dropped(&'static str),
}

/// A new flow, to be served by the caller.
#[derive(Debug)]
pub struct QuicFlowStart {
    pub flow: u64,
    pub queue: mpsc::Receiver<Bytes>,
}

impl Flows {
    /// Sends `frame` (a DATAGRAM frame's payload) to its flow.
    pub fn dispatch(&mut self, frame: Bytes) -> Dispatched {
        let Some((flow, payload)) = decode_datagram(&frame) else {
            return Dispatched::Dropped("no flow id");
        };
        let mut payload = frame.slice(frame.len() - payload.len()..);
        if let Some(tx) = self.live.get(&flow) {
            match tx.try_send(payload) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => return Dispatched::Queued,
                // The flow ended (idle): the id starts a new one.
                Err(mpsc::error::TrySendError::Closed(p)) => {
                    payload = p;
                    self.live.remove(&flow);
                }
            }
        }
        if self.live.len() >= MAX_FLOWS {
            self.live.retain(|_, tx| !tx.is_closed());
            if self.live.len() >= MAX_FLOWS {
                return Dispatched::Dropped("too many flows");
            }
        }
        let (tx, queue) = mpsc::channel(FLOW_QUEUE);
        let _ = tx.try_send(payload);
        self.live.insert(flow, tx);
        Dispatched::New(QuicFlowStart { flow, queue })
    }

    /// Forgets a flow that was not started (its first datagram is dropped).
    pub fn forget(&mut self, flow: u64) {
        self.live.remove(&flow);
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.live.values().filter(|tx| !tx.is_closed()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One flow's datagrams, both ways, as a [`DatagramChannel`].
#[derive(Debug)]
pub struct QuicFlow {
    flow: u64,
    conn: Connection,
    queue: mpsc::Receiver<Bytes>,
    out: Vec<u8>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl QuicFlow {
    pub fn new(conn: Connection, start: QuicFlowStart) -> Self {
        QuicFlow {
            flow: start.flow,
            conn,
            queue: start.queue,
            out: Vec::new(),
            bytes_up: 0,
            bytes_down: 0,
        }
    }
}

impl DatagramChannel for QuicFlow {
    fn recv<'a>(&'a mut self, buf: &'a mut Vec<u8>) -> BoxIo<'a, bool> {
        Box::pin(async move {
            // Cancel-safe: a datagram is taken whole from the queue or not at all.
            match self.queue.recv().await {
                Some(d) => {
                    buf.clear();
                    buf.extend_from_slice(&d);
                    self.bytes_up += d.len() as u64;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    fn send<'a>(&'a mut self, datagram: &'a [u8]) -> BoxIo<'a, ()> {
        Box::pin(async move {
            if datagram.len() > MAX_FRAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "datagram too large",
                ));
            }
            self.out.clear();
            // A flow id came from a varint: it fits one.
            let _ = put_varint(&mut self.out, self.flow);
            self.out.extend_from_slice(datagram);
            match self.conn.send_datagram(Bytes::copy_from_slice(&self.out)) {
                Ok(()) => {
                    self.bytes_down += datagram.len() as u64;
                    Ok(())
                }
                // Larger than the path carries now: lost, as on a network.
                Err(SendDatagramError::TooLarge) => {
                    tracing::debug!(
                        bytes = datagram.len(),
                        max = self.conn.max_datagram_size(),
                        "datagram too large for the client's path; dropped"
                    );
                    Ok(())
                }
                Err(e) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztp_proto::quic::encode_datagram;

    #[test]
    fn datagrams_go_to_their_flow_and_flows_are_bounded() {
        let mut flows = Flows::default();
        let Dispatched::New(mut a) = flows.dispatch(encode_datagram(1, b"a1").unwrap().into())
        else {
            panic!("a new flow");
        };
        assert_eq!(a.flow, 1);
        assert!(matches!(
            flows.dispatch(encode_datagram(1, b"a2").unwrap().into()),
            Dispatched::Queued
        ));
        assert_eq!(a.queue.try_recv().unwrap(), &b"a1"[..]);
        assert_eq!(a.queue.try_recv().unwrap(), &b"a2"[..]);
        assert!(matches!(
            flows.dispatch(Bytes::from_static(&[0x40])),
            Dispatched::Dropped("no flow id")
        ));
        let mut held = vec![a];
        for id in 2..=MAX_FLOWS as u64 {
            match flows.dispatch(encode_datagram(id, b"x").unwrap().into()) {
                Dispatched::New(f) => held.push(f),
                other => panic!("flow {id}: {other:?}"),
            }
        }
        assert_eq!(flows.len(), MAX_FLOWS);
        assert!(matches!(
            flows.dispatch(encode_datagram(1000, b"x").unwrap().into()),
            Dispatched::Dropped("too many flows")
        ));
        // A flow that ended frees its place, and its id starts a new flow.
        drop(held.remove(0));
        assert!(matches!(
            flows.dispatch(encode_datagram(1000, b"x").unwrap().into()),
            Dispatched::New(_)
        ));
        drop(held.remove(0));
        assert!(matches!(
            flows.dispatch(encode_datagram(2, b"x").unwrap().into()),
            Dispatched::New(_)
        ));
    }

    #[test]
    fn a_full_flow_queue_drops() {
        let mut flows = Flows::default();
        let Dispatched::New(mut f) = flows.dispatch(encode_datagram(5, b"0").unwrap().into())
        else {
            panic!("a new flow");
        };
        for i in 0..FLOW_QUEUE * 2 {
            let d = encode_datagram(5, format!("{i}").as_bytes()).unwrap();
            assert!(matches!(flows.dispatch(d.into()), Dispatched::Queued));
        }
        let mut n = 0;
        while f.queue.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, FLOW_QUEUE);
    }
}
