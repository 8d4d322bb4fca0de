"""The scanner against every recorded response, and fixed synthetic cases beyond them."""

from __future__ import annotations

import json

import pytest

from spendtap.metering.scanner import ResponseScanner, last_usage_object
from spendtap.metering.usage import (
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    OTHER,
    Usage,
)
from tests.corpus_cases import ENCODINGS, case_ids, chunked, encode, load_cases, scan, sse

CASES = load_cases()

# Streams that carry no generated content at all (so no content timing is expected):
NO_CONTENT = {
    "anthropic-stream-docs-error-event",  # only an error event
    "helexa-neuron-chat-stream-cached",  # a finish chunk and a usage chunk only
    "helexa-neuron-responses-stream-reasoning",  # the message item is opened empty
    "llamacpp-chat-stream-tail-timings",  # the recording keeps only the usage chunk
}
# Answers that name no model (Cohere's; the request's model is the row's).
NO_MODEL = {"anthropic-stream-docs-error-event"} | {
    c.name for c in CASES if c.api in ("cohere-chat", "cohere-embed", "rerank")
}


def test_corpus_present():
    """The corpus holds cases of every API family the scanner reads."""
    apis = {c.api for c in CASES}
    assert len(CASES) >= 20
    families = {OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES, ANTHROPIC_MESSAGES, EMBEDDINGS}
    assert families <= apis


@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_whole_body(case):
    """Fed whole, each recorded body yields its expected normalized usage, source and mode."""
    r = scan(case.api, case.content_type, [case.body])
    assert r.usage == case.expected_usage()
    assert r.usage_source == ("reported" if case.expected_usage().reported else "none")
    assert r.streamed_sse == case.streaming
    assert r.parse_errors == 0
    assert r.decode_error is None
    assert r.internal_errors == 0
    assert r.bytes_scanned == len(case.body)
    if case.name not in NO_MODEL:
        assert r.response_model


@pytest.mark.parametrize("size", [1, 7, 64, 1000])
@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_small_chunks(case, size):
    """Cut into small chunks, each body gives the same usage, model, error and counts as whole."""
    whole = scan(case.api, case.content_type, [case.body])
    r = scan(case.api, case.content_type, chunked(case.body, size))
    assert r.usage == case.expected_usage()
    assert r.usage == whole.usage
    assert r.content_events == whole.content_events
    assert r.response_model == whole.response_model
    assert r.error == whole.error
    assert r.parse_errors == whole.parse_errors == 0


@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_content_timing(case):
    """Streams time their content events; JSON bodies their first and last chunks."""
    chunks = chunked(case.body, 50)
    r = scan(case.api, case.content_type, chunks)
    if not case.streaming:
        assert (r.first_content_at, r.last_content_at) == (0.0, float(len(chunks) - 1))
        assert r.content_events == 1
    elif case.name in NO_CONTENT:
        assert r.first_content_at is None and r.last_content_at is None
        assert r.content_events == 0
    else:
        assert r.content_events > 0
        assert r.first_content_at is not None and r.last_content_at is not None
        assert 0 < r.first_content_at <= r.last_content_at <= len(chunks) - 1


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_compressed(case, encoding):
    """A gzip/deflate/br/zstd body fed in small chunks scans exactly like the plain one."""
    plain = scan(case.api, case.content_type, [case.body])
    data, header = encode(case.body, encoding)
    r = scan(case.api, case.content_type, chunked(data, 11), header)
    assert r.decode_error is None
    assert r.usage == case.expected_usage()
    assert r.content_events == plain.content_events
    assert r.response_model == plain.response_model
    assert r.bytes_scanned == len(case.body)


def _events_as_chunks(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e.strip()]


def test_anthropic_timing_skips_start_and_ping():
    """message_start, content_block_start and ping are not content; the two text deltas are."""
    case = next(c for c in CASES if c.name == "anthropic-stream-docs-basic")
    r = scan(case.api, case.content_type, _events_as_chunks(case.body))
    assert (r.first_content_at, r.last_content_at, r.content_events) == (3.0, 4.0, 2)


def test_chat_timing_skips_role_chunk():
    """The role-only chunk with empty content is not content; the first text delta is."""
    case = next(c for c in CASES if c.name == "vllm-chat-stream-include-usage")
    chunks = _events_as_chunks(case.body)
    r = scan(case.api, case.content_type, chunks)
    assert r.first_content_at == 1.0
    assert r.content_events == 13


