"""Gemini / Vertex AI ``generateContent`` and ``streamGenerateContent``.

Request: ``…/models/{model}:generateContent`` (one JSON document) or
``:streamGenerateContent`` (server-sent events with ``alt=sse``, otherwise a
JSON array of response objects). The model is in the path; the output limit is
``generationConfig.maxOutputTokens``.

Response: ``usageMetadata`` on each streamed object is a cumulative snapshot of the
whole call so far, so the last snapshot replaces the previous one whole (a figure it
omits is not reported, rather than left over from an earlier snapshot: with a
server-side tool, the counts restart mid-stream and the final snapshot covers all):

- ``promptTokenCount`` includes ``cachedContentTokenCount``;
- ``toolUsePromptTokenCount`` (tool results fed back) is input billed on top;
- ``candidatesTokenCount`` excludes ``thoughtsTokenCount`` (both are output).

Normalized: ``prompt = promptTokenCount + toolUsePromptTokenCount``,
``completion = candidatesTokenCount + thoughtsTokenCount``,
``cached = cachedContentTokenCount``, ``reasoning = thoughtsTokenCount``.
"""

from __future__ import annotations

import re

from spendtap.metering.dialects import Extractor, count_pattern, error_summary
from spendtap.metering.usage import GEMINI, Usage

__all__ = ["GeminiExtractor"]

_FIELDS = (
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
)
_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$", re.IGNORECASE)


class GeminiExtractor(Extractor):
    __slots__ = ()
    api = GEMINI
    PATH_SUFFIXES = (":generatecontent", ":streamgeneratecontent")
    LIMIT_PATHS = (
        ("generationConfig", "maxOutputTokens"),
        ("generation_config", "max_output_tokens"),
    )
    FIELDS = _FIELDS

    @classmethod
    def matches(cls, path_lower: str) -> bool:
        return path_lower.endswith(cls.PATH_SUFFIXES) and "/models/" in path_lower

    @classmethod
    def facts_from_path(cls, path: str) -> tuple[str | None, bool | None]:
        """The model and the streaming from ``…/models/{model}:(stream)generateContent``."""
        m = _PATH.search(path.split("?", 1)[0].rstrip("/"))
        if m is None:
            return None, None
        return m.group(1)[:256] or None, m.group(2).lower().startswith("stream")

    TAIL_PATTERNS = {k: count_pattern(k) for k in _FIELDS}

    def read(self, obj: dict, ev_type: str | None) -> bool:
        u = obj.get("usageMetadata")
        if type(u) is dict:
            self.figs = {}
            self._take(u, _FIELDS)
        if self.model is None:
            self._model(obj.get("modelVersion") or obj.get("model"))
        e = obj.get("error")
        if e and self.error is None:
            self.error = error_summary(e)
        cands = obj.get("candidates")
        if type(cands) is list:
            for c in cands:
                if type(c) is not dict:
                    continue
                content = c.get("content")
                parts = content.get("parts") if type(content) is dict else None
                if type(parts) is list:
                    for p in parts:
                        if type(p) is dict and (
                            p.get("text") or p.get("functionCall") or p.get("inlineData")
                            or p.get("executableCode")
                        ):  # fmt: skip
                            return True
        return False

    def usage(self) -> Usage:
        f = self.figs
        prompt = f.get("promptTokenCount")
        tool = f.get("toolUsePromptTokenCount")
        if prompt is not None and tool is not None:
            prompt += tool
        cand = f.get("candidatesTokenCount")
        thoughts = f.get("thoughtsTokenCount")
        completion = None if cand is None and thoughts is None else (cand or 0) + (thoughts or 0)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=f.get("cachedContentTokenCount"),
            reasoning_tokens=thoughts,
        )
