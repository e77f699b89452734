#!/usr/bin/env python3
"""Sends COUNT one-datagram UDP flows to DST: each flow is its own (source port,
destination port) pair, source ports from 1024 up, destination ports from PORT up,
so that every datagram is a new five-tuple. Prints the number sent."""
import socket
import sys


def main():
    dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    per_port = 60000
    sent = 0
    for i in range(count):
        sport = 1024 + i % per_port
        dport = port + i // per_port
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("", sport))
        while True:
            try:
                s.sendto(b"x", (dst, dport))
                break
            except (BlockingIOError, OSError) as e:
                # ENOBUFS under a full qdisc: retry, the flow must go out once.
                if getattr(e, "errno", None) not in (105, 11):
                    raise
        s.close()
        sent += 1
    print(sent)


if __name__ == "__main__":
    main()
