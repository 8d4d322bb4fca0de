"""The metrics port: ``/metrics`` for Prometheus and ``/healthz`` for probes.

A small threaded WSGI server, so scrapes never run on mitmproxy's event loop.
``/healthz`` answers 503 when the health check says the sidecar cannot meter
(for example, the ledger writer is stuck).
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """Serves until ``stop``, waking only for a connection or the stop.

    ``serve_forever`` wakes every half second to look for a shutdown request: an idle
    sidecar's only periodic work. Here the stop is a byte on a pipe the same wait
    watches.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wake_r, self._wake_w = os.pipe()

    def serve_until_stopped(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj == self._wake_r for key, _ in ready):
                    return
                self._handle_request_noblock()

    def stop(self) -> None:
        os.write(self._wake_w, b"x")

    def server_close(self) -> None:
        super().server_close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds are not news
        pass


class MetricsServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, str]] | None = None,
    ):
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/health"):
                ok, detail = health() if health else (True, "ok")
                body = (detail + "\n").encode()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(
                    status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
                )
                return [body]
            return metrics_app(environ, start_response)

        self._server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_until_stopped, name="spendtap-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.stop()
        self._thread.join()
        self._server.server_close()
