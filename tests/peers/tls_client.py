#!/usr/bin/env python3
"""Python's ssl module as a TLS client: connect ADDR PORT with SNI, verify with CAFILE."""
import os
import socket
import ssl
import sys

# The lab's deadlines are scaled in slow VMs (conduit_lab::timeout_scale).
SCALE = max(1, int(os.environ.get("CONDUIT_TEST_TIMEOUT_SCALE", "1") or "1"))

addr, port, sni, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection((addr, port), timeout=5 * SCALE) as raw:
    with ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
head, _, body = reply.partition(b"\r\n\r\n")
print(head.split(b"\r\n", 1)[0].decode(), body.decode().strip(), flush=True)
