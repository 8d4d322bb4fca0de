"""End to end against a real inference engine: llama.cpp (``llama-cpp-python[server]``).

The engine serves a tiny llama model the fixture generates (``tests/tiny_gguf.py``: no
download), behind a real mitmdump with the addon. Clients are the official ``openai``
SDK and raw HTTP, streaming and not, with and without ``stream_options``.

What the engine teaches: ``llama-cpp-python``'s server omits usage from its streams
even when the request asks for it (``stream_options.include_usage``), so a stream's
row is an estimate, and its completion figure is the count of streamed tokens; its
JSON answers report usage, and the row's figures are exactly the engine's. The
engine's own timings (``llama_perf_context_print`` in its log) bound what the proxy
measures: time to first token is at least the engine's prompt evaluation time, and
the decode rate seen on the wire cannot beat the engine's own eval rate.

The generated model never emits end-of-sequence (see ``tests/tiny_gguf.py``), so every
generation runs to ``max_tokens`` and the engine's completion count is known.
"""

from __future__ import annotations

import re
import sys
import time

import httpx
import pytest

from spendtap.address import free_port, wait_for_port
from tests.helpers import openai_client, principal
from tests.proc import Proc

pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is not installed")
pytest.importorskip("gguf", reason="the gguf package is not installed")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

MAX_TOKENS = 24
_PERF = re.compile(
    r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens.*?\n.*?"
    r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs",
)


class Engine(Proc):
    def __init__(self, tmp, model):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "512",
                "--model_alias", "tiny-llama", "--verbose", "true"]  # fmt: skip
        super().__init__(args, tmp / "engine.log")
        wait_for_port(self.port, self.proc, timeout=60)

    def perf_blocks(self) -> list[tuple[float, int, float, int]]:
        """(prompt eval ms, prompt tokens, eval ms, eval runs) for each finished generation."""
        return [(float(a), int(b), float(c), int(d)) for a, b, c, d in _PERF.findall(self.output())]

    def perf_after(self, before: int, timeout: float = 10) -> tuple[float, int, float, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            blocks = self.perf_blocks()
            if len(blocks) > before:
                return blocks[before]
            time.sleep(0.05)
        raise AssertionError("the engine logged no timings:\n" + self.output()[-2000:])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.tiny_gguf import write_tiny_llama

    tmp = tmp_path_factory.mktemp("engine")
    e = Engine(tmp, write_tiny_llama(tmp / "tiny-llama.gguf"))
    yield e
    e.stop()


@pytest.fixture(scope="module")
def sidecar_upstream(engine) -> str:
    return engine.url  # the module's sidecar (tests/conftest.py) proxies to the engine


MESSAGES = [{"role": "user", "content": "Count the sheep, please."}]


def _report(name: str, row: dict, perf: tuple, engine_usage: dict | None) -> None:
    prompt_ms, prompt_n, eval_ms, runs = perf
    rate = runs / (eval_ms / 1000) if eval_ms else float("inf")
    print(
        f"\n[engine] {name}: engine usage={engine_usage} prompt_eval={prompt_ms}ms/{prompt_n}t"
        f" eval={eval_ms}ms/{runs} runs ({rate:.0f} tok/s) | ledger prompt={row['prompt_tokens']}"
        f" completion={row['completion_tokens']} source={row['usage_source']}"
        f" ttft={row['ttft_s']} tok/s={row['tokens_per_s']} duration={row['duration_s']}"
    )


def _check_timing(row: dict, perf: tuple) -> None:
    """The proxy's timing against the engine's own (llama_perf_context_print).

    Lower bounds only: the proxy cannot see the first token before the engine
    evaluated the prompt, nor the end before the engine decoded every token. (An upper
    bound on the wire decode rate does not hold under load: events the proxy reads
    late arrive together and shrink its first-to-last window.)
    """
    prompt_ms, _, eval_ms, _ = perf
    assert row["ttft_s"] is not None and row["duration_s"] >= row["ttft_s"]
    assert row["ttft_s"] >= prompt_ms / 1000 * 0.9
    assert row["duration_s"] >= (prompt_ms + eval_ms) / 1000 * 0.9
    assert row["tokens_per_s"] is not None and row["tokens_per_s"] > 0


def test_engine_chat_json_sdk(engine, sidecar):
    """A JSON chat answer: the row's figures are exactly the engine's usage."""
    account, headers = principal("eng")
    before = len(engine.perf_blocks())
    with openai_client(sidecar.url, headers, api_key="sk-x") as client:
        resp = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=MAX_TOKENS
        )
    perf = engine.perf_after(before)
    row = sidecar.row_for(account, settle=0)
    _report("chat json", row, perf, resp.usage.model_dump())
    assert resp.usage.completion_tokens == MAX_TOKENS
    assert row["usage_source"] == "reported"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        resp.usage.prompt_tokens,
        resp.usage.completion_tokens,
    )
    assert row["api"] == "openai-chat" and row["streamed"] == 0
    _check_timing(row, perf)


