"""What a request asks for: its API, model, stream flag, output limit and principal.

Pure: takes the path, the headers (any mapping with case-insensitive ``get``, or a
plain dict with lower-case keys) and the body bytes. Never raises on bad input:
a body that is not JSON, or not an object, gives an ``RequestInfo`` with what the
path and headers alone tell.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from spendtap.metering.dialect_registry import EXTRACTORS, detect_native
from spendtap.metering.estimate import estimate_prompt_tokens, request_text
from spendtap.metering.usage import (
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    NATIVE_APIS,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    OTHER,
)

# Bodies above this size are not parsed whole on the event loop (a request with
# large images can weigh tens of MB); their model and limits are read from the
# head of the body instead.
MAX_PARSE_BYTES = 4 * 1024 * 1024
_HEAD_BYTES = 64 * 1024

_ESTIMATED_APIS = (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    *NATIVE_APIS,
)

_AZURE_DEPLOYMENT = re.compile(r"/deployments/([^/]+)/")
_HEAD_FIELDS = {
    "model": re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"'),
    "stream": re.compile(rb'"stream"\s*:\s*(true|false)'),
    "max_tokens": re.compile(rb'"max_tokens"\s*:\s*(\d{1,12})'),
    "max_completion_tokens": re.compile(rb'"max_completion_tokens"\s*:\s*(\d{1,12})'),
    "max_output_tokens": re.compile(rb'"max_output_tokens"\s*:\s*(\d{1,12})'),
}


@dataclass(slots=True)
class RequestInfo:
    api: str = OTHER
    model: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    include_usage: bool | None = None
    has_stream_options: bool = False
    body_parsed: bool = False
    # Best-guess prompt size for usage estimates (see spendtap.metering.estimate).
    prompt_estimate: int | None = None


def detect_api(path: str) -> str:
    """Name the API family from the request path (query string ignored)."""
    p = path.split("?", 1)[0].rstrip("/").lower()
    if p.endswith("/chat/completions"):
        return OPENAI_CHAT
    if p.endswith("/completions"):
        return OPENAI_COMPLETIONS
    if p.endswith("/responses"):
        return OPENAI_RESPONSES
    if p.endswith("/messages"):
        return ANTHROPIC_MESSAGES
    if p.endswith("/embeddings") and not p.endswith("/api/embeddings"):
        return EMBEDDINGS
    native = detect_native(p)  # Gemini, Ollama, llama.cpp, Cohere (metering.dialect_registry)
    return native.api if native is not None else OTHER


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def parse_request(path: str, headers: Mapping[str, str] | None, body: bytes | None) -> RequestInfo:
    """Read what the request asks for; never raises."""
    info = RequestInfo(api=detect_api(path))
    body = body or b""
    if len(body) <= MAX_PARSE_BYTES:
        try:
            doc = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            info.body_parsed = True
            _from_document(info, doc)
    else:
        _from_head(info, body[:_HEAD_BYTES])
        # Too large to parse on the event loop: most of such a body is images.
        info.prompt_estimate = estimate_prompt_tokens(len(body) // 8, 1, 0)
    native = EXTRACTORS.get(info.api)
    if native is not None:
        # Gemini names the model and the streaming in the path, not the body.
        model, streaming = native.facts_from_path(path)
        info.model = model or info.model
        if streaming is not None:
            info.stream = streaming
    if info.model is None:
        # Azure OpenAI names the deployment in the path, not the body.
        m = _AZURE_DEPLOYMENT.search(path)
        if m:
            info.model = m.group(1)
    return info


def _from_document(info: RequestInfo, doc: dict) -> None:
    model = doc.get("model")
    if isinstance(model, str) and model:
        info.model = model[:256]
    native = EXTRACTORS.get(info.api)
    stream = doc.get("stream")
    if native is not None and native.STREAMS_BY_DEFAULT:
        info.stream = stream is not False  # Ollama streams unless told not to
    else:
        info.stream = stream is True
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        limit = _positive_int(doc.get(field))
        if limit is not None:
            info.max_output_tokens = limit
            break
    if native is not None:
        limit = native.output_limit(doc)
        if limit is not None:
            info.max_output_tokens = limit
    if info.api in _ESTIMATED_APIS:
        info.prompt_estimate = estimate_prompt_tokens(*request_text(doc))
    options = doc.get("stream_options")
    info.has_stream_options = "stream_options" in doc
    if isinstance(options, dict) and "include_usage" in options:
        info.include_usage = options.get("include_usage") is True


def _from_head(info: RequestInfo, head: bytes) -> None:
    found = {name: rx.search(head) for name, rx in _HEAD_FIELDS.items()}
    if found["model"]:
        try:
            info.model = json.loads(b'"' + found["model"].group(1) + b'"')[:256]
        except ValueError:
            info.model = None
    native = EXTRACTORS.get(info.api)
    if found["stream"]:
        info.stream = found["stream"].group(1) == b"true"
    elif native is not None and native.STREAMS_BY_DEFAULT:
        info.stream = True
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if found[field]:
            info.max_output_tokens = int(found[field].group(1))
            break


_ID_SEGMENT = re.compile(r"^(?=.*\d)[A-Za-z0-9._~:-]{8,}$|^\d+$")
_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._~:-]")


def path_family(path: str, depth: int = 3) -> str:
    """A bounded label for a request path: its first segments, ids replaced by ``:id``.

    ``/v1/models`` stays itself; ``/v1/threads/thread_abc123XYZ/runs`` becomes
    ``/v1/threads/:id``; the query string is dropped. For metrics on requests of an
    API spendtap does not recognise (never a raw path: it may carry ids or secrets).
    """
    segments = [s for s in path.split("?", 1)[0].split("/") if s][:depth]
    out = []
    for seg in segments:
        if _ID_SEGMENT.match(seg):
            out.append(":id")
        else:
            out.append(_SAFE_SEGMENT.sub("_", seg)[:40])
    return "/" + "/".join(out)


_UNSAFE_LABEL = re.compile(r"[^\x21-\x7e]")
MAX_PRINCIPAL_LEN = 128


def clean_principal(value: str | None) -> str | None:
    """A trusted-header value fit for a ledger column and a metric label.

    Header values are bounded and stripped of whitespace and control
    characters so a misbehaving gateway cannot inject multi-line log entries
    or huge labels.
    """
    if not value:
        return None
    value = _UNSAFE_LABEL.sub("", value)[:MAX_PRINCIPAL_LEN]
    return value or None
