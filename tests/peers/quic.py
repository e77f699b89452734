#!/usr/bin/env python3
"""A real QUIC (RFC 9000) server and client with aioquic, for the lab.

server ADDRS PORT CERT KEY           ADDRS comma-separated; answer each stream with "ok"
client ADDR PORT SNI CAFILE [v1|v2]  handshake (ALPN h3), send one stream, print reply
"""
import asyncio
import os
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import QuicProtocolVersion

# The lab's deadlines are scaled in slow VMs (conduit_lab::timeout_scale).
SCALE = max(1, int(os.environ.get("CONDUIT_TEST_TIMEOUT_SCALE", "1") or "1"))


class Echo(QuicConnectionProtocol):
    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived) and event.end_stream:
            self._quic.send_stream_data(event.stream_id, b"ok\n", end_stream=True)
            self.transmit()


async def run_server(addrs, port, cert, key):
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3", "conduit-lab"])
    config.load_cert_chain(cert, key)
    # One socket per address: a wildcard socket would answer from the routed
    # source address, not the endpoint's, and NAT on the gateway would drop it.
    for addr in addrs.split(","):
        await serve(addr, port, configuration=config, create_protocol=Echo)
    print("listening", flush=True)
    await asyncio.Future()


async def run_client(addr, port, sni, cafile, version):
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name=sni)
    config.load_verify_locations(cafile)
    if version == "v2":
        config.supported_versions = [QuicProtocolVersion.VERSION_2]
    async with connect(addr, port, configuration=config, wait_connected=True) as client:
        reader, writer = await client.create_stream()
        writer.write(b"hello")
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout=5 * SCALE)
        print(data.decode().strip(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(run_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
    else:
        version = sys.argv[6] if len(sys.argv) > 6 else "v1"
        asyncio.run(asyncio.wait_for(run_client(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], version), 10 * SCALE))
