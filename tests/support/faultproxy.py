"""A loopback HTTP proxy in front of an S3 endpoint that fails a share of requests the way real object stores do:
503 SlowDown, 500 InternalError, or a connection dropped without a response. Requests pass through byte for byte
otherwise (SigV4 signatures stay valid: the client signs the proxy's host, and the proxy forwards that header), and
each one is logged (method, path, range, bytes) for tests that count what a command read."""

from __future__ import annotations

import http.client
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERR = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by test proxy</Message>'
        '</Error>')


class FaultProxy:
    def __init__(self, upstream: str, fail_rate: float = 0.0, seed: int = 0, fail_paths: str | None = None,
                 kinds: tuple = ("503", "500", "drop")):
        self.upstream = urlparse(upstream)
        self.kinds = list(kinds)
        self.fail_rate = fail_rate
        self.fail_paths = re.compile(fail_paths) if fail_paths else None
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = 0
        self.requests = 0
        self.log: list[tuple[str, str, str | None, int]] = []  # (method, path, Range header, response bytes)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = self._read_chunked()  # kept framed; forwarded as-is with the same header
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests += 1
                    roll = proxy.rng.random()
                    forced = bool(proxy.fail_paths and proxy.fail_paths.search(self.path)
                                  and self.command in ("PUT", "POST"))
                    inject = forced or roll < proxy.fail_rate
                    if inject:
                        proxy.injected += 1
                if inject:
                    kind = proxy.rng.choice(proxy.kinds) if not forced else "500"
                    if kind == "drop":
                        self.close_connection = True
                        self.connection.close()
                        return
                    code = "SlowDown" if kind == "503" else "InternalError"
                    payload = _ERR.format(code=code).encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy.lock:
                    proxy.log.append((self.command, self.path, self.headers.get("Range"), len(data)))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD carries the object's length with no body.
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_chunked(self) -> bytes:
                out = []
                while True:
                    line = self.rfile.readline()
                    out.append(line)
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers (e.g. x-amz-checksum-crc32) up to the blank line
                            t = self.rfile.readline()
                            out.append(t)
                            if t in (b"\r\n", b"\n", b""):
                                return b"".join(out)
                    out.append(self.rfile.read(size))
                    out.append(self.rfile.readline())

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
