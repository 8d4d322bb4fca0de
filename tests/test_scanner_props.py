"""Properties of the scanner: chunking-invariance, never raising, bounded memory."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendtap.metering.scanner import ResponseScanner
from spendtap.metering.sse import SSEParser
from spendtap.metering.usage import APIS, EMBEDDINGS, OPENAI_CHAT, Usage
from tests.corpus_cases import ENCODINGS, encode, load_cases, scan
from tests.helpers import cut

CASES = load_cases()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def corpus_cuts(draw):
    case = draw(st.sampled_from(CASES))
    n = len(case.body)
    style = draw(st.sampled_from(["points", "fixed"]))
    if style == "fixed":
        size = draw(st.integers(min_value=1, max_value=max(1, n)))
        chunks = [case.body[i : i + size] for i in range(0, n, size)]
    else:
        points = draw(st.lists(st.integers(min_value=0, max_value=n), max_size=60))
        chunks = cut(case.body, points)
    return case, chunks


@SETTINGS
@given(corpus_cuts())
def test_any_chunking_equals_whole_body(case_chunks):
    """However a corpus body is cut, usage, model, error and content counts match the whole."""
    case, chunks = case_chunks
    assert b"".join(chunks) == case.body
    whole = scan(case.api, case.content_type, [case.body])
    r = scan(case.api, case.content_type, chunks)
    assert r.usage == whole.usage == case.expected_usage()
    assert r.content_events == whole.content_events
    assert r.response_model == whole.response_model
    assert r.error == whole.error
    assert r.parse_errors == whole.parse_errors
    assert r.internal_errors == 0


CONTENT_TYPES = [None, "", "text/event-stream", "application/json", "text/plain", "garbage/;;"]
ENCODING_HEADERS = [None, "", "gzip", "deflate", "br", "zstd", "gzip, br", "x-gzip", "bogus"]


@SETTINGS
@given(
    api=st.sampled_from([*APIS, "nonsense"]),
    ctype=st.sampled_from(CONTENT_TYPES),
    enc=st.sampled_from(ENCODING_HEADERS),
    chunks=st.lists(st.binary(max_size=300), max_size=20),
)
def test_never_raises_on_arbitrary_bytes(api, ctype, enc, chunks):
    """Arbitrary bytes under any API, content type and encoding never make the scanner raise."""
    s = ResponseScanner(api, ctype, enc)
    for i, c in enumerate(chunks):
        s.feed(c, float(i))
    r = s.finish(99.0)
    assert r.internal_errors == 0
    assert s.finish(100.0) is r


SSE_ALPHABET = [b"data: ", b"data:", b"event: ", b"\n", b"\r\n", b"\r", b": c\n", b"{", b"}",
                b'"usage"', b":", b"{\"prompt_tokens\":", b"1", b"null", b"[DONE]", b'"',
                b'"choices":[{"delta":{"content":"x"}}]', b'"type":"error"', b"\\", b"\xff",
                b'"iterations":[', b'"input_tokens":', b"-3", b"1e400", b"true", b","]  # fmt: skip


@SETTINGS
@given(
    api=st.sampled_from(APIS),
    parts=st.lists(st.sampled_from(SSE_ALPHABET), max_size=80),
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=10),
)
def test_never_raises_on_sse_like_noise(api, parts, sizes):
    """SSE-looking noise (broken JSON, odd numbers, stray CRs) is counted, never raised."""
    body = b"".join(parts)
    s = ResponseScanner(api, "text/event-stream")
    pos = 0
    i = 0
    while pos < len(body):
        n = sizes[i % len(sizes)]
        s.feed(body[pos : pos + n], float(i))
        pos += n
        i += 1
    r = s.finish(float(i))
    assert r.internal_errors == 0
    for f in (r.usage.prompt_tokens, r.usage.completion_tokens):
        assert f is None or (isinstance(f, int) and f >= 0)


@SETTINGS
@given(
    case=st.sampled_from(CASES),
    enc=st.sampled_from(ENCODINGS),
    pos=st.integers(min_value=0),
    junk=st.binary(min_size=1, max_size=8),
)
def test_never_raises_on_corrupted_compressed_corpus(case, enc, pos, junk):
    """A compressed corpus body with bytes overwritten never raises (errors are recorded)."""
    data, header = encode(case.body, enc)
    p = pos % len(data)
    bad = data[:p] + junk + data[p + len(junk) :]
    s = ResponseScanner(case.api, case.content_type, header)
    for i in range(0, len(bad), 7):
        s.feed(bad[i : i + 7], 0.0)
    r = s.finish(1.0)
    assert r.internal_errors == 0


def _feed_bounded(s: ResponseScanner, chunks, bound: int) -> int:
    peak = 0
    for i, c in enumerate(chunks):
        s.feed(c, float(i))
        if i % 64 == 0:
            peak = max(peak, s.buffered_bytes())
            assert peak <= bound
    return peak


def test_50mb_stream_bounded_and_usage_found():
    """A 50 MB stream of content chunks plus final usage stays bounded and finds the usage."""
    chunk = (
        b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":'
        b'[{"index":0,"delta":{"content":"' + b"tok " * 40 + b'"},"finish_reason":null}]}\n\n'
    )
    reps = (50 << 20) // len(chunk)
    final = (
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1234,"completion_tokens":'
        + str(reps).encode()
        + b"}}\n\ndata: [DONE]\n\n"
    )
    block = chunk * 256  # ~64 KiB reads, cut mid-event
    half = len(block) // 2 + 17

    def chunks():
        for _ in range(reps // 256):
            yield block[:half]
            yield block[half:]
        for _ in range(reps % 256):
            yield chunk
        yield final

    s = ResponseScanner(OPENAI_CHAT, "text/event-stream")
    _feed_bounded(s, chunks(), 256 << 10)
    r = s.finish(1e9)
    assert r.usage == Usage(prompt_tokens=1234, completion_tokens=reps)
    assert r.content_events == reps
    assert r.bytes_scanned == reps * len(chunk) + len(final) > 49 << 20


def test_50mb_single_event_bounded_and_usage_found():
    """One 50 MB response.completed event is held by head and tail only; its usage is found."""
    head = (
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"model":"m","output":[{"text":"'
    )
    tail = b'"}],"usage":{"input_tokens":5,"output_tokens":6}}}\n\n'
    body_chunk = b"x" * (64 << 10)
    n = (50 << 20) // len(body_chunk)

    def chunks():
        yield head
        for _ in range(n):
            yield body_chunk
        yield tail

    s = ResponseScanner("openai-responses", "text/event-stream")
    _feed_bounded(s, chunks(), (1 << 20) + (512 << 10))
    r = s.finish(1.0)
    assert r.usage == Usage(prompt_tokens=5, completion_tokens=6)
    assert r.response_model == "m"


def test_huge_json_embeddings_body_usage_from_tail():
    """A 20 MB embeddings JSON body is scanned by head and tail; usage found in the tail."""
    vec = json.dumps([0.0123456789] * 1536)
    items = ",\n".join(
        f'    {{"object": "embedding", "index": {i}, "embedding": {vec}}}' for i in range(1100)
    )
    body = (
        '{\n  "object": "list",\n  "data": [\n'
        + items
        + '\n  ],\n  "model": "text-embedding-3-small",\n'
        '  "usage": {\n    "prompt_tokens": 4321,\n    "total_tokens": 4321\n  }\n}\n'
    ).encode()
    assert len(body) > 20 << 20
    s = ResponseScanner(EMBEDDINGS, "application/json")
    _feed_bounded(
        s, (body[i : i + 65536] for i in range(0, len(body), 65536)), (4 << 20) + (256 << 10)
    )
    r = s.finish(1.0)
    assert r.usage == Usage(prompt_tokens=4321)
    assert r.usage_source == "reported"
    assert r.response_model == "text-embedding-3-small"
    assert s.buffered_bytes() <= 256 << 10


# -- the inline token path (``ResponseScanner.feed`` skipping the parser) -----------------


class _ParserOnly(ResponseScanner):
    """The scanner with every event through the parser and ``_event``: the reference."""

    __slots__ = ()
    _INLINE_TOKENS = False


_START = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'  # noqa: E501
# One event of two data lines, each a JSON object of its own (invalid joined).
_TWO_JSON_LINES = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\ndata: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n'  # noqa: E501
# Events a chat stream may carry past its first token, the awkward ones included: the word
# usage or error inside text, an empty content, a usage object, an error, CRLF framing,
# a bare CR inside a line (a line break to SSE), an event name, a comment, several data
# lines, a vendor usage beside a null one.
_CHAT_EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"the \\"usage\\":{ of it"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"an error\\" here"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":""}}],"usage":null}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n',  # noqa: E501
    b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null,"x_groq":{"usage":{"prompt_tokens":5,"completion_tokens":6}}}\n\n',  # noqa: E501
    b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}\n\n',
    b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"crlf"}}]}\r\n\r\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"cr"}}]}\r\r',
    b'data: {"choices":[{"index":0,"delta":{"content":"bare cr"}}],\r"x":1}\n\n',
    b'event: message_delta\ndata: {"choices":[{"index":0,"delta":{"content":"named"}}]}\n\n',
    b'data: {"choices":[],"usage":{"input_tokens":5,"output_tokens":6,"cache_read_input_tokens":2}}\n\n',  # noqa: E501
    b": keep-alive\n\n",
    b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"two lines"}}]}\n\n',
    _TWO_JSON_LINES,
    b'data: {"content":"no choices"}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n',
    b"data: [DONE]\n\n",
]


@st.composite
def chat_streams(draw):
    """A chat stream cut mostly an event a chunk (as servers send), mostly several
    events a chunk, or anywhere (as a proxy behind a fast stream reads them), some
    events split anywhere or after their first line, each chunk arriving at its own
    time."""
    events = [_START, *draw(st.lists(st.sampled_from(_CHAT_EVENTS), max_size=40))]
    if draw(st.booleans()) and draw(st.booleans()):
        # Cut anywhere, as reads of a socket: pieces of up to 2,000 bytes.
        stream = b"".join(events)
        chunks = []
        while stream:
            size = draw(st.integers(min_value=1, max_value=2000))
            chunks.append(stream[:size])
            stream = stream[size:]
        return chunks
    ways = draw(
        st.sampled_from(
            [
                ["whole", "whole", "whole", "merge", "split", "line"],
                ["merge", "merge", "merge", "whole", "split"],
            ]
        )
    )
    chunks: list[bytes] = []
    for ev in events:
        how = draw(st.sampled_from(ways))
        if how == "merge" and chunks:
            chunks[-1] += ev
        elif how == "line" and 0 < ev.find(b"\n") < len(ev) - 2:
            # The first line alone (an event name, say), then the rest.
            at = ev.find(b"\n") + 1
            chunks += [ev[:at], ev[at:]]
        elif how == "split":
            at = draw(st.integers(min_value=1, max_value=len(ev) - 1))
            chunks += [ev[:at], ev[at:]]
        else:
            chunks.append(ev)
    return chunks


def _scan_timed(scanner: ResponseScanner, chunks: list[bytes]):
    for i, c in enumerate(chunks):
        scanner.feed(c, float(i))
    return scanner.finish(float(len(chunks)))


@SETTINGS
@given(chat_streams())
def test_the_inline_token_path_changes_nothing(chunks):
    """Whatever a chat stream holds and however it is cut, the scanner that takes whole token
    events inline gives the same result, timings included, as the one that parses every
    event through the SSE parser."""
    fast = _scan_timed(ResponseScanner(OPENAI_CHAT, "text/event-stream"), chunks)
    assert fast == _scan_timed(_ParserOnly(OPENAI_CHAT, "text/event-stream"), chunks)
    assert fast.internal_errors == 0


@SETTINGS
@given(corpus_cuts())
def test_the_inline_token_path_changes_nothing_on_the_corpus(case_chunks):
    """The same on every recorded response, under any chunking."""
    case, chunks = case_chunks
    fast = _scan_timed(ResponseScanner(case.api, case.content_type), chunks)
    assert fast == _scan_timed(_ParserOnly(case.api, case.content_type), chunks)


class _CountingParser(SSEParser):
    __slots__ = ("fed",)

    def __init__(self) -> None:
        super().__init__()
        self.fed: list[bytes] = []

    def feed(self, chunk: bytes):
        self.fed.append(chunk)
        return super().feed(chunk)


def test_token_events_skip_the_parser():
    """Past the first token, a chunk that is one whole token event is not handed to the SSE
    parser (the reason for the inline path); the usage at the end still is, and counts."""
    token = _CHAT_EVENTS[0]
    usage = _CHAT_EVENTS[8]
    scanner = ResponseScanner(OPENAI_CHAT, "text/event-stream")
    parser = scanner._parser = _CountingParser()
    chunks = [_START, token, token, token, usage, b"data: [DONE]\n\n"]
    r = _scan_timed(scanner, chunks)
    # The first token goes through the parser (the model and the first content are
    # learnt there); the next two do not.
    assert parser.fed == [_START, token, usage, b"data: [DONE]\n\n"]
    assert (r.content_events, r.first_content_at, r.last_content_at) == (3, 1.0, 3.0)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 8)
    # Identical events: the smallest is taken as the envelope and one character.
    assert r.output_chars == 3


def test_a_chunk_of_token_events_skips_the_parser():
    """Several whole token events in one chunk (a joined read) are counted inline too,
    an event cut by the chunk's start or end goes through the parser."""
    token = _CHAT_EVENTS[0]
    usage = _CHAT_EVENTS[8]
    scanner = ResponseScanner(OPENAI_CHAT, "text/event-stream")
    parser = scanner._parser = _CountingParser()
    run = token * 10
    cut = token[:20]
    chunks = [_START, token, run, run + cut, token[20:] + run + cut, token[20:] + usage]
    r = _scan_timed(scanner, [*chunks, b"data: [DONE]\n\n"])
    # Whole events inline; what ends or starts mid-event, and the usage, by the parser.
    assert parser.fed == [
        _START,
        token,
        cut,
        token[20:],
        cut,
        token[20:] + usage,
        b"data: [DONE]\n\n",
    ]
    assert (r.content_events, r.first_content_at, r.last_content_at) == (33, 1.0, 5.0)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 8)


