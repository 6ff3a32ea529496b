"""The test "internet" of the egress suite, run inside the network namespace the suite
creates: an HTTP server, a UDP echo server and a DNS server on each address given.

    python3 inet_services.py ADDR [ADDR...]

HTTP answers ``inet <addr> <path>``; UDP echoes; DNS answers A queries for
``good.test`` and ``*.wild.test`` with the first address, ``bad.test`` with the
second, and NXDOMAIN for anything else. Prints ``ready`` when every socket is bound.
Standard library only.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import struct
import sys
import threading

HTTP_PORT, UDP_PORT, DNS_PORT = 8080, 7007, 53


class ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def http_server(addr: str) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = f"inet {addr} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer((addr, HTTP_PORT), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def udp_echo(addr: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, UDP_PORT))

    def run():
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)

    threading.Thread(target=run, daemon=True).start()


def parse_name(msg: bytes, off: int) -> tuple[str, int]:
    labels = []
    while True:
        n = msg[off]
        off += 1
        if n == 0:
            return ".".join(labels), off
        labels.append(msg[off:off + n].decode("ascii", "replace"))
        off += n


def dns_server(addr: str, good: str, bad: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, DNS_PORT))

    def answer(q: bytes) -> bytes:
        qid, _flags, qd = struct.unpack("!HHH", q[:6])
        name, end = parse_name(q, 12)
        qtype = struct.unpack("!H", q[end:end + 2])[0]
        question = q[12:end + 4]
        name = name.lower()
        ip = good if name == "good.test" or name.endswith(".wild.test") else bad if name == "bad.test" else None
        if ip is None or qtype != 1:
            rcode = 3 if ip is None else 0
            return struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, 0, 0, 0) + question
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + rr

    def run():
        while True:
            q, peer = s.recvfrom(2048)
            try:
                s.sendto(answer(q), peer)
            except (IndexError, struct.error, UnicodeError):
                pass

    threading.Thread(target=run, daemon=True).start()


def main() -> None:
    addrs = sys.argv[1:]
    for a in addrs:
        http_server(a)
        udp_echo(a)
    dns_server(addrs[0], addrs[0], addrs[1] if len(addrs) > 1 else addrs[0])
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
