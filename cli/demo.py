"""``spendtap demo``: the whole thing on an embedded default.

Starts the simulated inference server and the sidecar (a real mitmdump with the
addon) on free loopback ports, drives a realistic mix of traffic through the
sidecar with the official ``openai`` and ``anthropic`` SDKs, prints the spend
report, and stops everything it started.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from spendtap.address import free_port, wait_for_port
from spendtap.cli.numbers import count
from spendtap.cli.query import report_command
from spendtap.cli.run import build_mitmdump_args

# (account, key) pairs the demo traffic is charged to; None is an anonymous caller.
PRINCIPALS = [
    ("acme", "acme-prod"),
    ("acme", "acme-dev"),
    ("globex", "globex-batch"),
    ("initech", "initech-agent"),
    (None, None),
]
PROMPTS = [
    "Summarize the attached incident report in three bullet points.",
    "Write a haiku about token budgets.",
    "Translate 'the proxy meters every token' into French.",
    "Explain time to first token to a new operator.",
    "List five ways to reduce prompt size.",
]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    try:
        wait_for_port(port, proc)
    except (RuntimeError, TimeoutError) as e:
        raise click.ClickException(f"{what}: {e}") from None


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _headers(account: str | None, key: str | None) -> dict[str, str]:
    if account is None:
        return {}
    return {"x-helexa-account-id": account, "x-helexa-key-id": key}


def _traffic(base: str, n: int, seed: int) -> list[str]:
    """Drive ``n`` requests with the official SDKs; returns a line per request kind."""
    import anthropic
    import httpx
    import openai

    rng = random.Random(seed)

    def one(i: int) -> str:
        account, key = PRINCIPALS[i % len(PRINCIPALS)]
        headers = _headers(account, key)
        prompt = rng.choice(PROMPTS)
        tokens = str(rng.randint(8, 48))
        kind = i % 11
        if kind in (0, 1, 2, 3):
            client = openai.OpenAI(
                base_url=base + "/v1", api_key="sk-demo", max_retries=0, default_headers=headers
            )
            with client:
                if kind == 0:
                    stream = client.chat.completions.create(
                        model="llama-3.1-8b",
                        messages=[{"role": "user", "content": prompt}],
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_headers={"x-sim-tokens": tokens},
                    )
                    for _ in stream:
                        pass
                    return "openai chat (stream)"
                if kind == 1:
                    client.chat.completions.create(
                        model="qwen2.5-72b",
                        messages=[{"role": "user", "content": prompt}],
                        extra_headers={"x-sim-tokens": tokens, "x-sim-cached-tokens": "8"},
                    )
                    return "openai chat (json)"
                if kind == 2:
                    for _ in client.responses.create(
                        model="gpt-oss-20b",
                        input=prompt,
                        stream=True,
                        extra_headers={"x-sim-tokens": tokens},
                    ):
                        pass
                    return "openai responses (stream)"
                client.embeddings.create(model="bge-m3", input=[prompt, prompt[::-1]])
                return "openai embeddings"
        if kind in (4, 5):
            client = anthropic.Anthropic(
                base_url=base, api_key="sk-ant-demo", max_retries=0, default_headers=headers
            )
            with client:
                if kind == 4:
                    with client.messages.stream(
                        model="claude-sonnet-4-5",
                        max_tokens=256,
                        messages=[{"role": "user", "content": prompt}],
                        extra_headers={"x-sim-tokens": tokens, "x-sim-cached-tokens": "16"},
                    ) as stream:
                        for _ in stream.text_stream:
                            pass
                    return "anthropic messages (stream)"
                client.messages.create(
                    model="claude-haiku-4-5",
                    max_tokens=256,
                    messages=[{"role": "user", "content": prompt}],
                    extra_headers={"x-sim-tokens": tokens},
                )
                return "anthropic messages (json)"
        if kind == 7:
            # Gemini's native API (the model is in the path), streamed as SSE.
            with httpx.Client(timeout=30) as http:
                http.post(
                    base + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                    headers={**headers, "x-sim-tokens": tokens, "x-sim-reasoning-tokens": "12"},
                    json={"contents": [{"role": "user", "parts": [{"text": prompt}]}]},
                ).raise_for_status()
            return "gemini native (stream)"
        if kind == 8:
            # Ollama's native API: NDJSON, streamed unless the request says otherwise.
            with httpx.Client(timeout=30) as http:
                http.post(
                    base + "/api/chat",
                    headers={**headers, "x-sim-tokens": tokens},
                    json={"model": "llama3.2", "messages": [{"role": "user", "content": prompt}]},
                ).raise_for_status()
            return "ollama native chat (stream)"
        if kind == 9:
            # llama.cpp server's own /completion endpoint, streamed.
            with httpx.Client(timeout=30) as http:
                http.post(
                    base + "/completion",
                    headers={**headers, "x-sim-tokens": tokens, "x-sim-cached-tokens": "4"},
                    json={
                        "model": "llama-3.1-8b",
                        "prompt": prompt,
                        "n_predict": 64,
                        "stream": True,
                    },
                ).raise_for_status()
            return "llama.cpp native completion (stream)"
        if kind == 10:
            # Cohere's v2 chat API.
            with httpx.Client(timeout=30) as http:
                http.post(
                    base + "/v2/chat",
                    headers={**headers, "x-sim-tokens": tokens},
                    json={"model": "command-r", "messages": [{"role": "user", "content": prompt}]},
                ).raise_for_status()
            return "cohere v2 chat (json)"
        # A client that hangs up mid-stream: spendtap records what it can.
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST",
                base + "/v1/chat/completions",
                headers={**headers, "x-sim-tokens": "200"},
                json={
                    "model": "llama-3.1-8b",
                    "stream": True,
                    "messages": [{"role": "user", "content": prompt}],
                },
            ) as resp,
        ):
            for _ in resp.iter_raw():
                break
        return "client disconnect mid-stream"

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))


# The simulated fleet's self-hosted models are in no catalogue: the operator prices
# them (dollars per million tokens); hosted models (claude-*) come from the catalogue.
DEMO_PRICES = """\
# spendtap demo: internal rates for the self-hosted models
[models."llama-3.1-8b"]
input = 0.05
output = 0.08

