"""Usage injection: the request gains include_usage, the client's stream loses what it adds."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from spendtap.metering.inject import InjectedUsageFilter, wants_usage_injection, with_include_usage
from spendtap.metering.request import parse_request

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]%s}\n\n'  # noqa: E501
USAGE = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'  # noqa: E501


def _stream(with_usage: bool, sep: bytes = b"\n\n") -> bytes:
    extra = b',"usage":null' if with_usage else b""
    body = b"".join(CHUNK % (w, extra) for w in (b"Hel", b"lo", b"!"))
    if with_usage:
        body += USAGE
    body += b"data: [DONE]\n\n"
    return body.replace(b"\n\n", sep)


def _filter(chunks: list[bytes]) -> bytes:
    f = InjectedUsageFilter()
    return b"".join(f.feed(c) for c in chunks) + f.flush()


def test_body_gains_include_usage_without_other_changes():
    """A body without stream_options gets the member appended and keeps every other byte."""
    body = b'{"model": "m", "stream": true, "messages": []}'
    out = with_include_usage(body)
    assert out.startswith(b'{"model": "m", "stream": true, "messages": []')
    assert json.loads(out)["stream_options"] == {"include_usage": True}


def test_body_with_include_usage_false_is_rewritten():
    """An explicit include_usage false is turned on, other stream options kept."""
    out = with_include_usage(b'{"stream":true,"stream_options":{"include_usage":false,"x":1}}')
    assert json.loads(out)["stream_options"] == {"include_usage": True, "x": 1}


def test_bad_bodies_are_left_alone():
    """A body that is not a JSON object cannot be changed and is reported as such."""
    assert with_include_usage(b"not json") is None
    assert with_include_usage(b"[1, 2]") is None
    assert with_include_usage(b'{"stream_options": 3}') is None


def test_which_requests_get_injection():
    """Only streaming chat/completions requests that did not ask for usage are changed."""

    def info(path, doc):
        return parse_request(path, {}, json.dumps(doc).encode())

    assert wants_usage_injection(info("/v1/chat/completions", {"stream": True}))
    assert wants_usage_injection(info("/v1/completions", {"stream": True}))
    assert not wants_usage_injection(info("/v1/chat/completions", {"stream": False}))
    assert not wants_usage_injection(
        info("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}})
    )
    assert not wants_usage_injection(info("/v1/messages", {"stream": True}))


@given(st.data())
def test_filter_restores_the_uninjected_stream_for_any_chunking(data):
    """Whatever the chunk boundaries, the client gets the stream it would have had."""
    sep = data.draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
    injected = _stream(True, sep)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(injected) - 1), max_size=20)))
    chunks = [injected[a:b] for a, b in zip([0, *cuts], [*cuts, len(injected)], strict=True)]
    assert _filter(chunks) == _stream(False, sep)


@given(sep=st.sampled_from([b"\n\n", b"\r\n\r\n"]))
def test_one_event_a_chunk_is_filtered_event_by_event(sep):
    """Each event in a chunk of its own, as a server sends them: each comes back without
    what the injection added, at once; the usage-only event comes back as nothing."""
    events = [e + sep for e in _stream(True, sep).split(sep)[:-1]]
    f = InjectedUsageFilter()
    out = [f.feed(e) for e in events]
    expected = [e + sep for e in _stream(False, sep).split(sep)[:-1]]
    assert out == [*expected[:3], b"", *expected[3:]]
    assert f.flush() == b""
    assert f.removed_chunks == 1


def test_filter_holds_partial_events_as_nothing_yet():
    """A chunk with only part of an event yields no bytes yet, never a premature end."""
    f = InjectedUsageFilter()
    assert f.feed(b'data: {"choices":[{"delta"') == b""
    assert (
        f.feed(b':{"content":"x"}}]}\n\n') == b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    )


def test_filter_gives_up_on_unframed_data():
    """More than 1 MiB without an event boundary passes through unchanged from then on."""
    f = InjectedUsageFilter()
    big = b"x" * (1 << 20)
    assert f.feed(big) == b""
    assert f.feed(b"y") == big + b"y"
    assert f.passthrough


def test_body_from_parsed_request_is_not_parsed_again_and_gives_the_same_bytes():
    """With parse_request's info, the appended body equals the one made by parsing."""
    for body in (
        b'{"model": "m", "stream": true, "messages": []}',
        b'{"stream":true}\n',
        b'{"stream": true, "stream_options": {"include_usage": false}}',
    ):
        info = parse_request("/v1/chat/completions", {}, body)
        assert with_include_usage(body, info) == with_include_usage(body)


def test_filter_leaves_usage_text_inside_content_alone():
    """Only JSON members are removed: a model that writes the text ,"usage":null (escaped
    inside its content string) reaches the client unchanged, in every spacing form."""
    content = rb"say \",\"usage\":null and \"usage\": null, please"
    for extra in (b',"usage":null', b', "usage": null', b',"usage" : null'):
        injected = CHUNK % (content, extra) + USAGE + b"data: [DONE]\n\n"
        expected = CHUNK % (content, b"") + b"data: [DONE]\n\n"
        assert _filter([injected]) == expected
        assert json.loads(expected.split(b"\n\n")[0][6:])["choices"][0]["delta"]["content"] == (
            'say ","usage":null and "usage": null, please'
        )


def test_the_word_usage_in_generated_text_is_left_as_it_is():
    """Content that says "usage" (a word in the text, or the whole token) is never cut:
    only the key the upstream added goes, whatever chunks the stream comes in."""
    words = (b" usage", b"usage", b'say \\"usage\\":null')
    added = b"".join(CHUNK % (w, b',"usage":null') for w in words) + USAGE + b"data: [DONE]\n\n"
    plain = b"".join(CHUNK % (w, b"") for w in words) + b"data: [DONE]\n\n"
    for size in (1, 7, 64, len(added)):
        chunks = [added[i : i + size] for i in range(0, len(added), size)]
        assert _filter(chunks) == plain
