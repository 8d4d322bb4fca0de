"""Native API dialects: request facts, extractors, framings and server timing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendtap.metering.dialect_scanner import DialectScanner, make_scanner
from spendtap.metering.framing import JSONSequence
from spendtap.metering.meter import FlowMeter
from spendtap.metering.request import detect_api, parse_request
from spendtap.metering.scanner import ResponseScanner
from spendtap.metering.usage import (
    COHERE_CHAT,
    COHERE_EMBED,
    EMBEDDINGS,
    GEMINI,
    LLAMACPP_COMPLETION,
    OLLAMA_CHAT,
    OLLAMA_EMBED,
    OLLAMA_GENERATE,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OTHER,
    RERANK,
    Usage,
)
from tests.corpus_cases import chunked, load_cases, scan
from tests.helpers import cut

CASES = {c.name: c for c in load_cases()}
EXTRACTOR_APIS = frozenset(
    (GEMINI, OLLAMA_CHAT, OLLAMA_GENERATE, OLLAMA_EMBED, LLAMACPP_COMPLETION, COHERE_CHAT,
     COHERE_EMBED, RERANK)
)  # fmt: skip


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", GEMINI),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=x", GEMINI),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/"
            "gemini-2.0-flash:streamGenerateContent",
            GEMINI,
        ),
        ("/api/chat", OLLAMA_CHAT),
        ("/api/generate", OLLAMA_GENERATE),
        ("/api/embed", OLLAMA_EMBED),
        ("/api/embeddings", OLLAMA_EMBED),
        ("/completion", LLAMACPP_COMPLETION),
        ("/v2/chat", COHERE_CHAT),
        ("/v1/chat", COHERE_CHAT),
        ("/v2/embed", COHERE_EMBED),
        ("/v1/rerank", RERANK),
        ("/v2/rerank", RERANK),
        ("/v1/chat/completions", OPENAI_CHAT),
        ("/v1/completions", OPENAI_COMPLETIONS),
        ("/v1/embeddings", EMBEDDINGS),
        ("/v1/models", OTHER),
        ("/api/tags", OTHER),
    ],
)
def test_detect_api(path, api):
    """Each native path names its family; the OpenAI paths keep theirs."""
    assert detect_api(path) == api


def test_gemini_request_facts_from_path_and_generation_config():
    """Gemini: model and streaming from the path, output limit from generationConfig."""
    body = json.dumps({
        "contents": [{"role": "user", "parts": [{"text": "Count to ten, please."}]}],
        "generationConfig": {"maxOutputTokens": 321},
    }).encode()  # fmt: skip
    info = parse_request("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", {}, body)
    assert (info.api, info.model, info.stream, info.max_output_tokens) == (
        GEMINI,
        "gemini-2.5-pro",
        True,
        321,
    )
    assert info.prompt_estimate and info.prompt_estimate > 3
    info = parse_request("/v1beta/models/gemini-2.5-pro:generateContent", {}, body)
    assert info.stream is False


@pytest.mark.parametrize(
    ("doc", "stream", "limit"),
    [
        ({"model": "llama3.2", "prompt": "hi"}, True, None),
        ({"model": "llama3.2", "prompt": "hi", "stream": False}, False, None),
        ({"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 64}}, True, 64),
        ({"model": "llama3.2", "prompt": "hi", "options": {"num_predict": -1}}, True, None),
    ],
)
def test_ollama_request_streams_by_default(doc, stream, limit):
    """Ollama streams unless the request says stream: false; num_predict is the limit."""
    info = parse_request("/api/generate", {}, json.dumps(doc).encode())
    assert (info.model, info.stream, info.max_output_tokens) == ("llama3.2", stream, limit)


def test_llamacpp_and_cohere_request_limits():
    """llama.cpp's n_predict and Cohere's max_tokens are the output limits."""
    info = parse_request("/completion", {}, b'{"prompt": "x", "n_predict": 12, "stream": true}')
    assert (info.api, info.stream, info.max_output_tokens) == (LLAMACPP_COMPLETION, True, 12)
    info = parse_request("/v2/chat", {}, b'{"model": "command-r", "max_tokens": 7, "messages": []}')
    assert (info.api, info.model, info.max_output_tokens) == (COHERE_CHAT, "command-r", 7)


def test_make_scanner_picks_by_family():
    """Native families get the dialect scanner; OpenAI/Anthropic keep the base scanner."""
    assert type(make_scanner(OPENAI_CHAT, None)) is ResponseScanner
    assert type(make_scanner(GEMINI, None)) is DialectScanner


@pytest.mark.parametrize(
    "name",
    ["ollama-generate-ndjson-stream", "ollama-chat-ndjson-stream", "ollama-chat-json-tools"],
)
def test_ollama_server_timing(name):
    """Ollama's nanosecond durations are read; decode rate = eval_count / eval_duration."""
    case = CASES[name]
    r = scan(case.api, case.content_type, chunked(case.body, 17))
    assert r.server_timing is not None
    assert (
        r.server_timing.decode_tokens_per_s == case.meta["expected"]["server_decode_tokens_per_s"]
    )
    assert r.server_timing.total_s and r.server_timing.decode_s


