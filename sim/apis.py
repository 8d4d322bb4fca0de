"""Wire renderers of the simulated APIs: OpenAI chat/completions/responses/embeddings, Anthropic.

Each renderer turns a :class:`Plan` (the figures decided for one request) into the exact
bytes a real server sends, copying the shapes of the recorded responses in
``tests/corpus/wire``: field order, compact JSON in SSE events, pretty-printed OpenAI JSON
bodies, compact Anthropic JSON bodies. Per-token events are pre-rendered once per request
(one template per vocabulary word and choice), so a stream costs one table lookup and one
write per token.

A streamed body is produced by the server as::

    preamble()                          sent with the headers, before time-to-first-token
    reason(i) for i in range(reasoning) only when ``streams_reasoning`` (Anthropic thinking)
    token(i)  for i in range(visible)   one content event per token and choice
    tail()                              finish events, usage, terminator

``reasoning`` and ``visible`` are per choice; a step renders the events of all choices.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from spendtap.metering.usage import (
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
)

# 32 words (a power of two, so ``i & 31`` picks the word of token i). Token 0 is the bare
# first word, every later token is " " + word.
WORDS = (
    "Simulated",
    "tokens",
    "arrive",
    "one",
    "at",
    "a",
    "time",
    "so",
    "every",
    "usage",
    "figure",
    "can",
    "be",
    "checked",
    "exactly",
    "against",
    "what",
    "the",
    "server",
    "streamed",
    "over",
    "this",
    "connection",
    "while",
    "the",
    "meter",
    "counts",
    "each",
    "piece",
    "it",
    "sees",
    "here",
)
assert len(WORDS) == 32
_SPACED = tuple(" " + w for w in WORDS)
_OBF = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"

PAD_MARKER = "\x00spendtap-sim-padding\x00"
PAD_MARKER_JSON = json.dumps(PAD_MARKER)


def token_text(i: int) -> str:
    return WORDS[0] if i == 0 else _SPACED[i & 31]


@functools.lru_cache(maxsize=64)
def _cycle_text() -> str:
    return "".join(_SPACED)


def completion_text(n: int) -> str:
    """The text of the first ``n`` tokens (what a client reassembles from the deltas)."""
    if n <= 0:
        return ""
    full, rest = divmod(n - 1, 32)
    cycle = _cycle_text()
    # tokens 1..n-1 are _SPACED[1..], wrapping; token 0 is WORDS[0]
    rotated = cycle[len(_SPACED[0]) :] + _SPACED[0]
    return WORDS[0] + rotated * full + "".join(_SPACED[(j + 1) & 31] for j in range(rest))


def _j(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _obfuscation(text: str) -> str:
    return _OBF[: max(1, 16 - len(text))]


# -- prompt token rule ---------------------------------------------------------------------


def text_tokens(text: str) -> int:
    """Tokens of a text: one per started group of 4 characters (0 for an empty text)."""
    return (len(text) + 3) // 4


def content_tokens(content: Any) -> int:
    """Tokens of a message content: a string, or a list of parts (text, image, other)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += text_tokens(part)
            elif isinstance(part, dict):
                kind = part.get("type", "")
                if isinstance(part.get("text"), str):
                    total += text_tokens(part["text"])
                elif "image" in kind or kind in ("document", "file", "input_file"):
                    total += 85
                else:
                    total += text_tokens(_j(part).decode())
        return total
    return text_tokens(_j(content).decode())


def _tools_tokens(body: dict) -> int:
    tools = body.get("tools")
    return text_tokens(_j(tools).decode()) if tools else 0


def messages_tokens(body: dict) -> int:
    """4 per message of ``body["messages"]`` plus its content's tokens (the messages of the
    Anthropic, Ollama and Cohere chat APIs; OpenAI chat also counts a message's name)."""
    msgs = body.get("messages") or []
    total = 0
    for m in msgs if isinstance(msgs, list) else []:
        if isinstance(m, dict):
            total += 4 + content_tokens(m.get("content"))
    return total


