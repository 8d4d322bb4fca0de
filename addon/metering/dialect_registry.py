"""The native API families spendtap reads, in detection order (pure).

Each entry is an :class:`spendtap.metering.dialects.Extractor` subclass from its dialect
module; :mod:`spendtap.metering.request` detects a family and reads its request facts from
here, :mod:`spendtap.metering.dialect_scanner` scans its answers with it. The OpenAI and
Anthropic shapes are not here: :class:`spendtap.metering.scanner.ResponseScanner` reads them
on its tuned path.
"""

from __future__ import annotations

from spendtap.metering.dialect_cohere import CohereChat, CohereEmbed, Rerank
from spendtap.metering.dialect_gemini import GeminiExtractor
from spendtap.metering.dialect_llamacpp import LlamaCppExtractor
from spendtap.metering.dialect_ollama import OllamaChat, OllamaEmbed, OllamaGenerate
from spendtap.metering.dialects import Extractor

__all__ = ["DIALECTS", "EXTRACTORS", "detect_native"]

DIALECTS: tuple[type[Extractor], ...] = (
    GeminiExtractor,
    OllamaChat,
    OllamaGenerate,
    OllamaEmbed,
    LlamaCppExtractor,
    CohereChat,
    CohereEmbed,
    Rerank,
)

EXTRACTORS: dict[str, type[Extractor]] = {cls.api: cls for cls in DIALECTS}


def detect_native(path_lower: str) -> type[Extractor] | None:
    """The family a request path names (lower-case, query removed), or None."""
    for cls in DIALECTS:
        if cls.matches(path_lower):
            return cls
    return None
