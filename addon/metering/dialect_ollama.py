"""Ollama native API: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``.

Streams are NDJSON (one object per line; Ollama streams unless the request says
``"stream": false``); the final object (``"done": true``) carries the figures:

- ``prompt_eval_count``: prompt tokens evaluated (absent when the whole prompt came
  from the cache — then it stays None, never 0);
- ``eval_count``: generated tokens (thinking included);
- ``total_duration``, ``load_duration``, ``prompt_eval_duration``, ``eval_duration``:
  the server's own durations in nanoseconds. Decode rate is
  ``eval_count / eval_duration`` (Ollama's documented formula).

``/api/embed`` reports ``prompt_eval_count`` only; the legacy ``/api/embeddings``
reports nothing (the row is then estimated). The output limit of a request is
``options.num_predict``.
"""

from __future__ import annotations

from spendtap.metering.dialects import Extractor, ServerTiming, count_pattern, error_summary
from spendtap.metering.usage import OLLAMA_CHAT, OLLAMA_EMBED, OLLAMA_GENERATE, Usage

__all__ = ["OllamaChat", "OllamaEmbed", "OllamaExtractor", "OllamaGenerate"]

_COUNTS = ("prompt_eval_count", "eval_count")
_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
_FIELDS = _COUNTS + _DURATIONS
_NS = 1e-9


class OllamaExtractor(Extractor):
    __slots__ = ()
    STREAMS_BY_DEFAULT = True
    LIMIT_PATHS = (("options", "num_predict"),)
    FIELDS = _FIELDS
    TAIL_PATTERNS = {k: count_pattern(k) for k in _FIELDS}

    def read(self, obj: dict, ev_type: str | None) -> bool:
        if obj.get("done") is True or "prompt_eval_count" in obj:
            self._take(obj, _FIELDS)
        if self.model is None:
            self._model(obj.get("model"))
        e = obj.get("error")
        if e and self.error is None:
            self.error = error_summary(e)
        r = obj.get("response")
        if type(r) is str and r:
            return True
        if obj.get("thinking"):
            return True
        m = obj.get("message")
        if type(m) is dict:
            return bool(m.get("content") or m.get("thinking") or m.get("tool_calls"))
        return False

    @property
    def reported(self) -> bool:
        f = self.figs
        return "prompt_eval_count" in f or "eval_count" in f

    def usage(self) -> Usage:
        f = self.figs
        return Usage(
            prompt_tokens=f.get("prompt_eval_count"), completion_tokens=f.get("eval_count")
        )

    def server_timing(self) -> ServerTiming | None:
        f = self.figs
        if not any(k in f for k in _DURATIONS):
            return None
        t = ServerTiming(
            prompt_s=_s(f.get("prompt_eval_duration")),
            decode_s=_s(f.get("eval_duration")),
            total_s=_s(f.get("total_duration")),
            load_s=_s(f.get("load_duration")),
        )
        n = f.get("eval_count")
        if n and t.decode_s:
            t.decode_tokens_per_s = round(n / t.decode_s, 3)
        return t


def _s(ns: int | None) -> float | None:
    return None if ns is None else round(ns * _NS, 9)


class OllamaChat(OllamaExtractor):
    __slots__ = ()
    api = OLLAMA_CHAT
    PATH_SUFFIXES = ("/api/chat",)


class OllamaGenerate(OllamaExtractor):
    __slots__ = ()
    api = OLLAMA_GENERATE
    PATH_SUFFIXES = ("/api/generate",)


class OllamaEmbed(OllamaExtractor):
    __slots__ = ()
    api = OLLAMA_EMBED
    PATH_SUFFIXES = ("/api/embed", "/api/embeddings")
    STREAMS_BY_DEFAULT = False
    LIMIT_PATHS = ()
