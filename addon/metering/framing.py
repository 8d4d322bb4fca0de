"""Incremental framing of JSON sequences: NDJSON, JSON-array streams, whole documents.

Pure (no mitmproxy, no click). ``JSONSequence.feed(data)`` takes the next decoded
piece of a body and yields every top-level JSON object completed so far;
``close()`` yields what is left. One framer reads all of these shapes alike:

- NDJSON (Ollama ``/api/chat``, ``/api/generate``): one object per line;
- a JSON-array stream (Gemini ``streamGenerateContent`` without ``alt=sse``):
  ``[{...}\\n,\\r\\n{...}\\n]`` with pretty-printed elements;
- one document, compact or pretty-printed (any non-streamed answer).

Separators between objects (whitespace, ``,``, the array's ``[`` and ``]``) are
skipped. A decode is attempted only when the buffer ends in ``}`` (after
whitespace and separators); after an attempt that finds the object incomplete, the
next waits until the buffer has doubled, so a large document whose chunks happen to
end in a nested ``}`` still costs linear time (an object is then seen at most one
buffer-doubling late; ``close()`` reads whatever is left).

Memory is bounded: an object larger than ``max_object`` is not held whole; its
head and a rolling tail are kept and handed out by ``close()`` as an
:class:`Oversized` (the dialect reads model and usage from them with byte
patterns). A value that is not an object (a bare number, string) is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["JSONSequence", "Oversized"]

_SEP = b" \t\r\n,[]"
_decoder = json.JSONDecoder()
_raw_decode = _decoder.raw_decode


@dataclass(slots=True)
class Oversized:
    """An object too large to keep: its first and last bytes."""

    head: bytes
    tail: bytes


class JSONSequence:
    __slots__ = (
        "_buf",
        "_head",
        "_head_bytes",
        "_max",
        "_next_try",
        "_over",
        "_tail",
        "_tail_bytes",
        "errors",
    )

    def __init__(
        self,
        max_object: int = 1 << 20,
        head_bytes: int = 64 << 10,
        tail_bytes: int = 64 << 10,
    ) -> None:
        self._buf = b""
        self._max = max_object
        self._head_bytes = head_bytes
        self._tail_bytes = tail_bytes
        self._over = False
        self._next_try = 0  # buffer length before the next decode attempt
        self._head = b""
        self._tail = b""
        self.errors = 0  # pieces that could not be parsed as JSON

    def buffered_bytes(self) -> int:
        return len(self._buf) + len(self._head) + len(self._tail)

    def feed(self, data: bytes) -> Iterator[dict]:
        if self._over:
            t = self._tail + data
            self._tail = t[-self._tail_bytes :] if len(t) > self._tail_bytes else t
            return
        buf = self._buf + data if self._buf else data
        if data.find(b"}") < 0 or len(buf) < self._next_try or buf.rstrip(_SEP)[-1:] != b"}":
            self._buf = buf
            self._check_size()
            return
        self._buf = b""
        yield from self._drain(buf, final=False)
        # Something incomplete stayed behind: back off until the buffer doubles.
        self._next_try = 2 * len(self._buf) if self._buf else 0
        self._check_size()

    def close(self) -> Iterator[dict | Oversized]:
        if self._over:
            self._over = False
            yield Oversized(self._head, self._tail)
            self._head = self._tail = b""
            return
        buf, self._buf = self._buf, b""
        if buf.strip(_SEP):
            yield from self._drain(buf, final=True)

    def _check_size(self) -> None:
        if len(self._buf) > self._max:
            buf, self._buf = self._buf, b""
            self._over = True
            self._head = buf[: self._head_bytes]
            self._tail = buf[-self._tail_bytes :]

    def _drain(self, buf: bytes, final: bool) -> Iterator[dict]:
        """Decode every complete value in ``buf``; keep an incomplete rest for later."""
        text = buf.decode("utf-8", "replace")
        n = len(text)
        i = 0
        while True:
            # Skip separators.
            while i < n and text[i] in " \t\r\n,[]":
                i += 1
            if i >= n:
                return
            try:
                obj, end = _raw_decode(text, i)
            except ValueError:
                rest = text[i:]
                nl = rest.find("\n")
                if final or (nl >= 0 and _complete_line_is_bad(rest, nl)):
                    # Not JSON (an HTML error page, a truncated line): count, skip the line.
                    self.errors += 1
                    if nl < 0:
                        return
                    i += nl + 1
                    continue
                self._buf = rest.encode()
                return
            i = end
            if type(obj) is dict:
                yield obj


def _complete_line_is_bad(rest: str, nl: int) -> bool:
    """True when the first line of ``rest`` is a whole line that is not JSON by itself
    and cannot be the start of a multi-line (pretty-printed) object.

    A pretty-printed object's first line never parses alone, but neither does its next
    line start with ``{`` (an object's members start with a key). So a line that fails
    alone is skipped when it looks like a whole record (``{...}``) or when the next line
    starts a new record; otherwise the rest is kept and completed by later data.
    """
    line = rest[:nl].strip()
    if not line:
        return False
    whole = line.startswith("{") and line.endswith("}")
    if not whole and not rest[nl + 1 :].lstrip().startswith("{"):
        return False
    try:
        _raw_decode(line)
    except ValueError:
        return True
    return False
