"""Pass what one read of a chunked HTTP/1 body holds on as one piece, not one per chunk.

mitmproxy (12.x) turns every chunk of a chunked body into its own event: each goes
through the layer stack, the stream callable and a write to the client's socket.
An inference server writes one SSE event a chunk, so a proxy that falls behind
a fast stream reads many chunks at once and still pays for each of them.
``install`` makes the HTTP/1 layer read a chunked body with a reader that
joins the chunks one buffer holds into one ``Data``: the same bytes in the same
order, no later (only what has already arrived is joined, so nothing waits), in
fewer events — the busier the proxy, the fewer. A stream read one event at a
time (a paced server) is unchanged.

The client gets the body re-chunked as mitmproxy always re-chunks it, one chunk
per piece; chunk boundaries carry no meaning in HTTP (intermediaries may re-chunk)
and SSE clients parse the bytes.

If mitmproxy's internals are not what this expects, ``install`` changes nothing
and returns False: bodies are then read chunk by chunk as before. ``set_joining``
switches it for the bodies that start afterwards (``spendtap_join_chunks``).
"""

from __future__ import annotations

__all__ = ["CoalescingChunkedReader", "install", "set_joining"]

_MARK = "_spendtap_coalescing"
_joining = True


_HEX_DIGITS = b"0123456789abcdefABCDEF"
# The one-pass cut copies the buffer; past this (a read is at most 64 KiB, so only a
# peer that never ends a line gets here) h11 reads it alone, searching incrementally.
_CUT_MAX_BYTES = 1 << 20


def _whole_chunks(raw: bytes, parts: list) -> int:
    """Append the data of the whole chunks at the start of ``raw`` to ``parts``; how many
    bytes they took.

    Only the plainest form (hex digits, CRLF, the data, CRLF) is taken: the last chunk,
    a chunk extension, blanks, a cut chunk or anything malformed stops it, and h11's own
    reader takes it from there, so what is accepted or refused stays h11's decision.
    """
    pos = 0
    find = raw.find
    while True:
        eol = find(b"\r\n", pos)
        if eol <= pos or eol - pos > 20:  # no line yet, an empty one or too long for h11
            return pos
        size_text = raw[pos:eol]
        if size_text.strip(_HEX_DIGITS):
            return pos
        size = int(size_text, 16)
        start = eol + 2
        stop = start + size
        if size == 0 or raw[stop : stop + 2] != b"\r\n":
            return pos
        parts.append(raw[start:stop])
        pos = stop + 2


def _reader_class():
    from h11 import Data, ProtocolError
    from h11._readers import ChunkedReader

    class CoalescingChunkedReader(ChunkedReader):
        """h11's chunked-body reader, answering with all the body data the buffer holds.

        Whole chunks at a chunk boundary are cut out of the buffer in one pass; h11's
        reader takes everything else (a cut chunk, the last chunk and its trailers,
        anything unusual or malformed). What follows the joined data (the end of the
        message, or a protocol error) is kept for the next call, which the reading loop
        makes at once: events come out in the order they would have, the data joined.
        """

        def __init__(self) -> None:
            super().__init__()
            self._after = None  # the event or error found after joined data

        def __call__(self, buf):
            after = self._after
            if after is not None:
                self._after = None
                if isinstance(after, BaseException):
                    raise after
                return after
            parts: list = []
            if not (
                self._bytes_in_chunk
                or self._bytes_to_discard
                or self._reading_trailer
                or len(buf) > _CUT_MAX_BYTES
            ):
                taken = _whole_chunks(bytes(buf), parts)
                if taken:
                    buf.maybe_extract_at_most(taken)
            read = super().__call__
            while True:
                try:
                    event = read(buf)
                except ProtocolError as e:
                    if not parts:
                        raise
                    self._after = e
                    break
                if type(event) is Data:
                    parts.append(event.data)
                    continue
                if not parts:
                    return event
                self._after = event  # None (nothing more yet) or the end
                break
            return Data(data=parts[0] if len(parts) == 1 else b"".join(parts))

    return CoalescingChunkedReader


CoalescingChunkedReader = None


def set_joining(on: bool) -> None:
    """Join the chunks of bodies read from now on (True) or pass them one by one."""
    global _joining
    _joining = bool(on)


def install() -> bool:
    global CoalescingChunkedReader
    try:
        from h11._readers import ChunkedReader
        from mitmproxy.proxy.layers.http import _http1
    except ImportError:
        return False
    original = getattr(_http1, "make_body_reader", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True
    plain = original(None)
    state = ("_bytes_in_chunk", "_bytes_to_discard", "_reading_trailer")
    if type(plain) is not ChunkedReader or not all(hasattr(plain, a) for a in state):
        return False
    if CoalescingChunkedReader is None:
        CoalescingChunkedReader = _reader_class()
    reader_class = CoalescingChunkedReader

    def make_body_reader(expected_size):
        if expected_size is None and _joining:
            return reader_class()
        return original(expected_size)

    setattr(make_body_reader, _MARK, True)
    _http1.make_body_reader = make_body_reader
    return True
