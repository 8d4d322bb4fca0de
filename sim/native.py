"""Wire renderers of the simulated native APIs: Gemini, Ollama, llama.cpp and Cohere.

Shapes copied from the recorded cases in ``tests/corpus/wire`` (``gemini-*``,
``ollama-*``):

- Gemini ``streamGenerateContent``: with ``alt=sse``, data-only events framed with
  CRLF CRLF; without it, a JSON array streamed element by element
  (``[`` pretty object ``\\r\\n,\\r\\n`` … ``\\r\\n]``). Every streamed object carries
  the cumulative ``usageMetadata``; thoughts are not streamed but counted
  (``thoughtsTokenCount``). ``generateContent``: one pretty-printed document.
- Ollama ``/api/chat`` and ``/api/generate``: NDJSON, one compact object per token
  (``thinking`` for reasoning tokens), the final ``done`` object with
  ``prompt_eval_count``, ``eval_count`` and nanosecond durations derived from the
  simulated pacing; ``/api/embed`` and the legacy ``/api/embeddings``.
- llama.cpp ``/completion``: data-only events, one per token with the cumulative
  ``tokens_predicted``, and a final ``"stop": true`` object with ``tokens_evaluated``,
  ``tokens_predicted``, ``tokens_cached`` and ``timings`` (``cache_n``, ``prompt_n``,
  ``prompt_ms``, ``predicted_n``, ``predicted_ms``, ``predicted_per_second``) derived
  from the pacing; the same object, with the content, when not streamed.
- Cohere v2 ``/v2/chat``: named events (``message-start``, ``content-delta`` per token,
  ``message-end`` with ``usage``), then ``data: [DONE]``; the JSON answer with ``usage``
  (``tokens``, ``billed_units``, ``cached_tokens``).

Prompt tokens follow the package rule (one per started group of 4 characters, plus
4 per message and 3 per request).
"""

from __future__ import annotations

import json
import time
from typing import Any

from spendtap.metering.usage import (
    COHERE_CHAT,
    GEMINI,
    LLAMACPP_COMPLETION,
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
)

from .apis import (
    Plan,
    Renderer,
    _j,
    completion_text,
    content_tokens,
    embedding_vector,
    messages_tokens,
    token_text,
)

__all__ = [
    "NATIVE_RENDERERS",
    "CohereRenderer",
    "GeminiRenderer",
    "LlamaCppRenderer",
    "OllamaRenderer",
    "native_prompt_tokens",
    "ollama_embed_document",
]

_NS = 1_000_000_000


def _parts_tokens(content: Any) -> int:
    if isinstance(content, dict):
        parts = content.get("parts")
        if isinstance(parts, list):
            return sum(content_tokens(p.get("text")) if isinstance(p, dict) else 0 for p in parts)
        return 0
    return content_tokens(content)


def native_prompt_tokens(api: str, body: dict) -> int:
    """The prompt tokens the simulator reports for a native request body."""
    if api == GEMINI:
        total = 3 + _parts_tokens(body.get("systemInstruction") or body.get("system_instruction"))
        contents = body.get("contents") or []
        if isinstance(contents, dict):
            contents = [contents]
        for c in contents if isinstance(contents, list) else []:
            total += 4 + _parts_tokens(c)
        return total
    if api in (OLLAMA_CHAT, COHERE_CHAT):
        return 3 + messages_tokens(body)
    if api == OLLAMA_GENERATE:
        return 3 + content_tokens(body.get("system")) + content_tokens(body.get("prompt"))
    if api == LLAMACPP_COMPLETION:
        return 1 + content_tokens(body.get("prompt"))  # the BOS token
    # embed: one group per input
    x = body.get("input", body.get("prompt", ""))
    items = x if isinstance(x, list) else [x]
    return sum(content_tokens(i) for i in items)


def _created_at() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


# -- Gemini ---------------------------------------------------------------------------------


