"""End to end: native Gemini and Ollama calls through a real mitmdump to the simulator.

The client must get the simulator's bytes unchanged, and the ledger row must carry
exactly the figures the simulated server reported (read back from the body the
client received), with the model, API, streaming flag and timing.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import principal

pytestmark = pytest.mark.e2e


def _post(sidecar, path: str, body: dict, headers: dict) -> tuple[httpx.Response, bytes]:
    with (
        httpx.Client(timeout=20) as client,
        client.stream("POST", sidecar.url + path, json=body, headers=headers) as resp,
    ):
        raw = b"".join(resp.iter_bytes())
    return resp, raw


def _last_gemini_usage(raw: bytes) -> dict:
    text = raw.decode()
    if text.startswith("["):
        objs = json.loads(text)
    elif text.startswith("data:"):
        objs = [json.loads(e[5:]) for e in text.split("\r\n\r\n") if e.startswith("data:")]
    else:
        objs = [json.loads(text)]
    return [o["usageMetadata"] for o in objs if "usageMetadata" in o][-1]


GEMINI_BODY = {
    "contents": [{"role": "user", "parts": [{"text": "Tell the proxy a short story."}]}],
    "generationConfig": {"maxOutputTokens": 50},
}


@pytest.mark.parametrize(
    ("path", "streamed"),
    [
        ("/v1beta/models/gemini-sim:streamGenerateContent?alt=sse", True),
        ("/v1beta/models/gemini-sim:streamGenerateContent", True),
        ("/v1beta/models/gemini-sim:generateContent", False),
    ],
)
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_gemini_native(sidecar, path, streamed, encoding):
    """Gemini SSE, JSON-array stream and JSON: figures equal the server's, thoughts included."""
    account, headers = principal(key="key-n")
    headers |= {"x-sim-tokens": "9", "x-sim-reasoning-tokens": "4", "x-sim-cached-tokens": "3"}
    if encoding:
        headers["x-sim-encoding"] = encoding
    resp, raw = _post(sidecar, path, GEMINI_BODY, headers)
    assert resp.status_code == 200
    u = _last_gemini_usage(raw)
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "gemini" and row["model"] == "gemini-sim"
    assert row["streamed"] == int(streamed) and row["outcome"] == "completed"
    assert row["usage_source"] == "reported"
    assert row["prompt_tokens"] == u["promptTokenCount"]
    assert row["completion_tokens"] == u["candidatesTokenCount"] + u["thoughtsTokenCount"] == 13
    assert row["reasoning_tokens"] == 4 and row["cached_tokens"] == 3
    assert row["ttft_s"] is not None and row["tokens_per_s"] is not None
    assert row["response_bytes"] > 0
    assert row["server_decode_s"] is None  # Gemini reports no durations


@pytest.mark.parametrize("api", ["chat", "generate"])
@pytest.mark.parametrize("stream", [True, False])
def test_ollama_native(sidecar, api, stream):
    """Ollama NDJSON and JSON: counts equal the final object's, decode rate from its durations."""
    account, headers = principal(key="key-n")
    headers |= {"x-sim-tokens": "7"}
    body: dict = {"model": "llama-sim", "options": {"num_predict": 40}}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": "Why is the sky blue?"}]
    else:
        body["prompt"] = "Why is the sky blue?"
    if not stream:
        body["stream"] = False  # Ollama streams unless told not to
    resp, raw = _post(sidecar, f"/api/{api}", body, headers)
    assert resp.status_code == 200
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    assert (len(lines) > 1) == stream
    final = lines[-1]
    assert final["done"] is True
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == f"ollama-{api}" and row["model"] == "llama-sim"
    assert row["streamed"] == int(stream)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        final["prompt_eval_count"],
        final["eval_count"],
    )
    assert row["completion_tokens"] == 7
    assert row["usage_source"] == "reported"
    rate = round(final["eval_count"] / (final["eval_duration"] / 1e9), 3)
    assert row["tokens_per_s"] == rate
    # The server's own durations are recorded, in seconds.
    assert row["server_decode_s"] == pytest.approx(final["eval_duration"] / 1e9)
    assert row["server_prompt_s"] == pytest.approx(final["prompt_eval_duration"] / 1e9)


def test_ollama_embed_has_no_completion(sidecar):
    """/api/embed reports prompt_eval_count only: the row's completion is NULL, never 0."""
    account, headers = principal(key="key-n")
    resp, raw = _post(
        sidecar, "/api/embed", {"model": "emb-sim", "input": ["alpha", "beta gamma"]}, headers
    )
    assert resp.status_code == 200
    doc = json.loads(raw)
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "ollama-embed"
    assert row["prompt_tokens"] == doc["prompt_eval_count"]
    assert row["completion_tokens"] is None and row["usage_source"] == "reported"


# -- the official SDKs, as users run them -------------------------------------------------


