"""Usage estimates for responses that report none.

No tokenizer ships offline for the models spendtap meters (tiktoken downloads
its tables at run time, and open models each have their own), so estimates
use a documented heuristic, the one OpenAI's own guidance gives for English
text: about 4 characters per token, plus a few tokens of framing per message.

- Prompt: characters of the request's text (messages, system, prompt, input,
  tools), images counted as a flat 85 tokens (OpenAI's low-detail figure),
  base64 payloads never counted as text.
- Completion: the larger of the number of content events (servers that stream
  token by token send about one token per event) and the characters of
  generated text / 4.

A row whose figures come from here says ``usage_source = "estimated"``.
"""

from __future__ import annotations

from math import ceil
from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REQUEST_OVERHEAD_TOKENS = 3
IMAGE_TOKENS = 85

# Keys whose string values are not text the model reads as prompt.
_NOT_TEXT = frozenset(
    ("model", "role", "type", "id", "tool_call_id", "detail", "media_type", "encoding_format",
     "format", "voice", "user", "service_tier", "reasoning_effort", "tool_choice", "url", "data",
     "file_id", "cache_control", "signature")
)  # fmt: skip
_IMAGE_KEYS = frozenset(("image_url", "image", "input_image", "inlineData", "inline_data"))
# Request keys whose values are prompt text: OpenAI, Anthropic, Gemini (contents,
# systemInstruction), Ollama (prompt, system), Cohere (texts, query, documents).
_PROMPT_KEYS = frozenset(
    ("messages", "input", "prompt", "system", "instructions", "tools", "functions", "contents",
     "systemInstruction", "system_instruction", "texts", "inputs", "query", "documents",
     "suffix")
)  # fmt: skip
_MAX_DEPTH = 16


def request_text(doc: dict) -> tuple[int, int, int]:
    """(text characters, messages, images) in a request document."""
    counts = [0, 0, 0]
    for key in ("messages", "input", "contents"):
        value = doc.get(key)
        if isinstance(value, list):
            counts[1] += len(value)
    for key, value in doc.items():
        if key in _PROMPT_KEYS:
            _walk(value, counts, 0)
    return counts[0], counts[1], counts[2]


def _walk(value: Any, counts: list[int], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        if not value.startswith("data:"):
            counts[0] += len(value)
    elif isinstance(value, list):
        for item in value:
            _walk(item, counts, depth + 1)
    elif isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image", "image_url", "input_image") or _IMAGE_KEYS & value.keys():
            counts[2] += 1
            return
        for key, item in value.items():
            if isinstance(item, str):
                if key not in _NOT_TEXT:
                    counts[0] += len(item) if not item.startswith("data:") else 0
                # Tool schemas' property names are prompt text too.
            elif key in ("parameters", "input_schema", "properties"):
                counts[0] += _schema_chars(item, depth + 1)
            else:
                _walk(item, counts, depth + 1)


def _schema_chars(value: Any, depth: int) -> int:
    if depth > _MAX_DEPTH:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _schema_chars(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return sum(_schema_chars(v, depth + 1) for v in value)
    return 0


def estimate_prompt_tokens(chars: int, messages: int, images: int) -> int:
    return (
        ceil(chars / CHARS_PER_TOKEN)
        + messages * MESSAGE_OVERHEAD_TOKENS
        + images * IMAGE_TOKENS
        + REQUEST_OVERHEAD_TOKENS
    )


def estimate_completion_tokens(output_chars: int | None, content_events: int) -> int | None:
    if output_chars is None and not content_events:
        return None
    return max(content_events, ceil((output_chars or 0) / CHARS_PER_TOKEN))