def test_responses_timing_counts_deltas():
    """Only response.*.delta events are content in a Responses stream."""
    case = next(c for c in CASES if c.name == "openai-responses-stream-basic")
    chunks = _events_as_chunks(case.body)
    deltas = [i for i, c in enumerate(chunks) if b"event: response.output_text.delta" in c]
    r = scan(case.api, case.content_type, chunks)
    assert r.content_events == len(deltas)
    assert (r.first_content_at, r.last_content_at) == (float(deltas[0]), float(deltas[-1]))


def test_anthropic_error_event_case():
    """The documented Anthropic error event sets the error summary and reports no usage."""
    case = next(c for c in CASES if c.name == "anthropic-stream-docs-error-event")
    r = scan(case.api, case.content_type, [case.body])
    assert r.error == "overloaded_error: Overloaded"
    assert r.usage == Usage() and r.usage_source == "none"


# -- synthetic cases beyond the corpus -------------------------------------------------

A = ANTHROPIC_MESSAGES
EVENT_STREAM = "text/event-stream"


def _anthropic(start_usage: dict, delta_usage: dict, *, error: dict | None = None) -> bytes:
    events: list = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hi"}}),
    ]  # fmt: skip
    if error is not None:
        events.append(("error", {"type": "error", "error": error}))
    else:
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": delta_usage}),
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip
    return sse(*events)


@pytest.mark.parametrize("api", [A, OTHER])
def test_anthropic_iterations_are_summed(api):
    """With usage.iterations[] (server-side compaction), billable figures are the sums."""
    body = _anthropic(
        {"input_tokens": 23000, "output_tokens": 1},
        {
            "input_tokens": 23000,
            "output_tokens": 1000,
            "cache_read_input_tokens": 0,
            "iterations": [
                {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
                {"type": "message", "input_tokens": 23000, "output_tokens": 1000},
            ],
        },
    )
    r = scan(api, EVENT_STREAM, chunked(body, 13))
    assert r.usage == Usage(
        prompt_tokens=203000, completion_tokens=4500, cached_tokens=0, cache_creation_tokens=None
    )


def test_anthropic_json_iterations_are_summed():
    """A non-streamed Anthropic message with iterations[] is billed the iteration sums."""
    body = json.dumps({
        "type": "message", "model": "claude-x", "content": [{"type": "text", "text": "x"}],
        "usage": {"input_tokens": 50, "output_tokens": 10, "cache_read_input_tokens": 5,
                  "iterations": [
                      {"type": "compaction", "input_tokens": 900, "output_tokens": 90,
                       "cache_read_input_tokens": 100},
                      {"type": "message", "input_tokens": 50, "output_tokens": 10,
                       "cache_read_input_tokens": 5}]},
    }).encode()  # fmt: skip
    r = scan(A, "application/json", [body])
    assert r.usage == Usage(prompt_tokens=1055, completion_tokens=100, cached_tokens=105)


def test_anthropic_final_output_lower_than_placeholder():
    """message_delta's output_tokens replaces message_start's placeholder even when lower."""
    body = _anthropic({"input_tokens": 40, "output_tokens": 50}, {"output_tokens": 12})
    r = scan(A, EVENT_STREAM, [body])
    assert r.usage == Usage(prompt_tokens=40, completion_tokens=12)


def test_anthropic_cache_figures_normalized():
    """Anthropic prompt = input + cache read + cache creation; cache figures kept as sub-counts."""
    body = _anthropic(
        {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5,
         "output_tokens": 1},
        {"output_tokens": 30},
    )  # fmt: skip
    r = scan(A, EVENT_STREAM, [body])
    assert r.usage == Usage(
        prompt_tokens=115, completion_tokens=30, cached_tokens=100, cache_creation_tokens=5
    )


def test_anthropic_input_only_in_message_delta():
    """helexa cortex: 0 placeholders in message_start, real input in message_delta: last wins."""
    body = _anthropic(
        {"input_tokens": 0, "output_tokens": 0},
        {"input_tokens": 225, "cache_read_input_tokens": 25, "output_tokens": 42},
    )
    r = scan(A, EVENT_STREAM, [body])
    assert r.usage == Usage(prompt_tokens=250, completion_tokens=42, cached_tokens=25)


def test_anthropic_cache_without_input_is_not_a_prompt_figure():
    """Without input_tokens, cache figures alone do not make a prompt figure (never invent)."""
    body = _anthropic({"cache_read_input_tokens": 7}, {"output_tokens": 3})
    r = scan(A, EVENT_STREAM, [body])
    assert r.usage == Usage(prompt_tokens=None, completion_tokens=3, cached_tokens=7)


def test_anthropic_error_after_message_start_bills_input():
    """An error event after message_start: the input already reported is billed, error kept."""
    body = _anthropic(
        {"input_tokens": 31, "output_tokens": 1},
        {},
        error={"type": "overloaded_error", "message": "Overloaded"},
    )
    r = scan(A, EVENT_STREAM, [body])
    assert r.usage.prompt_tokens == 31
    assert r.usage_source == "reported"
    assert r.error == "overloaded_error: Overloaded"


def _responses_stream(final_type: str, usage: dict, *, event_lines: bool, done: bool) -> bytes:
    resp = {"id": "resp_1", "object": "response", "model": "gpt-x", "status": "in_progress",
            "usage": None, "error": None}  # fmt: skip
    final = dict(resp, status=final_type.split(".")[1], usage=usage)
    if final_type == "response.failed":
        final["error"] = {"code": "server_error", "message": "boom"}
    events = [
        {"type": "response.created", "response": resp},
        {"type": "response.output_text.delta", "delta": "Hel"},
        {"type": "response.output_text.delta", "delta": "lo"},
        {"type": "response.output_text.done", "text": "Hello"},
        {"type": final_type, "response": final},
    ]
    items = [(e["type"], e) if event_lines else e for e in events]
    return sse(*items, done=done)


RESP_USAGE = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 8},
              "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 4},
              "total_tokens": 29}  # fmt: skip
