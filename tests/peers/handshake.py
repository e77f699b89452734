#!/usr/bin/env python3
"""One real TLS or QUIC handshake whose ClientHello can be held back half-sent.

tls|quic ADDR SNI CAFILE whole|held

Prints "port N" once the first part of the ClientHello is sent (N: local port).
With "held", the rest of the ClientHello waits for a line on stdin: TLS sends the
first half of the ClientHello in one TCP segment, QUIC the first of the Initial
datagrams (a long ALPN list makes the ClientHello span several). Prints "done N"
when the handshake has completed (and, for TLS, a request was answered); any
failure exits non-zero.
"""
import socket
import ssl
import sys
import time

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

PORT = 443
TIMEOUT = 15


def release(held):
    if held and not sys.stdin.readline():
        sys.exit("stdin closed before the release")


def tls(addr, sni, cafile, held):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    sock = socket.create_connection((addr, PORT), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    cut = len(hello) // 2 if held else len(hello)
    sock.sendall(hello[:cut])
    print(f"port {port}", flush=True)
    release(held)
    sock.sendall(hello[cut:])
    finish_tls(sock, conn, incoming, outgoing, sni, port)


def finish_tls(sock, conn, incoming, outgoing, sni, port):
    """Completes the handshake whose ClientHello was sent on `sock`, then a request;
    prints "done PORT" when it is answered, exits non-zero otherwise."""
    while True:
        try:
            conn.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out := outgoing.read():
                sock.sendall(out)
            data = sock.recv(65536)
            if not data:
                sys.exit("connection closed during the handshake")
            incoming.write(data)
    conn.write(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
    sock.sendall(outgoing.read())
    reply = b""
    while data := sock.recv(65536):
        incoming.write(data)
        try:
            reply += conn.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
    if not reply.startswith(b"HTTP/1.1 200"):
        sys.exit(f"unexpected reply: {reply[:80]!r}")
    print(f"done {port}", flush=True)


def quic(addr, sni, cafile, held):
    # ALPN padding: the ClientHello spans several Initial datagrams; h3 is what the
    # lab server speaks.
    alpn = ["h3"] + [f"x-conduit-pad-{i:02d}-" + "p" * 40 for i in range(40)]
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=sni)
    config.load_verify_locations(cafile)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((addr, PORT))
    port = sock.getsockname()[1]
    conn = QuicConnection(configuration=config)
    conn.connect((addr, PORT), now=time.time())
    datagrams = [d for d, _ in conn.datagrams_to_send(now=time.time())]
    if held and len(datagrams) < 2:
        sys.exit(f"the ClientHello fits one datagram ({len(datagrams)})")
    first = 1 if held else len(datagrams)
    for d in datagrams[:first]:
        sock.send(d)
    print(f"port {port}", flush=True)
    release(held)
    for d in datagrams[first:]:
        sock.send(d)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        timer = conn.get_timer()
        wait = deadline - time.time() if timer is None else timer - time.time()
        sock.settimeout(max(0.001, min(wait, deadline - time.time())))
        try:
            conn.receive_datagram(sock.recv(65536), (addr, PORT), now=time.time())
        except socket.timeout:
            conn.handle_timer(now=time.time())
        while (event := conn.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                conn.close()
                for d, _ in conn.datagrams_to_send(now=time.time()):
                    sock.send(d)
                print(f"done {port}", flush=True)
                return
            if isinstance(event, ConnectionTerminated):
                sys.exit(f"connection terminated: {event.reason_phrase}")
        for d, _ in conn.datagrams_to_send(now=time.time()):
            sock.send(d)
    sys.exit("handshake timed out")


if __name__ == "__main__":
    proto, addr, sni, cafile, mode = sys.argv[1:6]
    (tls if proto == "tls" else quic)(addr, sni, cafile, mode == "held")
