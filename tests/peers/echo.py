#!/usr/bin/env python3
"""Deterministic traffic peers for the lab: TCP/UDP echo servers and clients.

server tcp|udp ADDR PORT        echo everything back (one client at a time for tcp)
client tcp|udp ADDR PORT N SIZE send N messages of SIZE bytes, wait for each echo
"""
import socket
import sys


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def server(proto, addr, port):
    if proto == "udp":
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.bind((addr, port))
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    while True:
        conn, _ = s.accept()
        with conn:
            while True:
                data = conn.recv(65535)
                if not data:
                    break
                conn.sendall(data)


def client(proto, addr, port, n, size):
    payload = b"x" * size
    if proto == "udp":
        s = socket.socket(family(addr), socket.SOCK_DGRAM)
        s.settimeout(5)
        for _ in range(n):
            s.sendto(payload, (addr, port))
            data, _ = s.recvfrom(65535)
            assert len(data) == size, len(data)
        s.close()
        return
    s = socket.create_connection((addr, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        s.sendall(payload)
        got = 0
        while got < size:
            chunk = s.recv(65535)
            assert chunk, "connection closed early"
            got += len(chunk)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65535):
        pass
    s.close()


if __name__ == "__main__":
    role, proto, addr, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if role == "server":
        server(proto, addr, port)
    else:
        client(proto, addr, port, int(sys.argv[5]), int(sys.argv[6]))
    print("done", flush=True)
