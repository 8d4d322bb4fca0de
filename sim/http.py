"""Minimal HTTP/1.1 plumbing for the simulator: request parsing and body writers.

Only what an inference server needs: keep-alive, ``Content-Length`` and chunked
request bodies, ``Expect: 100-continue``, and responses with either a
``Content-Length`` or chunked transfer-encoding, optionally compressed
(``gzip``, ``deflate``, ``br``, ``zstd``) with a flush after every unit written so
a streamed event reaches the client promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024
ENCODINGS = ("gzip", "deflate", "br", "zstd")


class BadRequest(Exception):
    """The request could not be parsed; answer ``status`` and close."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """Read one request; ``None`` when the peer closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BadRequest("incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large", 431) from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    while lines and not lines[0]:  # tolerate stray CRLFs before a request line
        lines.pop(0)
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers[name.lower()] = value.strip()
    path, _, query = target.partition("?")
    if "://" in path:  # absolute-form target (a client talking to us as a proxy)
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    req = Request(method.upper(), target, path, query, version, headers)

    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        req.body = await _read_chunked(reader)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise BadRequest("bad content-length") from None
        if length < 0 or length > MAX_BODY:
            raise BadRequest("bad content-length", 413 if length > 0 else 400)
        if length:
            try:
                req.body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise BadRequest("incomplete request body") from None
    return req


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise BadRequest("request body too large", 413)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise BadRequest("incomplete chunked body") from None


# -- compression ---------------------------------------------------------------------------


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._c = zlib.compressobj(6, zlib.DEFLATED, wbits)

    def chunk(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH)


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._c = brotli.Compressor(quality=5)

    def chunk(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.flush()

    def end(self) -> bytes:
        return self._c.finish()


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._c = zstandard.ZstdCompressor(level=3).compressobj()

    def chunk(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(self._flush_block)

    def end(self) -> bytes:
        return self._c.flush()


def compressor(encoding: str) -> _Zlib | _Brotli | _Zstd:
    if encoding == "gzip":
        return _Zlib(31)
    if encoding == "deflate":  # HTTP "deflate" is the zlib format
        return _Zlib(15)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    raise ValueError(f"unsupported encoding {encoding!r}")


def compress_all(encoding: str, data: bytes) -> bytes:
    c = compressor(encoding)
    return c.chunk(data) + c.end()


# -- responses ---------------------------------------------------------------------------


def status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = {529: "Site Overloaded"}.get(status, "Unknown")
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("latin-1"))


def render_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    out = [status_line(status)]
    out.extend(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    out.append(b"\r\n")
    return b"".join(out)


class ChunkedBody:
    """A chunked response body; each ``send`` is one HTTP chunk (compressed and flushed)."""

    __slots__ = ("_c", "_drain_every", "_since", "transport", "writer")

    def __init__(self, writer: asyncio.StreamWriter, encoding: str | None) -> None:
        self.writer = writer
        self.transport = writer.transport
        self._c = compressor(encoding) if encoding else None
        self._since = 0

    def send(self, data: bytes) -> None:
        if self.transport.is_closing():  # the client went away: drop silently
            return
        if self._c is not None:
            data = self._c.chunk(data)
            if not data:
                return
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def finish(self) -> None:
        if self.transport.is_closing():
            return
        tail = b""
        if self._c is not None:
            data = self._c.end()
            if data:
                tail = b"%x\r\n%b\r\n" % (len(data), data)
        self.transport.write(tail + b"0\r\n\r\n")

    @property
    def closing(self) -> bool:
        return self.transport.is_closing()

    async def drain(self) -> None:
        await self.writer.drain()


def hard_reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), discarding anything unsent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
