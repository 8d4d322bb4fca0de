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


def _reader_class():
    from h11 import Data, ProtocolError
    from h11._readers import ChunkedReader

    class CoalescingChunkedReader(ChunkedReader):
        """h11's chunked-body reader, answering with all the body data the buffer holds.

        What follows the joined data in the buffer (the end of the message, or a
        protocol error) is kept for the next call, which the reading loop makes at
        once: events come out in the order they would have, the data joined.
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
            read = super().__call__
            event = read(buf)
            if type(event) is not Data:
                return event
            parts = None
            while True:
                try:
                    following = read(buf)
                except ProtocolError as e:
                    self._after = e
                    break
                if type(following) is not Data:
                    self._after = following  # None (nothing more yet) or the end
                    break
                if parts is None:
                    parts = [event.data]
                parts.append(following.data)
            if parts is None:
                return event
            return Data(data=b"".join(parts))

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
    if type(original(None)) is not ChunkedReader:
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