RESP_EXPECTED = Usage(prompt_tokens=20, completion_tokens=9, cached_tokens=8, reasoning_tokens=4)


@pytest.mark.parametrize("api", [OPENAI_RESPONSES, OTHER])
def test_responses_without_event_lines_and_done(api):
    """A Responses stream without event: lines, ending in [DONE], yields usage and timing."""
    body = _responses_stream("response.completed", RESP_USAGE, event_lines=False, done=True)
    r = scan(api, EVENT_STREAM, _events_as_chunks(body))
    assert r.usage == RESP_EXPECTED
    assert (r.first_content_at, r.last_content_at, r.content_events) == (1.0, 2.0, 2)
    assert r.response_model == "gpt-x"
    assert r.parse_errors == 0


@pytest.mark.parametrize("final", ["response.incomplete", "response.failed"])
def test_responses_incomplete_and_failed_usage(final):
    """Usage in response.incomplete / response.failed is billed; failed also sets the error."""
    body = _responses_stream(final, RESP_USAGE, event_lines=True, done=False)
    r = scan(OPENAI_RESPONSES, EVENT_STREAM, [body])
    assert r.usage == RESP_EXPECTED
    if final == "response.failed":
        assert r.error == "server_error: boom"
    else:
        assert r.error is None


def _chat_chunk(content: str | None = None, usage: dict | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    choices = [] if usage is not None and content is None else [
        {"index": 0, "delta": delta, "finish_reason": None}]  # fmt: skip
    d = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-x", "choices": choices}
    if usage is not None:
        d["usage"] = usage
    d.update(extra)
    return d


def test_openai_error_after_usage_chunk_is_billed():
    """An error object in a 200 stream after the usage chunk: usage billed, error recorded."""
    body = sse(
        _chat_chunk("Hi"),
        _chat_chunk(usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
        {"error": {"message": "upstream went away", "type": "server_error", "code": None}},
    )
    r = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    assert r.usage == Usage(prompt_tokens=5, completion_tokens=1)
    assert r.usage_source == "reported"
    assert r.error == "server_error: upstream went away"


def test_cumulative_usage_on_every_chunk_last_wins():
    """Usage repeated cumulatively on every chunk (continuous usage stats): the last value wins."""
    chunks = [
        _chat_chunk(t, usage={"prompt_tokens": 10, "completion_tokens": i + 1,
                              "total_tokens": 11 + i})
        for i, t in enumerate(["a", "b", "c", "d"])
    ]  # fmt: skip
    body = sse(*chunks, done=True)
    r = scan(OPENAI_CHAT, EVENT_STREAM, chunked(body, 40))
    assert r.usage == Usage(prompt_tokens=10, completion_tokens=4)
    assert r.content_events == 4


def test_vendor_duplicate_usage_not_double_counted():
    """Usage both at top level and under x_groq.usage is one report, never summed."""
    u = {"prompt_tokens": 12, "completion_tokens": 24, "total_tokens": 36}
    body = sse(_chat_chunk("x"), _chat_chunk(usage=u, x_groq={"id": "r", "usage": u}), done=True)
    r = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    assert r.usage == Usage(prompt_tokens=12, completion_tokens=24)


def test_sub_counts_are_not_added():
    """cached_tokens and reasoning_tokens are parts of prompt/completion, never added on top."""
    u = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
         "prompt_tokens_details": {"cached_tokens": 60},
         "completion_tokens_details": {"reasoning_tokens": 30}}  # fmt: skip
    body = sse(_chat_chunk("x"), _chat_chunk(usage=u), done=True)
    r = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    assert r.usage == Usage(
        prompt_tokens=100, completion_tokens=50, cached_tokens=60, reasoning_tokens=30
    )


def test_malformed_events_counted_and_later_usage_kept():
    """Malformed events the scanner had to read are counted; later usage still counts."""
    body = (
        b'data: {"choices": [{"delta": {"content": "y"\n\n'  # truncated, before any content
        + sse(_chat_chunk("x"))
        + b"data: not json at all\n\n"
        + b'data: {"usage": {"prompt_tokens": 99, "completion_tokens": \n\n'  # truncated usage
        + sse(_chat_chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}), done=True)
    )
    r = scan(OPENAI_CHAT, EVENT_STREAM, chunked(body, 9))
    assert r.parse_errors == 3
    assert r.usage == Usage(prompt_tokens=3, completion_tokens=2)
    # The truncated chunk still shows generated text: content, by the byte test.
    assert r.content_events == 2
    assert r.internal_errors == 0