def test_ollama_missing_prompt_eval_count_stays_none():
    """A fully cached prompt: Ollama omits prompt_eval_count; the figure is None, never 0."""
    body = (
        b'{"model":"m","response":"a","done":false}\n'
        b'{"model":"m","response":"","done":true,"eval_count":5,"eval_duration":1000000000}\n'
    )
    r = scan(OLLAMA_GENERATE, "application/x-ndjson", [body])
    assert r.usage == Usage(prompt_tokens=None, completion_tokens=5)
    assert r.usage_source == "reported"
    assert r.server_timing.decode_tokens_per_s == 5.0


def test_ollama_error_line():
    """An error object in an NDJSON stream is the row's error."""
    r = scan(OLLAMA_CHAT, "application/x-ndjson", [b'{"error":"model \\"x\\" not found"}\n'])
    assert r.error == 'model "x" not found'
    assert r.usage == Usage()


def test_gemini_tool_use_prompt_tokens_are_input():
    """toolUsePromptTokenCount is input billed on top of promptTokenCount."""
    doc = {
        "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 100, "toolUsePromptTokenCount": 40,
                          "candidatesTokenCount": 5, "cachedContentTokenCount": 60},
        "modelVersion": "gemini-x",
    }  # fmt: skip
    r = scan(GEMINI, "application/json", [json.dumps(doc).encode()])
    assert r.usage == Usage(prompt_tokens=140, completion_tokens=5, cached_tokens=60)
    assert r.response_model == "gemini-x"


def test_gemini_error_in_json_array():
    """A Gemini error answered as a JSON array is the row's error, with no usage."""
    body = (
        b'[{\n  "error": {\n    "code": 429,\n    "message": "Quota exceeded",\n'
        b'    "status": "RESOURCE_EXHAUSTED"\n  }\n}\n]'
    )
    r = scan(GEMINI, "application/json", chunked(body, 5))
    assert r.error == "RESOURCE_EXHAUSTED: Quota exceeded"
    assert r.usage == Usage()


def test_oversized_document_figures_from_tail():
    """A non-streamed answer larger than the object cap: figures from its tail, memory bounded."""
    doc = {"model": "big", "response": "w" * 300_000, "done": True,
           "prompt_eval_count": 11, "eval_count": 70_000}  # fmt: skip
    body = json.dumps(doc).encode()
    s = make_scanner(OLLAMA_GENERATE, "application/json", max_event_bytes=100_000)
    peak = 0
    for c in chunked(body, 4096):
        s.feed(c, 1.0)
        peak = max(peak, s.buffered_bytes())
    r = s.finish(2.0)
    assert r.usage == Usage(prompt_tokens=11, completion_tokens=70_000)
    assert r.response_model == "big"
    assert peak < 100_000 + 3 * (64 << 10) + 4096


def test_not_json_body_is_harmless():
    """An HTML error page on a native path: no usage, no exception, counted as a parse error."""
    r = scan(OLLAMA_CHAT, "text/html", [b"<html>502 Bad Gateway</html>"])
    assert r.usage == Usage() and r.internal_errors == 0 and r.parse_errors == 1


# -- chunking invariance of the new framings -------------------------------------------


