"""WHATWG event-stream framing: line endings, fields, chunk boundaries, bounded memory."""

from __future__ import annotations

import pytest

from spendtap.metering.sse import Event, SSEParser


def parse(*chunks: bytes, close: bool = True, **kw) -> list[Event]:
    p = SSEParser(**kw)
    out: list[Event] = []
    for c in chunks:
        out += p.feed(c)
    if close:
        out += p.close()
    return out


def pairs(events: list[Event]) -> list[tuple[str | None, bytes]]:
    return [(e.type, e.data) for e in events]


STREAM = b"event: a\ndata: one\n\ndata: two\ndata: three\n\n: comment\n\nevent: b\ndata:four\n\n"
EXPECTED = [("a", b"one"), (None, b"two\nthree"), ("b", b"four")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol):
    """LF, CRLF and CR line endings all frame the same events."""
    body = STREAM.replace(b"\n", eol)
    assert pairs(parse(body)) == EXPECTED


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_split_point(eol):
    """Cutting the stream at any byte (into two or into single bytes) changes nothing."""
    body = STREAM.replace(b"\n", eol)
    for i in range(len(body) + 1):
        assert pairs(parse(body[:i], body[i:])) == EXPECTED
    assert pairs(parse(*[body[i : i + 1] for i in range(len(body))])) == EXPECTED


def test_crlf_split_across_chunks_is_one_line_break():
    """A CR ending one chunk and an LF starting the next are one line break, not two."""
    # Were CR and LF two breaks, the LF would be a blank line dispatching "x" early
    # and the second data line would become its own event.
    events = parse(b"data: x\r", b"\ndata: y\r\n\r\n")
    assert pairs(events) == [(None, b"x\ny")]


def test_cr_at_chunk_end_followed_by_other_byte():
    """A CR at a chunk's end followed by a non-LF byte is still a line break."""
    assert pairs(parse(b"data: x\r", b"\rdata: y\r\r")) == [(None, b"x"), (None, b"y")]


def test_comments_ignored():
    """Lines starting with a colon are comments (keep-alives) and dispatch nothing."""
    body = b": OPENROUTER PROCESSING\n\n:\n\ndata: {}\n: mid-event comment\n\n"
    assert pairs(parse(body)) == [(None, b"{}")]


def test_multiline_data_joined_with_lf():
    """Several data lines in one event are joined with a single LF."""
    assert pairs(parse(b"data: a\ndata:\ndata: c\n\n")) == [(None, b"a\n\nc")]


def test_space_after_colon():
    """data:x and data: x are the same; only one leading space is stripped."""
    assert pairs(parse(b"data:x\n\ndata: x\n\ndata:  x\n\n")) == [
        (None, b"x"),
        (None, b"x"),
        (None, b" x"),
    ]


def test_missing_final_blank_line():
    """close() flushes a final event that lacks its blank line (and its final LF)."""
    assert pairs(parse(b"data: a\n\ndata: b\n")) == [(None, b"a"), (None, b"b")]
    assert pairs(parse(b"data: a\n\ndata: b")) == [(None, b"a"), (None, b"b")]
    assert pairs(parse(b"data: a\n\ndata: b", close=False)) == [(None, b"a")]


def test_bom_ignored_even_when_split():
    """One UTF-8 BOM at the start of the stream is ignored, even split over chunks."""
    assert pairs(parse(b"\xef\xbb\xbfdata: a\n\n")) == [(None, b"a")]
    assert pairs(parse(b"\xef", b"\xbb", b"\xbfdata: a\n\n")) == [(None, b"a")]
    # Only at the start: a BOM later is data.
    assert pairs(parse(b"data: a\n\ndata: \xef\xbb\xbfb\n\n"))[1] == (None, b"\xef\xbb\xbfb")


def test_other_fields_and_fieldless_lines():
    """id/retry/unknown fields are ignored; a bare "data" line is empty data; no data, no event."""
    body = b"id: 7\nretry: 100\nfoo: bar\nevent: x\n\ndata\ndata\n\nevent: y\ndata: z\n\n"
    assert pairs(parse(body)) == [(None, b"\n"), ("y", b"z")]


def test_event_type_resets_after_dispatch():
    """The event type applies to one event only."""
    assert pairs(parse(b"event: e\ndata: 1\n\ndata: 2\n\n")) == [("e", b"1"), (None, b"2")]


def test_oversized_event_keeps_head_and_tail():
    """An event beyond the cap is dispatched oversized with its head and its last bytes."""
    payload = b'{"type":"response.completed","text":"' + b"w" * 500_000 + b'","usage":{"n":1}}'
    chunks = [b"event: big\ndata: "] + [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
    chunks += [b"\n\ndata: after\n\n"]
    p = SSEParser(max_event_bytes=64 << 10, head_bytes=1024, tail_bytes=4096)
    events: list[Event] = []
    peak = 0
    for c in chunks:
        events += p.feed(c)
        peak = max(peak, p.buffered_bytes())
    events += p.close()
    big, after = events
    assert big.oversized and big.type == "big"
    # The head is the line's first bytes, less its "data: " prefix.
    assert payload.startswith(big.data) and 1000 <= len(big.data) <= 1024
    assert big.tail == payload[-4096:]
    assert big.tail.endswith(b'"usage":{"n":1}}')
    assert peak <= (64 << 10) + 2 * 4096 + 1024 + 1000
    assert not after.oversized and after.data == b"after"


def test_oversized_event_of_many_lines():
    """An event grown past the cap by many data lines keeps the first lines and the last ones."""
    lines = [b"data: line%06d\n" % i for i in range(20_000)]
    p = SSEParser(max_event_bytes=8192, head_bytes=64, tail_bytes=256)
    events: list[Event] = []
    peak = 0
    for line in lines:
        events += p.feed(line)
        peak = max(peak, p.buffered_bytes())
    events += p.feed(b"\n")
    (ev,) = events
    assert ev.oversized
    assert ev.data.startswith(b"line000000\nline000001\n")
    assert ev.tail.endswith(b"line019998\nline019999")
    assert peak < 8192 + 3 * 256 + 64 + 64


def test_huge_single_chunk_is_bounded_after_dispatch():
    """One chunk holding a huge complete event leaves no large buffer behind."""
    p = SSEParser(max_event_bytes=1024, head_bytes=128, tail_bytes=256)
    (ev,) = p.feed(b"data: " + b"x" * 100_000 + b"\n\n")
    assert ev.oversized and len(ev.data) == 128 and len(ev.tail) == 256
    assert p.buffered_bytes() == 0


def test_small_events_not_oversized():
    """Events under the cap are whole and not flagged."""
    (ev,) = parse(b"data: " + b"y" * 1000 + b"\n\n", max_event_bytes=4096)
    assert not ev.oversized and ev.tail is None and len(ev.data) == 1000
