"""Usage extractors for the native APIs: the base class every dialect module fills in.

Pure (no mitmproxy, no click). One subclass per API family says everything
spendtap needs to know about that family:

- which request paths name it (``PATH_SUFFIXES`` or ``matches``), whether it
  streams by default (``STREAMS_BY_DEFAULT``), where a request keeps its output
  limit (``LIMIT_PATHS``) and what the path itself says (``facts_from_path``);
- how to read its answers: ``read`` takes one parsed object (an SSE event's data, an
  NDJSON line, an element of a JSON-array stream, or a whole document),
  ``read_oversized`` an object too large to parse, ``usage`` / ``server_timing``
  give the normalized result.

The framing (server-sent events, NDJSON, JSON-array stream, one document),
decoding and timing live in :mod:`spendtap.metering.dialect_scanner`; the families are
listed once in :mod:`spendtap.metering.dialect_registry`. A new dialect is one module with a
subclass, one line in the registry, and its corpus cases.

An extractor, for each parsed object (an SSE event's data, an NDJSON line, an
element of a JSON-array stream, or a whole document):

- records every usage figure the object reports, the last value of each winning
  (usage objects are cumulative or repeated; never summed);
- takes the model and an error summary;
- says whether the object carried generated content (for TTFT and decode timing).

``usage()`` then normalizes the figures to :class:`spendtap.metering.usage.Usage` (see
DESIGN.md "Usage semantics"): a figure not reported stays None, never 0.
Servers that report their own durations (Ollama nanoseconds, llama.cpp ``timings``)
are read into :class:`ServerTiming`.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from spendtap.metering.usage import Usage

__all__ = ["Extractor", "ServerTiming", "error_summary", "int_or_none"]

MAX_ERROR_LEN = 300


@dataclass(slots=True)
class ServerTiming:
    """Durations the server reports for one response, in seconds."""

    prompt_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    load_s: float | None = None
    decode_tokens_per_s: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "prompt_s": self.prompt_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "load_s": self.load_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def int_or_none(v: Any) -> int | None:
    """A token count, or None when ``v`` is not a non-negative integer."""
    if type(v) is int:
        return v if v >= 0 else None
    if type(v) is float and v >= 0 and v.is_integer():
        return int(v)
    return None


def num_or_none(v: Any) -> float | None:
    if type(v) in (int, float) and v >= 0:
        return float(v)
    return None


# The keys that name an error's kind, the first one set wins: Google's shape has a
# ``status`` name beside its numeric ``code``; the OpenAI and Anthropic shapes
# (spendtap.metering.scanner) are read with ``("type", "code")``.
NATIVE_ERROR_KINDS = ("type", "status", "code")


def error_summary(e: Any, kinds: tuple[str, ...] = NATIVE_ERROR_KINDS) -> str | None:
    """``kind: message`` of an error object (JSON when either is structured), or a string
    error as it is; at most ``MAX_ERROR_LEN`` characters; None for anything else."""
    if isinstance(e, dict):
        kind = None
        for k in kinds:
            kind = e.get(k)
            if kind:
                break
        msg = e.get("message")
        if isinstance(kind, dict | list) or isinstance(msg, dict | list):
            text = json.dumps(e, separators=(",", ":"))
        else:
            parts = [str(p) for p in (kind, msg) if p not in (None, "")]
            text = ": ".join(parts) if parts else json.dumps(e, separators=(",", ":"))
    elif isinstance(e, str):
        text = e
    else:
        return None
    return text[:MAX_ERROR_LEN] or "error"


_TEXT_KEYS = frozenset(("content", "text", "response", "thinking", "arguments"))


def text_chars(obj: Any, keys: frozenset[str] = _TEXT_KEYS, depth: int = 0) -> int:
    """Characters of generated text under ``keys``, at any depth (for usage estimates)."""
    if depth > 12:
        return 0
    n = 0
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str):
                if k in keys:
                    n += len(v)
            elif isinstance(v, dict | list):
                n += text_chars(v, keys, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict | list):
                n += text_chars(v, keys, depth + 1)
    return n


class Extractor:
    """Base: one response's figures for one API family (subclass per family)."""

    __slots__ = ("error", "figs", "model")

    api: str = ""
    # -- the request side (class-level; read by spendtap.metering.request) --
    # Request paths (lower-case, query removed, no trailing slash) ending so name the family.
    PATH_SUFFIXES: tuple[str, ...] = ()
    # Where a request body keeps its output limit: key paths, the first present wins.
    LIMIT_PATHS: tuple[tuple[str, ...], ...] = ()
    # The family streams unless the request says ``"stream": false`` (Ollama).
    STREAMS_BY_DEFAULT = False
    # -- the response side --
    # Figure names this family reports (documentation; ``figs`` holds the values).
    FIELDS: tuple[str, ...] = ()
    # Byte patterns for an object too large to parse: name -> regex with one int group.
    TAIL_PATTERNS: dict[str, re.Pattern[bytes]] = {}

    def __init__(self) -> None:
        self.figs: dict[str, int] = {}
        self.model: str | None = None
        self.error: str | None = None

    # -- the request side -------------------------------------------------------------

    @classmethod
    def matches(cls, path_lower: str) -> bool:
        """True if a request path (lower-case, query removed) names this family."""
        return path_lower.endswith(cls.PATH_SUFFIXES) if cls.PATH_SUFFIXES else False

    @classmethod
    def facts_from_path(cls, path: str) -> tuple[str | None, bool | None]:
        """(model, streaming) that the request path itself states; None: it does not say."""
        return None, None

    @classmethod
    def output_limit(cls, doc: dict) -> int | None:
        """The request's output limit, from the first of ``LIMIT_PATHS`` present."""
        for keys in cls.LIMIT_PATHS:
            value: Any = doc
            for k in keys:
                value = value.get(k) if isinstance(value, dict) else None
            if type(value) is int and value >= 0:
                return value
        return None

    # -- reading --------------------------------------------------------------------

    def read(self, obj: dict, ev_type: str | None) -> bool:
        """Take figures, model and error from one object; True if it carried content."""
        raise NotImplementedError

    def read_oversized(self, head: bytes, tail: bytes) -> None:
        """An object too large to keep: figures from its tail with byte patterns."""
        for name, rx in self.TAIL_PATTERNS.items():
            found = None
            for found in rx.finditer(tail):  # noqa: B007 - the last match wins
                pass
            if found is not None:
                self.figs[name] = int(found.group(1))
        if self.model is None:
            m = _MODEL_IN_HEAD.search(head) or _MODEL_IN_HEAD.search(tail)
            if m is not None:
                with contextlib.suppress(ValueError):
                    self.model = json.loads(b'"' + m.group(2) + b'"')[:256]

    def _take(self, d: dict, keys: tuple[str, ...], prefix: str = "") -> bool:
        """Record ``d[key]`` for each key that holds a count; True if any did."""
        seen = False
        figs = self.figs
        for k in keys:
            v = d.get(k)
            if v is not None:
                n = int_or_none(v)
                if n is not None:
                    figs[prefix + k] = n
                    seen = True
        return seen

    def _model(self, m: Any) -> None:
        if self.model is None and type(m) is str and m:
            self.model = m[:256]

    # -- results --------------------------------------------------------------------

    @property
    def reported(self) -> bool:
        return bool(self.figs)

    def usage(self) -> Usage:
        raise NotImplementedError

    def server_timing(self) -> ServerTiming | None:
        return None


_MODEL_IN_HEAD = re.compile(rb'"(model|modelVersion)"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


def count_pattern(name: str) -> re.Pattern[bytes]:
    return re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d{1,15})\b')