def test_an_event_the_parser_holds_is_finished_before_whole_events_are_counted():
    """A chunk that starts with whole-looking token events while the parser holds the
    first line of an event: the first of them is that event's second data line, not an
    event of its own; the inline path must let the parser finish it first."""
    token = _CHAT_EVENTS[0]
    two = _TWO_JSON_LINES
    first_line = two[: two.index(b"\n") + 1]
    chunks = [_START, token, first_line, two[len(first_line) :] + token * 10]
    fast = _scan_timed(ResponseScanner(OPENAI_CHAT, "text/event-stream"), chunks)
    assert fast == _scan_timed(_ParserOnly(OPENAI_CHAT, "text/event-stream"), chunks)


def test_a_long_run_of_token_events_and_others_among_them_in_one_chunk():
    """A whole response joined into one read: hundreds of token events with other events
    among them (an empty content, usage, an error, [DONE]) counted as the parser would."""
    token, empty, usage = _CHAT_EVENTS[0], _CHAT_EVENTS[4], _CHAT_EVENTS[8]
    body = _START + token * 150 + empty + token * 150 + usage + token * 3 + b"data: [DONE]\n\n"
    for chunks in ([body], [body[:1000], body[1000:]], [_START, token, body[len(_START) :]]):
        fast = _scan_timed(ResponseScanner(OPENAI_CHAT, "text/event-stream"), chunks)
        assert fast == _scan_timed(_ParserOnly(OPENAI_CHAT, "text/event-stream"), chunks)
        assert fast.content_events >= 303
