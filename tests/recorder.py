"""A recording upstream: answers like an inference server and keeps each request's headers.

Tests use it to see exactly what reached the upstream through a real mitmdump:
which principal headers, which credential, and how many requests at all. It
answers ``/v1/messages`` in Anthropic's shape and everything else as an OpenAI
chat completion, each with usage (5 prompt + 3 completion tokens).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from spendtap.address import free_port

USAGE_PROMPT, USAGE_COMPLETION = 5, 3


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.server.lock:
            self.server.seen.append({"path": self.path, "headers": headers})
        if self.path.endswith("/v1/messages"):
            doc = {
                "id": "msg_rec",
                "type": "message",
                "role": "assistant",
                "model": "rec-claude",
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": USAGE_PROMPT, "output_tokens": USAGE_COMPLETION},
            }
        else:
            doc = {
                "id": "chatcmpl-rec",
                "object": "chat.completion",
                "created": 1,
                "model": "rec-gpt",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": USAGE_PROMPT,
                    "completion_tokens": USAGE_COMPLETION,
                    "total_tokens": USAGE_PROMPT + USAGE_COMPLETION,
                },
            }
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Recorder:
    """A real HTTP server on loopback, in a thread; ``seen`` lists what reached it."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._server.daemon_threads = True
        self._server.seen = []
        self._server.lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def seen(self) -> list[dict]:
        with self._server.lock:
            return list(self._server.seen)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
