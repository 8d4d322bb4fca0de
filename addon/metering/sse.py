"""Incremental WHATWG event-stream (server-sent events) framing.

``SSEParser.feed(chunk)`` takes bytes cut anywhere and returns the events completed
by that chunk; ``close()`` flushes a final event that lacks its blank line.

Framing follows https://html.spec.whatwg.org/multipage/server-sent-events.html:

- lines end in CRLF, LF or CR (a CR ending one chunk and an LF starting the next
  are one line break);
- a line starting with ``:`` is a comment (keep-alive) and is ignored;
- ``field:value`` or ``field: value`` (one leading space stripped), a line without a
  colon is a field with an empty value; only ``data`` and ``event`` matter here
  (``id``, ``retry`` and unknown fields are ignored);
- several ``data`` lines are joined with ``\\n``; a blank line dispatches the event;
  an event without any ``data`` line is not dispatched;
- one UTF-8 BOM at the start of the stream is ignored.

Cost is linear in the input: lines are cut with ``bytes.split``/``find`` and a partial
line is kept as a list of pieces, joined once when its end arrives.

Memory is bounded: a line or an event larger than ``max_event_bytes`` is not kept
whole. Its first ``head_bytes`` and its last ``tail_bytes`` are kept and the event is
dispatched as *oversized* (``Event.tail`` is not None): ``data`` then holds the head,
``tail`` the last bytes, and what lies between is gone. A caller can still look for a
trailing ``usage`` object in the tail (a Responses ``response.completed`` event carries
the whole output text before its ``usage``).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Event", "SSEParser"]

_BOM = b"\xef\xbb\xbf"


class Event(NamedTuple):
    """One dispatched event.

    ``type`` is the ``event:`` field (None when absent or empty, i.e. "message");
    ``data`` the ``data`` lines joined by ``\\n`` (for an oversized event: its head);
    ``tail`` None, or for an oversized event the last bytes of its data.
    """

    type: str | None
    data: bytes
    tail: bytes | None = None

    @property
    def oversized(self) -> bool:
        return self.tail is not None


_new_event = tuple.__new__


class SSEParser:
    """Incremental event-stream parser with bounded memory and linear cost."""

    __slots__ = (
        "_bom_buf",
        "_data",
        "_data_len",
        "_ev_head",
        "_ev_over",
        "_ev_tail",
        "_ev_tail_len",
        "_ev_type",
        "_head",
        "_line_head",
        "_line_over",
        "_max",
        "_pend",
        "_pend_len",
        "_skip_lf",
        "_tail",
    )

    def __init__(
        self,
        max_event_bytes: int = 1 << 20,
        head_bytes: int = 16 << 10,
        tail_bytes: int = 64 << 10,
    ) -> None:
        if head_bytes < 16 or tail_bytes < 16:
            raise ValueError("head_bytes and tail_bytes must be at least 16")
        self._max = max(max_event_bytes, head_bytes, tail_bytes)
        self._head = head_bytes
        self._tail = tail_bytes
        self._bom_buf: bytes | None = b""  # None once the start of stream is past
        self._skip_lf = False
        # The partial line: pieces (or, once oversized, the tail pieces).
        self._pend: list[bytes] = []
        self._pend_len = 0
        self._line_over = False
        self._line_head = b""
        # The event being built.
        self._ev_type: str | None = None
        self._data: list[bytes] = []
        self._data_len = 0
        self._ev_over = False
        self._ev_head = b""
        self._ev_tail: list[bytes] = []
        self._ev_tail_len = 0

    # -- public -------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Bytes currently held (partial line + event being built); for memory checks."""
        n = self._pend_len + len(self._line_head) + self._data_len
        n += len(self._ev_head) + self._ev_tail_len
        if self._bom_buf:
            n += len(self._bom_buf)
        return n

    def at_event_boundary(self) -> bool:
        """Nothing held: the next byte starts the first line of a new event."""
        return (
            self._bom_buf is None
            and not self._skip_lf
            and not self._pend
            and not self._data
            and self._ev_type is None
            and not self._ev_over
        )

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume ``chunk`` and return the events it completes (possibly none)."""
        if not chunk:
            return []
        if self._bom_buf is not None or self._skip_lf:
            chunk = self._start(chunk)
            if not chunk:
                return []
        if chunk.find(b"\r") >= 0:
            if chunk[-1] == 13:
                # This CR ends a line; an LF opening the next chunk belongs to it.
                self._skip_lf = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        nl = chunk.find(b"\n")
        if nl < 0:
            self._add_partial(chunk)
            return []
        if (
            nl == len(chunk) - 2
            and chunk[-1] == 10
            and not self._pend
            and not self._data
            and self._ev_type is None
            and not self._ev_over
            and chunk.startswith(b"data: ")
            and nl - 5 <= self._max
        ):
            # Exactly one whole ``data: ...`` event and nothing held: what paced servers
            # send as one chunk per token. Same event as the loop below would dispatch,
            # without the split, the line list and the data list round trip.
            return [_new_event(Event, (None, chunk[6:nl], None))]
        out: list[Event] = []
        if self._pend:
            if self._line_over:
                self._pend.append(chunk[:nl])
                self._oversized_line(out)
                chunk = chunk[nl + 1 :]
            else:
                self._pend.append(chunk)
                chunk = b"".join(self._pend)
                self._pend = []
                self._pend_len = 0
        lines = chunk.split(b"\n")
        last = lines.pop()
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(
                        _new_event(
                            Event,
                            (self._ev_type, data[0] if len(data) == 1 else b"\n".join(data), None),
                        )
                    )
                    data.clear()
                    self._data_len = 0
                elif self._ev_over:
                    out.append(self._dispatch())
                self._ev_type = None
            elif line.startswith(b"data: "):
                if self._ev_over:
                    self._add_data(line[6:])
                else:
                    data.append(line[6:])
                    self._data_len += len(line) - 5
                    if self._data_len > self._max:
                        self._collapse()
            elif line.startswith(b"event: "):
                self._ev_type = line[7:].decode("utf-8", "replace") or None
            elif line.startswith(b"data:"):
                self._add_data(line[5:])
            else:
                self._field(line)
        if last:
            self._add_partial(last)
        return out

    def _start(self, chunk: bytes) -> bytes:
        """Start-of-stream BOM and a pending CR's LF."""
        if self._bom_buf is not None:
            buf = self._bom_buf + chunk
            if len(buf) < 3 and _BOM.startswith(buf):
                self._bom_buf = buf
                return b""
            self._bom_buf = None
            chunk = buf[3:] if buf.startswith(_BOM) else buf
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 10:
                chunk = chunk[1:]
        return chunk

    def close(self) -> list[Event]:
        """End of stream: take a pending line as complete and flush the last event."""
        out: list[Event] = []
        # Bytes still held here are a strict prefix of a BOM: not a line worth keeping.
        self._bom_buf = None
        if self._pend:
            if self._line_over:
                self._oversized_line(out)
            else:
                line = b"".join(self._pend)
                self._pend = []
                self._pend_len = 0
                if line.startswith(b"data:"):
                    self._add_data(line[6:] if line[5:6] == b" " else line[5:])
                else:
                    self._field(line)
        if self._data or self._ev_over:
            out.append(self._dispatch())
        self._ev_type = None
        return out

    # -- internals ----------------------------------------------------------------

    def _field(self, line: bytes) -> None:
        if line[0] == 58:  # ":" comment
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if name == b"data":
            self._add_data(value)
        elif name == b"event":
            self._ev_type = value.decode("utf-8", "replace") if value else None

    def _add_partial(self, piece: bytes) -> None:
        self._pend.append(piece)
        self._pend_len += len(piece)
        if self._line_over:
            if self._pend_len > 2 * self._tail:
                t = b"".join(self._pend)[-self._tail :]
                self._pend = [t]
                self._pend_len = len(t)
        elif self._pend_len > self._max:
            line = b"".join(self._pend)
            self._line_over = True
            self._line_head = line[: self._head]
            t = line[-self._tail :]
            self._pend = [t]
            self._pend_len = len(t)

    def _oversized_line(self, out: list[Event]) -> None:
        """The partial line was oversized and has now ended: treat its head and tail."""
        head = self._line_head
        tail = b"".join(self._pend)[-self._tail :]
        self._pend = []
        self._pend_len = 0
        self._line_over = False
        self._line_head = b""
        if not head.startswith(b"data:"):
            # An oversized comment, event name or unknown field: nothing to keep.
            return
        head = head[6:] if head[5:6] == b" " else head[5:]
        if not self._ev_over:
            prior = b"\n".join(self._data) + b"\n" if self._data else b""
            self._ev_head = (prior + head)[: self._head]
            self._ev_over = True
            self._data.clear()
            self._data_len = 0
        self._ev_tail = [tail]
        self._ev_tail_len = len(tail)

    def _add_data(self, value: bytes) -> None:
        if self._ev_over:
            tl = self._ev_tail
            tl.append(b"\n")
            tl.append(value)
            self._ev_tail_len += len(value) + 1
            if self._ev_tail_len > 2 * self._tail:
                t = b"".join(tl)[-self._tail :]
                self._ev_tail = [t]
                self._ev_tail_len = len(t)
            return
        self._data.append(value)
        self._data_len += len(value) + 1
        if self._data_len > self._max:
            self._collapse()

    def _collapse(self) -> None:
        """The event outgrew the cap: keep its head and a tail from now on."""
        joined = b"\n".join(self._data)
        self._ev_head = joined[: self._head]
        t = joined[-self._tail :]
        self._ev_tail = [t]
        self._ev_tail_len = len(t)
        self._ev_over = True
        self._data.clear()
        self._data_len = 0

    def _dispatch(self) -> Event:
        ev_type = self._ev_type
        self._ev_type = None
        if self._ev_over:
            ev = _new_event(Event, (ev_type, self._ev_head, b"".join(self._ev_tail)[-self._tail :]))
            self._ev_over = False
            self._ev_head = b""
            self._ev_tail = []
            self._ev_tail_len = 0
            return ev
        data = self._data
        ev = _new_event(Event, (ev_type, data[0] if len(data) == 1 else b"\n".join(data), None))
        data.clear()
        self._data_len = 0
        return ev
