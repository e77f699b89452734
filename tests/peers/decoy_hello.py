#!/usr/bin/env python3
"""A TLS call whose real ClientHello follows a decoy at the same sequence number.

ADDR SNI DECOY CAFILE

The decoy is a complete ClientHello naming DECOY, sent on the raw socket with a
broken TCP checksum: a router forwards it, the server's TCP drops it. The real
hello (naming SNI) then goes out on the kernel's socket with the same sequence
number, and the handshake and a request complete over it. Prints "port N" once the
decoy is sent and "done N" when the request was answered; any failure exits
non-zero.
"""
import socket
import ssl
import struct
import sys
import time

from scapy.all import IP, TCP, Raw, conf, raw, send

from handshake import finish_tls

PORT = 443
TIMEOUT = 10


def client_hello(ctx, name):
    """The ClientHello `ctx` sends to `name` (and the objects to go on with it)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return conn, incoming, outgoing, outgoing.read()


def handshake_numbers(capture, local_port, deadline):
    """(client ISN, server ISN) from the SYN and SYN-ACK on the packet socket."""
    isn = server_isn = None
    while time.monotonic() < deadline and (isn is None or server_isn is None):
        try:
            frame = capture.recv(65535)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != 6:
            continue
        tcp = frame[14 + ihl :]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        flags = tcp[13]
        if flags & 0x12 == 0x02 and sport == local_port:
            isn = seq
        elif flags & 0x12 == 0x12 and dport == local_port:
            server_isn = seq
    if isn is None or server_isn is None:
        sys.exit("the SYN and SYN-ACK were not captured")
    return isn, server_isn


def main():
    addr, sni, decoy_name, cafile = sys.argv[1:5]
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    conn, incoming, outgoing, hello = client_hello(ctx, sni)
    *_, decoy = client_hello(ssl.create_default_context(cafile=cafile), decoy_name)

    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    capture.setblocking(False)
    sock = socket.create_connection((addr, PORT), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local, port = sock.getsockname()
    isn, server_isn = handshake_numbers(capture, port, time.monotonic() + TIMEOUT)
    capture.close()

    conf.verb = 0
    seg = IP(src=local, dst=addr, ttl=64) / TCP(
        sport=port,
        dport=PORT,
        flags="PA",
        seq=(isn + 1) % 2**32,
        ack=(server_isn + 1) % 2**32,
        window=64240,
    ) / Raw(decoy)
    seg = IP(raw(seg))
    seg[TCP].chksum ^= 0x5A5A
    send(seg)
    print(f"port {port}", flush=True)

    sock.sendall(hello)
    finish_tls(sock, conn, incoming, outgoing, sni, port)


if __name__ == "__main__":
    main()
