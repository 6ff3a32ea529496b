"""HTTP + WebSocket echo server run inside the guest (python3 standard library only).

Usage: python3 guest_http_server.py HOST PORT NAME

Uploaded into a capsule by test_port_proxy.py; not a test module.
"""

import base64
import hashlib
import json
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, NAME = sys.argv[1], int(sys.argv[2]), sys.argv[3]
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Guest-Server", NAME)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/slow"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                chunk = f"chunk{i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                time.sleep(0.7)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/headers"):
            seen = {k.lower(): v for k, v in self.headers.items()}
            return self.reply(200, json.dumps(seen).encode(), "application/json")
        self.reply(200, f"{NAME} GET {self.path} host={self.headers.get('Host')}".encode())

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.reply(200, f"{NAME} POST {len(data)} {hashlib.sha256(data).hexdigest()}".encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("X-Seen-Authorization", self.headers.get("Authorization", "-"))
        self.send_header("X-Seen-Api-Key", self.headers.get("X-API-Key", "-"))
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", r.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if opcode == 0x1:
                payload = f"{NAME}:".encode() + payload
            if len(payload) < 126:
                hdr = bytes([0x80 | opcode, len(payload)])
            elif len(payload) < 65536:
                hdr = bytes([0x80 | opcode, 126]) + struct.pack(">H", len(payload))
            else:
                hdr = bytes([0x80 | opcode, 127]) + struct.pack(">Q", len(payload))
            w.write(hdr + payload)
            w.flush()
            if opcode == 0x8:
                self.close_connection = True
                return


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