class GeminiRenderer(Renderer):
    """``generateContent`` / ``streamGenerateContent`` (SSE or JSON array)."""

    tail_keys = ("usageMetadata", "modelVersion", "responseId")

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.sse = "alt=sse" in plan.query
        self.stream_content_type = (
            "text/event-stream" if self.sse else "application/json; charset=UTF-8"
        )

    def usage(self, candidates: int) -> dict:
        p = self.plan
        u: dict[str, Any] = {"promptTokenCount": p.prompt_tokens}
        if candidates:
            u["candidatesTokenCount"] = candidates
        u["totalTokenCount"] = p.prompt_tokens + candidates + p.reasoning
        if p.cached_tokens:
            u["cachedContentTokenCount"] = p.cached_tokens
        u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": p.prompt_tokens}]
        if p.reasoning:
            u["thoughtsTokenCount"] = p.reasoning
        return u

    def _obj(self, text: str, candidates: int, finish: str | None) -> dict:
        cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        if finish:
            cand["finishReason"] = finish
        cand["index"] = 0
        return {
            "candidates": [cand],
            "usageMetadata": self.usage(candidates),
            "modelVersion": self.plan.model,
            "responseId": self.plan.rid,
        }

    def _frame(self, obj: dict, first: bool) -> bytes:
        if self.sse:
            return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"
        text = json.dumps(obj, indent=2).encode()
        return text if first else b"\r\n,\r\n" + text

    def preamble(self) -> bytes:
        return b"" if self.sse else b"["

    def token(self, i: int) -> bytes:
        return self._frame(self._obj(token_text(i), i + 1, None), i == 0)

    def finish_reason(self) -> str:
        return "MAX_TOKENS" if self.plan.truncated else "STOP"

    def tail(self) -> bytes:
        p = self.plan
        last = self._frame(self._obj("", p.visible, self.finish_reason()), p.visible == 0)
        return last if self.sse else last + b"\r\n]"

    def error_event(self, generated: int) -> bytes:
        msg = "Internal error encountered."
        err = {"error": {"code": 500, "message": msg, "status": "INTERNAL"}}
        return self._frame(err, generated == 0) + (b"" if self.sse else b"\r\n]")

    def document(self) -> dict:
        p = self.plan
        return self._obj(completion_text(p.visible), p.visible, self.finish_reason())


# -- Ollama ---------------------------------------------------------------------------------


class OllamaRenderer(Renderer):
    """``/api/chat`` and ``/api/generate``: NDJSON streams or one JSON object."""

    streams_reasoning = True
    pretty_json = False
    stream_content_type = "application/x-ndjson"
    tail_keys = ("done_reason", "done", "total_duration", "load_duration", "prompt_eval_count",
                 "prompt_eval_duration", "eval_count", "eval_duration")  # fmt: skip

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.chat = plan.api == OLLAMA_CHAT
        self._created = _created_at()
        self._head = b'{"model":%s,"created_at":"%s",' % (_j(plan.model), self._created.encode())

    def _piece(self, key: str, text: str) -> bytes:
        if self.chat:
            msg = {"role": "assistant", "content": ""}
            msg[key] = text
            return self._head + b'"message":%s,"done":false}\n' % _j(msg)
        if key == "thinking":
            return self._head + b'"response":"","thinking":%s,"done":false}\n' % _j(text)
        return self._head + b'"response":%s,"done":false}\n' % _j(text)

    def reason(self, i: int) -> bytes:
        return self._piece("thinking", token_text(i))

    def token(self, i: int) -> bytes:
        return self._piece("content", token_text(i))

    def stats(self) -> dict:
        p = self.plan
        n = p.visible + p.reasoning
        prompt_ns = max(1, int(p.ttft_s * _NS))
        eval_ns = max(1, int(max(0, n - 1) * p.interval_s * _NS)) if n else 0
        out: dict[str, Any] = {
            "done_reason": "length" if p.truncated else "stop",
            "done": True,
            "total_duration": prompt_ns + eval_ns + 1_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": p.prompt_tokens,
            "prompt_eval_duration": prompt_ns,
            "eval_count": n,
        }
        if n:
            out["eval_duration"] = eval_ns
        return out

    def final(self, text: str, thinking: str) -> dict:
        doc: dict[str, Any] = {"model": self.plan.model, "created_at": self._created}
        if self.chat:
            msg = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            doc["message"] = msg
        else:
            doc["response"] = text
            if thinking:
                doc["thinking"] = thinking
        doc.update(self.stats())
        return doc

    def tail(self) -> bytes:
        return _j(self.final("", "")) + b"\n"

    def error_event(self, generated: int) -> bytes:
        return b'{"error":"an error was encountered while running the model"}\n'

    def document(self) -> dict:
        p = self.plan
        return self.final(completion_text(p.visible), completion_text(p.reasoning))


def ollama_embed_document(plan: Plan, legacy: bool) -> dict:
    """``/api/embed`` (with ``prompt_eval_count``) or the legacy ``/api/embeddings``."""
    body = plan.body
    dims = 384
    if legacy:
        return {"embedding": embedding_vector(body.get("prompt", ""), dims)}
    x = body.get("input", "")
    items = x if isinstance(x, list) else [x]
    return {
        "model": plan.model,
        "embeddings": [embedding_vector(i, dims) for i in items],
        "total_duration": 14_143_917,
        "load_duration": 1_019_500,
        "prompt_eval_count": plan.prompt_tokens,
    }