def test_google_genai_sdk_stream_and_json(sidecar):
    """google-genai's client (SSE stream and JSON) through the sidecar: rows equal its usage."""
    genai = pytest.importorskip("google.genai")
    from google.genai import types

    account, headers = principal(key="key-n")
    headers |= {"x-sim-tokens": "11", "x-sim-reasoning-tokens": "5"}
    client = genai.Client(
        api_key="AIza-test", http_options=types.HttpOptions(base_url=sidecar.url, headers=headers)
    )
    config = types.GenerateContentConfig(max_output_tokens=64)
    chunks = list(
        client.models.generate_content_stream(
            model="gemini-sim", contents="Tell me a story", config=config
        )
    )
    text = "".join(c.text or "" for c in chunks)
    u = chunks[-1].usage_metadata
    assert text and u.candidates_token_count == 11 and u.thoughts_token_count == 5
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "gemini" and row["model"] == "gemini-sim" and row["streamed"] == 1
    assert row["prompt_tokens"] == u.prompt_token_count
    assert row["completion_tokens"] == 16 and row["reasoning_tokens"] == 5

    account, headers = principal(key="key-n")
    client = genai.Client(
        api_key="AIza-test",
        http_options=types.HttpOptions(
            base_url=sidecar.url, headers=headers | {"x-sim-tokens": "7"}
        ),
    )
    resp = client.models.generate_content(model="gemini-sim", contents="Hi", config=config)
    row = sidecar.row_for(account, settle=0)
    assert row["streamed"] == 0 and row["usage_source"] == "reported"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        resp.usage_metadata.prompt_token_count,
        resp.usage_metadata.candidates_token_count,
    )


def test_ollama_sdk_chat_generate_embed(sidecar):
    """The ollama client (streamed chat, JSON generate, embed) through the sidecar."""
    ollama = pytest.importorskip("ollama")

    account, headers = principal(key="key-n")
    client = ollama.Client(host=sidecar.url, headers=headers | {"x-sim-tokens": "9"})
    parts = list(
        client.chat(model="llama-sim", messages=[{"role": "user", "content": "Hi"}], stream=True)
    )
    final = parts[-1]
    assert final.done and final.eval_count == 9
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "ollama-chat" and row["streamed"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"]) == (final.prompt_eval_count, 9)

    account, headers = principal(key="key-n")
    client = ollama.Client(host=sidecar.url, headers=headers | {"x-sim-tokens": "4"})
    out = client.generate(model="llama-sim", prompt="Why?", stream=False)
    row = sidecar.row_for(account, settle=0)
    assert row["streamed"] == 0 and row["completion_tokens"] == out.eval_count == 4

    account, headers = principal(key="key-n")
    client = ollama.Client(host=sidecar.url, headers=headers)
    emb = client.embed(model="emb-sim", input=["one", "two three"])
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "ollama-embed" and row["prompt_tokens"] == emb.prompt_eval_count
    assert row["completion_tokens"] is None


# -- llama.cpp's /completion and Cohere's v2 chat ---------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_llamacpp_native(sidecar, stream):
    """llama.cpp /completion: tokens_evaluated / tokens_predicted, cache and decode timing."""
    account, headers = principal(key="key-n")
    headers |= {"x-sim-tokens": "6", "x-sim-cached-tokens": "3"}
    body = {"prompt": "Once upon a time, there was", "n_predict": 32, "stream": stream}
    resp, raw = _post(sidecar, "/completion", body, headers)
    assert resp.status_code == 200
    if stream:
        final = json.loads(raw.strip().split(b"\n\n")[-1][len(b"data: ") :])
    else:
        final = json.loads(raw)
    assert final["stop"] is True
    t = final["timings"]
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "llamacpp-completion" and row["streamed"] == int(stream)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        final["tokens_evaluated"],
        final["tokens_predicted"],
        3,
    )
    assert row["completion_tokens"] == 6
    assert row["tokens_per_s"] == round(t["predicted_per_second"], 3)
    assert row["server_decode_s"] == pytest.approx(t["predicted_ms"] / 1000)


@pytest.mark.parametrize("stream", [True, False])
def test_cohere_v2_chat(sidecar, stream):
    """Cohere v2 chat: usage.tokens from message-end (stream) or the answer (JSON)."""
    account, headers = principal(key="key-n")
    headers |= {"x-sim-tokens": "5", "x-sim-cached-tokens": "4"}
    body = {"model": "command-sim", "messages": [{"role": "user", "content": "Hello there"}],
            "stream": stream, "max_tokens": 20}  # fmt: skip
    resp, raw = _post(sidecar, "/v2/chat", body, headers)
    assert resp.status_code == 200
    if stream:
        ends = [json.loads(e.split(b"data: ", 1)[1]) for e in raw.split(b"\n\n")
                if e.startswith(b"event: message-end")]  # fmt: skip
        usage = ends[-1]["delta"]["usage"]
    else:
        usage = json.loads(raw)["usage"]
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "cohere-chat" and row["model"] == "command-sim"
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        usage["tokens"]["input_tokens"],
        usage["tokens"]["output_tokens"],
        usage["cached_tokens"],
    )
    assert row["completion_tokens"] == 5 and row["usage_source"] == "reported"


def test_cohere_sdk_stream(sidecar):
    """The cohere client's v2 chat stream through the sidecar: the row equals its usage."""
    cohere = pytest.importorskip("cohere")

    account, headers = principal(key="key-n")
    co = cohere.ClientV2(api_key="co-test", base_url=sidecar.url)
    events = list(
        co.chat_stream(
            model="command-sim",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=7,
            request_options={"additional_headers": headers},
        )
    )
    usage = next(e for e in events if e.type == "message-end").delta.usage
    row = sidecar.row_for(account, settle=0)
    assert row["api"] == "cohere-chat" and row["streamed"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage.tokens.input_tokens,
        usage.tokens.output_tokens,
    )
    assert row["completion_tokens"] == 7