def test_usage_null_is_not_usage():
    """A null usage on every chunk reports nothing; absent figures stay None, never 0."""
    body = sse(_chat_chunk("a", usage=None), {**_chat_chunk("b"), "usage": None}, done=True)
    r = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    assert r.usage == Usage() and r.usage_source == "none"


def test_partial_usage_figures_stay_none():
    """A usage object reporting only prompt_tokens leaves completion None (embeddings-like)."""
    body = json.dumps({"object": "list", "data": [], "model": "emb",
                       "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()  # fmt: skip
    r = scan(EMBEDDINGS, "application/json", [body])
    assert r.usage == Usage(prompt_tokens=8)
    assert r.usage_source == "reported"


def test_sse_sniffed_despite_json_content_type():
    """A body that looks like an event stream is framed as SSE whatever its content type."""
    body = b"\n\n" + sse(
        _chat_chunk("hi"), _chat_chunk(usage={"prompt_tokens": 1, "completion_tokens": 1})
    )
    r = scan(OPENAI_CHAT, "application/json", chunked(body, 1))
    assert r.streamed_sse
    assert r.usage == Usage(prompt_tokens=1, completion_tokens=1)


def test_json_body_with_event_stream_content_type():
    """A JSON document sent as text/event-stream (e.g. an error body) is read as JSON."""
    body = b'{"error": {"message": "bad key", "type": "invalid_request_error"}}'
    r = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    assert not r.streamed_sse
    assert r.error == "invalid_request_error: bad key"


def test_non_json_body_is_harmless():
    """An HTML error page (not JSON) yields no usage, no exception, one parse error."""
    r = scan(OPENAI_CHAT, "text/html", [b"<html><body>502 Bad Gateway</body></html>"])
    assert r.usage == Usage() and r.parse_errors == 1 and r.internal_errors == 0
    r = scan(OPENAI_CHAT, "application/json", [b"[1, 2, 3]"])
    assert r.usage == Usage() and r.parse_errors == 0


def test_json_document_is_read_as_an_event_is():
    """A whole JSON body is read by the code that reads a parsed event: a failed Responses
    document names its model (inside ``response``) and its error like the event would."""
    doc = {
        "type": "response.failed",
        "response": {
            "model": "gpt-x",
            "status": "failed",
            "error": {"code": "server_error", "message": "The model failed"},
            "usage": {"input_tokens": 12, "output_tokens": 3},
        },
    }
    r = scan(OPENAI_RESPONSES, "application/json", [json.dumps(doc).encode()])
    assert not r.streamed_sse
    assert r.response_model == "gpt-x"
    assert r.error == "server_error: The model failed"
    assert r.usage == Usage(prompt_tokens=12, completion_tokens=3)


def test_large_pretty_json_uses_head_and_tail():
    """A pretty-printed JSON body beyond the limit: model from its head, usage from its tail."""
    doc = {
        "id": "chatcmpl-1",
        "model": "gpt-big",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "z" * 300_000}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 70_000,
                  "completion_tokens_details": {"reasoning_tokens": 5}},
    }  # fmt: skip
    body = json.dumps(doc, indent=2).encode()
    s = ResponseScanner(OPENAI_CHAT, "application/json", max_json_bytes=100_000)
    for c in chunked(body, 4096):
        s.feed(c, 1.0)
        assert s.buffered_bytes() <= 100_000 + 3 * (64 << 10) + 4096
    r = s.finish(2.0)
    assert r.usage == Usage(prompt_tokens=7, completion_tokens=70_000, reasoning_tokens=5)
    assert r.response_model == "gpt-big"


