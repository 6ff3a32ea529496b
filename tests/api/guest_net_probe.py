"""Network probes run inside a capsule by the egress suite (python3 standard library).

    python3 guest_net_probe.py '<json list of probes>'

Each probe is a list: ``["tcp", host, port]`` (connect, send, read back),
``["udp", host, port]`` (datagram round trip), ``["dns", server, name]`` (one A query
over UDP), ``["http", url]`` (GET through the guest's own resolver), ``["ping", host]``.
Prints one JSON list of results: ``"ok"`` / the answer, or the error's name
(``refused``, ``timeout``, ``unreachable``, ...).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import urllib.request

TIMEOUT = 3.0


def err_name(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    code = getattr(e, "errno", None)
    if code is None and getattr(e, "reason", None) is not None:
        return err_name(e.reason)
    return {
        errno.ECONNREFUSED: "refused",
        errno.EHOSTUNREACH: "unreachable",
        errno.ENETUNREACH: "unreachable",
        errno.ECONNRESET: "reset",
        errno.EACCES: "denied",
        errno.EPERM: "denied",
    }.get(code, f"error:{type(e).__name__}:{code}")


def tcp(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return "ok" if s.recv(64) else "closed"
    except OSError as e:
        return err_name(e)


def udp(host: str, port: int) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.connect((host, port))
        s.send(b"ping")
        return "ok" if s.recv(64) == b"ping" else "garbled"
    except OSError as e:
        return err_name(e)
    finally:
        s.close()


def dns(server: str, name: str) -> str:
    qid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(q, (server, 53))
        r, _ = s.recvfrom(4096)
    except OSError as e:
        return err_name(e)
    finally:
        s.close()
    rcode = r[3] & 0xF
    if rcode:
        return {2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(rcode, f"rcode{rcode}")
    ancount = struct.unpack("!H", r[6:8])[0]
    off = len(q)
    for _ in range(ancount):
        off += 2 if r[off] & 0xC0 == 0xC0 else r.index(b"\0", off) + 1 - off
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", r[off:off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(r[off:off + 4])
        off += rdlen
    return "no-answer"


def http(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.read().decode()
    except OSError as e:
        return err_name(e)


def ping(host: str) -> str:
    r = subprocess.run(["ping", "-c1", "-W2", host], capture_output=True)
    return "ok" if r.returncode == 0 else "fail"


def main() -> None:
    probes = json.loads(sys.argv[1])
    fns = {"tcp": tcp, "udp": udp, "dns": dns, "http": http, "ping": ping}
    print(json.dumps([fns[p[0]](*p[1:]) for p in probes]))


if __name__ == "__main__":
    main()
