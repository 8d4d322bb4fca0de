"""Normalized token usage: the figures one ledger row holds.

Every API reports usage in its own shape; spendtap stores one meaning
whatever the API (see docs/usage-semantics.md):

- ``prompt_tokens``: all input tokens processed, cache reads and writes included
- ``completion_tokens``: all output tokens, reasoning included
- ``cached_tokens``: input tokens read from a prompt cache (part of prompt_tokens)
- ``cache_creation_tokens``: input tokens written to a prompt cache (part of prompt_tokens)
- ``reasoning_tokens``: output tokens spent on reasoning (part of completion_tokens)

A figure the response does not report is ``None``, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

# The API families spendtap understands; the same names as the corpus' meta.json.
OPENAI_CHAT = "openai-chat"
OPENAI_COMPLETIONS = "openai-completions"
OPENAI_RESPONSES = "openai-responses"
ANTHROPIC_MESSAGES = "anthropic-messages"
EMBEDDINGS = "embeddings"
# Native APIs read by the dialect extractors (spendtap.metering.dialects).
GEMINI = "gemini"  # Gemini / Vertex AI generateContent, streamGenerateContent
OLLAMA_CHAT = "ollama-chat"  # Ollama /api/chat
OLLAMA_GENERATE = "ollama-generate"  # Ollama /api/generate
OLLAMA_EMBED = "ollama-embed"  # Ollama /api/embed, /api/embeddings
LLAMACPP_COMPLETION = "llamacpp-completion"  # llama.cpp server /completion
COHERE_CHAT = "cohere-chat"  # Cohere v2 /v2/chat
COHERE_EMBED = "cohere-embed"  # Cohere /v1/embed, /v2/embed
RERANK = "rerank"  # Cohere /v1/rerank, /v2/rerank (and servers that copy it)
OTHER = "other"
NATIVE_APIS = (
    GEMINI,
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
    OLLAMA_EMBED,
    LLAMACPP_COMPLETION,
    COHERE_CHAT,
    COHERE_EMBED,
    RERANK,
)
APIS = (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_RESPONSES,
    ANTHROPIC_MESSAGES,
    EMBEDDINGS,
    *NATIVE_APIS,
    OTHER,
)
# APIs that generate nothing: their rows carry no completion figure (NULL, never 0).
INPUT_ONLY_APIS = frozenset((EMBEDDINGS, OLLAMA_EMBED, COHERE_EMBED, RERANK))

REPORTED = "reported"
ESTIMATED = "estimated"
NONE = "none"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None

    @property
    def reported(self) -> bool:
        return self.prompt_tokens is not None or self.completion_tokens is not None

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def as_dict(self) -> dict[str, int | None]:
        # Spelled out: dataclasses.asdict deep-copies and costs ~10x more, once per request.
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }
