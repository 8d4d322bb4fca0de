"""Vendor variants inside the OpenAI shapes: where each vendor puts its usage figures."""

from __future__ import annotations

import json

import pytest

from spendtap.metering.usage import OPENAI_CHAT, OPENAI_RESPONSES, Usage
from tests.corpus_cases import chunked, scan, sse

EVENT_STREAM = "text/event-stream"


def _chunk(content=None, usage=None, choice_usage=None, finish=None) -> dict:
    choice: dict = {"index": 0, "delta": {} if content is None else {"content": content},
                    "finish_reason": finish}  # fmt: skip
    if choice_usage is not None:
        choice["usage"] = choice_usage
    d: dict = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    if usage is not None:
        d["usage"] = usage
    return d


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # DeepSeek without the details object: cache hits are the cached part.
        ({"prompt_tokens": 10, "completion_tokens": 2, "prompt_cache_hit_tokens": 8,
          "prompt_cache_miss_tokens": 2}, Usage(10, 2, cached_tokens=8)),
        # Moonshot: cached_tokens at the top level of usage.
        ({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cached_tokens": 6},
         Usage(10, 2, cached_tokens=6)),
        # The standard details figure wins over the vendor duplicate.
        ({"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 9,
          "prompt_tokens_details": {"cached_tokens": 4}}, Usage(10, 2, cached_tokens=4)),
        # OpenRouter / LiteLLM cache writes under their own names.
        ({"prompt_tokens": 50, "completion_tokens": 1,
          "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 40}},
         Usage(50, 1, cached_tokens=0, cache_creation_tokens=40)),
        ({"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51,
          "cache_creation_input_tokens": 30, "cache_read_input_tokens": 5},
         Usage(50, 1, cached_tokens=5, cache_creation_tokens=30)),
        ({"prompt_tokens": 50, "completion_tokens": 1,
          "prompt_tokens_details": {"cached_tokens": 3, "cache_creation_tokens": 7}},
         Usage(50, 1, cached_tokens=3, cache_creation_tokens=7)),
        # Null detail objects: no sub-count, never 0.
        ({"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": None,
          "completion_tokens_details": None}, Usage(7, 3)),
    ],
)  # fmt: skip
def test_vendor_usage_fields(usage, expected):
    """Each vendor's cache figures land in cached/cache_creation as sub-counts of the prompt."""
    body = sse(_chunk("hi"), _chunk(usage=usage, finish="stop"), done=True)
    assert scan(OPENAI_CHAT, EVENT_STREAM, chunked(body, 9)).usage == expected
    msg = {"role": "assistant", "content": "hi"}
    doc = {"id": "c", "object": "chat.completion", "model": "m", "usage": usage,
           "choices": [{"index": 0, "message": msg}]}  # fmt: skip
    assert scan(OPENAI_CHAT, "application/json", [json.dumps(doc).encode()]).usage == expected


def test_usage_inside_the_choice_is_read():
    """Moonshot's finish chunk carries usage inside choices[0], with no top-level usage."""
    u = {"prompt_tokens": 12, "completion_tokens": 5, "completion_tokens_details":
         {"reasoning_tokens": 1}}  # fmt: skip
    body = sse(_chunk("OK"), _chunk(choice_usage=u, finish="stop"), done=True)
    r = scan(OPENAI_CHAT, EVENT_STREAM, chunked(body, 13))
    assert r.usage == Usage(12, 5, reasoning_tokens=1)
    assert r.content_events == 1


def test_crlf_framed_chat_stream():
    """An OpenAI-shaped stream framed with CRLF reads exactly like one framed with LF."""
    body = sse(_chunk("a"), _chunk("b"), _chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}))
    crlf = body.replace(b"\n", b"\r\n")
    lf = scan(OPENAI_CHAT, EVENT_STREAM, [body])
    r = scan(OPENAI_CHAT, EVENT_STREAM, chunked(crlf, 3))
    assert r.usage == lf.usage == Usage(3, 2)
    assert r.content_events == lf.content_events == 2


def test_responses_cache_write_in_input_details():
    """A Responses usage with a vendor cache-write figure in input_tokens_details keeps it."""
    final = {"type": "response.completed", "response": {"model": "m", "usage": {
        "input_tokens": 20, "output_tokens": 4,
        "input_tokens_details": {"cached_tokens": 5, "cache_creation_tokens": 9}}}}  # fmt: skip
    body = sse({"type": "response.output_text.delta", "delta": "x"}, final)
    r = scan(OPENAI_RESPONSES, EVENT_STREAM, [body])
    assert r.usage == Usage(20, 4, cached_tokens=5, cache_creation_tokens=9)