# -- llama.cpp ------------------------------------------------------------------------------


class LlamaCppRenderer(Renderer):
    """llama.cpp server ``/completion``: data-only events, or one JSON object."""

    pretty_json = False
    stream_content_type = "text/event-stream"
    tail_keys = ("tokens_predicted", "tokens_evaluated", "tokens_cached", "timings")

    def token(self, i: int) -> bytes:
        p = self.plan
        return b'data: {"index":0,"content":%s,"tokens":[%d],"stop":false,"id_slot":-1,' % (
            _j(token_text(i)),
            (i & 31) + 3,
        ) + b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n' % (i + 1, p.prompt_tokens)

    def final(self, content: str) -> dict:
        p = self.plan
        n = p.visible
        prompt_ms = round(max(p.ttft_s, 0.0001) * 1000, 3)
        predicted_ms = round(max(max(0, n - 1) * p.interval_s, 0.0001) * 1000, 3)
        computed = max(1, p.prompt_tokens - p.cached_tokens)
        return {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": p.model,
            "tokens_predicted": n,
            "tokens_evaluated": p.prompt_tokens,
            "stop_type": "limit" if p.truncated else "eos",
            "stopping_word": "",
            "tokens_cached": p.prompt_tokens + max(0, n - 1),
            "timings": {
                "cache_n": p.prompt_tokens - computed,
                "prompt_n": computed,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": round(prompt_ms / computed, 6),
                "prompt_per_second": round(computed / prompt_ms * 1000, 6),
                "predicted_n": n,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": round(predicted_ms / n, 6) if n else 0,
                "predicted_per_second": round(n / predicted_ms * 1000, 6) if n else 0,
            },
        }

    def tail(self) -> bytes:
        return b"data: " + _j(self.final("")) + b"\n\n"

    def error_event(self, generated: int) -> bytes:
        return (
            b'data: {"error":{"code":500,"message":"simulated failure","type":"server_error"}}\n\n'
        )

    def document(self) -> dict:
        return self.final(completion_text(self.plan.visible))


# -- Cohere ---------------------------------------------------------------------------------


class CohereRenderer(Renderer):
    """Cohere v2 ``/v2/chat``: named events ending in ``message-end``, or one JSON answer."""

    pretty_json = False
    stream_content_type = "text/event-stream"
    tail_keys = ("finish_reason", "usage")

    def _event(self, kind: str, data: dict) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), _j({"type": kind, **data}))

    def usage(self) -> dict:
        p = self.plan
        u: dict[str, Any] = {
            "billed_units": {"input_tokens": p.prompt_tokens, "output_tokens": p.visible},
            "tokens": {"input_tokens": p.prompt_tokens, "output_tokens": p.visible},
        }
        if p.cached_tokens:
            u["cached_tokens"] = p.cached_tokens
        return u

    def finish_reason(self) -> str:
        return "MAX_TOKENS" if self.plan.truncated else "COMPLETE"

    def preamble(self) -> bytes:
        msg = {
            "role": "assistant",
            "content": [],
            "tool_plan": "",
            "tool_calls": [],
            "citations": [],
        }
        start = self._event("message-start", {"id": self.plan.rid, "delta": {"message": msg}})
        content = {"message": {"content": {"type": "text", "text": ""}}}
        return start + self._event("content-start", {"index": 0, "delta": content})

    def token(self, i: int) -> bytes:
        delta = {"message": {"content": {"text": token_text(i)}}}
        return self._event("content-delta", {"index": 0, "delta": delta})

    def tail(self) -> bytes:
        end = {"delta": {"finish_reason": self.finish_reason(), "usage": self.usage()}}
        return (
            self._event("content-end", {"index": 0})
            + self._event("message-end", end)
            + b"data: [DONE]\n\n"
        )

    def error_event(self, generated: int) -> bytes:
        return self._event("message-end", {"delta": {"finish_reason": "ERROR", "error": "failed"}})

    def document(self) -> dict:
        p = self.plan
        text = completion_text(p.visible)
        return {
            "id": p.rid,
            "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
            "finish_reason": self.finish_reason(),
            "usage": self.usage(),
        }


NATIVE_RENDERERS: dict[str, type[Renderer]] = {
    GEMINI: GeminiRenderer,
    OLLAMA_CHAT: OllamaRenderer,
    OLLAMA_GENERATE: OllamaRenderer,
    LLAMACPP_COMPLETION: LlamaCppRenderer,
    COHERE_CHAT: CohereRenderer,
}