def prompt_tokens(api: str, body: dict) -> int:
    """The prompt tokens the simulator reports for a request body (see the package docs)."""
    if api == OPENAI_CHAT:
        msgs = body.get("messages") or []
        total = 3 + _tools_tokens(body)
        for m in msgs if isinstance(msgs, list) else []:
            if isinstance(m, dict):
                total += 4 + content_tokens(m.get("content"))
                name = m.get("name")
                if isinstance(name, str):
                    total += text_tokens(name)
        return total
    if api == ANTHROPIC_MESSAGES:
        return 3 + content_tokens(body.get("system")) + _tools_tokens(body) + messages_tokens(body)
    if api == OPENAI_RESPONSES:
        total = 3 + content_tokens(body.get("instructions")) + _tools_tokens(body)
        inp = body.get("input")
        if isinstance(inp, str):
            total += 4 + text_tokens(inp)
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, dict):
                    if "content" in item:
                        total += 4 + content_tokens(item.get("content"))
                    else:
                        total += 4 + content_tokens(item.get("output") or item.get("arguments"))
                else:
                    total += 4 + content_tokens(item)
        return total
    if api == OPENAI_COMPLETIONS:
        return sum(max(1, _single_input_tokens(p)) for p in completion_prompts(body))
    if api == EMBEDDINGS:
        return sum(_single_input_tokens(x) for x in embedding_inputs(body))
    return 0


def _single_input_tokens(x: Any) -> int:
    if isinstance(x, str):
        return text_tokens(x)
    if isinstance(x, list):
        return len(x)
    return 0


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) for t in x)


def completion_prompts(body: dict) -> list[Any]:
    p = body.get("prompt", "")
    if isinstance(p, list) and p and not _is_token_list(p):
        return p
    return [p]


def embedding_inputs(body: dict) -> list[Any]:
    x = body.get("input", "")
    if isinstance(x, list) and x and not _is_token_list(x):
        return x
    return [x]


# -- the plan --------------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """What one request generates: every figure the response reports comes from here."""

    api: str
    model: str
    rid: str  # deterministic id suffix, unique per server instance
    created: int
    stream: bool = False
    n: int = 1  # choices
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning: int = 0  # per choice, effective (after the max-tokens cap)
    visible: int = 0  # per choice, effective
    truncated: bool = False  # the max-tokens cap cut the generation
    include_usage: bool = False
    obfuscation: bool = True
    body: dict = field(default_factory=dict)
    query: str = ""  # the request's query string (Gemini: alt=sse)
    ttft_s: float = 0.0  # the pacing, for servers that report their own durations
    interval_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return self.n * (self.visible + self.reasoning)

    @property
    def reasoning_tokens(self) -> int:
        return self.n * self.reasoning


class Renderer:
    """Base renderer; see the module docstring for the call sequence."""

    streams_reasoning = False
    pretty_json = True  # OpenAI pretty-prints non-streaming JSON bodies
    stream_content_type = "text/event-stream; charset=utf-8"
    # Keys the "huge" fault keeps after the padding (the usage a scanner reads from the tail).
    tail_keys: tuple[str, ...] = ("usage",)

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def preamble(self) -> bytes:
        return b""

    def reason(self, i: int) -> bytes:
        return b""

    def token(self, i: int) -> bytes:
        raise NotImplementedError

    def tail(self) -> bytes:
        raise NotImplementedError

    def error_event(self, generated: int) -> bytes:
        """The in-stream error after ``generated`` visible tokens (per choice)."""
        return (
            b'data: {"error":{"message":"The server had an error while processing your request.'
            b' Sorry about that!","type":"server_error","param":null,"code":null}}\n\n'
        )

    def document(self) -> dict:
        """The non-streaming JSON body."""
        raise NotImplementedError


# -- OpenAI chat completions and legacy completions ------------------------------------------


