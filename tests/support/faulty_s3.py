"""A fault-injecting reverse proxy for S3 on loopback (tests only).

It sits between the S3 client (s3fs/botocore, pointed at it through AWS_ENDPOINT_URL) and
moto's server, and fails a set share of requests of every kind (GET, HEAD, PUT, POST for
multipart, DELETE, list) in the ways an object store fails:

* ``500``: an S3 ``InternalError`` XML body, before the request reaches the store;
* ``503``: an S3 ``SlowDown`` XML body, before the request reaches the store;
* ``reset``: the request reaches the store (a write is done), then the response is cut off
  mid-body and the connection reset: the client cannot tell whether a write happened;
* ``slow``: the response is held back for a while (then delivered whole).

Which requests fail is decided by a hash of (seed, method, path and query, how many times
this exact request was seen before): the same test fails the same requests whatever the
order threads send them in, and a retried request gets a fresh draw. The proxy counts
requests and injected faults by kind.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import http.server
import socket
import struct
import threading
import time
import urllib.parse

FAULT_KINDS = ("500", "503", "reset", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_XML_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>faulty-s3-{n}</RequestId></Error>')


class FaultyS3Proxy:
    """``FaultyS3Proxy(upstream, share=0.2, seed=0)``; ``.endpoint`` is its URL once started."""

    def __init__(self, upstream: str, share: float = 0.2, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS,
                 slow_seconds: float = 0.3):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.share, self.seed, self.kinds, self.slow_seconds = share, seed, kinds, slow_seconds
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    def start(self) -> "FaultyS3Proxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultyS3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def draw(self, method: str, target: str) -> str | None:
        """The fault for this request (a kind), or None to pass it through."""
        key = f"{method} {target}"
        with self._lock:
            self.requests += 1
            nth = self._seen[key]
            self._seen[key] += 1
        digest = hashlib.sha256(f"{self.seed}|{key}|{nth}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u >= self.share:
            return None
        kind = self.kinds[digest[8] % len(self.kinds)]
        with self._lock:
            self.faults[kind] += 1
        return kind

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send_error_xml(self, status: int, code: str, message: str) -> None:
                body = _XML_ERROR.format(code=code, message=message, n=proxy.requests).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends a TCP RST, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _forward(self) -> None:
                body = self._read_body()
                fault = proxy.draw(self.command, self.path)
                if fault == "500":
                    return self._send_error_xml(500, "InternalError", "We encountered an internal error.")
                if fault == "503":
                    return self._send_error_xml(503, "SlowDown", "Please reduce your request rate.")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    status, reply_headers = response.status, response.getheaders()
                finally:
                    upstream.close()
                if fault == "slow":
                    time.sleep(proxy.slow_seconds)
                if fault == "reset" and (self.command == "HEAD" or len(data) < 2):
                    return self._reset()  # the store acted; the client never hears of it
                self.send_response(status)
                length = None
                for k, v in reply_headers:
                    if k.lower() in _HOP_BY_HOP:
                        continue
                    if k.lower() == "content-length":
                        length = v
                        continue
                    self.send_header(k, v)
                # HEAD answers carry the object's length with no body; others, the body's.
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "reset":  # half the body, then the connection drops
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
