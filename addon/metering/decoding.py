"""Incremental Content-Encoding decoders, used only to *scan* a body.

The client always receives the bytes as sent; the scanner reads a decoded copy.
``make_decoder(content_encoding)`` returns an object with

- ``iter_decode(chunk)``: yields the decoded bytes in pieces of bounded size;
- ``decode(chunk) -> bytes``: the same, joined;
- ``flush() -> bytes``: whatever is still held at the end of the body.

Supported: ``identity``, ``gzip``/``x-gzip`` (multi-member), ``deflate`` (zlib-wrapped
or raw, detected from the first two bytes), ``br``, ``zstd`` and comma-separated lists
(``gzip, br`` was applied gzip first, so it is decoded br first).

An unknown encoding or corrupt data raises ``DecodeError``.

Decompression bombs: ``iter_decode`` never holds much more than ``piece_size``
decoded bytes at once, so a caller that consumes each piece before asking for the
next keeps memory bounded.

- zlib (gzip/deflate): ``decompress(data, max_length)`` + ``unconsumed_tail``: exact.
- brotli: ``process(data, output_buffer_limit=...)`` then ``process(b"")`` until no
  more output: each piece is bounded (the limit may be overshot by one internal
  buffer, well under 1 MiB).
- zstd: ``zstandard``'s decompressobj has no output limit, so input is fed in slices
  of ``_ZSTD_SLICE`` bytes; one zstd block can expand to at most 128 KiB from a few
  bytes (ratio ~32000:1), so one piece stays under ~8 MiB. That is the weak spot.

The CPU spent decoding a bomb is still proportional to its decoded size; a caller
that wants to cap it counts the bytes it receives.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import brotli
import zstandard

__all__ = ["DecodeError", "Decoder", "make_decoder"]

PIECE_SIZE = 64 << 10
_ZSTD_SLICE = 256


class DecodeError(Exception):
    """The body cannot be decoded (unknown encoding or corrupt data)."""


class Decoder:
    """Base decoder: identity."""

    name = "identity"

    def iter_decode(self, chunk: bytes) -> Iterator[bytes]:
        if chunk:
            yield chunk

    def iter_flush(self) -> Iterator[bytes]:
        return iter(())

    def decode(self, chunk: bytes) -> bytes:
        return b"".join(self.iter_decode(chunk))

    def flush(self) -> bytes:
        return b"".join(self.iter_flush())


class _ZlibDecoder(Decoder):
    """gzip (multi-member) and deflate (zlib-wrapped or raw)."""

    def __init__(self, name: str, piece_size: int) -> None:
        self.name = name
        self._piece = piece_size
        self._gzip = name in ("gzip", "x-gzip")
        # gzip: the current member (None between members); deflate: None until the
        # first two bytes tell zlib-wrapped from raw.
        self._obj = zlib.decompressobj(31) if self._gzip else None
        self._head = b""  # bytes held until the next stream's start can be judged
        self._done = False  # the stream ended: trailing bytes are ignored

    def _start(self, data: bytes) -> bytes:
        """With no stream open, open one from ``data`` (or hold/ignore it); return the rest."""
        head = self._head + data
        if self._gzip:
            # Between gzip members: zero padding is skipped, anything but a new
            # member's magic is trailing garbage.
            head = head.lstrip(b"\0")
            if len(head) < 2:
                self._head = head
                return b""
            if head[:2] != b"\x1f\x8b":
                self._done = True
                return b""
            self._obj = zlib.decompressobj(31)
        else:
            if len(head) < 2:
                self._head = head
                return b""
            b0, b1 = head[0], head[1]
            wrapped = (b0 & 0x0F) == 8 and (b0 >> 4) <= 7 and ((b0 << 8) | b1) % 31 == 0
            self._obj = zlib.decompressobj(15 if wrapped else -15)
        self._head = b""
        return head

    def iter_decode(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        piece = self._piece
        while data and not self._done:
            obj = self._obj
            if obj is None:
                data = self._start(data)
                continue
            try:
                out = obj.decompress(data, piece)
            except zlib.error as e:
                raise DecodeError(f"{self.name}: {e}") from None
            if out:
                yield out
            data = obj.unconsumed_tail
            if obj.eof:
                data = obj.unused_data
                if self._gzip:
                    self._obj = None  # another member may follow
                else:
                    self._done = True

    def iter_flush(self) -> Iterator[bytes]:
        if self._done:
            return
        if self._obj is None:
            if not self._gzip and self._head:
                # A one-byte deflate body: only raw deflate can be that short.
                self._obj = zlib.decompressobj(-15)
                head, self._head = self._head, b""
                yield from self.iter_decode(head)
            else:
                return
        try:
            out = self._obj.flush()
        except zlib.error as e:
            raise DecodeError(f"{self.name}: {e}") from None
        if out:
            yield out


class _BrotliDecoder(Decoder):
    name = "br"

    def __init__(self, piece_size: int) -> None:
        self._obj = brotli.Decompressor()
        self._piece = piece_size

    def iter_decode(self, chunk: bytes) -> Iterator[bytes]:
        if not chunk:
            return
        obj = self._obj
        piece = self._piece
        try:
            if obj.is_finished():
                return  # trailing bytes after the stream end are ignored
            out = obj.process(chunk, output_buffer_limit=piece)
            while True:
                if out:
                    yield out
                if obj.is_finished():
                    return
                out = obj.process(b"", output_buffer_limit=piece)
                if not out:
                    return
        except brotli.error as e:
            raise DecodeError(f"br: {e}") from None


class _ZstdDecoder(Decoder):
    name = "zstd"

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()

    def iter_decode(self, chunk: bytes) -> Iterator[bytes]:
        if not chunk:
            return
        view = memoryview(chunk)
        pos = 0
        n = len(chunk)
        try:
            while pos < n:
                piece = view[pos : pos + _ZSTD_SLICE]
                pos += len(piece)
                out = self._obj.decompress(piece)
                if out:
                    yield out
                if self._obj.eof:
                    # Next frame (if any): unused bytes + the rest of this chunk.
                    rest = bytes(self._obj.unused_data) + bytes(view[pos:])
                    self._obj = self._dctx.decompressobj()
                    view = memoryview(rest)
                    pos = 0
                    n = len(rest)
        except zstandard.ZstdError as e:
            raise DecodeError(f"zstd: {e}") from None


class _ChainDecoder(Decoder):
    """Several encodings: ``stages`` in decoding order (the last applied first)."""

    def __init__(self, stages: list[Decoder]) -> None:
        self._stages = stages
        self.name = ", ".join(s.name for s in reversed(stages))

    def _through(self, i: int, data: bytes) -> Iterator[bytes]:
        if i == len(self._stages):
            yield data
            return
        for out in self._stages[i].iter_decode(data):
            yield from self._through(i + 1, out)

    def iter_decode(self, chunk: bytes) -> Iterator[bytes]:
        return self._through(0, chunk)

    def iter_flush(self) -> Iterator[bytes]:
        for i, stage in enumerate(self._stages):
            for out in stage.iter_flush():
                yield from self._through(i + 1, out)


def _one(name: str, piece_size: int) -> Decoder | None:
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip", "deflate"):
        return _ZlibDecoder(name, piece_size)
    if name == "br":
        return _BrotliDecoder(piece_size)
    if name == "zstd":
        return _ZstdDecoder()
    raise DecodeError(f"unsupported content-encoding: {name[:40]!r}")


def make_decoder(content_encoding: str | None, piece_size: int = PIECE_SIZE) -> Decoder:
    """A decoder for a Content-Encoding header value (None or empty: identity)."""
    if not content_encoding:
        return Decoder()
    names = [n.strip().lower() for n in content_encoding.split(",")]
    stages = [d for d in (_one(n, piece_size) for n in reversed(names)) if d is not None]
    if not stages:
        return Decoder()
    if len(stages) == 1:
        return stages[0]
    return _ChainDecoder(stages)


def is_identity(decoder: Decoder) -> bool:
    """True when ``decoder`` passes bytes through unchanged."""
    return type(decoder) is Decoder