[models."qwen2.5-*"]
input = 0.40
cached_input = 0.10
output = 1.20

[models."gpt-oss-*"]
input = 0.07
output = 0.30

[models."bge-m3"]
input = 0.01
output = 0

[models."llama3.2"]
input = 0.03
output = 0.05
"""


@click.command()
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    help="Ledger to write (default: a new file in a temporary directory, kept).",
)
@click.option(
    "--requests",
    "n",
    type=count(1, 100_000),
    default=42,
    show_default=True,
    help="How many requests to send.",
)
@click.option(
    "--ttft-ms",
    type=count(0, 600_000),
    default=120,
    show_default=True,
    help="Simulated time to first token.",
)
@click.option(
    "--tps",
    type=count(0, 1_000_000),
    default=150,
    show_default=True,
    help="Simulated decode rate (tokens/s).",
)
@click.option(
    "--seed",
    type=count(0, 2**63 - 1),
    default=7,
    show_default=True,
    help="Seed for the traffic mix.",
)
def demo(db, n, ttft_ms, tps, seed):
    """Run the sidecar in front of the built-in simulator, send traffic, print the report.

    Everything runs on free loopback ports and stops when the demo ends; the
    ledger stays behind for you to query.

    \b
    Examples:
        spendtap demo
        spendtap report --db /tmp/spendtap-demo-XXXX/ledger.db --by key
    """
    if db is None:
        db = os.path.join(tempfile.mkdtemp(prefix="spendtap-demo-"), "ledger.db")
    db = os.path.abspath(db)
    workdir = Path(db).parent
    workdir.mkdir(parents=True, exist_ok=True)
    sim_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    sim = proxy = None
    sim_log = open(workdir / "simulator.log", "wb")  # noqa: SIM115 - closed below
    proxy_log = open(workdir / "sidecar.log", "wb")  # noqa: SIM115 - closed below
    started = time.monotonic()
    try:
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spendtap.sim",
                "--listen",
                f"127.0.0.1:{sim_port}",
                "--ttft-ms",
                str(ttft_ms),
                "--tps",
                str(tps),
            ],
            stdout=sim_log,
            stderr=subprocess.STDOUT,
        )
        _wait_port(sim_port, sim, "the simulator")
        prices = workdir / "prices.toml"
        prices.write_text(DEMO_PRICES)
        args = build_mitmdump_args(
            mode="reverse",
            upstream=sim_url,
            listen=f"127.0.0.1:{proxy_port}",
            db=db,
            metrics=f"127.0.0.1:{metrics_port}",
            prices=str(prices),
        )
        proxy = subprocess.Popen(args, stdout=proxy_log, stderr=subprocess.STDOUT)
        _wait_port(proxy_port, proxy, "the sidecar (mitmdump)")
        _wait_port(metrics_port, proxy, "the sidecar's metrics server")
        click.echo(f"simulator  {sim_url}  (ttft {ttft_ms} ms, {tps} tokens/s)")
        click.echo(f"sidecar    {proxy_url}  -> {sim_url}")
        click.echo(f"metrics    http://127.0.0.1:{metrics_port}/metrics")
        click.echo(f"ledger     {db}")
        click.echo(f"prices     {prices} (self-hosted models), then the genai-prices catalogue")
        click.echo(f"\nsending {n} requests with the openai and anthropic SDKs...")
        kinds = _traffic(proxy_url, n, seed)
        for kind in sorted(set(kinds)):
            click.echo(f"  {kinds.count(kind):3d} x {kind}")
        metrics_text = _scrape(metrics_port)
    finally:
        _stop(proxy)
        _stop(sim)
        sim_log.close()
        proxy_log.close()
    ctx = click.get_current_context()
    click.echo("\nspend by key (spendtap report --by key):")
    ctx.invoke(report_command, by="key", db_path=Path(db), fmt="table")
    click.echo("\nusage by model (spendtap report --by model):")
    ctx.invoke(report_command, by="model", db_path=Path(db), fmt="table")
    if metrics_text:
        click.echo("\na few of the metrics the sidecar exported:")
        for line in metrics_text:
            click.echo("  " + line)
    click.echo(f"\ndone in {time.monotonic() - started:.1f}s; nothing left running.")
    click.echo(f"query the ledger:  {_spendtap_command()} requests --db {db} --limit 10")


def _spendtap_command() -> str:
    """How to type ``spendtap`` from here: bare when it is on PATH, else its path
    (after ``make demo`` it is ``.venv/bin/spendtap``)."""
    here = Path(sys.executable).with_name("spendtap")
    found = shutil.which("spendtap")
    if found and Path(found).resolve() == here.resolve():
        return "spendtap"
    if not here.exists():
        return "spendtap"
    relative = os.path.relpath(here)
    return str(here) if relative.startswith("..") else relative


def _scrape(port: int) -> list[str]:
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return []
    wanted = ("_spend_tokens_total{", "_time_to_first_token_seconds_sum{", "_requests_total{")
    lines = text.splitlines()
    return [line for w in wanted for line in lines if w in line][:14]
