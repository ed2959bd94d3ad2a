#!/usr/bin/env python3
"""An independent QUIC client of ZTP's QUIC transport, on aioquic (not quinn).

It speaks DESIGN.md's contract from its text alone: ALPN ztp/1, SNI = the service, a
client certificate; a tcp service's session is one bidirectional stream (FIN = EOF); a udp
service's datagrams are QUIC DATAGRAM frames carrying a varint flow id, then the
datagram. It prints one JSON line: what came back, or how the connection was closed.

    ztp_quic_peer.py --connect 127.0.0.1:9743 --sni echo.svc.internal \
        --cert alice.pem --key alice.key --ca ca.pem stream --data hello
    ztp_quic_peer.py ... datagram --flow 7 --data hello
"""

import argparse
import asyncio
import json
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived


def put_varint(v):
    if v < 1 << 6:
        return bytes([v])
    if v < 1 << 14:
        return (v | 0x4000).to_bytes(2, "big")
    if v < 1 << 30:
        return (v | 0x80000000).to_bytes(4, "big")
    return (v | 0xC000000000000000).to_bytes(8, "big")


def get_varint(b):
    n = 1 << (b[0] >> 6)
    v = b[0] & 0x3F
    for x in b[1:n]:
        v = (v << 8) | x
    return v, b[n:]


PEERS = []


class Peer(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        PEERS.append(self)
        self.datagrams = asyncio.Queue()
        self.terminated = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event):
        if isinstance(event, DatagramFrameReceived):
            self.datagrams.put_nowait(event.data)
        elif isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(event)
        super().quic_event_received(event)


def closed(event):
    return {
        "closed": True,
        "error_code": event.error_code,
        "reason": event.reason_phrase,
    }


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--sni")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca", required=True)
    p.add_argument("--alpn", default="ztp/1")
    p.add_argument("mode", choices=["stream", "datagram"])
    p.add_argument("--data", default="")
    p.add_argument("--flow", type=int, default=0)
    a = p.parse_args()
    host, port = a.connect.rsplit(":", 1)
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[a.alpn] if a.alpn else None,
        server_name=a.sni,
        max_datagram_frame_size=65536,
        idle_timeout=10.0,
    )
    config.load_verify_locations(a.ca)
    if a.cert:
        config.load_cert_chain(a.cert, a.key)
    try:
        async with connect(
            host.strip("[]"), int(port), configuration=config, create_protocol=Peer,
            wait_connected=True,
        ) as peer:
            if a.mode == "stream":
                reader, writer = await peer.create_stream()
                writer.write(a.data.encode())
                writer.write_eof()
                read = asyncio.ensure_future(reader.read())
                done, _ = await asyncio.wait(
                    [read, peer.terminated], timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
                # A connection close also ends the stream's reader: the close says more.
                if peer.terminated.done():
                    print(json.dumps(closed(peer.terminated.result())))
                elif read in done and not read.exception():
                    print(json.dumps({"data": read.result().decode(errors="replace")}))
                else:
                    print(json.dumps({"error": "no answer"}))
            else:
                peer._quic.send_datagram_frame(put_varint(a.flow) + a.data.encode())
                peer.transmit()
                got = asyncio.ensure_future(peer.datagrams.get())
                done, _ = await asyncio.wait(
                    [got, peer.terminated], timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
                if got in done:
                    flow, payload = get_varint(got.result())
                    print(json.dumps({"flow": flow, "data": payload.decode(errors="replace")}))
                elif peer.terminated.done():
                    print(json.dumps(closed(peer.terminated.result())))
                else:
                    print(json.dumps({"error": "no answer"}))
    except ConnectionError as e:
        # The handshake failed: the close the protocol saw says how.
        if PEERS and PEERS[0].terminated.done():
            print(json.dumps(closed(PEERS[0].terminated.result())))
        else:
            print(json.dumps({"closed": True, "error": str(e)}))


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
