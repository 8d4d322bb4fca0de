"""The recorded wire corpus (tests/corpus/wire) and helpers to scan it."""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import brotli
import zstandard

from spendtap.metering.dialect_scanner import make_scanner
from spendtap.metering.scanner import ScanResult
from spendtap.metering.usage import ANTHROPIC_MESSAGES, GEMINI, Usage

CORPUS = Path(__file__).resolve().parent / "corpus" / "wire"

# Encodings a server may apply, and how to produce them.
ENCODINGS = ("gzip", "x-gzip", "deflate", "deflate-raw", "br", "zstd", "gzip, br")


@dataclass(frozen=True)
class Case:
    name: str
    meta: dict
    body: bytes

    @property
    def api(self) -> str:
        return self.meta["api"]

    @property
    def content_type(self) -> str | None:
        return self.meta.get("content_type")

    @property
    def streaming(self) -> bool:
        return bool(self.meta["streaming"])

    def expected_usage(self) -> Usage:
        """The meta's raw figures, normalized as the ledger stores them (docs/)."""
        e = self.meta["expected"]
        inp, cached, created = (
            e["input_tokens"],
            e["cached_input_tokens"],
            e["cache_creation_input_tokens"],
        )
        out = e["output_tokens"]
        if self.api == ANTHROPIC_MESSAGES and inp is not None:
            # Anthropic input_tokens excludes cache reads and writes.
            prompt = inp + (cached or 0) + (created or 0)
        elif self.api == GEMINI:
            # Gemini: tool-use prompt tokens are input on top of promptTokenCount, and
            # thoughts are output on top of candidatesTokenCount.
            tool = e.get("tool_use_prompt_tokens")
            prompt = inp + tool if inp is not None and tool is not None else inp
            r = e["reasoning_tokens"]
            out = None if out is None and r is None else (out or 0) + (r or 0)
        else:
            prompt = inp
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=out,
            cached_tokens=cached,
            cache_creation_tokens=created,
            reasoning_tokens=e["reasoning_tokens"],
        )


@cache
def load_cases() -> tuple[Case, ...]:
    cases = []
    for d in sorted(CORPUS.iterdir()):
        if (d / "meta.json").is_file() and (d / "body").is_file():
            meta = json.loads((d / "meta.json").read_text())
            cases.append(Case(d.name, meta, (d / "body").read_bytes()))
    return tuple(cases)


def case_ids() -> list[str]:
    return [c.name for c in load_cases()]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def encode(body: bytes, encoding: str) -> tuple[bytes, str]:
    """``body`` compressed as ``encoding``; returns (bytes, Content-Encoding value)."""
    if encoding in ("gzip", "x-gzip"):
        return gzip.compress(body, mtime=0), encoding  # fixed mtime: same bytes every time
    if encoding == "deflate":
        return zlib.compress(body), "deflate"
    if encoding == "deflate-raw":
        c = zlib.compressobj(wbits=-15)
        return c.compress(body) + c.flush(), "deflate"
    if encoding == "br":
        return brotli.compress(body), "br"
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(body), "zstd"
    if encoding == "gzip, br":
        return brotli.compress(gzip.compress(body, mtime=0)), "gzip, br"
    raise ValueError(encoding)


def scan(
    api: str,
    content_type: str | None,
    chunks: list[bytes],
    content_encoding: str | None = None,
    **kwargs,
) -> ScanResult:
    """Feed ``chunks`` at times 0, 1, 2, ... and finish one second after the last."""
    s = make_scanner(api, content_type, content_encoding, **kwargs)
    for i, c in enumerate(chunks):
        s.feed(c, float(i))
    return s.finish(float(len(chunks)))


def sse(*events: tuple[str | None, object] | object, done: bool = False) -> bytes:
    """An event stream: each item is a JSON-able object or (event name, object)."""
    out = []
    for ev in events:
        name, obj = ev if isinstance(ev, tuple) else (None, ev)
        data = obj if isinstance(obj, str) else json.dumps(obj)
        out.append((f"event: {name}\n" if name else "") + f"data: {data}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()
