"""The usage objects of the OpenAI and Anthropic shapes: one reader per family (pure).

The extractor half of :class:`spendtap.metering.scanner.ResponseScanner`, which keeps the
framing and the tuned per-event path: given one ``usage`` object, these functions
return its raw figures in a fixed order; ``openai_usage`` / ``anthropic_usage``
normalize the last figures recorded (see DESIGN.md "Usage semantics"):

- OpenAI chat/completions (``prompt_tokens`` ...) and Responses (``input_tokens`` ...):
  cache reads and reasoning are sub-counts; vendor variants are read too — cached tokens
  at the top level of usage (Moonshot ``cached_tokens``, DeepSeek
  ``prompt_cache_hit_tokens``, LiteLLM ``cache_read_input_tokens``) when the details
  object has none, and cache writes under vendor names (OpenRouter
  ``cache_write_tokens``, LiteLLM ``cache_creation_tokens`` /
  ``cache_creation_input_tokens``);
- Anthropic: ``input_tokens`` excludes cache reads and writes; with ``iterations[]``
  (server-side compaction) the billable figures are the sums over the iterations.

A figure not reported is None, never 0.
"""

from __future__ import annotations

from typing import Any

from spendtap.metering.usage import ANTHROPIC_MESSAGES, OPENAI_RESPONSES, Usage

__all__ = [
    "ANTHROPIC_SHAPE",
    "OPENAI_SHAPE",
    "anthropic_figures",
    "anthropic_usage",
    "chat_figures",
    "input_output_shape",
    "openai_usage",
    "responses_figures",
]

OPENAI_SHAPE = 1  # prompt_tokens/completion_tokens or Responses input_tokens (cache included)
ANTHROPIC_SHAPE = 2  # Anthropic input_tokens (cache reads and writes excluded)

# Figures, in order: OpenAI (prompt, completion, cached, reasoning, cache creation);
# Anthropic (input, output, cache read, cache creation, reasoning).
N_FIGURES = 5

_VENDOR_CACHED = ("cached_tokens", "prompt_cache_hit_tokens", "cache_read_input_tokens")
_CACHE_WRITE_DETAIL = ("cache_write_tokens", "cache_creation_tokens", "cache_creation_input_tokens")
_ITERATION_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens",
                   "cache_creation_input_tokens")  # fmt: skip


def count(v: Any) -> int | None:
    """A token count, or None when ``v`` is not a non-negative integer."""
    if type(v) is int:
        return v if v >= 0 else None
    if type(v) is float and v >= 0 and v.is_integer():
        return int(v)
    return None


def sub_count(d: Any, key: str) -> int | None:
    return count(d.get(key)) if isinstance(d, dict) else None


def _vendor_cached(u: dict) -> int | None:
    for k in _VENDOR_CACHED:
        v = u.get(k)
        if v is not None:
            n = count(v)
            if n is not None:
                return n
    return None


def _cache_write(details: Any, u: dict) -> int | None:
    if type(details) is dict:
        for k in _CACHE_WRITE_DETAIL:
            v = details.get(k)
            if v is not None:
                return count(v)
    v = u.get("cache_creation_input_tokens")
    return None if v is None else count(v)


def chat_figures(u: dict) -> tuple:
    """A ``prompt_tokens`` / ``completion_tokens`` usage object (chat, completions)."""
    pdet = u.get("prompt_tokens_details")
    extra = len(u) > 3  # more than prompt, completion, total: vendor fields may be there
    cached = sub_count(pdet, "cached_tokens")
    if cached is None and extra:
        cached = _vendor_cached(u)
    return (
        count(u.get("prompt_tokens")),
        count(u.get("completion_tokens")),
        cached,
        sub_count(u.get("completion_tokens_details"), "reasoning_tokens"),
        _cache_write(pdet, u) if extra or pdet else None,
    )


def responses_figures(u: dict) -> tuple:
    """An ``input_tokens`` / ``output_tokens`` usage object of the Responses API."""
    idet = u.get("input_tokens_details")
    return (
        count(u.get("input_tokens")),
        count(u.get("output_tokens")),
        sub_count(idet, "cached_tokens"),
        sub_count(u.get("output_tokens_details"), "reasoning_tokens"),
        _cache_write(idet, u),
    )


def anthropic_figures(u: dict) -> list:
    """An Anthropic usage object (``message_start``, ``message_delta``, a message)."""
    odet = u.get("output_tokens_details")
    reasoning = sub_count(odet, "reasoning_tokens")
    if reasoning is None:
        reasoning = sub_count(odet, "thinking_tokens")
    figs = [
        count(u.get("input_tokens")),
        count(u.get("output_tokens")),
        count(u.get("cache_read_input_tokens")),
        count(u.get("cache_creation_input_tokens")),
        reasoning,
    ]
    its = u.get("iterations")
    if type(its) is list and its:
        # Server-side compaction: every sampling iteration is billed.
        for i, k in enumerate(_ITERATION_KEYS):
            total = None
            for it in its:
                v = sub_count(it, k)
                if v is not None:
                    total = v if total is None else total + v
            if total is not None:
                figs[i] = total
    return figs


def input_output_shape(u: dict, api: str, hint: int) -> int:
    """Which family an ``input_tokens``-style usage object is (0: not a usage object).

    Both OpenAI's Responses API and Anthropic say ``input_tokens``; the request's API
    decides, then the cache figures' names, then the event type (``hint``).
    """
    if not (
        "input_tokens" in u
        or "output_tokens" in u
        or "iterations" in u
        or "cache_read_input_tokens" in u
        or "cache_creation_input_tokens" in u
    ):
        return 0
    if api == ANTHROPIC_MESSAGES:
        return ANTHROPIC_SHAPE
    if api == OPENAI_RESPONSES:
        return OPENAI_SHAPE
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
        return ANTHROPIC_SHAPE
    if "input_tokens_details" in u or "output_tokens_details" in u:
        return OPENAI_SHAPE
    # Without cache figures both shapes normalize alike: prompt = input_tokens.
    return hint or OPENAI_SHAPE


def openai_usage(figs: list) -> Usage:
    p, c, cached, reasoning, created = figs
    return Usage(
        prompt_tokens=p,
        completion_tokens=c,
        cached_tokens=cached,
        cache_creation_tokens=created,
        reasoning_tokens=reasoning,
    )


def anthropic_usage(figs: list) -> Usage:
    inp, out, c_read, c_create, reasoning = figs
    return Usage(
        prompt_tokens=None if inp is None else inp + (c_read or 0) + (c_create or 0),
        completion_tokens=out,
        cached_tokens=c_read,
        cache_creation_tokens=c_create,
        reasoning_tokens=reasoning,
    )
