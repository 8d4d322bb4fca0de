"""llama.cpp server native ``/completion`` (and the ``timings`` it adds everywhere).

Streamed (``data:`` events without names) or one JSON document. The final object
(``"stop": true``) reports:

- ``tokens_evaluated``: prompt tokens (the whole prompt, cached part included);
- ``tokens_predicted``: generated tokens;
- ``timings``: ``prompt_n`` (prompt tokens actually computed, i.e. not from the
  cache), ``cache_n`` (prompt tokens reused from the cache; newer servers),
  ``prompt_ms``, ``predicted_n``, ``predicted_ms``, ``predicted_per_second``.

``tokens_cached`` is the slot's whole KV position (prompt and generated tokens
that stay cached for the next request), not a cache read of this prompt: it is
not taken as ``cached_tokens``. The cache read is ``timings.cache_n`` where the
server reports it, else ``tokens_evaluated - timings.prompt_n`` (the prompt tokens
it did not have to compute). The output limit of a request is ``n_predict``.
"""

from __future__ import annotations

from spendtap.metering.dialects import (
    Extractor,
    ServerTiming,
    count_pattern,
    error_summary,
    int_or_none,
    num_or_none,
)
from spendtap.metering.usage import LLAMACPP_COMPLETION, Usage

__all__ = ["LlamaCppExtractor", "timings_of"]

_FIELDS = ("tokens_evaluated", "tokens_predicted")


def timings_of(t: dict) -> ServerTiming | None:
    """Server timing from a llama.cpp ``timings`` object (also sent on ``/v1`` answers)."""
    prompt_ms = num_or_none(t.get("prompt_ms"))
    decode_ms = num_or_none(t.get("predicted_ms"))
    rate = num_or_none(t.get("predicted_per_second"))
    n = int_or_none(t.get("predicted_n"))
    if rate is None and n and decode_ms:
        rate = n / (decode_ms / 1000)
    if prompt_ms is None and decode_ms is None and rate is None:
        return None
    return ServerTiming(
        prompt_s=None if prompt_ms is None else round(prompt_ms / 1000, 9),
        decode_s=None if decode_ms is None else round(decode_ms / 1000, 9),
        decode_tokens_per_s=None if rate is None else round(rate, 3),
    )


class LlamaCppExtractor(Extractor):
    __slots__ = ("_timings",)
    api = LLAMACPP_COMPLETION
    PATH_SUFFIXES = ("/completion",)
    LIMIT_PATHS = (("n_predict",), ("max_tokens",))
    FIELDS = _FIELDS
    TAIL_PATTERNS = {k: count_pattern(k) for k in (*_FIELDS, "cache_n")}

    def __init__(self) -> None:
        super().__init__()
        self._timings: dict | None = None

    def read(self, obj: dict, ev_type: str | None) -> bool:
        if obj.get("stop") is True or "timings" in obj:
            self._take(obj, _FIELDS)
            t = obj.get("timings")
            if type(t) is dict:
                self._timings = t
                self._take(t, ("cache_n", "prompt_n"))
        if self.model is None:
            self._model(obj.get("model"))
        e = obj.get("error")
        if e and self.error is None:
            self.error = error_summary(e)
        c = obj.get("content")
        return type(c) is str and c != ""

    @property
    def reported(self) -> bool:
        return "tokens_evaluated" in self.figs or "tokens_predicted" in self.figs

    def usage(self) -> Usage:
        f = self.figs
        prompt = f.get("tokens_evaluated")
        cached = None
        if prompt is not None:
            cached = f.get("cache_n")
            computed = f.get("prompt_n")
            if cached is None and computed is not None and computed <= prompt:
                cached = prompt - computed
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=f.get("tokens_predicted"),
            cached_tokens=cached,
        )

    def server_timing(self) -> ServerTiming | None:
        return timings_of(self._timings) if self._timings else None
