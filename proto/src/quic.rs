//! The QUIC transport's contract (DESIGN.md, "QUIC transport"): ALPN `ztp/1`, one
//! bidirectional stream per session of a tcp service, and, for udp and quic services,
//! QUIC DATAGRAM frames (RFC 9221) that each carry a varint flow id and one datagram.
//!
//! A refusal after the handshake closes the connection with the refusal's code (403, 421,
//! 501, 503) as the application error code and the `ZTP-ERROR` line as the reason.

/// The ALPN protocol clients must offer.
pub const ALPN: &[u8] = b"ztp/1";

/// Application error code of a connection closed without a refusal (drain, the client's
/// own close): the session ended cleanly.
pub const CLOSE_DONE: u32 = 0;

/// Application error code of a stream reset because its backend connection broke in the
/// middle (the session was cut: a clean FIN would say everything arrived).
pub const STREAM_ABORTED: u32 = 1;

/// The largest UDP payload ZTP's QUIC endpoints accept and the ceiling of their path-MTU
/// discovery (both sides). Not part of the contract, a shared setting. quinn's default
/// (1,452) keeps every packet Ethernet-sized; where the path carries more (loopback,
/// jumbo-frame LANs) discovery climbs, and each packet's fixed costs (framing, AEAD,
/// acknowledgements, a kernel datagram) are paid four times less often: on loopback the
/// data plane's CPU per GB fell from 2.2-2.5 times its TCP path's to 1.1-1.4 (`bench`,
/// `quic`). A path that loses the probes stays where it was; a black hole falls back to
/// 1,200. At most 6,500: quinn sends up to 10 packets in one segmented (GSO) send, which
/// must fit one 64 KiB UDP datagram, or the whole batch is lost.
pub const MAX_UDP_PAYLOAD: u16 = 6000;

/// Live datagram flows the data plane serves per connection; datagrams that would open
/// more are dropped (a client keeps to it).
pub const MAX_FLOWS: usize = 64;

/// The largest value a QUIC variable-length integer holds (RFC 9000 §16).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `v` as a QUIC variable-length integer (the shortest encoding). Values over
/// [`VARINT_MAX`] are an error and append nothing.
pub fn put_varint(out: &mut Vec<u8>, v: u64) -> Result<(), VarintTooLarge> {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else if v <= VARINT_MAX {
        out.extend_from_slice(&(v | 0xC000_0000_0000_0000).to_be_bytes());
    } else {
        return Err(VarintTooLarge(v));
    }
    Ok(())
}

/// The number of bytes [`put_varint`] writes for `v`.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..=0x3F => 1,
        0x40..=0x3FFF => 2,
        0x4000..=0x3FFF_FFFF => 4,
        _ => 8,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} does not fit a QUIC varint")]
pub struct VarintTooLarge(pub u64);

/// Reads a varint from the front of `buf`: the value and the bytes that follow it.
/// `None` when `buf` is shorter than the encoding says.
pub fn get_varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3F);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, &buf[len..]))
}

/// A datagram of a flow, as a QUIC DATAGRAM frame's payload carries it.
pub fn encode_datagram(flow: u64, payload: &[u8]) -> Result<Vec<u8>, VarintTooLarge> {
    let mut out = Vec::with_capacity(varint_len(flow) + payload.len());
    put_varint(&mut out, flow)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Splits a DATAGRAM frame's payload into its flow id and datagram; `None` when it is too
/// short to hold its flow id.
pub fn decode_datagram(frame: &[u8]) -> Option<(u64, &[u8])> {
    get_varint(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_length_boundary() {
        for (v, len) in [
            (0, 1),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (VARINT_MAX, 8),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v).unwrap();
            assert_eq!(out.len(), len, "{v}");
            assert_eq!(varint_len(v), len, "{v}");
            out.push(0xAB);
            assert_eq!(get_varint(&out), Some((v, &[0xAB][..])), "{v}");
        }
        assert_eq!(
            put_varint(&mut Vec::new(), VARINT_MAX + 1),
            Err(VarintTooLarge(VARINT_MAX + 1))
        );
    }

    #[test]
    fn rfc9000_examples_decode() {
        // RFC 9000 appendix A.1.
        let cases: &[(&[u8], u64)] = &[
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            (&[0x40, 0x25], 37),
        ];
        for (bytes, v) in cases {
            assert_eq!(get_varint(bytes), Some((*v, &[][..])));
        }
    }

    #[test]
    fn short_input_is_none_not_a_panic() {
        assert_eq!(get_varint(&[]), None);
        assert_eq!(get_varint(&[0x40]), None);
        assert_eq!(get_varint(&[0x80, 0, 0]), None);
        assert_eq!(get_varint(&[0xC0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode_datagram(&[0x41]), None);
    }

    #[test]
    fn datagrams_carry_their_flow() {
        let d = encode_datagram(300, b"dns").unwrap();
        assert_eq!(d, [0x41, 0x2C, b'd', b'n', b's']);
        assert_eq!(decode_datagram(&d), Some((300, &b"dns"[..])));
        assert_eq!(decode_datagram(&[7]), Some((7, &[][..])));
    }
}
