#!/usr/bin/env python3
"""udp_burst.py SRC DST PORT COUNT SECONDS: sends COUNT one-datagram UDP flows from
SRC to DST over SECONDS, through a raw socket (one syscall per datagram, so the
rate is the kernel's, not Python's socket setup). Each flow is its own (source
port, destination port) pair: source ports 1024-61023, destination ports from PORT
up. Prints the number sent and how many of them the device refused (ENOBUFS)
and were sent again."""
import socket
import struct
import sys
import time

# <linux/in.h>; the socket module does not export it.
IP_RECVERR = 11


def main():
    src, dst = sys.argv[1], sys.argv[2]
    port, count, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    # Without IP_RECVERR a raw socket swallows ENOBUFS (raw_send_hdrinc): a datagram
    # the veth could not queue (its peer's XDP ring full) would count as sent.
    s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    payload = b"x"
    per_port = 60000
    chunk = 500
    start = time.monotonic()
    sent = 0
    retries = 0
    for i in range(count):
        sport = 1024 + i % per_port
        dport = port + i // per_port
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        # Version/IHL, TOS, total length, id (0: the kernel fills it), flags+offset,
        # TTL, protocol, checksum (0: the kernel fills it), addresses.
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, saddr, daddr)
        while True:
            try:
                s.sendto(ip + udp, (dst, 0))
                break
            except OSError as e:
                # ENOBUFS: the device queue is full; the flow must go out once.
                if e.errno != 105:
                    raise
                retries += 1
                time.sleep(0.0005)
        sent += 1
        if sent % chunk == 0:
            # Pace to COUNT over SECONDS.
            ahead = start + seconds * sent / count - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    print(sent, retries)


if __name__ == "__main__":
    main()
