"""The simulated inference server: an asyncio HTTP/1.1 server speaking the real wire formats.

See the package docstring (:mod:`spendtap.sim`) for the endpoints, the token rules and the
``x-sim-*`` request headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from spendtap.metering.request import detect_api
from spendtap.metering.usage import (
    ANTHROPIC_MESSAGES,
    COHERE_CHAT,
    EMBEDDINGS,
    GEMINI,
    LLAMACPP_COMPLETION,
    OLLAMA_CHAT,
    OLLAMA_EMBED,
    OLLAMA_GENERATE,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
)

from .apis import (
    PAD_MARKER,
    PAD_MARKER_JSON,
    RENDERERS,
    Plan,
    Renderer,
    completion_prompts,
    embeddings_document,
    prompt_tokens,
)
from .http import (
    ENCODINGS,
    MAX_HEAD,
    BadRequest,
    ChunkedBody,
    Request,
    compress_all,
    compressor,
    hard_reset,
    read_request,
    render_head,
)
from .native import NATIVE_RENDERERS, native_prompt_tokens, ollama_embed_document

log = logging.getLogger("spendtap.sim")

MODELS = "models"
HEALTH = "health"
COUNT_TOKENS = "count-tokens"
UNKNOWN = "unknown"
SIM_STATS = "sim-stats"
SIM_RESET = "sim-reset"
GENERATING = (OPENAI_CHAT, OPENAI_COMPLETIONS, OPENAI_RESPONSES, ANTHROPIC_MESSAGES)
NATIVE = (GEMINI, OLLAMA_CHAT, OLLAMA_GENERATE, LLAMACPP_COMPLETION, COHERE_CHAT)
# Every API family the simulator answers (the addon meters more: Cohere embed and rerank).
SIMULATED = frozenset((*GENERATING, *NATIVE, EMBEDDINGS, OLLAMA_EMBED))
ALL_RENDERERS = {**RENDERERS, **NATIVE_RENDERERS}
FAULTS = ("cut", "reset", "error-event", "malformed", "stall", "huge")

DEFAULT_STALL_MS = 1000
DEFAULT_BODY_BYTES = 4 * 1024 * 1024
PAD_PIECE = 64 * 1024
KEEPALIVE = b": keep-alive\n\n"
MALFORMED = (
    b'data: {"id":"sim-malformed", this is not JSON\n\n'
    b"this line is not an SSE field\n\n"
    b": simulated comment line\n\n"
)


def classify(path: str) -> str:
    """The endpoint a request path names, whatever prefix precedes it."""
    p = path.rstrip("/")
    if p.endswith("/sim/stats"):
        return SIM_STATS
    if p.endswith("/sim/reset"):
        return SIM_RESET
    if p.endswith("/messages/count_tokens"):
        return COUNT_TOKENS
    api = detect_api(p)  # the same API families the addon meters
    if api in SIMULATED:
        return api
    if p.endswith("/models"):
        return MODELS
    if p.endswith(("/health", "/healthz")) or p == "":
        return HEALTH
    return UNKNOWN


class ControlError(ValueError):
    """An ``x-sim-*`` header has an invalid value."""


@dataclass(slots=True)
class Controls:
    tokens: int | None = None
    prompt_tokens: int | None = None
    ttft: float = 0.0  # seconds
    interval: float = 0.0  # seconds per token (0 = unpaced)
    cached: int = 0
    cache_creation: int = 0
    reasoning: int = 0
    faults: frozenset[str] = frozenset()
    status: int | None = None
    stall: float = DEFAULT_STALL_MS / 1000
    body_bytes: int = DEFAULT_BODY_BYTES
    encoding: str | None = None
    keepalive: bool = False

    @property
    def paced(self) -> bool:
        return self.ttft > 0 or self.interval > 0


def _int(headers: dict[str, str], name: str, default: int | None) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ControlError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if value < 0:
        raise ControlError(f"{name} must be a non-negative integer, got {raw!r}")
    return value


def _float(headers: dict[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ControlError(f"{name} must be a non-negative number, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ControlError(f"{name} must be a non-negative number, got {raw!r}")
    return value


def parse_controls(headers: dict[str, str], ttft_ms: float, tokens_per_s: float) -> Controls:
    """The per-request controls from the ``x-sim-*`` headers over the server defaults."""
    ctl = Controls(ttft=ttft_ms / 1000, interval=1 / tokens_per_s if tokens_per_s > 0 else 0.0)
    if not any(k.startswith("x-sim-") for k in headers):
        return ctl
    ctl.tokens = _int(headers, "x-sim-tokens", None)
    ctl.prompt_tokens = _int(headers, "x-sim-prompt-tokens", None)
    ctl.ttft = _float(headers, "x-sim-ttft-ms", ttft_ms) / 1000
    tps = _float(headers, "x-sim-tps", tokens_per_s)
    ctl.interval = 1 / tps if tps > 0 else 0.0
    ctl.cached = _int(headers, "x-sim-cached-tokens", 0) or 0
    ctl.cache_creation = _int(headers, "x-sim-cache-creation-tokens", 0) or 0
    ctl.reasoning = _int(headers, "x-sim-reasoning-tokens", 0) or 0
    ctl.stall = (_int(headers, "x-sim-stall-ms", DEFAULT_STALL_MS) or 0) / 1000
    ctl.body_bytes = _int(headers, "x-sim-body-bytes", DEFAULT_BODY_BYTES) or 0
    faults = set()
    for item in headers.get("x-sim-fault", "").split(","):
        fault = item.strip().lower()
        if not fault:
            continue
        if fault.startswith("status-"):
            try:
                ctl.status = int(fault[7:])
            except ValueError:
                raise ControlError(f"bad x-sim-fault {fault!r}") from None
            if not 400 <= ctl.status <= 599:
                raise ControlError(f"x-sim-fault status must be 400..599, got {fault!r}")
        elif fault in FAULTS:
            faults.add(fault)
        else:
            raise ControlError(
                f"unknown x-sim-fault {fault!r} (one of {', '.join(FAULTS)}, status-NNN)"
            )
    ctl.faults = frozenset(faults)
    enc = headers.get("x-sim-encoding", "").strip().lower()
    if enc and enc not in ("identity", "none"):
        if enc not in ENCODINGS:
            raise ControlError(f"x-sim-encoding must be one of {', '.join(ENCODINGS)}, got {enc!r}")
        ctl.encoding = enc
    ctl.keepalive = headers.get("x-sim-keepalive-comments", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    return ctl


# -- error envelopes ---------------------------------------------------------------------------

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None, "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: ("permission_error", None, "You are not allowed to use this model (simulated)."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (simulated)."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request (simulated).",
    ),
    503: (
        "server_error",
        None,
        "The engine is currently overloaded, please try again later (simulated).",
    ),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_envelope(anthropic: bool, status: int, message: str | None, request_id: str) -> dict:
    if anthropic:
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        msg = message or ("Overloaded" if status == 529 else f"Simulated {status} error")
        return {"type": "error", "error": {"type": kind, "message": msg}, "request_id": request_id}
    kind, code, default = _OPENAI_ERRORS.get(
        status,
        (
            "server_error" if status >= 500 else "invalid_request_error",
            None,
            f"Simulated {status} error.",
        ),
    )
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


# -- the server ---------------------------------------------------------------------------------


class SimServer:
    """A simulated OpenAI/Anthropic inference server (see :mod:`spendtap.sim`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ttft_ms: float = 0.0,
        tokens_per_s: float = 0.0,
        default_tokens: int = 16,
        model: str = "sim-model",
    ) -> None:
        if ttft_ms < 0 or tokens_per_s < 0 or default_tokens < 0:
            raise ValueError("ttft_ms, tokens_per_s and default_tokens must be >= 0")
        self.host = host
        self.port = port
        self.ttft_ms = float(ttft_ms)
        self.tokens_per_s = float(tokens_per_s)
        self.default_tokens = int(default_tokens)
        self.model = model
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0
        self._stopped: asyncio.Event | None = None
        self._stats = self._zero_stats()

    # -- lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting connections; ``.port`` is the real port afterwards."""
        if self._server is not None:
            return
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(
            self._connection,
            self.host,
            self.port,
            limit=MAX_HEAD,  # a longer request head is answered 431
            reuse_address=True,
            backlog=1024,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, drop every open connection, and wait until all are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)
        if self._stopped is not None:
            self._stopped.set()

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until :meth:`stop` is called or the task is cancelled."""
        await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    # -- stats

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {
            "total": 0,
            "endpoints": {},
            "streams": 0,
            "statuses": {},
            "faults": {},
            "usage_reported": {"responses": 0, "prompt_tokens": 0, "completion_tokens": 0},
        }

    def stats(self) -> dict[str, Any]:
        """A copy of the request counters (also served at ``GET /sim/stats``)."""
        return json.loads(json.dumps(self._stats))

    def reset_stats(self) -> None:
        self._stats = self._zero_stats()

    def _count_status(self, status: int) -> None:
        s = self._stats["statuses"]
        s[str(status)] = s.get(str(status), 0) + 1

    def _count_usage(self, plan: Plan) -> None:
        u = self._stats["usage_reported"]
        u["responses"] += 1
        if plan.api == ANTHROPIC_MESSAGES:
            u["prompt_tokens"] += (
                plan.prompt_tokens + plan.cached_tokens + plan.cache_creation_tokens
            )
        else:
            u["prompt_tokens"] += plan.prompt_tokens
        u["completion_tokens"] += plan.completion_tokens

    # -- connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except BadRequest as exc:
                    body = json.dumps(error_envelope(False, exc.status, str(exc), "")).encode()
                    self._write_json_head(writer, exc.status, len(body), False, None, "")
                    writer.write(body)
                    break
                if req is None:
                    break
                if not await self._dispatch(req, writer):
                    break
                if writer.transport.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("simulator: request handling failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _next_rid(self) -> str:
        self._seq += 1
        return f"sim{self._seq:024x}"

    async def _dispatch(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        t0 = asyncio.get_running_loop().time()
        kind = classify(req.path)
        keep = req.keep_alive
        anthropic = kind in (ANTHROPIC_MESSAGES, COUNT_TOKENS) or "anthropic-version" in req.headers
        rid = self._next_rid()

        if kind == SIM_STATS:
            return self._send_doc(writer, 200, self.stats(), keep, rid)
        if kind == SIM_RESET:
            if req.method != "POST":
                return self._send_error(writer, 405, False, "use POST /sim/reset", keep, rid)
            self.reset_stats()
            return self._send_doc(writer, 200, {"ok": True}, keep, rid)

        st = self._stats
        st["total"] += 1
        st["endpoints"][kind] = st["endpoints"].get(kind, 0) + 1

        try:
            ctl = parse_controls(req.headers, self.ttft_ms, self.tokens_per_s)
        except ControlError as exc:
            return self._send_error(writer, 400, anthropic, str(exc), keep, rid)
        for fault in ctl.faults:
            st["faults"][fault] = st["faults"].get(fault, 0) + 1
        if ctl.status is not None:
            name = f"status-{ctl.status}"
            st["faults"][name] = st["faults"].get(name, 0) + 1

        if "reset" in ctl.faults:
            hard_reset(writer)
            return False
        if ctl.status is not None:
            return self._send_error(writer, ctl.status, anthropic, None, keep, rid, ctl.encoding)

        if kind == HEALTH:
            return self._send_doc(writer, 200, {"status": "ok"}, keep, rid, ctl.encoding)
        if kind == MODELS:
            return self._send_doc(writer, 200, self._models_doc(anthropic), keep, rid, ctl.encoding)
        if kind == UNKNOWN:
            msg = f"Unknown request URL: {req.method} {req.path}."
            return self._send_error(writer, 404, anthropic, msg, keep, rid)
        if req.method != "POST":
            return self._send_error(
                writer, 405, anthropic, f"{req.method} not allowed here", keep, rid
            )

        try:
            body = json.loads(req.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            msg = "We could not parse the JSON body of your request."
            return self._send_error(writer, 400, anthropic, msg, keep, rid)
        if not isinstance(body, dict):
            return self._send_error(
                writer, 400, anthropic, "The request body must be an object.", keep, rid
            )

        if kind == COUNT_TOKENS:
            n = (
                ctl.prompt_tokens
                if ctl.prompt_tokens is not None
                else prompt_tokens(ANTHROPIC_MESSAGES, body)
            )
            return self._send_doc(writer, 200, {"input_tokens": n}, keep, rid, ctl.encoding)

        try:
            plan = self._plan(kind, body, ctl, rid, req)
        except ControlError as exc:
            return self._send_error(writer, 400, anthropic, str(exc), keep, rid)

        if kind == EMBEDDINGS:
            return await self._send_generated(writer, plan, None, ctl, t0, keep)
        if kind == OLLAMA_EMBED:
            legacy = req.path.rstrip("/").endswith("/embeddings")
            doc = ollama_embed_document(plan, legacy)
            if not legacy:
                self._count_usage(plan)
            return self._send_doc(writer, 200, doc, keep, rid, ctl.encoding)
        renderer = ALL_RENDERERS[kind](plan)
        if plan.stream:
            st["streams"] += 1
            return await self._stream(writer, plan, renderer, ctl, t0, keep)
        return await self._send_generated(writer, plan, renderer, ctl, t0, keep)

    # -- planning

    def _plan(self, api: str, body: dict, ctl: Controls, rid: str, req: Request) -> Plan:
        model = body.get("model")
        if api == GEMINI:
            model = req.path.rstrip("/").rsplit("/", 1)[-1].split(":", 1)[0]
        if not isinstance(model, str) or not model:
            model = self.model
        plan = Plan(api=api, model=model, rid=rid, created=int(time.time()), body=body)
        plan.query = req.query
        plan.ttft_s, plan.interval_s = ctl.ttft, ctl.interval
        if api == GEMINI:
            plan.stream = req.path.rstrip("/").lower().endswith(":streamgeneratecontent")
        elif api in (OLLAMA_CHAT, OLLAMA_GENERATE):
            plan.stream = body.get("stream") is not False
        else:
            plan.stream = body.get("stream") is True and api != EMBEDDINGS
        if api in (OPENAI_CHAT, OPENAI_COMPLETIONS):
            n = body.get("n", 1)
            if n is None:
                n = 1
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
                raise ControlError("n must be an integer between 1 and 128")
            if api == OPENAI_COMPLETIONS:
                n *= len(completion_prompts(body))
            plan.n = n
            opts = body.get("stream_options")
            opts = opts if isinstance(opts, dict) else {}
            plan.include_usage = opts.get("include_usage") is True
            plan.obfuscation = opts.get("include_obfuscation") is not False
        elif api == OPENAI_RESPONSES:
            opts = body.get("stream_options")
            opts = opts if isinstance(opts, dict) else {}
            plan.obfuscation = opts.get("include_obfuscation") is not False
        if ctl.prompt_tokens is not None:
            plan.prompt_tokens = ctl.prompt_tokens
        elif api in NATIVE or api == OLLAMA_EMBED:
            plan.prompt_tokens = native_prompt_tokens(api, body)
        else:
            plan.prompt_tokens = prompt_tokens(api, body)
        if api in (EMBEDDINGS, OLLAMA_EMBED):
            return plan
        if api == ANTHROPIC_MESSAGES:
            # Anthropic's input_tokens excludes the cache; the cache figures are separate.
            plan.cached_tokens = ctl.cached
            plan.cache_creation_tokens = ctl.cache_creation
        else:
            # OpenAI's cached_tokens is a sub-count of prompt_tokens.
            plan.cached_tokens = ctl.cached
            plan.prompt_tokens = max(plan.prompt_tokens, ctl.cached)

        cap_key = {
            OPENAI_CHAT: ("max_completion_tokens", "max_tokens"),
            OPENAI_COMPLETIONS: ("max_tokens",),
            OPENAI_RESPONSES: ("max_output_tokens",),
            ANTHROPIC_MESSAGES: ("max_tokens",),
            GEMINI: ("maxOutputTokens",),
            OLLAMA_CHAT: ("num_predict",),
            OLLAMA_GENERATE: ("num_predict",),
            LLAMACPP_COMPLETION: ("n_predict", "max_tokens"),
            COHERE_CHAT: ("max_tokens",),
        }[api]
        # Gemini and Ollama keep their limits in a nested object.
        limits = body
        if api == GEMINI:
            limits = body.get("generationConfig") or {}
        elif api in (OLLAMA_CHAT, OLLAMA_GENERATE):
            limits = body.get("options") or {}
        if not isinstance(limits, dict):
            limits = {}
        cap = None
        for key in cap_key:
            value = limits.get(key)
            if api in (OLLAMA_CHAT, OLLAMA_GENERATE, LLAMACPP_COMPLETION) and value == -1:
                value = None  # Ollama, llama.cpp: -1 means no limit
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ControlError(f"{key} must be a non-negative integer")
                cap = value
                break
        want = ctl.tokens if ctl.tokens is not None else self.default_tokens
        # llama.cpp's /completion and Cohere's chat report no reasoning figure.
        reasoning = 0 if api in (LLAMACPP_COMPLETION, COHERE_CHAT) else ctl.reasoning
        if cap is not None and reasoning + want > cap:
            plan.reasoning = min(reasoning, cap)
            plan.visible = cap - plan.reasoning
            plan.truncated = True
        else:
            plan.reasoning = reasoning
            plan.visible = want
        return plan

    # -- responses

    def _write_json_head(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        length: int | None,
        keep: bool,
        encoding: str | None,
        rid: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [("content-type", "application/json")]
        if length is None:
            headers.append(("transfer-encoding", "chunked"))
        else:
            headers.append(("content-length", str(length)))
        if encoding:
            headers.append(("content-encoding", encoding))
        if rid:
            headers.append(("x-request-id", "req_" + rid))
            headers.append(("request-id", "req_" + rid))
        headers.extend(extra or ())
        headers.append(("connection", "keep-alive" if keep else "close"))
        writer.write(render_head(status, headers))
        self._count_status(status)

    def _send_doc(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        doc: Any,
        keep: bool,
        rid: str,
        encoding: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        body = json.dumps(doc, separators=(",", ":")).encode()
        if encoding:
            body = compress_all(encoding, body)
        self._write_json_head(writer, status, len(body), keep, encoding, rid, extra)
        writer.write(body)
        return keep

    def _send_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        anthropic: bool,
        message: str | None,
        keep: bool,
        rid: str,
        encoding: str | None = None,
    ) -> bool:
        extra = [("retry-after", "1")] if status in (429, 503, 529) else None
        doc = error_envelope(anthropic, status, message, "req_" + rid)
        return self._send_doc(writer, status, doc, keep, rid, encoding, extra)

    def _models_doc(self, anthropic: bool) -> dict:
        ids = [self.model]
        if anthropic:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in ids
            ]
            return {"data": data, "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
        data = [
            {"id": m, "object": "model", "created": 1735689600, "owned_by": "spendtap-sim"}
            for m in ids
        ]
        return {"object": "list", "data": data}

    async def _send_generated(
        self,
        writer: asyncio.StreamWriter,
        plan: Plan,
        renderer: Renderer | None,
        ctl: Controls,
        t0: float,
        keep: bool,
    ) -> bool:
        """A non-streaming response: wait for the simulated generation, then send the JSON."""
        loop = asyncio.get_running_loop()
        if ctl.paced and renderer is not None:
            steps = plan.reasoning + plan.visible
            delay = t0 + ctl.ttft + max(0, steps - 1) * ctl.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if "stall" in ctl.faults:
            await asyncio.sleep(ctl.stall)
        anthropic = plan.api == ANTHROPIC_MESSAGES
        if "error-event" in ctl.faults:
            return self._send_error(
                writer, 529 if anthropic else 500, anthropic, None, keep, plan.rid
            )

        doc = embeddings_document(plan) if renderer is None else renderer.document()
        pretty = renderer is None or renderer.pretty_json
        huge = "huge" in ctl.faults
        if huge:
            keys = renderer.tail_keys if renderer is not None else ("usage",)
            tail_items = [(k, doc.pop(k)) for k in keys if k in doc]
            doc["sim_padding"] = PAD_MARKER
            doc.update(tail_items)
        text = (
            json.dumps(doc, indent=2) + "\n" if pretty else json.dumps(doc, separators=(",", ":"))
        )
        cut = "cut" in ctl.faults

        if not huge:
            body = text.encode()
            if ctl.encoding:
                body = compress_all(ctl.encoding, body)
            self._write_json_head(writer, 200, len(body), keep, ctl.encoding, plan.rid)
            if cut:
                writer.write(body[: len(body) // 2])
                await writer.drain()
                writer.close()
                return False
            writer.write(body)
            self._count_usage(plan)
            return keep

        head, _, tail = text.partition(PAD_MARKER_JSON)
        head_b, tail_b = head.encode() + b'"', b'"' + tail.encode()
        pad = max(0, ctl.body_bytes - len(head_b) - len(tail_b))
        total = len(head_b) + pad + len(tail_b)
        limit = total // 2 if cut else total
        comp = compressor(ctl.encoding) if ctl.encoding else None
        self._write_json_head(writer, 200, None if comp else total, keep, ctl.encoding, plan.rid)

        def pieces() -> Iterator[bytes]:
            yield head_b
            block = b"x" * PAD_PIECE
            left = pad
            while left > 0:
                yield block if left >= PAD_PIECE else block[:left]
                left -= PAD_PIECE
            yield tail_b

        sent = 0
        for piece in pieces():
            if sent + len(piece) > limit:
                piece = piece[: limit - sent]
            sent += len(piece)
            if comp is not None:
                data = comp.chunk(piece)
                if data:
                    writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                writer.write(piece)
            await writer.drain()
            if sent >= limit:
                break
        if cut:
            writer.close()
            return False
        if comp is not None:
            data = comp.end()
            writer.write((b"%x\r\n%b\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n")
        self._count_usage(plan)
        return keep

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        plan: Plan,
        r: Renderer,
        ctl: Controls,
        t0: float,
        keep: bool,
    ) -> bool:
        """A streamed (SSE) response: one content event per token, paced or as fast as possible."""
        headers = [
            ("content-type", r.stream_content_type),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
            ("x-request-id", "req_" + plan.rid),
            ("request-id", "req_" + plan.rid),
        ]
        if ctl.encoding:
            headers.append(("content-encoding", ctl.encoding))
        headers.append(("connection", "keep-alive" if keep else "close"))
        writer.write(render_head(200, headers))
        self._count_status(200)
        out = ChunkedBody(writer, ctl.encoding)
        pre = r.preamble()
        if pre:
            out.send(pre)
        if ctl.keepalive:
            out.send(KEEPALIVE)

        faults = ctl.faults
        streamed_r = plan.reasoning if r.streams_reasoning else 0
        hidden_r = plan.reasoning - streamed_r
        visible = plan.visible
        total = streamed_r + visible
        fault_at = streamed_r + visible // 2 if faults & {"cut", "error-event", "malformed"} else -1
        stall_at = streamed_r + min(3, visible) if "stall" in faults else -1
        paced = ctl.paced
        interval = ctl.interval
        keepalive = ctl.keepalive
        loop = asyncio.get_running_loop()
        start = t0 + ctl.ttft + hidden_r * interval  # when step 0 is due
        odd_until = -1  # steps before this index get CR-only line endings (malformed)
        split_next = False
        send = out.send
        reason, token = r.reason, r.token

        for k in range(total + 1):
            if k == fault_at:
                if "cut" in faults:
                    await out.drain()
                    writer.close()  # flush what was sent, then FIN without the last chunk
                    return False
                if "error-event" in faults:
                    send(r.error_event(max(0, k - streamed_r)))
                    out.finish()
                    await out.drain()
                    return keep
                send(MALFORMED)
                odd_until = k + 3
                split_next = True
            if k == stall_at:
                await out.drain()
                await asyncio.sleep(ctl.stall)
                start += ctl.stall
            if k == total:
                break
            if paced:
                delay = start + k * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if out.closing:
                    return False
            data = reason(k) if k < streamed_r else token(k - streamed_r)
            if k < odd_until:
                if split_next:  # one data field spread over two lines
                    data = data.replace(b"data: {", b"data: {\ndata: ", 1)
                    split_next = False
                data = data.replace(b"\n", b"\r")
            send(data)
            if keepalive and k & 15 == 15:
                send(KEEPALIVE)
            if not paced and k & 63 == 63:
                if out.closing:  # the client went away
                    return False
                await out.drain()
                await asyncio.sleep(0)
        send(r.tail())
        out.finish()
        await out.drain()
        if plan.include_usage or plan.api in (OPENAI_RESPONSES, ANTHROPIC_MESSAGES, *NATIVE):
            self._count_usage(plan)
        return keep


# -- running it --------------------------------------------------------------------------------


async def serve_until_signalled(
    server: SimServer, announce: Callable[[str], None] | None = None
) -> None:
    """Start ``server``, announce its URL, and serve until SIGINT or SIGTERM."""
    await server.start()
    if announce is not None:
        announce(server.url)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()


@contextlib.contextmanager
def run_in_thread(host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> Iterator[SimServer]:
    """Run a :class:`SimServer` on its own event loop in a background thread.

    Yields the started server (``.url``, ``.port``, ``.stats()``); on exit the server is
    stopped, its loop closed and the thread joined. Keyword arguments go to SimServer.
    """
    server = SimServer(host, port, **kwargs)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(server.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"spendtap-sim-{port}", daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
