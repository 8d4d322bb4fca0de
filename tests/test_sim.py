"""Tests of the simulated inference server, driven by the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import anthropic
import brotli
import httpx2
import openai
import pytest
import zstandard

from spendtap.address import parse_listen
from spendtap.sim import SimServer, run_in_thread
from spendtap.sim.apis import completion_text
from tests.helpers import invoke

MESSAGES = [{"role": "user", "content": "hello there"}]  # 11 chars -> 3 tokens
CHAT_PROMPT = 3 + 4 + 3  # priming + one message + its text


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with run_in_thread() as server:
        yield server


@pytest.fixture
def oai(sim: SimServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="sk-sim", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(sim: SimServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=sim.url, api_key="sk-ant-sim", max_retries=0) as client:
        yield client


@pytest.fixture
def raw(sim: SimServer) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=sim.url, timeout=30) as client:
        yield client


def _chat_body(**extra: object) -> dict:
    return {"model": "gpt-sim", "messages": MESSAGES, **extra}


def _events(text: str) -> list[str]:
    return [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]


# -- OpenAI chat ----------------------------------------------------------------------------


def test_chat_stream_without_include_usage_reports_no_usage(oai: openai.OpenAI, raw) -> None:
    """A chat stream without stream_options.include_usage carries no usage anywhere."""
    chunks = list(
        oai.chat.completions.create(**_chat_body(stream=True), extra_headers={"x-sim-tokens": "7"})
    )
    contents = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(contents) == completion_text(7)
    assert len(contents) == 7
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    body = raw.post(
        "/v1/chat/completions", json=_chat_body(stream=True), headers={"x-sim-tokens": "7"}
    ).text
    assert '"usage"' not in body
    assert body.endswith("data: [DONE]\n\n")


def test_chat_stream_with_include_usage_reports_it_on_a_final_empty_chunk(oai) -> None:
    """With include_usage every chunk has usage null and a final choices-[] chunk has the usage."""
    chunks = list(
        oai.chat.completions.create(
            **_chat_body(stream=True, stream_options={"include_usage": True}),
            extra_headers={"x-sim-tokens": "9", "x-sim-cached-tokens": "4"},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert last.usage.completion_tokens == pieces == 9
    assert last.usage.prompt_tokens == CHAT_PROMPT
    assert last.usage.total_tokens == CHAT_PROMPT + 9
    assert last.usage.prompt_tokens_details.cached_tokens == 4


def test_chat_stream_n_choices_capped_by_max_tokens(oai) -> None:
    """n choices each stream up to max_tokens, finish with "length", and usage sums them."""
    chunks = list(
        oai.chat.completions.create(
            **_chat_body(stream=True, n=3, max_tokens=5, stream_options={"include_usage": True}),
            extra_headers={"x-sim-tokens": "50"},
        )
    )
    per_choice = {0: 0, 1: 0, 2: 0}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            if ch.delta.content:
                per_choice[ch.index] += 1
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert per_choice == {0: 5, 1: 5, 2: 5}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 15


def test_chat_json_reports_usage_with_cached_and_reasoning(oai) -> None:
    """A non-streaming chat completion reports usage including cached and reasoning sub-counts."""
    resp = oai.chat.completions.create(
        **_chat_body(n=2),
        extra_headers={
            "x-sim-tokens": "6",
            "x-sim-cached-tokens": "1024",
            "x-sim-reasoning-tokens": "10",
        },
    )
    assert [c.message.content for c in resp.choices] == [completion_text(6)] * 2
    u = resp.usage
    assert u.prompt_tokens == 1024  # raised to the cached count
    assert u.prompt_tokens_details.cached_tokens == 1024
    assert u.completion_tokens == 2 * (6 + 10)
    assert u.completion_tokens_details.reasoning_tokens == 20
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_json_is_pretty_printed_like_openai(raw) -> None:
    """Non-streaming OpenAI bodies are pretty-printed JSON with a Content-Length."""
    r = raw.post("/v1/chat/completions", json=_chat_body(), headers={"x-sim-tokens": "2"})
    assert r.headers["content-length"] == str(len(r.content))
    assert r.text.startswith('{\n  "id": "chatcmpl-')
    assert '"prompt_tokens": 10' in r.text


# -- legacy completions ---------------------------------------------------------------------


def test_completions_json_and_stream(oai) -> None:
    """Legacy completions report usage in JSON, and in a stream only with include_usage."""
    resp = oai.completions.create(
        model="gpt-sim",
        prompt="Once upon a time",
        max_tokens=4,
        extra_headers={"x-sim-tokens": "8"},
    )
    assert resp.choices[0].text == completion_text(4)
    assert resp.choices[0].finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 4)

    chunks = list(
        oai.completions.create(
            model="gpt-sim",
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-sim-tokens": "5"},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(
        oai.completions.create(
            model="gpt-sim", prompt="x", stream=True, extra_headers={"x-sim-tokens": "3"}
        )
    )
    assert all(c.usage is None for c in plain)
    assert "".join(c.choices[0].text for c in plain) == completion_text(3)


# -- Responses API --------------------------------------------------------------------------


def test_responses_stream_events_parse_and_complete_with_usage(oai) -> None:
    """The SDK parses every Responses stream event and the completed response has usage."""
    events = list(
        oai.responses.create(
            model="gpt-sim",
            input="Say hi",
            instructions="Be brief.",
            stream=True,
            extra_headers={"x-sim-tokens": "6", "x-sim-reasoning-tokens": "3"},
        )
    )
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types.count("response.output_text.delta") == 6
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.usage is None
    final = events[-1].response
    assert final.output_text == completion_text(6)
    assert final.usage.output_tokens == 9
    assert final.usage.output_tokens_details.reasoning_tokens == 3
    assert final.usage.input_tokens == 3 + 3 + 4 + 2  # priming, instructions, one input item
    assert final.usage.total_tokens == final.usage.input_tokens + 9


def test_responses_stream_helper_and_max_output_tokens_incomplete(oai) -> None:
    """The SDK's responses.stream() helper finishes, and max_output_tokens yields incomplete."""
    with oai.responses.stream(
        model="gpt-sim", input="hi", extra_headers={"x-sim-tokens": "5", "x-sim-cached-tokens": "2"}
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == completion_text(5)
    assert final.usage.input_tokens_details.cached_tokens == 2
    events = list(
        oai.responses.create(
            model="gpt-sim",
            input="hi",
            max_output_tokens=4,
            stream=True,
            extra_headers={"x-sim-tokens": "20"},
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 4
    resp = oai.responses.create(
        model="gpt-sim", input="hi", max_output_tokens=3, extra_headers={"x-sim-tokens": "5"}
    )
    assert resp.status == "incomplete"
    assert resp.output_text == completion_text(3)
    assert resp.usage.output_tokens == 3


def test_responses_error_event_is_followed_by_failed_with_partial_usage(oai) -> None:
    """A Responses error-event fault sends an error event and response.failed with usage."""
    events = list(
        oai.responses.create(
            model="gpt-sim",
            input="hi",
            stream=True,
            extra_headers={"x-sim-tokens": "10", "x-sim-fault": "error-event"},
        )
    )
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.usage.output_tokens == 5


# -- embeddings -----------------------------------------------------------------------------


def test_embeddings_float_and_base64(oai, raw) -> None:
    """Embeddings come as floats or base64 float32 per encoding_format, with usage."""
    floats = oai.embeddings.create(
        model="emb-sim", input=["hello world", "x"], dimensions=8, encoding_format="float"
    )
    assert [len(d.embedding) for d in floats.data] == [8, 8]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 3 + 1
    default = oai.embeddings.create(model="emb-sim", input=["hello world", "x"], dimensions=8)
    for got, want in zip(default.data, floats.data, strict=True):
        assert got.embedding == pytest.approx(want.embedding, rel=1e-6)
    body = raw.post(
        "/v1/embeddings",
        json={"model": "e", "input": "hello world", "encoding_format": "base64", "dimensions": 8},
    ).json()
    vec = struct.unpack("<8f", base64.b64decode(body["data"][0]["embedding"]))
    assert list(vec) == pytest.approx(floats.data[0].embedding, rel=1e-6)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# -- Anthropic Messages ---------------------------------------------------------------------


def test_anthropic_stream_final_message_usage(claude: anthropic.Anthropic) -> None:
    """messages.stream() ends with the exact usage, cache figures included."""
    with claude.messages.stream(
        model="claude-sim",
        max_tokens=1024,
        system="Be brief.",
        messages=MESSAGES,
        extra_headers={
            "x-sim-tokens": "12",
            "x-sim-cached-tokens": "300",
            "x-sim-cache-creation-tokens": "7",
        },
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == completion_text(12)
    u = final.usage
    assert (u.input_tokens, u.output_tokens) == (3 + 3 + 4 + 3, 12)
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (300, 7)
    assert final.stop_reason == "end_turn"


def test_anthropic_stream_thinking_and_max_tokens(claude) -> None:
    """Reasoning streams as a thinking block counted in output_tokens, capped by max_tokens."""
    with claude.messages.stream(
        model="claude-sim",
        max_tokens=10,
        messages=MESSAGES,
        extra_headers={"x-sim-tokens": "20", "x-sim-reasoning-tokens": "4"},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == completion_text(4)
    assert final.content[1].text == completion_text(6)
    assert final.usage.output_tokens == 10
    assert final.stop_reason == "max_tokens"


def test_anthropic_json_message_and_count_tokens(claude) -> None:
    """A non-streaming message reports usage, and count_tokens uses the same rule."""
    msg = claude.messages.create(
        model="claude-sim", max_tokens=100, messages=MESSAGES, extra_headers={"x-sim-tokens": "3"}
    )
    assert msg.content[0].text == completion_text(3)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (3 + 4 + 3, 3)
    assert msg.usage.cache_read_input_tokens == 0
    count = claude.messages.count_tokens(model="claude-sim", messages=MESSAGES)
    assert count.input_tokens == msg.usage.input_tokens


# -- pacing ---------------------------------------------------------------------------------


def test_pacing_ttft_and_rate_are_honoured(oai) -> None:
    """The first content arrives after x-sim-ttft-ms and the rest at about x-sim-tps."""
    t0 = time.monotonic()
    first = None
    stream = oai.chat.completions.create(
        **_chat_body(stream=True),
        extra_headers={"x-sim-tokens": "11", "x-sim-ttft-ms": "300", "x-sim-tps": "50"},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t0
    total = time.monotonic() - t0
    assert first is not None and 0.28 <= first < 2.0
    assert total >= 0.28 + 10 / 50 - 0.02


def test_server_wide_pacing_defaults_apply_to_json_too() -> None:
    """Server defaults pace a non-streaming response, and a header turns pacing off."""
    with (
        run_in_thread(ttft_ms=200, tokens_per_s=100, default_tokens=6) as sim,
        openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        t0 = time.monotonic()
        resp = client.chat.completions.create(**_chat_body())
        assert time.monotonic() - t0 >= 0.2 + 5 / 100 - 0.02
        assert resp.usage.completion_tokens == 6
        t0 = time.monotonic()
        client.chat.completions.create(
            **_chat_body(), extra_headers={"x-sim-ttft-ms": "0", "x-sim-tps": "0"}
        )
        assert time.monotonic() - t0 < 0.2


# -- faults ---------------------------------------------------------------------------------


def test_fault_cut_makes_the_sdks_raise(oai, claude) -> None:
    """A cut stream or JSON body makes the SDKs raise instead of returning a result."""
    with pytest.raises(openai.APIConnectionError):
        for _ in oai.chat.completions.create(
            **_chat_body(stream=True), extra_headers={"x-sim-tokens": "20", "x-sim-fault": "cut"}
        ):
            pass
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(**_chat_body(), extra_headers={"x-sim-fault": "cut"})
    with (
        pytest.raises((anthropic.APIError, httpx2.HTTPError)),
        claude.messages.stream(
            model="c", max_tokens=100, messages=MESSAGES, extra_headers={"x-sim-fault": "cut"}
        ) as stream,
    ):
        stream.get_final_message()


def test_fault_cut_stream_stops_without_terminator(raw) -> None:
    """A cut stream delivers about half its tokens and no [DONE] before the connection closes."""
    received = b""
    with (
        pytest.raises(httpx2.RemoteProtocolError),
        raw.stream(
            "POST",
            "/v1/chat/completions",
            json=_chat_body(stream=True),
            headers={"x-sim-tokens": "20", "x-sim-fault": "cut"},
        ) as r,
    ):
        for chunk in r.iter_bytes():
            received += chunk
    assert received.count(b'"content":" ') + received.count(b'"content":"S') == 10
    assert b"[DONE]" not in received


def test_fault_error_event_surfaces_as_sdk_error(oai, claude, raw) -> None:
    """An in-stream error event raises an APIError in both SDKs; Anthropic's follows usage."""
    with pytest.raises(openai.APIError):
        for _ in oai.chat.completions.create(
            **_chat_body(stream=True), extra_headers={"x-sim-fault": "error-event"}
        ):
            pass
    with (
        pytest.raises(anthropic.APIError, match="overloaded_error"),
        claude.messages.stream(
            model="c",
            max_tokens=100,
            messages=MESSAGES,
            extra_headers={"x-sim-fault": "error-event"},
        ) as stream,
    ):
        stream.get_final_message()
    body = raw.post(
        "/v1/messages",
        json={"model": "c", "max_tokens": 100, "messages": MESSAGES, "stream": True},
        headers={"x-sim-fault": "error-event", "x-sim-tokens": "4"},
    ).text
    events = _events(body)
    assert events[0].startswith("event: message_start") and '"input_tokens":10' in events[0]
    assert events[-1].startswith("event: error\ndata: ")
    assert json.loads(events[-1].split("data: ", 1)[1])["error"]["type"] == "overloaded_error"


def test_fault_status_429_gives_rate_limit_errors(oai, claude) -> None:
    """status-429 answers with each API's error envelope, parsed as RateLimitError."""
    with pytest.raises(openai.RateLimitError) as exc:
        oai.chat.completions.create(**_chat_body(), extra_headers={"x-sim-fault": "status-429"})
    assert exc.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as aexc:
        claude.messages.create(
            model="c", max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fault": "status-429"}
        )
    assert aexc.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.InternalServerError):
        oai.embeddings.create(model="e", input="x", extra_headers={"x-sim-fault": "status-503"})


def test_fault_reset_gives_connection_errors(oai, claude) -> None:
    """A reset before the response headers is a connection error in both SDKs."""
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(**_chat_body(), extra_headers={"x-sim-fault": "reset"})
    with pytest.raises(anthropic.APIConnectionError):
        claude.messages.create(
            model="c", max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fault": "reset"}
        )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_fault_malformed_still_ends_with_usage(raw, path: str) -> None:
    """A malformed stream has junk lines and CR-only endings yet still ends with its usage."""
    body = {"model": "m", "messages": MESSAGES, "input": "hi", "max_tokens": 100, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if path != "/v1/chat/completions":
        del body["stream_options"]
    r = raw.post(path, json=body, headers={"x-sim-fault": "malformed", "x-sim-tokens": "10"})
    data = r.content
    assert b"this is not JSON" in data
    assert b"\nthis line is not an SSE field\n" in data
    assert b"\n: simulated comment line\n" in data
    assert b"\r\r" in data and b"data: {\r" in data  # CR-only section, split data field
    tail = data.rsplit(b"\n\n", 3)
    if path == "/v1/chat/completions":
        assert data.endswith(b"data: [DONE]\n\n")
        assert b'"completion_tokens":10' in tail[-3]
    elif path == "/v1/messages":
        assert b'"output_tokens":10' in tail[-3] and b"message_stop" in tail[-2]
    else:
        assert b'"output_tokens":10' in tail[-2] and b"response.completed" in tail[-2]


def test_fault_malformed_anthropic_sdk_still_parses(claude) -> None:
    """The Anthropic SDK skips the nameless junk event and gets the final usage."""
    with claude.messages.stream(
        model="c",
        max_tokens=100,
        messages=MESSAGES,
        extra_headers={"x-sim-fault": "malformed", "x-sim-tokens": "10"},
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 10
    assert final.content[0].text == completion_text(10)


def test_fault_stall_pauses_the_stream(raw) -> None:
    """A stall leaves a gap of x-sim-stall-ms between two events of an unpaced stream."""
    gaps = []
    last = None
    with raw.stream(
        "POST",
        "/v1/chat/completions",
        json=_chat_body(stream=True),
        headers={"x-sim-fault": "stall", "x-sim-stall-ms": "400", "x-sim-tokens": "8"},
    ) as r:
        for _ in r.iter_lines():
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
    assert max(gaps) >= 0.35


def test_fault_huge_pads_the_body_and_keeps_usage_last(raw, oai) -> None:
    """A huge JSON body reaches x-sim-body-bytes, parses, and has its usage at the end."""
    size = 3 * 1024 * 1024 + 17
    r = raw.post(
        "/v1/chat/completions",
        json=_chat_body(),
        headers={"x-sim-fault": "huge", "x-sim-body-bytes": str(size), "x-sim-tokens": "4"},
    )
    assert len(r.content) == size == int(r.headers["content-length"])
    doc = r.json()
    assert list(doc)[-1] == "usage" and doc["usage"]["completion_tokens"] == 4
    assert b'"completion_tokens": 4' in r.content[-400:]
    resp = oai.chat.completions.create(
        **_chat_body(), extra_headers={"x-sim-fault": "huge", "x-sim-encoding": "gzip"}
    )
    assert resp.usage.completion_tokens == 16


def test_unknown_fault_or_bad_control_is_a_400(raw) -> None:
    """An invalid x-sim-* header is answered with 400 and an error envelope."""
    r = raw.post("/v1/chat/completions", json=_chat_body(), headers={"x-sim-fault": "explode"})
    assert r.status_code == 400 and "explode" in r.json()["error"]["message"]
    r = raw.post("/v1/messages", json={}, headers={"x-sim-tokens": "many"})
    assert r.status_code == 400 and r.json()["type"] == "error"


# -- encodings ------------------------------------------------------------------------------

_DECODE = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "br": brotli.decompress,
    "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
}


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_encoding_json_and_stream_decode(raw, encoding: str) -> None:
    """x-sim-encoding compresses JSON and streams with that Content-Encoding; both decode."""
    headers = {"x-sim-encoding": encoding, "x-sim-tokens": "5"}
    r = raw.post("/v1/chat/completions", json=_chat_body(), headers=headers)
    assert r.headers["content-encoding"] == encoding
    assert r.json()["usage"]["completion_tokens"] == 5

    raw_bytes = b""
    with raw.stream(
        "POST",
        "/v1/chat/completions",
        json=_chat_body(stream=True, stream_options={"include_usage": True}),
        headers=headers,
    ) as s:
        assert s.headers["content-encoding"] == encoding
        for chunk in s.iter_raw():
            raw_bytes += chunk
    text = _DECODE[encoding](raw_bytes).decode()
    assert text.endswith("data: [DONE]\n\n")
    assert '"completion_tokens":5' in text


def test_encoded_stream_flushes_each_event(sim: SimServer) -> None:
    """A compressed paced stream delivers decodable events before the stream ends."""
    headers = {"x-sim-encoding": "gzip", "x-sim-tokens": "4", "x-sim-tps": "5"}
    with (
        httpx2.Client(base_url=sim.url, timeout=30) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=_chat_body(stream=True), headers=headers
        ) as r,
    ):
        t0 = time.monotonic()
        first = next(r.iter_text())
        assert time.monotonic() - t0 < 0.5  # the role+first token event, not the whole body
        assert first.startswith("data: {")


def test_keepalive_comments(raw) -> None:
    """x-sim-keepalive-comments adds ': keep-alive' comment lines to a stream."""
    body = raw.post(
        "/v1/chat/completions",
        json=_chat_body(stream=True),
        headers={"x-sim-keepalive-comments": "1", "x-sim-tokens": "20"},
    ).text
    assert body.count(": keep-alive\n\n") == 2


# -- plumbing -------------------------------------------------------------------------------


def test_stats_count_requests_per_endpoint_and_reset(sim: SimServer, raw) -> None:
    """/sim/stats counts requests per endpoint under any prefix, and /sim/reset zeroes them."""
    assert raw.post("/sim/reset").json() == {"ok": True}
    raw.post("/openai/v1/chat/completions", json=_chat_body())
    raw.post("/chat/completions", json=_chat_body(stream=True))
    raw.post("/v1/messages", json={"model": "c", "max_tokens": 5, "messages": MESSAGES})
    raw.get("/health")
    raw.get("/v1/models")
    stats = raw.get("/sim/stats").json()
    assert stats["total"] == 5
    assert stats["endpoints"] == {
        "openai-chat": 2,
        "anthropic-messages": 1,
        "health": 1,
        "models": 1,
    }
    assert stats["streams"] == 1
    assert stats["usage_reported"]["responses"] == 2  # the stream had no include_usage
    assert sim.stats()["total"] == 5
    raw.post("/sim/reset")
    assert raw.get("/sim/stats").json()["total"] == 0


def test_models_health_and_unknown_paths(oai, claude, raw) -> None:
    """Models list in both API shapes, health answers, and unknown paths get a 404."""
    assert [m.id for m in oai.models.list()] == ["sim-model"]
    assert [m.id for m in claude.models.list()] == ["sim-model"]
    assert raw.get("/health").json() == {"status": "ok"}
    assert raw.get("/v1/nothing").status_code == 404


def test_keep_alive_serves_several_requests_on_one_connection(sim: SimServer) -> None:
    """Two pipelined-in-turn requests on one socket both get complete answers."""
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"x-sim-tokens: 3\r\nContent-Length: %d\r\n\r\n%s"
    )
    payload = json.dumps(_chat_body(stream=True)).encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(req % (len(payload), payload))
            buf = b""
            while not buf.endswith(b"0\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
            assert buf.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"transfer-encoding: chunked" in buf
            assert b"data: [DONE]" in buf


def test_long_unpaced_stream_is_complete(sim: SimServer) -> None:
    """A long unpaced stream delivers every one of its chunks (its speed is measured in bench/)."""
    n = 20000
    payload = json.dumps(_chat_body(stream=True)).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"x-sim-tokens: %d\r\nContent-Length: %d\r\n\r\n" % (n, len(payload))
    )
    data = bytearray()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=30) as s:
        s.sendall(head + payload)
        while chunk := s.recv(1 << 20):
            data += chunk
    assert data.count(b"\ndata: ") + 1 >= n


def test_parse_listen_forms() -> None:
    """--listen accepts HOST:PORT, [V6]:PORT, :PORT and PORT."""
    assert parse_listen("0.0.0.0:8000") == ("0.0.0.0", 8000)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":81") == ("127.0.0.1", 81)
    assert parse_listen("82") == ("127.0.0.1", 82)
    with pytest.raises(ValueError):
        parse_listen("host:port")


def test_cli_help_has_an_example() -> None:
    """`spendtap simulate --help` documents the command with an example."""
    result = invoke("simulate", "--help")
    assert result.exit_code == 0
    assert "spendtap simulate --listen 127.0.0.1:8000 --ttft-ms 200" in result.output


def test_module_entry_serves_and_exits_on_sigterm() -> None:
    """`python -m spendtap.sim` prints its URL, serves, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spendtap.sim", "--listen", "127.0.0.1:0", "--tokens", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ", 1)[1].strip()
        with httpx2.Client(base_url=url, timeout=10) as client:
            r = client.post("/v1/chat/completions", json=_chat_body())
            assert r.json()["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
