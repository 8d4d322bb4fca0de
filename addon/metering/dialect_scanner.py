"""Scanning a response of a native API with its family's extractor (pure).

``make_scanner(api, content_type, content_encoding)`` returns the scanner for a
request's API family: :class:`spendtap.metering.scanner.ResponseScanner` for the OpenAI and
Anthropic shapes (its tuned hot path), :class:`DialectScanner` with the family's
:class:`spendtap.metering.dialects.Extractor` for a native API
(:data:`spendtap.metering.dialect_registry.EXTRACTORS`).

``DialectScanner`` keeps the base scanner's contract (``feed`` never raises,
``finish`` is idempotent, memory bounded, cost linear) and its decoding; it frames
the body from its first bytes:

- ``data:``/``event:`` lines: server-sent events (Gemini ``alt=sse``, llama.cpp,
  Cohere v2), CRLF or LF, with or without event names;
- ``{`` or ``[``: a JSON sequence (:class:`spendtap.metering.framing.JSONSequence`): NDJSON
  lines (Ollama), a JSON-array stream (Gemini without ``alt=sse``), or one document.

Timing: in a stream, each object the extractor calls content is a content event
(TTFT = the first one); a body that is one document is timed by its first and
last bytes, like the base scanner's JSON bodies.
"""

from __future__ import annotations

from json import loads as _loads

from spendtap.metering.dialect_registry import EXTRACTORS
from spendtap.metering.dialects import MAX_ERROR_LEN, Extractor, text_chars
from spendtap.metering.framing import JSONSequence, Oversized
from spendtap.metering.scanner import (
    _BOM,
    _SSE,
    _UNDECIDED,
    ResponseScanner,
    ScanResult,
)
from spendtap.metering.usage import Usage

__all__ = ["EXTRACTORS", "DialectScanner", "make_scanner"]

_SEQ = 3  # JSON sequence framing (NDJSON, JSON array, one document)


def make_scanner(
    api: str, content_type: str | None, content_encoding: str | None = None, **kwargs
) -> ResponseScanner:
    """The scanner for ``api``: the dialect scanner for a native API, else the base one."""
    cls = EXTRACTORS.get(api)
    if cls is None:
        return ResponseScanner(api, content_type, content_encoding, **kwargs)
    return DialectScanner(api, content_type, content_encoding, extractor=cls(), **kwargs)


class DialectScanner(ResponseScanner):
    """Scan one native-API response body with its family's extractor."""

    __slots__ = ("_array", "_ex", "_objects", "_seq", "_seq_first", "_seq_last", "_seq_n")

    _DOCUMENT = _SEQ
    _INLINE_TOKENS = False  # its own ``_event``

    def __init__(
        self,
        api: str,
        content_type: str | None,
        content_encoding: str | None = None,
        *,
        extractor: Extractor,
        max_event_bytes: int = 1 << 20,
        json_head_bytes: int = 64 << 10,
        json_tail_bytes: int = 64 << 10,
        **kwargs,
    ) -> None:
        super().__init__(
            api,
            content_type,
            content_encoding,
            max_event_bytes=max_event_bytes,
            json_head_bytes=json_head_bytes,
            json_tail_bytes=json_tail_bytes,
            **kwargs,
        )
        self._ex = extractor
        self._seq = JSONSequence(max_event_bytes, json_head_bytes, json_tail_bytes)
        self._array = False
        self._objects = 0
        # Content timing of a JSON sequence, kept apart until we know it is a stream.
        self._seq_first: float | None = None
        self._seq_last: float | None = None
        self._seq_n = 0

    def buffered_bytes(self) -> int:
        return super().buffered_bytes() + self._seq.buffered_bytes()

    # -- framing --------------------------------------------------------------------

    def _scan(self, data: bytes, now: float) -> None:
        if self._mode == _SEQ:
            self._bytes += len(data)
            self._last_bytes_at = now
            for obj in self._seq.feed(data):
                self._object_seq(obj, now)
            return
        super()._scan(data, now)

    def _start_document(self, pre: bytes, s: bytes, now: float) -> None:
        self._array = s[:1] == b"["
        body = pre[3:] if pre.startswith(_BOM) else pre
        for obj in self._seq.feed(body):
            self._object_seq(obj, now)

    # -- objects ----------------------------------------------------------------------

    def _object_seq(self, obj: dict, now: float) -> None:
        self._objects += 1
        try:
            if self._ex.read(obj, None):
                if self._seq_first is None:
                    self._seq_first = now
                self._seq_last = now
                self._seq_n += 1
                self._content_bytes += text_chars(obj)
        except Exception:
            self._internal += 1

    def _event(self, ev_type: str | None, data: bytes, tail: bytes | None, now: float) -> None:
        try:
            if tail is not None:
                self._ex.read_oversized(data, tail)
                return
            s = data.strip()
            if not s or s == b"[DONE]":
                return
            try:
                obj = _loads(s)
            except (ValueError, RecursionError):
                self._parse_errors += 1
                if ev_type == "error" and self._ex.error is None:
                    self._ex.error = s[:MAX_ERROR_LEN].decode("utf-8", "replace")
                return
            if type(obj) is list:  # a JSON array inside one event: read each element
                content = False
                for o in obj:
                    if type(o) is dict and self._ex.read(o, ev_type):
                        content = True
            elif type(obj) is dict:
                content = self._ex.read(obj, ev_type)
            else:
                return
            if content:
                if self._first is None:
                    self._first = now
                self._last = now
                self._content_n += 1
                self._content_bytes += text_chars(obj)
        except Exception:
            self._internal += 1

    # -- result (ResponseScanner.finish calls these once) ---------------------------------

    def _close_framing(self, at: float) -> None:
        if self._mode != _SEQ:
            super()._close_framing(at)
            return
        for obj in self._seq.close():
            if isinstance(obj, Oversized):
                self._objects += 1
                self._ex.read_oversized(obj.head, obj.tail)
            else:
                self._object_seq(obj, at)

    def _build(self) -> ScanResult:
        self._parse_errors += self._seq.errors
        ex = self._ex
        try:
            usage = ex.usage()
            timing = ex.server_timing()
        except Exception:
            self._internal += 1
            usage, timing = Usage(), None
        mode = self._mode
        framing = "sse"
        if mode == _SEQ:
            streamed = self._array or self._objects > 1
            framing = "json-array" if self._array else ("ndjson" if streamed else "json")
        else:
            streamed = mode == _SSE
        if mode == _SEQ and not streamed:
            first, last = self._first_bytes_at, self._last_bytes_at
            n = 1 if self._bytes else 0
        elif mode == _SEQ:
            first, last, n = self._seq_first, self._seq_last, self._seq_n
        else:
            first, last, n = self._first, self._last, self._content_n
        chars = self._content_bytes
        return self._scan_result(
            usage,
            first_content_at=first,
            last_content_at=last,
            content_events=n,
            response_model=ex.model,
            error=ex.error,
            streamed_sse=streamed,
            output_chars=chars if (chars or n) else None,
            server_timing=timing,
            framing=framing if mode != _UNDECIDED else None,
        )
