"""``spendtap simulate``: run the built-in simulated inference server."""

from __future__ import annotations

import asyncio

import click

from spendtap.address import parse_listen
from spendtap.cli.numbers import count, seconds
from spendtap.sim import SimServer, serve_until_signalled


def _listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command("simulate")
@click.option(
    "--listen",
    default="127.0.0.1:8000",
    show_default=True,
    callback=_listen,
    metavar="HOST:PORT",
    help="Address to listen on (port 0 picks a free port).",
)
@click.option(
    "--ttft-ms",
    type=seconds(0, 600_000),
    default=0,
    show_default=True,
    help="Time to first token in milliseconds (0 = immediate).",
)
@click.option(
    "--tps",
    type=seconds(0, 1_000_000),
    default=0,
    show_default=True,
    help="Tokens per second after the first (0 = unpaced, as fast as possible).",
)
@click.option(
    "--tokens",
    type=count(0, 1_000_000),
    default=16,
    show_default=True,
    help="Default completion length per choice, in tokens.",
)
@click.option(
    "--model",
    default="sim-model",
    show_default=True,
    help="Model id reported when a request names none.",
)
def simulate(listen: tuple[str, int], ttft_ms: float, tps: float, tokens: int, model: str) -> None:
    """Run the built-in simulated inference server.

    It answers the OpenAI (chat completions, completions, responses, embeddings,
    models) and Anthropic (messages) APIs, and the native Gemini
    (models/M:generateContent, :streamGenerateContent), Ollama (/api/chat,
    /api/generate, /api/embed), llama.cpp (/completion) and Cohere (/v2/chat) APIs,
    under any path prefix, with the real wire
    formats, deterministic token usage, optional pacing, and faults injected per
    request through x-sim-* headers (x-sim-tokens, x-sim-ttft-ms, x-sim-tps,
    x-sim-fault: cut|reset|error-event|malformed|stall|huge|status-NNN,
    x-sim-encoding, ...; see `python -c "import spendtap.sim; help(spendtap.sim)"`).
    GET /sim/stats counts the requests that reached it; POST /sim/reset zeroes them.

    It prints the URL it listens on and runs until SIGINT or SIGTERM.

    \b
    Examples:
      spendtap simulate --listen 127.0.0.1:8000 --ttft-ms 200 --tps 50 --tokens 64
      curl -s http://127.0.0.1:8000/v1/chat/completions \\
        -H 'content-type: application/json' -H 'x-sim-tokens: 5' \\
        -d '{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
    """
    host, port = listen
    server = SimServer(
        host, port, ttft_ms=ttft_ms, tokens_per_s=tps, default_tokens=tokens, model=model
    )

    def announce(url: str) -> None:
        click.echo(f"spendtap simulator listening on {url}")

    try:
        asyncio.run(serve_until_signalled(server, announce))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        pass


__all__ = ["simulate"]