def test_last_usage_object_ignores_escaped_and_null():
    """The tail extractor skips escaped "usage" in strings, "usage": null and truncated objects."""
    tail = (
        b'"text": "say \\"usage\\": {\\"prompt_tokens\\": 999}", "usage": {"prompt_tokens": 4,'
        b' "note": "} {"}, "other": {"usage": null}}'
    )
    assert last_usage_object(tail) == {"prompt_tokens": 4, "note": "} {"}
    assert last_usage_object(b'"usage": {"prompt_tokens": 4, "x": [1, 2') is None


def test_oversized_responses_completed_event():
    """A response.completed event larger than the event cap still yields usage from its tail."""
    big = {"type": "response.completed", "response": {
        "id": "r", "object": "response", "model": "gpt-x", "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text",
                                                    "text": "w" * 3_000_000}]}],
        "usage": RESP_USAGE}}  # fmt: skip
    body = sse(("response.output_text.delta", {"type": "response.output_text.delta",
                                               "delta": "w"}),
               ("response.completed", big))  # fmt: skip
    s = ResponseScanner(OPENAI_RESPONSES, EVENT_STREAM)
    peak = 0
    for c in chunked(body, 16384):
        s.feed(c, 1.0)
        peak = max(peak, s.buffered_bytes())
    r = s.finish(2.0)
    assert r.usage == RESP_EXPECTED
    assert peak < (1 << 20) + (256 << 10)
    assert r.content_events == 1


def test_unknown_or_corrupt_encoding_is_reported_not_raised():
    """An unknown Content-Encoding or a corrupt gzip body sets decode_error; nothing raises."""
    r = scan(OPENAI_CHAT, EVENT_STREAM, [b"data: {}\n\n"], "compress")
    assert r.decode_error and "compress" in r.decode_error
    r = scan(OPENAI_CHAT, EVENT_STREAM, [b"\x1f\x8b\x08\x00garbage" * 10], "gzip")
    assert r.decode_error and r.decode_error.startswith("gzip")


def test_finish_is_idempotent_and_feed_after_finish_ignored():
    """finish() returns the same result every time; chunks fed after it change nothing."""
    case = next(c for c in CASES if c.name == "openai-chat-stream-cached")
    s = ResponseScanner(case.api, case.content_type)
    s.feed(case.body, 1.0)
    r1 = s.finish(2.0)
    s.feed(b'data: {"usage": {"prompt_tokens": 1}}\n\n', 3.0)
    assert s.finish(4.0) is r1
    assert r1.usage == case.expected_usage()


def test_final_event_without_blank_line_keeps_chunk_time():
    """An event completed only at finish() is timed at its last chunk's arrival, not at finish."""
    body = sse(_chat_chunk("a")) + b'data: {"choices":[{"delta":{"content":"b"}}]}'
    s = ResponseScanner(OPENAI_CHAT, EVENT_STREAM)
    s.feed(body, 5.0)
    r = s.finish(99.0)
    assert (r.first_content_at, r.last_content_at, r.content_events) == (5.0, 5.0, 2)
