"""spendtap's built-in simulated inference server.

An asyncio HTTP/1.1 server (keep-alive; chunked transfer-encoding for streams,
``Content-Length`` for JSON) that answers like OpenAI, Anthropic, Gemini, Ollama,
llama.cpp and Cohere do, byte for byte in shape (see ``tests/corpus/wire``), with
deterministic token figures, optional realistic pacing and injectable faults. It is the
upstream for spendtap's tests, demo and benchmark.

Endpoints (accepted under any path prefix: ``/v1/chat/completions``,
``/openai/v1/chat/completions`` and ``/chat/completions`` are the same):

- ``POST .../chat/completions``  OpenAI chat (``stream``, ``n``, ``stream_options``,
  ``max_completion_tokens`` / ``max_tokens``)
- ``POST .../completions``       legacy text completions (``prompt`` may be a list)
- ``POST .../responses``         Responses API (``max_output_tokens`` -> ``response.incomplete``)
- ``POST .../embeddings``        float or base64 (``encoding_format``), ``dimensions``
- ``POST .../messages``          Anthropic Messages; ``.../messages/count_tokens`` too
- ``POST .../models/{m}:generateContent``, ``:streamGenerateContent``  Gemini native (the
  model from the path; SSE with ``?alt=sse``, else a streamed JSON array; cumulative
  ``usageMetadata`` on every object; ``generationConfig.maxOutputTokens``; reasoning
  tokens are counted as ``thoughtsTokenCount``, cached as ``cachedContentTokenCount``)
- ``POST /api/chat``, ``/api/generate``  Ollama native (NDJSON unless ``"stream": false``;
  the final object reports ``prompt_eval_count``, ``eval_count`` and nanosecond durations
  derived from the pacing; reasoning streams as ``thinking``; ``options.num_predict``)
- ``POST /api/embed``, ``/api/embeddings``  Ollama embeddings (``prompt_eval_count``; the
  legacy endpoint reports none)
- ``POST /completion``           llama.cpp server native (data-only events, the final
  ``"stop": true`` object with ``tokens_evaluated``, ``tokens_predicted`` and ``timings``;
  ``n_predict``; ``x-sim-cached-tokens`` becomes ``timings.cache_n``)
- ``POST /v2/chat``              Cohere v2 chat (named events ending in ``message-end``
  with ``usage``; ``max_tokens``; ``x-sim-cached-tokens`` becomes ``usage.cached_tokens``)
- ``GET  .../models``            model list (Anthropic shape when ``anthropic-version`` is sent)
- ``GET  /health``               ``{"status":"ok"}``
- ``GET  /sim/stats``            request counters: ``total``, ``endpoints`` (keyed by the API
  names of :mod:`spendtap.metering.usage` plus ``models``, ``health``, ``count-tokens``,
  ``unknown``), ``streams``, ``statuses``, ``faults``, and ``usage_reported`` (the usage
  figures of responses that carried usage and were sent whole; Anthropic prompt tokens
  there include cache reads and writes, as the ledger normalizes them)
- ``POST /sim/reset``            zero the counters (``/sim/*`` requests are never counted)

Token figures (deterministic):

- prompt tokens: every text counts ``ceil(characters / 4)``; each message (chat, Anthropic,
  Responses input item) adds 4, a request adds 3 (chat/Anthropic/Responses priming; a
  system prompt or ``instructions`` count as text; ``tools`` count as their compact JSON
  text; an image or file part counts 85). Legacy completions: per prompt ``max(1, ...)``,
  a token-id list counts its length; embeddings: the sum over inputs, no overhead.
  ``x-sim-prompt-tokens`` overrides the rule.
- completion tokens: ``x-sim-tokens`` or the server's ``default_tokens`` per choice, one
  SSE content event per token (every choice of ``n``), capped by the request's max-tokens
  field (``finish_reason`` ``"length"``, Anthropic ``"max_tokens"``, Responses
  ``response.incomplete``). The usage reported equals exactly what was generated:
  ``completion_tokens = n * (visible tokens + reasoning tokens)``.
- reasoning (``x-sim-reasoning-tokens``): generated before the visible text and counted in
  the output. OpenAI chat/Responses keep them hidden (they take pacing time and appear
  only as ``reasoning_tokens`` / a Responses ``reasoning`` output item); Anthropic streams
  them as a ``thinking`` block (``thinking_delta`` events) and reports them only inside
  ``output_tokens``. The max-tokens cap applies to reasoning + visible.
- cache (``x-sim-cached-tokens``): OpenAI ``prompt_tokens_details.cached_tokens`` (a
  sub-count; ``prompt_tokens`` is raised to it if smaller) and Responses
  ``input_tokens_details.cached_tokens``; Anthropic ``cache_read_input_tokens`` (separate
  from ``input_tokens``). ``x-sim-cache-creation-tokens`` sets Anthropic
  ``cache_creation_input_tokens``.
- streams honour ``stream_options.include_usage`` exactly like OpenAI: with it every chunk
  carries ``"usage":null`` and a final ``"choices":[]`` chunk carries the usage; without
  it no chunk has a usage key. Responses and Anthropic streams always report usage.

Per-request controls (request headers, all optional; SDKs send them with
``extra_headers``); an invalid value is answered with HTTP 400:

- ``x-sim-tokens: N``             completion length per choice
- ``x-sim-prompt-tokens: N``      reported prompt tokens
- ``x-sim-ttft-ms: MS``           time to first token (from the request's arrival)
- ``x-sim-tps: RATE``             tokens per second after the first (0 = unpaced)
- ``x-sim-cached-tokens: N``, ``x-sim-cache-creation-tokens: N``, ``x-sim-reasoning-tokens: N``
- ``x-sim-fault: F[,F...]`` with F one of:

  - ``cut``: a stream stops after about half of its tokens and the connection closes
    without the terminating chunk; a JSON body closes after half its bytes
  - ``reset``: the connection is reset (TCP RST) before any response byte
  - ``error-event``: a 200 stream carries an error event after about half of its tokens
    and then ends (OpenAI chat/completions ``data: {"error": {...}}``; Responses
    ``event: error`` then ``response.failed`` with the usage generated so far; Anthropic
    ``event: error`` ``overloaded_error`` after ``message_start``, whose usage was sent).
    Non-streaming requests get HTTP 500 (Anthropic 529) instead
  - ``malformed``: mid-stream, a data line of invalid JSON, a stray non-field line and a
    comment, then three events with CR-only line endings (the first with its JSON split
    over two ``data:`` lines); the stream then finishes normally with its usage
  - ``status-NNN``: answer HTTP NNN (400..599) with the API's error envelope
    (``retry-after: 1`` on 429/503/529)
  - ``stall``: after a few tokens (3) send nothing for ``x-sim-stall-ms`` (default 1000),
    then continue (a non-streaming response is delayed by it)
  - ``huge``: a non-streaming body is padded with a ``"sim_padding"`` string field to
    ``x-sim-body-bytes`` (default 4 MiB), written in 64 KiB pieces, usage last

- ``x-sim-encoding: gzip|deflate|br|zstd``  compress the body (``Content-Encoding``); a
  stream is compressed incrementally with a flush after every event
- ``x-sim-keepalive-comments: 1``  add ``: keep-alive`` comment lines (after the preamble
  and every 16 tokens)

Python API::

    server = SimServer(host="127.0.0.1", port=0, ttft_ms=0, tokens_per_s=0, default_tokens=16)
    await server.start(); server.url; await server.stop()   # or: await server.serve_forever()

    with run_in_thread(ttft_ms=50) as sim:                  # for synchronous tests
        client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x")

Command line: ``python -m spendtap.sim --listen HOST:PORT [--ttft-ms] [--tps] [--tokens]``
or ``spendtap simulate``.
"""

from .server import SimServer, run_in_thread, serve_until_signalled

__all__ = ["SimServer", "run_in_thread", "serve_until_signalled"]
