"""Joining the chunks one read of a chunked body holds (``spendtap.proxy.coalesce``).

The reader is held to h11's own ``ChunkedReader`` over chunked bodies cut every way:
the same bytes in the same order, the same end (trailers included) or the same
error, never a piece held back for data that has not arrived. Through a real
mitmdump: a burst of chunks reaches the client as fewer chunks with the same bytes,
each chunk of a paced stream reaches the client before the next one is sent, and
``spendtap_join_chunks=false`` passes chunks one for one.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import h11
import pytest
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from spendtap.proxy import coalesce
from tests.helpers import principal

assert coalesce.install()
Joining = coalesce.CoalescingChunkedReader


# How a chunk's size line may be written: what the one-pass cut takes and what it
# leaves to h11 (upper case, leading zeros, an extension, trailing blanks, too long).
_SIZE_LINES = {
    "plain": b"%x\r\n",
    "upper": b"%X\r\n",
    "zeros": b"000%x\r\n",
    "ext": b"%x;name=value\r\n",
    "blank": b"%x \r\n",
    "long": b"000000000000000000000%x\r\n",
}


def _chunked(pieces: list[bytes], trailers: bytes = b"", styles: list[str] | None = None) -> bytes:
    styles = styles or ["plain"]
    body = b"".join(
        _SIZE_LINES[styles[i % len(styles)]] % len(p) + p + b"\r\n" for i, p in enumerate(pieces)
    )
    return body + b"0\r\n" + trailers + b"\r\n"


def _read(reader, reads: list[bytes]) -> tuple[list, list[int]]:
    """Feed ``reads`` one at a time as mitmproxy does (call until None or the end).

    Returns the events (Data bytes, ("end", headers) or ("error", type)) and, per
    read, how many Data events it gave.
    """
    buf = ReceiveBuffer()
    out: list = []
    per_read: list[int] = []
    for data in reads:
        buf += data
        n = 0
        while True:
            try:
                event = reader(buf)
            except h11.ProtocolError as e:
                out.append(("error", type(e).__name__))
                per_read.append(n)
                return out, per_read
            if event is None:
                break
            if isinstance(event, h11.Data):
                n += 1
                out.append(bytes(event.data))
            else:
                out.append(("end", list(event.headers)))
                per_read.append(n)
                return out, per_read
        per_read.append(n)
    return out, per_read


def _joined(events: list) -> tuple[bytes, list]:
    data = b"".join(e for e in events if isinstance(e, bytes))
    return data, [e for e in events if not isinstance(e, bytes)]


def test_the_chunks_of_one_read_come_out_as_one():
    events, per_read = _read(Joining(), [_chunked([b"data: 1\n\n", b"data: 2\n\n", b"x" * 300])])
    assert events == [b"data: 1\n\ndata: 2\n\n" + b"x" * 300, ("end", [])]
    assert per_read == [1]


def test_a_chunk_cut_by_the_read_goes_out_up_to_the_cut_and_the_rest_later():
    wire = _chunked([b"data: one\n\n", b"data: two\n\n"])
    cut = wire.index(b"two")
    events, per_read = _read(Joining(), [wire[:cut], wire[cut:]])
    assert events == [b"data: one\n\ndata: ", b"two\n\n", ("end", [])]
    assert per_read == [1, 1]


def test_the_end_after_joined_data_is_kept_for_the_next_call():
    reader = Joining()
    buf = ReceiveBuffer()
    buf += _chunked([b"a", b"b"], trailers=b"x-usage: 3\r\n")
    assert bytes(reader(buf).data) == b"ab"
    end = reader(buf)
    assert isinstance(end, h11.EndOfMessage)
    assert list(end.headers) == [(b"x-usage", b"3")]


def test_an_error_after_good_chunks_comes_after_their_data():
    wire = _chunked([b"good", b"also good"])[:-5] + b"zz\r\nbad\r\n"
    events, _ = _read(Joining(), [wire])
    assert events == [b"goodalso good", ("error", "LocalProtocolError")]


def test_a_buffer_past_the_cut_limit_is_read_by_h11_and_still_joined():
    pieces = [bytes([65 + i % 26]) * 1000 for i in range(2100)]  # 2 MiB in one buffer
    events, per_read = _read(Joining(), [_chunked(pieces)])
    assert events == [b"".join(pieces), ("end", [])]
    assert per_read == [1]


def test_nothing_arrived_is_nothing():
    reader = Joining()
    buf = ReceiveBuffer()
    assert reader(buf) is None
    buf += b"5\r\nab"
    assert bytes(reader(buf).data) == b"ab"
    assert reader(buf) is None


def test_a_truncated_body_fails_at_eof_like_h11():
    reader = Joining()
    with pytest.raises(h11.RemoteProtocolError):
        reader.read_eof()


@settings(max_examples=500, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=12),
    trailers=st.sampled_from([b"", b"x-a: 1\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=8),
    corrupt=st.one_of(st.none(), st.integers(min_value=0, max_value=1000)),
    styles=st.lists(st.sampled_from(sorted(_SIZE_LINES)), min_size=1, max_size=4),
)
def test_same_bytes_same_end_as_h11_however_it_arrives(pieces, trailers, cuts, corrupt, styles):
    wire = _chunked(pieces, trailers, styles)
    if corrupt is not None:
        at = corrupt % len(wire)
        wire = wire[:at] + b"\x00" + wire[at + 1 :]
    points = sorted({c % (len(wire) + 1) for c in cuts})
    reads = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    plain, plain_per_read = _read(ChunkedReader(), reads)
    joined, joined_per_read = _read(Joining(), reads)
    assert _joined(joined) == _joined(plain)
    # One piece at most a read, and a read that gave data still gives some.
    assert all(j <= 1 for j in joined_per_read)
    assert [j > 0 for j in joined_per_read] == [p > 0 for p in plain_per_read]


def test_install_is_idempotent_and_the_switch_gives_the_plain_reader():
    from mitmproxy.proxy.layers.http import _http1

    assert coalesce.install()
    assert type(_http1.make_body_reader(None)) is Joining
    coalesce.set_joining(False)
    try:
        assert type(_http1.make_body_reader(None)) is ChunkedReader
    finally:
        coalesce.set_joining(True)
    assert type(_http1.make_body_reader(7)) is not Joining  # only chunked bodies


# -- through a real mitmdump -------------------------------------------------------


def _event(i: int, n: int) -> bytes:
    chunk = {
        "id": "chatcmpl-j",
        "object": "chat.completion.chunk",
        "model": "m-join",
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
    }
    if i == n - 1:
        chunk["choices"] = []
        chunk["usage"] = {"prompt_tokens": 5, "completion_tokens": n - 1, "total_tokens": n + 4}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class _Upstream:
    """A chat upstream on a raw socket: ``n`` SSE events, one chunk each, written in one
    burst or ``gap`` seconds apart (the time each chunk was sent is kept)."""

    def __init__(self, n: int, gap: float = 0.0):
        self.n, self.gap = n, gap
        self.sent_at: list[float] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.body = b"".join(_event(i, n) for i in range(n))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, rest = request.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(rest) < length:
                rest += conn.recv(65536)
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            chunks = [
                b"%x\r\n%s\r\n" % (len(e), e) for e in (_event(i, self.n) for i in range(self.n))
            ]
            if not self.gap:
                conn.sendall(head + b"".join(chunks) + b"0\r\n\r\n")
                self.sent_at = [time.monotonic()] * self.n
            else:
                conn.sendall(head)
                for c in chunks:
                    self.sent_at.append(time.monotonic())
                    conn.sendall(c)
                    time.sleep(self.gap)
                conn.sendall(b"0\r\n\r\n")
            conn.recv(1)  # until the proxy hangs up

    def close(self) -> None:
        self.sock.close()


def _fetch(url: str, headers: dict) -> tuple[list[tuple[float, bytes]], int]:
    """POST a streaming chat request with h11; each body chunk as it arrived, and the status."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "m-join",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    conn = h11.Connection(h11.CLIENT)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hdrs = [
        ("host", host),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        *headers.items(),
    ]
    sock.sendall(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=hdrs)))
    sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    chunks: list[tuple[float, bytes]] = []
    status = 0
    with sock:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                # h11 gives a chunk in pieces as the socket delivers it: count whole chunks.
                if event.chunk_start or not chunks:
                    chunks.append((time.monotonic(), bytes(event.data)))
                else:
                    at, data = chunks[-1]
                    chunks[-1] = (at, data + bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return chunks, status


@pytest.mark.e2e
@pytest.mark.parametrize("join", [True, False])
def test_a_burst_reaches_the_client_whole_and_joined_unless_switched_off(start_sidecar, join):
    n = 200
    upstream = _Upstream(n)
    try:
        proxy = start_sidecar(upstream.url, *([] if join else ["spendtap_join_chunks=false"]))
        account, headers = principal()
        chunks, status = _fetch(proxy.url, headers)
    finally:
        upstream.close()
    assert status == 200
    assert b"".join(c for _, c in chunks) == upstream.body  # byte for byte
    if join:
        assert len(chunks) < n / 4, len(chunks)
    else:
        assert len(chunks) == n
    row = proxy.row_for(account)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, n - 1)
    assert row["usage_source"] == "reported" and row["outcome"] == "completed"


@pytest.mark.e2e
def test_a_paced_stream_is_never_held_for_what_follows(start_sidecar):
    n = 8
    upstream = _Upstream(n, gap=0.15)
    try:
        proxy = start_sidecar(upstream.url)
        account, headers = principal()
        chunks, status = _fetch(proxy.url, headers)
    finally:
        upstream.close()
    assert status == 200
    assert [c for _, c in chunks] == [_event(i, n) for i in range(n)]
    # Each event reached the client before the upstream sent the next one.
    for (arrived, _), next_sent in zip(chunks, upstream.sent_at[1:], strict=False):
        assert arrived < next_sent
    assert proxy.row_for(account)["completion_tokens"] == n - 1