class _OpenAIRenderer(Renderer):
    """What the chat and legacy completions renderers share: token events built once per
    choice and word (``_tok``, ``_first``, ``_single``, set by the subclass), the finish
    reason, and the envelope of the non-streamed answer."""

    _tok: list[list[bytes]]
    _first: bytes
    _single: list[bytes] | None

    def token(self, i: int) -> bytes:
        if i == 0:
            return self._first
        if self._single is not None:
            return self._single[i & 31]
        k = i & 31
        return b"".join(t[k] for t in self._tok)

    @property
    def finish_reason(self) -> str:
        return "length" if self.plan.truncated else "stop"

    def _document(self, id_prefix: str, kind: str, choices: list) -> dict:
        p = self.plan
        return {
            "id": id_prefix + p.rid,
            "object": kind,
            "created": p.created,
            "model": p.model,
            "choices": choices,
            "usage": self.usage(),
        }


class ChatRenderer(_OpenAIRenderer):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        p = plan
        self._head = b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,' % (
            p.rid.encode(),
            p.created,
        ) + b'"model":%s,"service_tier":"default","system_fingerprint":"fp_sim","choices":[' % _j(
            p.model
        )
        self._usage_null = b',"usage":null' if p.include_usage else b""
        head, un = self._head, self._usage_null

        def end(text: str) -> bytes:
            obf = b',"obfuscation":"%s"' % _obfuscation(text).encode() if p.obfuscation else b""
            return b"]" + un + obf + b"}\n\n"

        def tok(c: int, text: str) -> bytes:
            return (
                head
                + b'{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}'
                % (c, _j(text))
                + end(text)
            )

        self._tok = [[tok(c, w) for w in _SPACED] for c in range(p.n)]
        self._role = [
            head
            + b'{"index":%d,"delta":{"role":"assistant","content":"","refusal":null},' % c
            + b'"logprobs":null,"finish_reason":null}'
            + end("")
            for c in range(p.n)
        ]
        self._first = b"".join(self._role[c] + tok(c, WORDS[0]) for c in range(p.n))
        self._end = end
        self._single = self._tok[0] if p.n == 1 else None

    def usage(self) -> dict:
        p = self.plan
        prompt = p.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": p.completion_tokens,
            "total_tokens": prompt + p.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": p.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": p.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def tail(self) -> bytes:
        p = self.plan
        fr = _j(self.finish_reason)
        out = [] if p.visible else list(self._role)  # the role chunk opens every stream
        out += [
            self._head
            + b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":%s}' % (c, fr)
            + self._end("")
            for c in range(p.n)
        ]
        if p.include_usage:
            obf = b',"obfuscation":"%s"' % _obfuscation("usage").encode() if p.obfuscation else b""
            out.append(self._head + b'],"usage":' + _j(self.usage()) + obf + b"}\n\n")
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    def document(self) -> dict:
        p = self.plan
        text = completion_text(p.visible)
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        choices = [
            {"index": c, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
            for c in range(p.n)
        ]
        return self._document("chatcmpl-", "chat.completion", choices) | {
            "service_tier": "default",
            "system_fingerprint": "fp_sim",
        }


# -- OpenAI legacy completions ---------------------------------------------------------------


class CompletionsRenderer(_OpenAIRenderer):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        p = plan
        self._head = (
            b'data: {"id":"cmpl-%s","object":"text_completion","created":%d,"choices":['
            % (
                p.rid.encode(),
                p.created,
            )
        )
        self._end = (
            b"],"
            + b'"model":%s' % _j(p.model)
            + (b',"usage":null' if p.include_usage else b"")
            + b"}\n\n"
        )

        def tok(c: int, text: str) -> bytes:
            return (
                self._head
                + b'{"text":%s,"index":%d,"logprobs":null,"finish_reason":null}' % (_j(text), c)
                + self._end
            )

        self._tok = [[tok(c, w) for w in _SPACED] for c in range(p.n)]
        self._first = b"".join(tok(c, WORDS[0]) for c in range(p.n))
        self._single = self._tok[0] if p.n == 1 else None

    def usage(self) -> dict:
        p = self.plan
        return {
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": p.completion_tokens,
            "total_tokens": p.prompt_tokens + p.completion_tokens,
        }

    def tail(self) -> bytes:
        p = self.plan
        fr = _j(self.finish_reason)
        out = [
            self._head
            + b'{"text":"","index":%d,"logprobs":null,"finish_reason":%s}' % (c, fr)
            + self._end
            for c in range(p.n)
        ]
        if p.include_usage:
            out.append(
                b'data: {"id":"cmpl-%s","object":"text_completion","created":%d,"model":%s,'
                % (p.rid.encode(), p.created, _j(p.model))
                + b'"usage":%s,"choices":[]}\n\n' % _j(self.usage())
            )
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    def document(self) -> dict:
        p = self.plan
        text = completion_text(p.visible)
        choices = [
            {"text": text, "index": c, "logprobs": None, "finish_reason": self.finish_reason}
            for c in range(p.n)
        ]
        return self._document("cmpl-", "text_completion", choices)


# -- OpenAI Responses ------------------------------------------------------------------------


def _sse(event: str, data: dict) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), _j(data))


