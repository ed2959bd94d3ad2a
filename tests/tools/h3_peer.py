#!/usr/bin/env python3
"""A real HTTP/3 server and client (aioquic), to carry an HTTP/3 exchange through ZTP.

    h3_peer.py server --listen 127.0.0.1:4433 --cert c.pem --key k.pem
        prints "listening" once bound; answers every request with 200 and
        "hello over h3: <path>"
    h3_peer.py client --connect 127.0.0.1:5353 --sni h3.example --ca c.pem --path /x
        prints one JSON line: {"status": 200, "body": "..."} or {"error": "..."}
"""

import argparse
import asyncio
import json
import sys

from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None

    def quic_event_received(self, event):
        if self.h3 is None:
            self.h3 = H3Connection(self._quic)
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                path = dict(e.headers).get(b":path", b"/").decode()
                body = f"hello over h3: {path}".encode()
                self.h3.send_headers(
                    e.stream_id,
                    [(b":status", b"200"), (b"content-length", str(len(body)).encode())],
                )
                self.h3.send_data(e.stream_id, body, end_stream=True)
                self.transmit()


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.status = None
        self.body = b""
        self.done = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.status = int(dict(e.headers).get(b":status", b"0"))
            elif isinstance(e, DataReceived):
                self.body += e.data
            if getattr(e, "stream_ended", False) and not self.done.done():
                self.done.set_result(True)

    async def get(self, authority, path):
        stream_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        await self.done


async def run_server(a):
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(a.cert, a.key)
    host, port = a.listen.rsplit(":", 1)
    await serve(host, int(port), configuration=config, create_protocol=Server)
    print("listening", flush=True)
    await asyncio.Future()


async def run_client(a):
    # Packets of at most 1,200 bytes: they travel inside another QUIC connection's
    # DATAGRAM frames.
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.sni)
    config.load_verify_locations(a.ca)
    host, port = a.connect.rsplit(":", 1)
    try:
        async with connect(host, int(port), configuration=config, create_protocol=Client) as c:
            await asyncio.wait_for(c.get(a.sni, a.path), timeout=20)
            print(json.dumps({"status": c.status, "body": c.body.decode(errors="replace")}))
    except Exception as e:  # noqa: BLE001 - one line for the test, whatever went wrong
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--listen")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--connect")
    p.add_argument("--sni", default="localhost")
    p.add_argument("--ca")
    p.add_argument("--path", default="/")
    a = p.parse_args()
    asyncio.run(run_server(a) if a.mode == "server" else run_client(a))


if __name__ == "__main__":
    main()
    sys.exit(0)
