"""End to end: the official SDKs talk through a real mitmdump to the simulator."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.helpers import openai_client, principal

pytestmark = pytest.mark.e2e


def _row(sidecar, account: str) -> dict:
    return sidecar.row_for(account, settle=0)


def test_openai_chat_stream_with_usage(sidecar):
    """A streamed chat completion with include_usage parses normally and its usage is billed."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        stream = client.chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "Say hello to the proxy"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=12,
            extra_headers={"x-sim-tokens": "12"},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
    assert text and usage is not None
    row = _row(sidecar, account)
    assert row["outcome"] == "completed" and row["status"] == 200
    assert row["api"] == "openai-chat" and row["model"] == "sim-chat" and row["streamed"] == 1
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["completion_tokens"] == usage.completion_tokens == 12
    assert row["usage_source"] == "reported"
    assert row["key"] == "key-1"
    assert row["ttft_s"] is not None and 0 <= row["ttft_s"] <= row["duration_s"]
    assert row["tokens_per_s"] is not None and row["tokens_per_s"] > 0


def test_openai_chat_stream_usage_injected_and_hidden(sidecar):
    """A client that did not ask for usage gets none, yet the row has the reported usage."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        chunks = list(
            client.chat.completions.create(
                model="sim-chat",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers={"x-sim-tokens": "6"},
            )
        )
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach the client"
    row = _row(sidecar, account)
    assert row["usage_source"] == "reported"
    assert row["completion_tokens"] == 6 and row["prompt_tokens"] is not None


def test_stream_without_usage_is_estimated_not_zero(sim, start_sidecar):
    """With injection off, a stream that reports no usage is estimated, never a silent 0."""
    proxy = start_sidecar(sim.url, "spendtap_inject_usage=false")
    account, headers = principal(key="key-1")
    with openai_client(proxy.url, headers) as client:
        for _ in client.chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "count to twenty please"}],
            stream=True,
            extra_headers={"x-sim-tokens": "20"},
        ):
            pass
    row = _row(proxy, account)
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == 20  # one content event per token
    assert row["prompt_tokens"] and row["prompt_tokens"] > 0


def test_openai_chat_json(sidecar):
    """A non-streaming chat completion passes through and is billed from its body."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        resp = client.chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "one two three"}],
            extra_headers={"x-sim-tokens": "7", "x-sim-cached-tokens": "2"},
        )
    row = _row(sidecar, account)
    assert row["streamed"] == 0 and row["outcome"] == "completed"
    assert row["prompt_tokens"] == resp.usage.prompt_tokens
    assert row["completion_tokens"] == resp.usage.completion_tokens == 7
    assert row["cached_tokens"] == 2


def test_openai_responses_stream(sidecar):
    """A Responses API stream is billed from response.completed."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        final = None
        for event in client.responses.create(
            model="sim-resp",
            input="Tell me a story",
            stream=True,
            extra_headers={"x-sim-tokens": "9"},
        ):
            if event.type == "response.completed":
                final = event.response
    assert final is not None
    row = _row(sidecar, account)
    assert row["api"] == "openai-responses"
    assert row["prompt_tokens"] == final.usage.input_tokens
    assert row["completion_tokens"] == final.usage.output_tokens == 9


def test_openai_embeddings(sidecar):
    """Embeddings are billed for their input tokens, with no completion figure."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        resp = client.embeddings.create(model="sim-embed", input=["a b c", "d e"])
    row = _row(sidecar, account)
    assert row["api"] == "embeddings"
    assert row["prompt_tokens"] == resp.usage.prompt_tokens
    assert row["completion_tokens"] is None


@pytest.mark.parametrize("cache_read", [0, 40])
def test_anthropic_stream(sidecar, cache_read):
    """An Anthropic stream merges message_start and message_delta usage, cache reads included."""
    account, headers = principal(key="key-1")
    with (
        anthropic.Anthropic(
            base_url=sidecar.url, api_key="sk-ant-test", default_headers=headers, max_retries=0
        ) as client,
        client.messages.stream(
            model="sim-claude",
            max_tokens=64,
            messages=[{"role": "user", "content": "Hello"}],
            extra_headers={"x-sim-tokens": "11", "x-sim-cached-tokens": str(cache_read)},
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    row = _row(sidecar, account)
    u = final.usage
    expected_prompt = (
        u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    )
    assert row["api"] == "anthropic-messages"
    assert row["prompt_tokens"] == expected_prompt
    assert row["completion_tokens"] == u.output_tokens == 11
    assert row["cached_tokens"] == u.cache_read_input_tokens


def test_anthropic_json(sidecar):
    """A non-streaming Anthropic message is billed from its usage object."""
    account, headers = principal(key="key-1")
    with anthropic.Anthropic(
        base_url=sidecar.url, api_key="sk-ant-test", default_headers=headers, max_retries=0
    ) as client:
        msg = client.messages.create(
            model="sim-claude",
            max_tokens=64,
            messages=[{"role": "user", "content": "Hello there"}],
            extra_headers={"x-sim-tokens": "5"},
        )
    row = _row(sidecar, account)
    assert row["completion_tokens"] == msg.usage.output_tokens == 5
    assert row["prompt_tokens"] == msg.usage.input_tokens + (
        msg.usage.cache_read_input_tokens or 0
    ) + (msg.usage.cache_creation_input_tokens or 0)


def test_regular_proxy_mode(sim, start_sidecar):
    """As an explicit HTTP proxy, spendtap meters the SDK's traffic the same way."""
    proxy = start_sidecar(None, mode="regular")
    account, headers = principal(key="key-1")
    with openai.OpenAI(
        base_url=sim.url + "/v1",
        api_key="sk-test",
        default_headers=headers,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=proxy.url),
    ) as client:
        resp = client.chat.completions.create(
            model="sim-chat",
            messages=[{"role": "user", "content": "via proxy"}],
            extra_headers={"x-sim-tokens": "4"},
        )
    row = _row(proxy, account)
    assert row["completion_tokens"] == resp.usage.completion_tokens == 4
    assert row["node"] == f"127.0.0.1:{sim.port}"


def test_metrics_exported(sidecar):
    """After traffic, the Prometheus endpoint exports the seed-compatible metric names."""
    account, headers = principal(key="key-1")
    with openai_client(sidecar.url, headers) as client:
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "x"}]
        )
    _row(sidecar, account)
    text = sidecar.metrics()
    for name in (
        "cortex_time_to_first_token_seconds_bucket",
        "cortex_tokens_per_second_bucket",
        "cortex_request_duration_seconds_bucket",
        "cortex_requests_total",
        "cortex_prompt_tokens_total",
        "cortex_completion_tokens_total",
        "cortex_spend_tokens_total",
        "cortex_ledger_queue_depth",
    ):
        assert name in text, name
    assert f'account="{account}"' in text
    health = httpx.get(sidecar.metrics_url + "/healthz", timeout=5)
    assert health.status_code == 200