def _ndjson(n: int) -> bytes:
    lines = [{"model": "m", "message": {"role": "assistant", "content": f"t{i}"}, "done": False}
             for i in range(n)]  # fmt: skip
    lines.append({"model": "m", "done": True, "prompt_eval_count": 9, "eval_count": n,
                  "eval_duration": 2_000_000_000})  # fmt: skip
    return b"".join(json.dumps(o).encode() + b"\n" for o in lines)


def _array(n: int) -> bytes:
    objs = [{"candidates": [{"content": {"parts": [{"text": f"p{i} {{}}"}], "role": "model"}}],
             "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": i + 1},
             "modelVersion": "g"} for i in range(n)]  # fmt: skip
    return ("[" + "\r\n,\r\n".join(json.dumps(o, indent=2) for o in objs) + "\r\n]").encode()


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 12), points=st.lists(st.integers(0, 10_000), max_size=30))
def test_ndjson_chunking_invariance(n, points):
    """However an NDJSON stream is cut, usage, content events and model are the same."""
    body = _ndjson(n)
    whole = scan(OLLAMA_CHAT, "application/x-ndjson", [body])
    r = scan(OLLAMA_CHAT, "application/x-ndjson", cut(body, points))
    assert whole.usage == r.usage == Usage(prompt_tokens=9, completion_tokens=n)
    assert r.content_events == whole.content_events == n
    assert r.response_model == "m" and r.parse_errors == 0
    assert r.server_timing.decode_tokens_per_s == round(n / 2, 3)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 12), points=st.lists(st.integers(0, 20_000), max_size=30))
def test_json_array_chunking_invariance(n, points):
    """However a JSON-array stream is cut, the last cumulative usage wins; every element counts."""
    body = _array(n)
    r = scan(GEMINI, "application/json", cut(body, points))
    assert r.usage == Usage(prompt_tokens=4, completion_tokens=n)
    assert r.content_events == n
    assert r.streamed_sse and r.response_model == "g" and r.parse_errors == 0


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400), points=st.lists(st.integers(0, 500), max_size=10))
def test_json_sequence_never_raises(data, points):
    """Arbitrary bytes never make the framer or the dialect scanner raise."""
    seq = JSONSequence(max_object=256)
    for piece in cut(data, points):
        list(seq.feed(piece))
    list(seq.close())
    for api in (GEMINI, OLLAMA_CHAT, COHERE_CHAT, LLAMACPP_COMPLETION):
        r = scan(api, None, cut(data, points))
        assert r.internal_errors == 0


# -- the meter uses the server's own decode timing ---------------------------------------


def test_meter_decode_rate_from_server_timing():
    """A row's tokens_per_s is the server's eval_count / eval_duration when it reports them."""
    case = CASES["ollama-generate-ndjson-stream"]
    info = parse_request("/api/generate", {}, b'{"model": "llama3.2", "prompt": "why?"}')
    m = FlowMeter("f1", 100.0, "POST", "/api/generate", info, "acct", "key", None)
    m.start_response(200, case.content_type, None)
    for c in chunked(case.body, 40):
        m.on_chunk(c)
    row = m.finish("completed", 200.0)
    assert row["usage_source"] == "reported"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (26, 259)
    assert row["tokens_per_s"] == case.meta["expected"]["server_decode_tokens_per_s"]
    assert (row["server_prompt_s"], row["server_decode_s"]) == (0.130079, 4.23271)
    assert row["streamed"] is True and row["api"] == OLLAMA_GENERATE


def test_meter_embed_without_usage_has_no_completion():
    """Legacy /api/embeddings reports nothing: the estimate has a prompt and no completion."""
    info = parse_request("/api/embeddings", {}, b'{"model": "all-minilm", "prompt": "hello there"}')
    m = FlowMeter("f2", 100.0, "POST", "/api/embeddings", info, "acct", "key", None)
    m.start_response(200, "application/json", None)
    m.on_chunk(b'{"embedding":[0.1,0.2]}')
    row = m.finish("completed", 101.0)
    assert row["usage_source"] == "estimated"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] is None