class ResponsesRenderer(Renderer):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        p = plan
        self.resp_id = "resp_" + p.rid
        self.msg_id = "msg_" + p.rid
        self.rs_id = "rs_" + p.rid
        has_rs = p.reasoning > 0
        # sequence numbers: 0 created, 1 in_progress, [2 reasoning item added]; at the first
        # token [reasoning item done], message item added, content part added, then deltas.
        s = 2 + has_rs
        self._first_seq = s
        s += has_rs
        self._msg_added = s
        self._base = s + 2
        self.out_index = 1 if has_rs else 0
        prefix = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"content_index":0,"delta":'
        )
        mid = b',"item_id":"%s","logprobs":[],' % self.msg_id.encode()

        def tok(text: str) -> bytes:
            obf = b'"obfuscation":"%s",' % _obfuscation(text).encode() if p.obfuscation else b""
            return (
                prefix
                + _j(text)
                + mid
                + obf
                + b'"output_index":%d,"sequence_number":' % self.out_index
            )

        self._tok = [tok(w) for w in _SPACED]
        self._tok0 = tok(WORDS[0])

    # objects

    def _reasoning_item(self) -> dict:
        return {"id": self.rs_id, "type": "reasoning", "summary": []}

    def _message_item(self, status: str, text: str | None) -> dict:
        content = (
            []
            if text is None
            else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
        )
        return {
            "id": self.msg_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    def usage(self, visible: int | None = None) -> dict:
        p = self.plan
        out = (p.visible if visible is None else visible) + p.reasoning
        return {
            "input_tokens": p.prompt_tokens,
            "input_tokens_details": {"cached_tokens": p.cached_tokens},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": p.reasoning},
            "total_tokens": p.prompt_tokens + out,
        }

    def response(self, status: str, output: list, usage: dict | None, **extra: Any) -> dict:
        p, b = self.plan, self.plan.body
        reasoning = b.get("reasoning") if isinstance(b.get("reasoning"), dict) else {}
        done = status != "in_progress"
        return {
            "id": self.resp_id,
            "object": "response",
            "created_at": p.created,
            "status": status,
            "background": bool(b.get("background", False)),
            "completed_at": p.created if done and status == "completed" else None,
            "error": extra.get("error"),
            "frequency_penalty": 0.0,
            "incomplete_details": extra.get("incomplete_details"),
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": p.model,
            "output": output,
            "parallel_tool_calls": True,
            "presence_penalty": 0.0,
            "previous_response_id": b.get("previous_response_id"),
            "prompt_cache_key": None,
            "prompt_cache_retention": None,
            "reasoning": {"effort": reasoning.get("effort"), "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": bool(b.get("store", True)),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": b.get("metadata") or {},
        }

    def _final_output(self) -> list:
        p = self.plan
        out: list = [self._reasoning_item()] if p.reasoning else []
        if p.visible:
            status = "incomplete" if p.truncated else "completed"
            out.append(self._message_item(status, completion_text(p.visible)))
        return out

    # stream

    def preamble(self) -> bytes:
        p = self.plan
        r = self.response("in_progress", [], None)
        out = [
            _sse(
                "response.created",
                {"type": "response.created", "response": r, "sequence_number": 0},
            ),
            _sse(
                "response.in_progress",
                {"type": "response.in_progress", "response": r, "sequence_number": 1},
            ),
        ]
        if p.reasoning:
            out.append(self._item_event("added", self._reasoning_item(), 0, 2))
        return b"".join(out)

    def _item_event(self, what: str, item: dict, index: int, seq: int) -> bytes:
        name = "response.output_item." + what
        return _sse(
            name, {"type": name, "item": item, "output_index": index, "sequence_number": seq}
        )

    def _start_message(self) -> bytes:
        out = []
        if self.plan.reasoning:
            out.append(self._item_event("done", self._reasoning_item(), 0, self._first_seq))
        oi = self.out_index
        out.append(
            self._item_event("added", self._message_item("in_progress", None), oi, self._msg_added)
        )
        out.append(
            _sse(
                "response.content_part.added",
                {
                    "type": "response.content_part.added",
                    "content_index": 0,
                    "item_id": self.msg_id,
                    "output_index": oi,
                    "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
                    "sequence_number": self._msg_added + 1,
                },
            )
        )
        return b"".join(out)

    def token(self, i: int) -> bytes:
        if i == 0:
            return self._start_message() + self._tok0 + b"%d}\n\n" % self._base
        return self._tok[i & 31] + b"%d}\n\n" % (self._base + i)

    def _next_seq(self, generated: int) -> int:
        if generated > 0:
            return self._base + generated
        return self._first_seq

    def tail(self) -> bytes:
        p = self.plan
        out = []
        seq = self._next_seq(p.visible)
        if p.visible:
            text = completion_text(p.visible)
            oi = self.out_index
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            out.append(
                _sse(
                    "response.output_text.done",
                    {
                        "type": "response.output_text.done",
                        "content_index": 0,
                        "item_id": self.msg_id,
                        "logprobs": [],
                        "output_index": oi,
                        "sequence_number": seq,
                        "text": text,
                    },
                )
            )
            out.append(
                _sse(
                    "response.content_part.done",
                    {
                        "type": "response.content_part.done",
                        "content_index": 0,
                        "item_id": self.msg_id,
                        "output_index": oi,
                        "part": part,
                        "sequence_number": seq + 1,
                    },
                )
            )
            status = "incomplete" if p.truncated else "completed"
            out.append(self._item_event("done", self._message_item(status, text), oi, seq + 2))
            seq += 3
        elif p.reasoning:
            out.append(self._item_event("done", self._reasoning_item(), 0, seq))
            seq += 1
        if p.truncated:
            name = "response.incomplete"
            r = self.response(
                "incomplete",
                self._final_output(),
                self.usage(),
                incomplete_details={"reason": "max_output_tokens"},
            )
        else:
            name = "response.completed"
            r = self.response("completed", self._final_output(), self.usage())
        out.append(_sse(name, {"type": name, "response": r, "sequence_number": seq}))
        return b"".join(out)

    def error_event(self, generated: int) -> bytes:
        seq = self._next_seq(generated)
        msg = "The server had an error while processing your request. Sorry about that!"
        err = {
            "type": "error",
            "code": "server_error",
            "message": msg,
            "param": None,
            "sequence_number": seq,
        }
        failed = self.response(
            "failed", [], self.usage(generated), error={"code": "server_error", "message": msg}
        )
        return _sse("error", err) + _sse(
            "response.failed",
            {"type": "response.failed", "response": failed, "sequence_number": seq + 1},
        )

    def document(self) -> dict:
        p = self.plan
        if p.truncated:
            return self.response(
                "incomplete",
                self._final_output(),
                self.usage(),
                incomplete_details={"reason": "max_output_tokens"},
            )
        return self.response("completed", self._final_output(), self.usage())


# -- Anthropic Messages ----------------------------------------------------------------------

_SIGNATURE = "c2ltdWxhdGVkLXRoaW5raW5nLXNpZ25hdHVyZQ=="


class MessagesRenderer(Renderer):
    streams_reasoning = True
    pretty_json = False

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        p = plan
        self.msg_id = "msg_" + p.rid
        self.text_index = 1 if p.reasoning else 0
        ti = self.text_index

        def delta(index: int, kind: str, key: str, text: str) -> bytes:
            return (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                % index
                + b'"delta":{"type":"%s","%s":%s}}\n\n' % (kind.encode(), key.encode(), _j(text))
            )

        self._tok = [delta(ti, "text_delta", "text", w) for w in _SPACED]
        self._tok0 = delta(ti, "text_delta", "text", WORDS[0])
        self._think = [delta(0, "thinking_delta", "thinking", w) for w in _SPACED]
        self._think0 = delta(0, "thinking_delta", "thinking", WORDS[0])

    def usage(self, start: bool = False) -> dict:
        p = self.plan
        return {
            "input_tokens": p.prompt_tokens,
            "cache_creation_input_tokens": p.cache_creation_tokens,
            "cache_read_input_tokens": p.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": p.cache_creation_tokens,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": 1 if start else p.completion_tokens,
            "service_tier": "standard",
        }

    @property
    def stop_reason(self) -> str:
        return "max_tokens" if self.plan.truncated else "end_turn"

    def _block_start(self, index: int, block: dict) -> bytes:
        return _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )

    def _block_stop(self, index: int) -> bytes:
        return (
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % index
        )

    def _end_thinking(self) -> bytes:
        sig = _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": _SIGNATURE},
            },
        )
        return sig + self._block_stop(0)

    def preamble(self) -> bytes:
        p = self.plan
        message = {
            "model": p.model,
            "id": self.msg_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(start=True),
        }
        first = (
            {"type": "thinking", "thinking": "", "signature": ""}
            if p.reasoning
            else {"type": "text", "text": ""}
        )
        return (
            _sse("message_start", {"type": "message_start", "message": message})
            + self._block_start(0, first)
            + b'event: ping\ndata: {"type": "ping"}\n\n'
        )

    def reason(self, i: int) -> bytes:
        return self._think0 if i == 0 else self._think[i & 31]

    def token(self, i: int) -> bytes:
        if i == 0:
            if self.plan.reasoning:
                return (
                    self._end_thinking()
                    + self._block_start(1, {"type": "text", "text": ""})
                    + self._tok0
                )
            return self._tok0
        return self._tok[i & 31]

    def tail(self) -> bytes:
        p = self.plan
        if p.reasoning and not p.visible:
            out = self._end_thinking()
        else:
            out = self._block_stop(self.text_index)
        u = self.usage()
        delta_usage = {
            "input_tokens": u["input_tokens"],
            "cache_creation_input_tokens": u["cache_creation_input_tokens"],
            "cache_read_input_tokens": u["cache_read_input_tokens"],
            "output_tokens": u["output_tokens"],
        }
        return (
            out
            + _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": delta_usage,
                },
            )
            + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )

    def error_event(self, generated: int) -> bytes:
        return _sse(
            "error",
            {
                "type": "error",
                "error": {"details": None, "type": "overloaded_error", "message": "Overloaded"},
                "request_id": "req_" + self.plan.rid,
            },
        )

    def document(self) -> dict:
        p = self.plan
        content: list = []
        if p.reasoning:
            content.append(
                {
                    "type": "thinking",
                    "thinking": completion_text(p.reasoning),
                    "signature": _SIGNATURE,
                }
            )
        if p.visible or not p.reasoning:
            content.append({"type": "text", "text": completion_text(p.visible)})
        return {
            "model": p.model,
            "id": self.msg_id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": self.usage(),
        }


# -- embeddings ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _base_vector(dims: int) -> tuple[float, ...]:
    rng = random.Random(dims)
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return tuple(float("%.9g" % (x / norm)) for x in v)


def embedding_vector(item: Any, dims: int) -> list[float]:
    """A deterministic unit vector for an input (a rotation of one base vector)."""
    seed = zlib.crc32(_j(item)) % dims if dims else 0
    base = _base_vector(dims)
    return list(base[seed:] + base[:seed])


def embeddings_document(plan: Plan) -> dict:
    body = plan.body
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 16384 else 1536
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(embedding_inputs(body)):
        vec = embedding_vector(item, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": plan.model,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    }


RENDERERS: dict[str, type[Renderer]] = {
    OPENAI_CHAT: ChatRenderer,
    OPENAI_COMPLETIONS: CompletionsRenderer,
    OPENAI_RESPONSES: ResponsesRenderer,
    ANTHROPIC_MESSAGES: MessagesRenderer,
}
