"""Per-response usage and timing scanner (pure: no mitmproxy, no click).

``ResponseScanner(api, content_type, content_encoding)`` is fed every chunk of one
response body as it passes through (``feed(chunk, now)``, which never raises) and
yields a ``ScanResult`` at the end (``finish(now)``, idempotent).

It reads the usage the server reports, normalized to ``spendtap.metering.usage.Usage`` (see
docs/usage-semantics.md):

- a figure not reported is None, never 0;
- streams: the last reported value of each figure wins, usage objects are never summed
  (they are cumulative, repeated on every chunk, or duplicated under a vendor key such
  as ``x_groq.usage``);
- OpenAI ``*_tokens_details.cached_tokens`` / ``reasoning_tokens`` are sub-counts;
- Anthropic ``prompt_tokens = input_tokens + cache_read_input_tokens +
  cache_creation_input_tokens``, from the last value of each raw figure (so a
  ``message_delta`` that carries the real input figures, or an ``output_tokens`` lower
  than ``message_start``'s placeholder, wins); with ``usage.iterations[]`` the billable
  figures are the sums over the iterations;
- Responses API: ``response.usage`` in ``response.completed`` / ``incomplete`` /
  ``failed``.

The usage objects themselves are read by :mod:`spendtap.metering.usage_shapes` (one reader per
family, vendor variants included); this module frames the body and finds them. The
native API families (Gemini, Ollama, llama.cpp, Cohere) are scanned by
:mod:`spendtap.metering.dialect_scanner`, a subclass that reuses this framing and decoding.

Bodies are framed as server-sent events when the content type says so or the body
looks like an event stream, otherwise read as one JSON document (whole when small,
by head and tail when large). Memory per response is bounded and cost is linear.

Speed: ``feed`` runs on mitmproxy's event loop for every chunk. JSON is parsed only
for events that may carry usage or an error (a cheap regex on the raw bytes), and for
every event until the first generated content and the model have been seen; after
that, content events are recognised with byte checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from spendtap.metering.decoding import DecodeError, Decoder, is_identity, make_decoder
from spendtap.metering.dialect_llamacpp import timings_of
from spendtap.metering.dialects import MAX_ERROR_LEN, ServerTiming, error_summary, text_chars
from spendtap.metering.sse import SSEParser
from spendtap.metering.usage import NONE, REPORTED, Usage
from spendtap.metering.usage_shapes import (
    ANTHROPIC_SHAPE,
    N_FIGURES,
    OPENAI_SHAPE,
    anthropic_figures,
    anthropic_usage,
    chat_figures,
    input_output_shape,
    openai_usage,
    responses_figures,
)

__all__ = ["ResponseScanner", "ScanResult", "last_usage_object"]

# Events parsed in full while waiting for the first content event, at most.
PHASE1_MAX_EVENTS = 256
# Events of a many-event chunk handed to the parser one by one to learn the model and
# the first token before the rest is counted inline; past them, the parser takes it all.
_PARSED_BEFORE_INLINE = 8

# Scanning modes.
_UNDECIDED = 0
_SSE = 1
_JSON = 2

_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_SSE_PREFIXES = (b"data:", b"event:", b"id:", b"retry:", b":", b"data\n", b"data\r")

# An event may carry usage or an error: worth a JSON parse. ``"usage":null`` does not match.
_USAGE_OR_ERROR = re.compile(rb'"(?:usage|error)"\s*:\s*[{"]|"type"\s*:\s*"error"')
_USAGE_AT = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_IN_HEAD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_TYPE_IN_HEAD = re.compile(rb'"type"\s*:\s*"([A-Za-z0-9_.]{1,80})"')
# Chat / completions chunk with generated content: a non-empty string or list.
_CHAT_CONTENT = re.compile(
    rb'"(?:content|reasoning_content|reasoning|refusal|text)"\s*:\s*(?:"[^"]|\[\s*[^\]\s])'
    rb'|"tool_calls"\s*:\s*\[\s*[^\]\s]'
)
_ANTH_EMPTY_DELTA = re.compile(rb'"(?:text|thinking|partial_json|signature)"\s*:\s*""')
_RESP_DELTA_TYPE = re.compile(rb'"type"\s*:\s*"response\.[A-Za-z0-9_.]*\.delta"')
_RESP_EMPTY_DELTA = re.compile(rb'"delta"\s*:\s*""')

# Anthropic event types that never carry generated content.
_ANTH_NON_CONTENT = frozenset(
    ("message_start", "message_delta", "message_stop", "content_block_start",
     "content_block_stop", "ping", "error")
)  # fmt: skip

_ANTH_DELTA_KEYS = ("text", "thinking", "partial_json", "signature", "citation")
_CHAT_DELTA_KEYS = ("content", "reasoning_content", "reasoning", "refusal", "tool_calls")

_loads = json.loads
_raw_decoder = json.JSONDecoder()

# Usage families (spendtap.metering.usage_shapes).
_OA = OPENAI_SHAPE
_AN = ANTHROPIC_SHAPE


@dataclass(slots=True)
class ScanResult:
    usage: Usage = field(default_factory=Usage)
    usage_source: str = NONE
    first_content_at: float | None = None
    last_content_at: float | None = None
    content_events: int = 0
    response_model: str | None = None
    error: str | None = None
    parse_errors: int = 0
    decode_error: str | None = None
    bytes_scanned: int = 0
    streamed_sse: bool = False
    internal_errors: int = 0
    # Approximate characters of generated text, for estimating usage a server did
    # not report (see ``spendtap.metering.estimate``); None when there is nothing to go on.
    output_chars: int | None = None
    # Durations the server itself reported (Ollama, llama.cpp ``timings``), if any.
    server_timing: ServerTiming | None = None
    # How the body was framed: "sse", "json", "ndjson", "json-array" (None: no body).
    framing: str | None = None


# An error's kind in the OpenAI and Anthropic shapes (no Google ``status``).
_ERROR_KINDS = ("type", "code")


def _error_summary(e: Any) -> str | None:
    return error_summary(e, _ERROR_KINDS)


_TEXT_KEYS = frozenset(
    ("content", "text", "reasoning_content", "reasoning", "refusal", "arguments", "thinking")
)


def generated_text_chars(obj: Any) -> int:
    """Characters of generated text in a response document (for usage estimates).

    Sums the string values under the keys that hold generated text in the
    OpenAI chat/completions/Responses and Anthropic shapes, at any depth.
    """
    return text_chars(obj, _TEXT_KEYS)


def last_usage_object(buf: bytes) -> dict | None:
    """The last complete ``"usage": {...}`` object in ``buf`` (a head or tail excerpt).

    Finds the last ``"usage"\\s*:\\s*{`` (an escaped ``\\"usage\\"`` inside a JSON string
    cannot match) and reads the object there with a JSON parser, which is string-aware
    and stops at its matching brace. A truncated object is skipped for an earlier one.
    """
    pos = len(buf)
    while pos > 0:
        i = buf.rfind(b'"usage"', 0, pos)
        if i < 0:
            return None
        m = _USAGE_AT.match(buf, i)
        if m is not None:
            text = buf[m.end() - 1 :].decode("utf-8", "replace")
            try:
                obj, _ = _raw_decoder.raw_decode(text)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                return obj
        pos = i
    return None


class ResponseScanner:
    """Scan one response body for reported usage, model, errors and content timing."""

    # The mode of a body that is not an event stream (the dialect scanner reads JSON
    # sequences instead of one document).
    _DOCUMENT = _JSON
    # ``_event``'s token test may run inline in ``feed`` (a subclass with its own
    # ``_event`` turns this off).
    _INLINE_TOKENS = True

    __slots__ = (
        "_an",
        "_api",
        "_bytes",
        "_content_bytes",
        "_content_min",
        "_content_n",
        "_ctype_sse",
        "_decode_error",
        "_decoder",
        "_error",
        "_fam",
        "_fast",
        "_first",
        "_first_bytes_at",
        "_internal",
        "_j_head",
        "_j_len",
        "_j_over",
        "_j_parts",
        "_j_tail",
        "_j_tail_len",
        "_json_head",
        "_json_tail",
        "_json_text_chars",
        "_last",
        "_last_bytes_at",
        "_max_json",
        "_mode",
        "_model",
        "_oa",
        "_parse_errors",
        "_parser",
        "_phase1",
        "_phase1_events",
        "_pre",
        "_result",
        "_stopped",
        "_timings",
    )

    def __init__(
        self,
        api: str,
        content_type: str | None,
        content_encoding: str | None = None,
        *,
        max_json_bytes: int = 4 << 20,
        json_head_bytes: int = 64 << 10,
        json_tail_bytes: int = 64 << 10,
        max_event_bytes: int = 1 << 20,
        event_tail_bytes: int = 64 << 10,
    ) -> None:
        self._api = api
        ct = (content_type or "").lower()
        self._ctype_sse = "text/event-stream" in ct
        self._mode = _UNDECIDED
        self._pre = b""
        self._parser = SSEParser(max_event_bytes, min(16 << 10, max_event_bytes), event_tail_bytes)
        self._decoder: Decoder | None = None
        self._decode_error: str | None = None
        self._stopped = False
        try:
            dec = make_decoder(content_encoding)
            self._decoder = None if is_identity(dec) else dec
        except DecodeError as e:
            self._decode_error = str(e)[:MAX_ERROR_LEN]
            self._stopped = True
        except Exception as e:  # never raise
            self._decode_error = f"{type(e).__name__}: {e}"[:MAX_ERROR_LEN]
            self._stopped = True
        # Raw usage figures, per family, last value of each wins.
        # _oa: prompt, completion, cached, reasoning, cache creation (OpenAI shapes)
        # _an: input, output, cache read, cache creation, reasoning (Anthropic)
        self._oa: list[int | None] = [None] * N_FIGURES
        self._an: list[int | None] = [None] * N_FIGURES
        self._fam = 0  # family of the last usage object seen
        self._first: float | None = None
        self._last: float | None = None
        self._content_n = 0
        self._content_bytes = 0
        self._content_min = 1 << 30
        self._json_text_chars: int | None = None
        self._phase1 = True  # until the first content event: parse every event
        # A chunk that is one whole token event may skip the parser (see ``feed``).
        self._fast = False
        self._phase1_events = 0
        self._model: str | None = None
        self._error: str | None = None
        self._parse_errors = 0
        self._internal = 0
        self._bytes = 0
        self._first_bytes_at: float | None = None
        self._last_bytes_at: float | None = None
        # JSON mode: the whole body up to max_json, then head + tail.
        self._max_json = max_json_bytes
        self._json_head = json_head_bytes
        self._json_tail = json_tail_bytes
        self._j_parts: list[bytes] = []
        self._j_len = 0
        self._j_over = False
        self._j_head = b""
        self._j_tail: list[bytes] = []
        self._j_tail_len = 0
        self._result: ScanResult | None = None
        self._timings: dict | None = None  # llama.cpp's ``timings`` sibling of usage

    # -- feeding ------------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> None:
        """Scan the next chunk of the body (as received, still encoded). Never raises."""
        if self._stopped or not chunk:
            return
        try:
            dec = self._decoder
            if dec is None:
                if self._mode == _SSE:  # the hot path: plain event stream
                    self._bytes += len(chunk)
                    self._last_bytes_at = now
                    if (
                        self._fast
                        and chunk.startswith(b"data: {")
                        and chunk.find(b"\n") == len(chunk) - 2
                        and chunk[-1] == 10
                        and chunk.find(b"\r") < 0
                        and self._token_event(chunk)
                    ):
                        # One whole chat token event, the parser holding nothing: what
                        # ``_event`` would conclude, without the parser's list, the event
                        # tuple and the call (the parser stays at an event boundary).
                        self._last = now
                        self._content_n += 1
                        size = len(chunk) - 8  # the event's data: without "data: " and "\n\n"
                        self._content_bytes += size
                        if size < self._content_min:
                            self._content_min = size
                        return
                    self._feed_sse(chunk, now)
                    parser = self._parser
                    self._fast = (
                        chunk[-1] == 10  # an event boundary ends a line: cheap test first
                        and self._INLINE_TOKENS
                        and not self._phase1
                        and self._first is not None
                        and self._model is not None
                        and parser.at_event_boundary()
                    )
                    return
                self._scan(chunk, now)
            else:
                for piece in dec.iter_decode(chunk):
                    self._scan(piece, now)
        except DecodeError as e:
            self._decode_error = str(e)[:MAX_ERROR_LEN]
            self._stopped = True
        except Exception:
            self._internal += 1
            self._stopped = True

    def buffered_bytes(self) -> int:
        """Bytes held for this response (framing, JSON body or head/tail); for memory checks."""
        n = len(self._pre) + self._parser.buffered_bytes()
        return n + self._j_len + len(self._j_head) + self._j_tail_len

    def _scan(self, data: bytes, now: float) -> None:
        self._bytes += len(data)
        if self._first_bytes_at is None:
            self._first_bytes_at = now
        self._last_bytes_at = now
        mode = self._mode
        if mode == _SSE:
            self._feed_sse(data, now)
        elif mode == _JSON:
            self._json_add(data)
        else:
            self._detect(data, now, final=False)

    def _detect(self, data: bytes, now: float, final: bool) -> None:
        """Choose SSE or a document from the first non-blank bytes (and the content type).

        Runs only until the mode is chosen (the first chunk or few of a response).
        """
        pre = self._pre + data
        s = pre[3:] if pre.startswith(_BOM) else pre
        s = s.lstrip(_WS)
        doc = self._DOCUMENT
        if not s:
            if not final and len(pre) < 4096:
                self._pre = pre
                return
            mode = _SSE if self._ctype_sse else doc
        elif s[0] in b"{[":
            mode = doc
        elif s.startswith(_SSE_PREFIXES):
            mode = _SSE
        elif not final and len(s) < 6 and any(p.startswith(s) for p in _SSE_PREFIXES):
            self._pre = pre
            return
        else:
            mode = _SSE if self._ctype_sse else doc
        self._pre = b""
        self._mode = mode
        if mode == _SSE:
            self._feed_sse(pre, now)
        else:
            self._start_document(pre, s, now)

    def _start_document(self, pre: bytes, s: bytes, now: float) -> None:
        """The first bytes of a body that is not an event stream (``s``: without BOM and
        leading blanks)."""
        self._json_add(pre)

    # -- SSE ----------------------------------------------------------------------

    def _event(self, ev_type: str | None, data: bytes, tail: bytes | None, now: float) -> None:
        try:
            if tail is None and data and data[0] == 123:  # "{": the usual case
                if self._phase1 or (self._model is None and data.find(b'"model"') >= 0):
                    content = self._parse(ev_type, data)
                elif ev_type is None and self._token_event(data):
                    content = True  # a chat token, the usual event
                elif _USAGE_OR_ERROR.search(data) is not None:
                    content = self._parse(ev_type, data)
                else:
                    content = self._bytes_content(ev_type, data)
            else:
                content = self._event_other(ev_type, data, tail)
            if content:
                if self._first is None:
                    self._first = now
                    self._phase1 = False
                self._last = now
                self._content_n += 1
                # For estimates: content events share one JSON envelope, so the
                # smallest event approximates envelope + 1 character.
                size = len(data)
                self._content_bytes += size
                if size < self._content_min:
                    self._content_min = size
            elif self._phase1:
                self._phase1_events += 1
                if self._phase1_events >= PHASE1_MAX_EVENTS:
                    # A shape whose content we do not recognise: stop parsing everything.
                    self._phase1 = False
        except Exception:
            self._internal += 1

    def _feed_sse(self, chunk: bytes, now: float) -> None:
        """Events through the parser, or, in a chunk of many (what one read of a fast
        stream brings, passed on whole by ``spendtap.proxy.coalesce``), the whole token
        events counted inline: once the parser is at an event boundary with the stream's
        model and first token known (the first few events go through it to learn them),
        the whole events up to the chunk's last boundary are counted inline if all of
        them are token events; a cut event at the end goes through the parser.
        """
        parser = self._parser
        event = self._event
        if not self._INLINE_TOKENS or len(chunk) <= 512 or chunk.find(b"\r") >= 0:
            for t, d, tail in parser.feed(chunk):
                event(t, d, tail, now)
            return
        n = len(chunk)
        pos = 0
        for _ in range(_PARSED_BEFORE_INLINE):
            if (
                not self._phase1
                and self._first is not None
                and self._model is not None
                and parser.at_event_boundary()
            ):
                break
            following = chunk.find(b"\n\n", pos) + 2
            if following == 1 or following == n:
                following = n
            for t, d, tail in parser.feed(chunk[pos:following] if pos or following < n else chunk):
                event(t, d, tail, now)
            pos = following
            if pos == n:
                return
        else:
            for t, d, tail in parser.feed(chunk[pos:]):
                event(t, d, tail, now)
            return
        end = chunk.rfind(b"\n\n") + 2
        while pos < end:
            # Token events inline up to the first other one, which the parser takes.
            pos = self._token_events(chunk, pos, end, now)
            if pos == end:
                break
            following = chunk.find(b"\n\n", pos) + 2
            for t, d, tail in parser.feed(chunk[pos:following]):
                event(t, d, tail, now)
            pos = following
            if not parser.at_event_boundary():
                break
        if pos < n:
            for t, d, tail in parser.feed(chunk[pos:]):
                event(t, d, tail, now)

    def _token_events(self, chunk: bytes, pos: int, end: int, now: float) -> int:
        """Count the chat token events of ``chunk[pos:end]`` (whole events) inline, up to
        the first event that is anything else; where that one starts (``end``: all were).
        """
        events = chunk[pos:end].split(b"\n\n")
        events.pop()  # after the last blank line: nothing
        token_event = self._token_event
        total = 0
        smallest = self._content_min
        counted = 0
        for ev in events:
            if not (ev.startswith(b"data: {") and ev.find(b"\n") < 0 and token_event(ev)):
                break
            size = len(ev) - 6  # the event's data, without "data: "
            total += size
            if size < smallest:
                smallest = size
            counted += 1
            pos += size + 8
        else:
            pos = end
        if counted:
            self._last = now
            self._content_n += counted
            self._content_bytes += total
            self._content_min = smallest
        return pos

    @staticmethod
    def _token_event(data: bytes) -> bool:
        """True for a chat token event: a non-empty ``content`` string in a ``choices``
        chunk that carries no usage and no error (the compact ``"usage":null`` a server
        adds to every chunk once usage is asked for does not count). False means "not
        sure": the event takes the full path (a regex, a parse or ``_bytes_content``).

        Plain ``find``s at C speed, for the event nearly every chunk of a chat stream is.
        ``data`` may be the event's data or its whole ``data: ...`` line: the checks only
        look inside the JSON.
        """
        u = data.find(b'usage"')
        if u >= 0 and not (data.startswith(b":null", u + 6) and data.find(b'usage"', u + 11) < 0):
            return False
        if data.find(b'error"') >= 0:
            return False
        i = data.find(b'"content":"')
        return i >= 0 and data[i + 11 : i + 12] != b'"' and data.find(b'"choices"') >= 0

    def _event_other(self, ev_type: str | None, data: bytes, tail: bytes | None) -> bool:
        """Oversized events, ``[DONE]``, blank or non-JSON data."""
        if tail is not None:
            return self._oversized(ev_type, data, tail)
        s = data.strip()
        if not s or s == b"[DONE]":
            return False
        if s[0] == 123:
            return self._parse(ev_type, s)
        if s[0] != 91:  # not a JSON array either: malformed
            self._parse_errors += 1
            if ev_type == "error" and self._error is None:
                self._error = s[:MAX_ERROR_LEN].decode("utf-8", "replace")
        return False

    def _parse(self, ev_type: str | None, data: bytes) -> bool:
        try:
            obj = _loads(data)
        except (ValueError, RecursionError):
            self._parse_errors += 1
            if ev_type == "error" and self._error is None:
                self._error = data[:MAX_ERROR_LEN].decode("utf-8", "replace")
            return self._bytes_content(ev_type, data)
        if type(obj) is dict:
            return self._object(obj, ev_type)
        return False

    def _bytes_content(self, ev_type: str | None, data: bytes) -> bool:
        """Cheap content test on the raw event data (no JSON parse)."""
        if ev_type is not None:
            if ev_type == "content_block_delta":
                return data.find(b'""') < 0 or _ANTH_EMPTY_DELTA.search(data) is None
            if ev_type.startswith("response."):
                return ev_type.endswith(".delta") and (
                    data.find(b'""') < 0 or _RESP_EMPTY_DELTA.search(data) is None
                )
            if ev_type in _ANTH_NON_CONTENT:
                return False
        if data.find(b'"choices"') >= 0:
            i = data.find(b'"content":"')
            if i >= 0 and data[i + 11 : i + 12] != b'"':
                return True
            return _CHAT_CONTENT.search(data) is not None
        if data.find(b'"content_block_delta"') >= 0:
            return data.find(b'""') < 0 or _ANTH_EMPTY_DELTA.search(data) is None
        if data.find(b'"response.') >= 0 and _RESP_DELTA_TYPE.search(data) is not None:
            return data.find(b'""') < 0 or _RESP_EMPTY_DELTA.search(data) is None
        return False

    def _oversized(self, ev_type: str | None, head: bytes, tail: bytes) -> bool:
        """An event too large to keep: model and type from its head, usage from its tail."""
        if self._model is None:
            m = _MODEL_IN_HEAD.search(head)
            if m is not None:
                self._set_model(m.group(1))
        t = ev_type
        if t is None:
            m = _TYPE_IN_HEAD.search(head)
            t = m.group(1).decode() if m is not None else None
        u = last_usage_object(tail)
        if u is not None:
            self._usage(u, self._hint(t))
        if ev_type == "error" and self._error is None:
            self._error = "error event: " + head[:200].decode("utf-8", "replace")
        return self._bytes_content(ev_type, head)

    def _set_model(self, raw: bytes) -> None:
        try:
            m = json.loads(b'"' + raw + b'"')
        except ValueError:
            return
        if isinstance(m, str) and m:
            self._model = m

    # -- objects ------------------------------------------------------------------

    def _object(self, obj: dict, ev_type: str | None) -> bool:
        """Take usage, model and error from one parsed event; return its content-ness."""
        t = obj.get("type")
        if type(t) is not str:
            t = ev_type
        if self._model is None:
            m = obj.get("model")
            if not (type(m) is str and m):
                sub = obj.get("message") or obj.get("response")
                m = sub.get("model") if isinstance(sub, dict) else None
            if type(m) is str and m:
                self._model = m[:256]
        self._object_usage(obj, t)
        tm = obj.get("timings")
        if type(tm) is dict:
            self._timings = tm
        if self._error is None:
            self._object_error(obj, t, ev_type)
        return self._object_content(obj, t)

    def _object_usage(self, obj: dict, t: str | None) -> None:
        hint = self._hint(t)
        # Vendor duplicates first (x_groq.usage): a standard top-level usage then wins.
        for k, v in obj.items():
            if k.startswith("x_") and isinstance(v, dict):
                u = v.get("usage")
                if isinstance(u, dict):
                    self._usage(u, hint)
        for key, h in (("message", _AN), ("response", _OA)):
            sub = obj.get(key)
            if isinstance(sub, dict):
                u = sub.get("usage")
                if isinstance(u, dict):
                    self._usage(u, h)
        u = obj.get("usage")
        if isinstance(u, dict):
            self._usage(u, hint)
        elif type(obj.get("choices")) is list:
            # Moonshot: usage inside the finish chunk's choice, not beside it.
            for c in obj["choices"]:
                if type(c) is dict:
                    cu = c.get("usage")
                    if type(cu) is dict:
                        self._usage(cu, hint)

    def _object_error(self, obj: dict, t: str | None, ev_type: str | None) -> None:
        e = obj.get("error")
        if e and not isinstance(e, bool):
            self._error = _error_summary(e)
        elif t == "error" or ev_type == "error":
            self._error = _error_summary(obj)
        elif t == "response.failed":
            r = obj.get("response")
            if isinstance(r, dict):
                self._error = _error_summary(r.get("error")) or "response.failed"

    @staticmethod
    def _object_content(obj: dict, t: str | None) -> bool:
        if t is not None:
            if t == "content_block_delta":
                d = obj.get("delta")
                if not isinstance(d, dict):
                    return False
                return any(d.get(k) for k in _ANTH_DELTA_KEYS)
            if t.startswith("response."):
                if not t.endswith(".delta"):
                    return False
                d = obj.get("delta")
                return d is not None and d != ""
            if t in _ANTH_NON_CONTENT:
                return False
        choices = obj.get("choices")
        if type(choices) is list:
            for c in choices:
                if type(c) is not dict:
                    continue
                d = c.get("delta")
                if type(d) is dict:
                    for k in _CHAT_DELTA_KEYS:
                        v = d.get(k)
                        if v and isinstance(v, str | list):
                            return True
                tx = c.get("text")
                if type(tx) is str and tx:
                    return True
        return False

    def _hint(self, t: str | None) -> int:
        """Usage family suggested by an event or object type (0: no idea)."""
        if t is None:
            return 0
        if t == "message" or t.startswith(("message_", "content_block")):
            return _AN
        if t.startswith("response"):
            return _OA
        return 0

    def _usage(self, u: dict, hint: int) -> None:
        """Record one usage object; each reported figure replaces the previous one."""
        if "prompt_tokens" in u or "completion_tokens" in u:
            self._record(self._oa, chat_figures(u), _OA)
            return
        fam = input_output_shape(u, self._api, hint)
        if fam == _OA:
            self._record(self._oa, responses_figures(u), _OA)
        elif fam == _AN:
            self._record(self._an, anthropic_figures(u), _AN)

    def _record(self, store: list, vals: Any, fam: int) -> None:
        seen = False
        for i, v in enumerate(vals):
            if v is not None:
                store[i] = v
                seen = True
        if seen:
            self._fam = fam

    # -- JSON bodies --------------------------------------------------------------

    def _json_add(self, data: bytes) -> None:
        if not self._j_over:
            self._j_parts.append(data)
            self._j_len += len(data)
            if self._j_len <= self._max_json:
                return
            body = b"".join(self._j_parts)
            self._j_parts = []
            self._j_len = 0
            self._j_over = True
            self._j_head = body[: self._json_head]
            data = body[-self._json_tail :]
            self._j_tail = []
            self._j_tail_len = 0
        self._j_tail.append(data)
        self._j_tail_len += len(data)
        if self._j_tail_len > 2 * self._json_tail:
            t = b"".join(self._j_tail)[-self._json_tail :]
            self._j_tail = [t]
            self._j_tail_len = len(t)

    def _finish_json(self) -> None:
        if self._j_over:
            head = self._j_head
            tail = b"".join(self._j_tail)[-self._json_tail :]
            m = _MODEL_IN_HEAD.search(head) or _MODEL_IN_HEAD.search(tail)
            if m is not None:
                self._set_model(m.group(1))
            u = last_usage_object(tail)
            if u is not None:
                m = _TYPE_IN_HEAD.search(head)
                self._usage(u, self._hint(m.group(1).decode()) if m is not None else 0)
            return
        body = b"".join(self._j_parts)
        self._j_parts = []
        self._j_len = 0
        if not body.strip(_WS):
            return
        try:
            obj = _loads(body)
        except (ValueError, RecursionError):
            self._parse_errors += 1
            return
        if type(obj) is not dict:
            return
        t = obj.get("type")
        if type(t) is not str:
            t = "response" if obj.get("object") == "response" else None
        # A whole document is read as one event is (model, usage, timings, error); its
        # content-ness does not matter, the body's own bytes time it.
        self._object(obj, t)
        if self._fam == 0:
            self._json_text_chars = generated_text_chars(obj)

    # -- result -------------------------------------------------------------------

    def finish(self, now: float) -> ScanResult:
        """Flush decoder and framing and return the result (the same one on every call)."""
        if self._result is not None:
            return self._result
        at = self._last_bytes_at if self._last_bytes_at is not None else now
        if not self._stopped:
            try:
                if self._decoder is not None:
                    for piece in self._decoder.iter_flush():
                        self._scan(piece, at)
                if self._mode == _UNDECIDED:
                    self._detect(b"", at, final=True)
                self._close_framing(at)
            except DecodeError as e:
                self._decode_error = str(e)[:MAX_ERROR_LEN]
            except Exception:
                self._internal += 1
        self._stopped = True
        r = self._result = self._build()
        return r

    def _close_framing(self, at: float) -> None:
        """The end of the body: the last event, or the JSON document (once per response;
        the dialect scanner closes its JSON sequences here)."""
        if self._mode == _SSE:
            for t, d, tail in self._parser.close():
                self._event(t, d, tail, at)
        elif self._mode == _JSON:
            self._finish_json()

    def _scan_result(self, usage: Usage, **fields) -> ScanResult:
        """The result of this response: ``fields`` plus what every scanner counts the same
        way (once per response, off the per-chunk path)."""
        return ScanResult(
            usage=usage,
            usage_source=REPORTED if usage.reported else NONE,
            parse_errors=self._parse_errors,
            decode_error=self._decode_error,
            bytes_scanned=self._bytes,
            internal_errors=self._internal,
            **fields,
        )

    def _build(self) -> ScanResult:
        if self._fam == _AN:
            usage = anthropic_usage(self._an)
        elif self._fam == _OA:
            usage = openai_usage(self._oa)
        else:
            usage = Usage()
        if self._mode == _JSON:
            first, last = self._first_bytes_at, self._last_bytes_at
            n = 1 if self._bytes else 0
            output_chars = self._json_text_chars
        else:
            first, last, n = self._first, self._last, self._content_n
            output_chars = self._content_bytes - n * (self._content_min - 1) if n else None
        return self._scan_result(
            usage,
            first_content_at=first,
            last_content_at=last,
            content_events=n,
            response_model=self._model,
            error=self._error,
            streamed_sse=self._mode == _SSE,
            output_chars=output_chars,
            server_timing=timings_of(self._timings) if self._timings else None,
            framing=("sse" if self._mode == _SSE else "json") if self._mode else None,
        )