# -- what spendtap does not recognise is counted, never guessed ------------------------


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/v1/models", "/v1/models"),
        ("/v1/threads/thread_abc123XYZ/runs?key=secret", "/v1/threads/:id"),
        ("/v1/files/12345/content", "/v1/files/:id"),
        ("/", "/"),
    ],
)
def test_path_family(path, family):
    """Path families are bounded: first segments only, ids folded, no query string."""
    from spendtap.metering.request import path_family

    assert path_family(path) == family


def test_unrecognized_api_row_and_metric():
    """An unrecognised API: usage_source none, no estimate, and its path family counted."""
    from prometheus_client import CollectorRegistry

    from spendtap.metrics.series import Metrics

    info = parse_request("/v1/assistants/asst_9f8e7d6c5b/files", {}, b'{"purpose": "x"}')
    assert info.api == OTHER
    m = FlowMeter("f3", 100.0, "POST", "/v1/assistants/asst_9f8e7d6c5b/files", info, "a", "k", None)
    m.start_response(200, "application/json", None)
    m.on_chunk(b'{"id": "file-1", "object": "assistant.file", "content": "some text"}')
    row = m.finish("completed", 101.0)
    assert row["usage_source"] == "none"
    assert row["prompt_tokens"] is None and row["completion_tokens"] is None
    reg = CollectorRegistry()
    metrics = Metrics(registry=reg)
    metrics.observe(row)
    got = reg.get_sample_value(
        "cortex_unrecognized_api_requests_total", {"path_family": "/v1/assistants/:id"}
    )
    assert got == 1.0


def test_registry_covers_every_native_family():
    """Each native family has one extractor, and each of its path suffixes detects it."""
    from spendtap.metering.dialect_registry import DIALECTS, EXTRACTORS
    from spendtap.metering.usage import NATIVE_APIS

    assert set(EXTRACTORS) == set(NATIVE_APIS) and len(DIALECTS) == len(NATIVE_APIS)
    for cls in DIALECTS:
        for suffix in cls.PATH_SUFFIXES:
            path = "/v1beta/models/m" + suffix if suffix.startswith(":") else "/x" + suffix
            assert detect_api(path) == cls.api, (cls, suffix)


def test_key_swap_for_gemini_uses_x_goog_api_key(tmp_path):
    """Key swap on a Gemini request: the operator's key goes up as x-goog-api-key, alone."""
    from spendtap.proxy.keyswap import UpstreamCredential

    f = tmp_path / "upstream.key"
    f.write_text("AIza-operator\n")
    f.chmod(0o600)
    headers = {"x-goog-api-key": "sk-spendtap-client", "authorization": "Bearer x"}
    UpstreamCredential(str(f)).apply(headers, GEMINI)
    assert headers == {"x-goog-api-key": "AIza-operator"}


@pytest.mark.parametrize(
    ("api", "check"),
    [
        (
            GEMINI,
            lambda d: d["error"]["status"] == "RESOURCE_EXHAUSTED" and d["error"]["code"] == 429,
        ),
        (OLLAMA_CHAT, lambda d: isinstance(d["error"], str)),
        (COHERE_CHAT, lambda d: isinstance(d["message"], str)),
        (OPENAI_CHAT, lambda d: d["error"]["code"] == "rate_limit_exceeded"),
    ],
)
def test_refusals_in_each_dialects_envelope(api, check):
    """A budget refusal answers in the error envelope the family's clients parse."""
    from spendtap.proxy.refusals import budget_refusal
    from spendtap.store.budgets import Decision

    decision = Decision(
        allowed=False, reason="window", scope="key", principal="k", cap=10,
        spent=10, reserved=0, tokens=5, window_s=3600, retry_after_s=30.0,
    )  # fmt: skip
    status, headers, body = budget_refusal(api, decision)
    assert status == 429 and headers["retry-after"] == "30"
    assert check(json.loads(body))


