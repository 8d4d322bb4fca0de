"""Cohere: v2 ``/v2/chat`` (and v1 ``/v1/chat``), ``/v1|v2/embed``, ``/v1|v2/rerank``.

v2 chat reports ``usage`` (on the JSON answer, or on the ``message-end`` event's
``delta`` in a stream):

- ``tokens.input_tokens`` / ``tokens.output_tokens``: all tokens processed (the
  prompt template included);
- ``billed_units.input_tokens`` / ``output_tokens``: what is billed;
- ``cached_tokens``: input tokens read from the cache (at the top level of usage; a
  part of ``tokens.input_tokens`` — it can exceed the billed input).

Normalized with the ledger's meaning (all tokens processed): ``tokens`` first,
``billed_units`` when ``tokens`` is absent. v1 answers carry the same figures
under ``meta``.

Embed and rerank generate nothing (completion stays None). Rerank bills
``search_units``, which are not tokens: a rerank answer with only search units
reports no token figure (the row is then estimated from the request); a server
that reports tokens for rerank (``meta.tokens``, ``meta.billed_units.input_tokens``,
or a Jina-style ``usage.total_tokens``) is taken at its word.
"""

from __future__ import annotations

from spendtap.metering.dialects import Extractor, count_pattern, error_summary
from spendtap.metering.usage import COHERE_CHAT, COHERE_EMBED, RERANK, Usage

__all__ = ["CohereChat", "CohereEmbed", "CohereExtractor", "Rerank"]

_PAIR = ("input_tokens", "output_tokens")


class CohereExtractor(Extractor):
    __slots__ = ()
    FIELDS = ("t.input_tokens", "t.output_tokens", "b.input_tokens", "b.output_tokens")
    TAIL_PATTERNS = {"b.search_units": count_pattern("search_units")}

    def read(self, obj: dict, ev_type: str | None) -> bool:
        t = obj.get("type")
        if type(t) is not str:
            t = ev_type
        if t == "message-end":
            d = obj.get("delta")
            if type(d) is dict:
                self._usage(d.get("usage"))
        self._usage(obj.get("usage"))
        self._usage(obj.get("meta"))
        r = obj.get("response")  # v1 stream-end
        if type(r) is dict:
            self._usage(r.get("meta"))
        if self.model is None:
            self._model(obj.get("model"))
        e = obj.get("error")
        if e and self.error is None:
            self.error = error_summary(e)
        elif self.error is None and t in ("error", "stream-error"):
            self.error = error_summary(obj.get("message") or obj)
        if t is not None:
            if t in ("content-delta", "tool-plan-delta", "tool-call-delta", "text-generation"):
                return True
            if t not in ("message", "chat") and "-" in t:
                return False
        msg = obj.get("message")
        if type(msg) is dict:
            return bool(msg.get("content") or msg.get("tool_calls") or msg.get("tool_plan"))
        return bool(obj.get("text"))

    def _usage(self, u: object) -> None:
        if type(u) is not dict:
            return
        tok = u.get("tokens")
        if type(tok) is dict:
            self._take(tok, _PAIR, "t.")
        billed = u.get("billed_units")
        if type(billed) is dict:
            self._take(billed, (*_PAIR, "search_units"), "b.")
        self._take(u, ("cached_tokens",))
        if "total_tokens" in u and "prompt_tokens" not in u and "input_tokens" not in u:
            self._take(u, ("total_tokens",), "j.")  # Jina-style rerank usage

    @property
    def reported(self) -> bool:
        f = self.figs
        return any(
            k in f
            for k in ("t.input_tokens", "t.output_tokens", "b.input_tokens", "b.output_tokens",
                      "j.total_tokens")
        )  # fmt: skip

    def usage(self) -> Usage:
        f = self.figs
        if "t.input_tokens" in f or "t.output_tokens" in f:
            prompt, completion = f.get("t.input_tokens"), f.get("t.output_tokens")
        else:
            prompt, completion = f.get("b.input_tokens"), f.get("b.output_tokens")
        if prompt is None and completion is None:
            prompt = f.get("j.total_tokens")
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=f.get("cached_tokens") if prompt is not None else None,
        )

    @property
    def search_units(self) -> int | None:
        return self.figs.get("b.search_units")


class CohereChat(CohereExtractor):
    __slots__ = ()
    api = COHERE_CHAT
    PATH_SUFFIXES = ("/v2/chat", "/v1/chat")


class CohereEmbed(CohereExtractor):
    __slots__ = ()
    api = COHERE_EMBED
    PATH_SUFFIXES = ("/v1/embed", "/v2/embed")


class Rerank(CohereExtractor):
    __slots__ = ()
    api = RERANK
    PATH_SUFFIXES = ("/rerank",)
