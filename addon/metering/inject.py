"""Ask a streaming server for usage the client did not ask for, and hide the answer.

OpenAI-compatible chat/completions streams carry usage only when the request
sets ``stream_options.include_usage``. When a client did not, spendtap sets it
on the way upstream (``with_include_usage``) and removes what that adds from
the stream the client receives (``InjectedUsageFilter``): the final
usage-only chunk (``"choices":[]`` with a usage object) and the
``"usage":null`` member servers add to every other chunk. The client sees the
stream it would have seen without the sidecar; the scanner sees the original.

Pure: bytes in, bytes out; never raises on bad input (it passes bytes through
unchanged once it cannot follow the framing).
"""

from __future__ import annotations

import json
import re

from spendtap.metering.request import RequestInfo
from spendtap.metering.usage import OPENAI_CHAT, OPENAI_COMPLETIONS

_USAGE_KEY = b'"usage"'
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_MAX_PENDING = 1 << 20


def wants_usage_injection(info: RequestInfo) -> bool:
    """A streaming chat/completions request that did not ask for usage itself."""
    return (
        info.stream
        and info.body_parsed
        and info.api in (OPENAI_CHAT, OPENAI_COMPLETIONS)
        and info.include_usage is not True
    )


def with_include_usage(body: bytes, info: RequestInfo | None = None) -> bytes | None:
    """The request body with ``stream_options.include_usage`` set, or None if it cannot be.

    With the ``RequestInfo`` that ``parse_request`` already made of this body, the
    common case (a non-empty object without ``stream_options``) is handled without
    parsing the body a second time on the event loop.
    """
    if info is not None and info.body_parsed and info.stream and not info.has_stream_options:
        return _append_member(body, nonempty=True)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    options = doc.get("stream_options")
    if options is None:
        return _append_member(body, nonempty=bool(doc))
    if not isinstance(options, dict):
        return None
    doc["stream_options"] = {**options, "include_usage": True}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _append_member(body: bytes, nonempty: bool) -> bytes | None:
    """Append the member without re-serializing: every other byte stays as sent."""
    end = body.rstrip().rfind(b"}")
    if end < 0:
        return None
    sep = b"," if nonempty else b""
    return body[:end] + sep + b'"stream_options":{"include_usage":true}' + body[end:]


class InjectedUsageFilter:
    """Removes, event by event, what ``include_usage`` added to an SSE stream.

    Complete events are released as soon as their blank line arrives; a partial
    event waits for the rest (the client could not use half an event anyway).
    If framing cannot be followed (an event larger than 1 MiB), the filter gives
    up and passes everything through unchanged from then on.
    """

    __slots__ = ("_pending", "_sep", "passthrough", "removed_chunks")

    def __init__(self) -> None:
        self._pending = b""
        self._sep: bytes | None = None
        self.passthrough = False
        self.removed_chunks = 0

    def feed(self, chunk: bytes) -> bytes:
        if self.passthrough:
            return chunk
        sep = self._sep
        if sep is not None and not self._pending and chunk.endswith(sep):
            # Whole events and nothing held (a server sends an event a chunk): the
            # cut below would keep all of it, so filter it without the copy.
            return self._filter(chunk, sep)
        buf = self._pending + chunk if self._pending else chunk
        if sep is None:
            if b"\r\n\r\n" in buf:
                sep = self._sep = b"\r\n\r\n"
            elif b"\n\n" in buf:
                sep = self._sep = b"\n\n"
            else:
                return self._hold(buf)
        cut = buf.rfind(sep)
        if cut < 0:
            return self._hold(buf)
        cut += len(sep)
        self._pending = buf[cut:]
        return self._filter(buf[:cut], sep)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self.passthrough or not rest:
            return rest
        return self._filter(rest, self._sep or b"\n\n")

    def _hold(self, buf: bytes) -> bytes:
        if len(buf) > _MAX_PENDING:
            self.passthrough = True
            self._pending = b""
            return buf
        self._pending = buf
        return b""

    def _filter(self, events: bytes, sep: bytes) -> bytes:
        # Looked for as a key, with its quotes: the word in generated text ("... usage
        # ...") is inside a JSON string, where a quote is escaped, so it never matches
        # and the events it is in stay on the fast path.
        if events.find(_USAGE_KEY) < 0:
            return events  # nothing to remove
        # What servers send on every chunk, in the compact form they all use, goes at C
        # speed (inside a JSON string a quote is escaped, so this text cannot be data).
        events = events.replace(b',"usage":null', b"")
        if events.find(_USAGE_KEY) < 0:
            return events
        parts = events.split(sep)
        kept = []
        for part in parts:
            if part.find(_USAGE_KEY) < 0:
                kept.append(part)
            elif _USAGE_OBJECT.search(part) and _EMPTY_CHOICES.search(part):
                self.removed_chunks += 1
            else:
                kept.append(_USAGE_NULL.sub(b"", part))
        return sep.join(kept)
