"""A replay upstream: serves recorded corpus bodies byte for byte.

It is not a simulation: it sends the exact bytes a real server sent (from
tests/corpus/wire), in small chunks with chunked transfer-encoding, optionally
compressed, so tests can compare what the client gets through the proxy with
the recording. The case is chosen by the ``x-replay-case`` request header;
``x-replay-encoding`` (gzip, deflate, br, zstd) compresses it on the wire and
``x-replay-chunk`` sets the chunk size.
"""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.corpus_cases import Case, encode, load_cases


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    cases: dict = {}

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        name = self.headers.get("x-replay-case", "")
        raw = self.headers.get("x-replay-raw")
        if raw is not None:
            # Arbitrary bytes as the body (invalid UTF-8, a JSON array, ...).
            case = Case(
                "raw",
                {"content_type": self.headers.get("x-replay-type", "application/json")},
                base64.b64decode(raw),
            )
        else:
            case = self.cases.get(name)
        if case is None:
            self.send_error(404, f"no case {name!r}")
            return
        encoding = self.headers.get("x-replay-encoding") or None
        chunk = int(self.headers.get("x-replay-chunk") or 97)
        wire, header = encode(case.body, encoding) if encoding else (case.body, None)
        self.send_response(200)
        self.send_header("content-type", case.content_type)
        if header:
            self.send_header("content-encoding", header)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(0, len(wire), chunk):
            piece = wire[i : i + chunk]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            if i == 0:
                time.sleep(0.01)  # a real gap between the first chunk and the rest
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_GET = do_POST


class ReplayServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"cases": {c.name: c for c in load_cases()}})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