def test_json_sequence_cost_stays_linear(monkeypatch):
    """A big pretty document whose every chunk ends in a nested '}' is not re-parsed per chunk."""
    import spendtap.metering.framing as framing

    calls = []
    real = framing._raw_decode

    def counting(text, i=0):
        calls.append(len(text) - i)
        return real(text, i)

    monkeypatch.setattr(framing, "_raw_decode", counting)
    doc = {"items": [{"k": i, "v": "x" * 40} for i in range(5000)], "prompt_eval_count": 3}
    body = json.dumps(doc, indent=1).encode()
    cuts = [i + 1 for i in range(len(body)) if body[i : i + 1] == b"}"]
    seq = JSONSequence(max_object=1 << 24)
    got = []
    prev = 0
    for c in cuts:
        got += list(seq.feed(body[prev:c]))
        prev = c
    got += list(seq.feed(body[prev:])) + list(seq.close())
    assert got == [doc]
    assert sum(calls) < 4 * len(body)  # geometric back-off: linear, not quadratic


def test_gemini_stream_without_usage_is_estimated():
    """A recognised API whose answer carries no usage: estimated from request and content."""
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "Say hi " * 20}]}]})
    path = "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    info = parse_request(path, {}, body.encode())
    m = FlowMeter("f4", 100.0, "POST", path, info, "a", "k", None)
    m.start_response(200, "text/event-stream", None)
    for word in ("Hello", " there", " friend"):
        obj = {"candidates": [{"content": {"parts": [{"text": word}], "role": "model"}}]}
        m.on_chunk(b"data: " + json.dumps(obj).encode() + b"\r\n\r\n")
    row = m.finish("completed", 101.0)
    assert row["usage_source"] == "estimated" and row["model"] == "gemini-x"
    assert row["prompt_tokens"] > 20 and row["completion_tokens"] == 5  # ceil(17 chars / 4)
    assert row["ttft_s"] is not None and row["streamed"] is True


def test_gemini_usage_snapshot_replaces_the_previous_one():
    """Each usageMetadata is a whole snapshot: a figure it omits is not left over."""

    def ev(u):
        obj = {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": u}
        return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"

    body = ev({"promptTokenCount": 8, "candidatesTokenCount": 20, "thoughtsTokenCount": 400})
    body += ev({"promptTokenCount": 9, "thoughtsTokenCount": 30})  # MAX_TOKENS while thinking
    r = scan(GEMINI, "text/event-stream", [body])
    assert r.usage == Usage(prompt_tokens=9, completion_tokens=30, reasoning_tokens=30)


def test_ndjson_garbage_line_is_skipped_in_time():
    """A line that is not JSON in an NDJSON stream is counted and skipped; later lines
    are still read (and timed) as they arrive, not only at the end."""
    lines = [
        b'{"model":"m","message":{"role":"assistant","content":"a"},"done":false}\n',
        b"this is not json\n",
        b'{"model":"m","message":{"role":"assistant","content":"b"},"done":false}\n',
        b'{"model":"m","done":true,"prompt_eval_count":2,"eval_count":2}\n',
    ]
    r = scan(OLLAMA_CHAT, "application/x-ndjson", lines)
    assert r.usage == Usage(prompt_tokens=2, completion_tokens=2)
    assert r.parse_errors == 1 and r.content_events == 2
    assert (r.first_content_at, r.last_content_at) == (0.0, 2.0)


NATIVE_CASES = [c for c in CASES.values() if c.api in EXTRACTOR_APIS]


@settings(max_examples=200, deadline=None)
@given(
    i=st.integers(0, len(NATIVE_CASES) - 1),
    points=st.lists(st.integers(0, 30_000), max_size=60),
)
def test_native_corpus_cases_any_chunking(i, points):
    """Every recorded native-API body, cut anywhere, scans to the same usage and events."""
    c = NATIVE_CASES[i]
    whole = scan(c.api, c.content_type, [c.body])
    r = scan(c.api, c.content_type, cut(c.body, points))
    assert r.usage == whole.usage == c.expected_usage()
    assert r.content_events == whole.content_events
    assert r.parse_errors == r.internal_errors == 0
    assert r.response_model == whole.response_model


def test_large_ollama_request_still_streams_by_default():
    """A request too large to parse whole (images) keeps Ollama's default streaming."""
    from spendtap.metering.request import MAX_PARSE_BYTES

    body = b'{"model": "llava", "prompt": "what is this?", "images": ["' + b"A" * MAX_PARSE_BYTES
    info = parse_request("/api/generate", {}, body + b'"]}')
    assert (info.model, info.stream, info.body_parsed) == ("llava", True, False)