@pytest.mark.parametrize("include_usage", [True, False])
def test_engine_chat_stream_sdk(engine, sidecar, include_usage):
    """A stream: the engine omits usage even when asked; the completion estimate is exact."""
    account, headers = principal("eng")
    before = len(engine.perf_blocks())
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    with openai_client(sidecar.url, headers, api_key="sk-x") as client:
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True, **extra
            )
        )
    perf = engine.perf_after(before)
    row = sidecar.row_for(account, settle=0)
    _report(f"chat stream include_usage={include_usage}", row, perf, None)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all(c.usage is None for c in chunks), "the engine sends no usage in streams"
    assert all(c.choices for c in chunks), "no usage-only chunk reaches the client"
    assert len(content) == MAX_TOKENS  # one chunk per token
    assert perf[3] in (MAX_TOKENS - 1, MAX_TOKENS)  # the engine's decode runs
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == MAX_TOKENS
    assert row["prompt_tokens"] and row["prompt_tokens"] > 0
    assert row["streamed"] == 1
    _check_timing(row, perf)


def test_engine_chat_stream_raw_http_bytes_unchanged(engine, sidecar):
    """Raw HTTP without stream_options: what the client reads is what the engine sent."""
    account, headers = principal("eng")
    before = len(engine.perf_blocks())
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", sidecar.url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        raw = b"".join(r.iter_raw())
    perf = engine.perf_after(before)
    row = sidecar.row_for(account, settle=0)
    events = [e for e in raw.split(b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n") if e.strip()]
    assert events[-1].strip() == b"data: [DONE]"
    assert b'"usage"' not in raw and b'"choices": []' not in raw and b'"choices":[]' not in raw
    assert row["completion_tokens"] == MAX_TOKENS and row["usage_source"] == "estimated"
    assert row["response_bytes"] == len(raw)
    _check_timing(row, perf)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_completions(engine, sidecar, stream):
    """Legacy completions: JSON usage exact, a stream's completion estimate exact."""
    account, headers = principal("eng")
    before = len(engine.perf_blocks())
    with openai_client(sidecar.url, headers, api_key="sk-x") as client:
        out = client.completions.create(
            model="tiny-llama", prompt="Once upon a time", max_tokens=MAX_TOKENS, stream=stream
        )
        if stream:
            chunks = list(out)
            usage = None
            assert sum(1 for c in chunks if c.choices and c.choices[0].text) == MAX_TOKENS
        else:
            usage = out.usage
    perf = engine.perf_after(before)
    row = sidecar.row_for(account, settle=0)
    _report(f"completions stream={stream}", row, perf, usage and usage.model_dump())
    assert row["api"] == "openai-completions"
    assert row["completion_tokens"] == MAX_TOKENS
    if usage is not None:
        assert row["usage_source"] == "reported"
        assert row["prompt_tokens"] == usage.prompt_tokens
    else:
        assert row["usage_source"] == "estimated"
    _check_timing(row, perf)
