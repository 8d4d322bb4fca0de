"""The systems under test, each in its own processes, all on loopback.

- ``direct``: the simulator itself (the upstream of every other target).
- ``mitmdump``: bare ``mitmdump`` in reverse mode, streaming on (``stream_large_bodies=1``),
  no addon, with the flags ``spendtap run`` uses.
- ``mitmdump-uvloop``: the same mitmproxy on uvloop's event loop, as ``spendtap run``
  starts it (``python -m spendtap.proxy.eventloop uvloop``): spendtap against mitmproxy on
  the same loop (info lines; the goals compare with bare ``mitmdump``).
- ``mitmdump-cb``: (optional, for attribution) mitmdump with a trivial addon whose stream
  callable returns each chunk unchanged: what mitmproxy itself charges for a callable.
- ``spendtap``: ``mitmdump -s addon/spendtap.py`` exactly as ``spendtap run`` builds it,
  ledger in a temp dir, metrics on a free port.
- ``lean-bare``: (optional) the lean runner without spendtap's addons.
- ``spendtap-lean``: the same through the lean runner (``spendtap run --runner lean``:
  ``python -m spendtap.proxy.runner``, mitmproxy's master with only the addons a sidecar
  needs).
- ``spendtap-budget``: the same with a (never reached) token budget on the benchmark's key,
  enforced on every request -- only when the installed spendtap has budgets.
- ``spendtap-central``: the same budget enforced through PostgreSQL on loopback (the
  fleet's central store: ``spendtap_central``), a real server started for the run from
  Debian's ``postgresql`` package (skipped when it is not installed).
- ``litellm``: LiteLLM's proxy (see :mod:`bench.peers`), offline, fronting the simulator.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import PYTHON, REPO, Proc, descendants
from spendtap.address import free_port, wait_for_port

ACCOUNT = "bench-acct"
KEY = "bench-key"
MASTER_KEY = "sk-bench-" + "0123456789abcdef" * 4  # LiteLLM refuses to start without one
MODEL_UNPACED = "sim-unpaced"
MODEL_PACED = "sim-paced"

PASSTHRU_ADDON = '''\
"""Benchmark baseline: stream every response through a callable that changes nothing."""


def _same(data):
    return data


class Passthru:
    def responseheaders(self, flow):
        if flow.response is not None:
            flow.response.stream = _same


addons = [Passthru()]
'''


@dataclass
class Target:
    name: str
    host: str
    port: int
    procs: list[Proc] = field(default_factory=list)
    note: str = ""
    metrics_port: int | None = None
    cleanups: list = field(default_factory=list)
    # Per-scenario sim controls go in x-sim-* headers; LiteLLM drops client headers,
    # so for it they ride on the model entry (extra_headers) instead.
    forwards_headers: bool = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs:
            if p.alive():
                out += descendants(p.pid)
        return out

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        for fn in self.cleanups:
            fn()


def start_sim(log_dir: Path) -> Target:
    port = free_port()
    p = Proc(
        "sim",
        [PYTHON, "-m", "spendtap.sim", "--listen", f"127.0.0.1:{port}"],
        log_dir,
        cwd=str(REPO),
    )
    wait_for_port(port, p.proc)
    return Target("direct", "127.0.0.1", port, [p])


def _mitmdump_base(upstream: str, port: int, event_loop: str = "asyncio") -> list[str]:
    """The flags ``spendtap run`` passes, minus the addon and its options.

    On asyncio's loop this is the ``mitmdump`` program itself (bare mitmdump, the
    baseline of every ratio); on uvloop, mitmproxy's ``mitmdump()`` started on uvloop's
    loop as ``spendtap run`` starts it (``python -m spendtap.proxy.eventloop uvloop``)."""
    from spendtap.cli.run import build_mitmdump_args

    args = build_mitmdump_args(
        mode="reverse", upstream=upstream, listen=f"127.0.0.1:{port}", db="/x", metrics="",
        event_loop=event_loop,
    )  # fmt: skip
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "-s":
            skip = True
            continue
        if a == "--set" and args[i + 1].startswith("spendtap_"):
            skip = True
            continue
        out.append(a)
    return out


def spendtap_args(
    upstream: str,
    port: int,
    db: Path,
    metrics_port: int,
    runner: str = "mitmdump",
    event_loop: str | None = None,
) -> list[str]:
    from spendtap.cli.run import build_mitmdump_args

    kw = {"runner": runner} if runner != "mitmdump" else {}
    if event_loop is not None:  # else spendtap run's default
        kw["event_loop"] = event_loop
    return build_mitmdump_args(
        mode="reverse",
        upstream=upstream,
        listen=f"127.0.0.1:{port}",
        db=str(db),
        metrics=f"127.0.0.1:{metrics_port}",
        **kw,
    )


def start_mitmdump(
    upstream: str,
    log_dir: Path,
    callable_stream: bool = False,
    env: dict | None = None,
    event_loop: str = "asyncio",
) -> Target:
    port = free_port()
    args = _mitmdump_base(upstream, port, event_loop)
    name = "mitmdump-cb" if callable_stream else "mitmdump"
    if event_loop != "asyncio":
        name += f"-{event_loop}"
    if callable_stream:
        script = log_dir / "passthru_addon.py"
        script.write_text(PASSTHRU_ADDON)
        args += ["-s", str(script)]
    else:
        args += ["--set", "stream_large_bodies=1"]
    p = Proc(name, args, log_dir, env=env)
    wait_for_port(port, p.proc)
    return Target(name, "127.0.0.1", port, [p], note=" ".join(args[1:]))


LEAN_BARE = (
    "import sys; import spendtap.proxy.runner as r; r.entry_addons = list; "
    "sys.exit(r.main(sys.argv[1:]))"
)


def start_lean_bare(upstream: str, log_dir: Path) -> Target:
    """The lean runner without spendtap's addons: mitmproxy's own cost with a dozen addons
    and per-hook dispatch, against bare mitmdump's forty."""
    port = free_port()
    args = [PYTHON, "-c", LEAN_BARE, *_mitmdump_base(upstream, port)[1:]]
    args += ["--set", "stream_large_bodies=1"]
    p = Proc("lean-bare", args, log_dir)
    wait_for_port(port, p.proc)
    return Target("lean-bare", "127.0.0.1", port, [p], note=" ".join(args[3:]))


def start_spendtap(
    upstream: str,
    log_dir: Path,
    extra: list[str] | None = None,
    name: str = "spendtap",
    db: Path | None = None,
    env: dict | None = None,
    runner: str = "mitmdump",
    event_loop: str | None = None,
) -> Target:
    port, mport = free_port(), free_port()
    db = db or log_dir / f"{name}-ledger.db"
    args = spendtap_args(upstream, port, db, mport, runner, event_loop)
    for s in extra or ():
        args += ["--set", s]
    p = Proc(name, args, log_dir, env=env)
    wait_for_port(port, p.proc)
    wait_for_port(mport, p.proc)
    return Target(name, "127.0.0.1", port, [p], note=" ".join(args[1:]), metrics_port=mport)


def start_spendtap_central(
    upstream: str,
    log_dir: Path,
    extra: list[str],
    runner: str = "mitmdump",
    event_loop: str | None = None,
) -> Target:
    """spendtap with the benchmark's (never reached) budgets in a PostgreSQL of its own."""
    from spendtap.store.central import CentralStore
    from tests.pg import PostgresServer, pg_bindir

    if pg_bindir() is None:
        raise RuntimeError("PostgreSQL is not installed (scripts/ci-deps.sh installs it)")
    server = PostgresServer()
    try:
        dsn = server.create_database()
        with CentralStore(dsn) as store:
            store.set("key", KEY, 10**15, None)
            store.set("account", ACCOUNT, 10**15, None)
        # As `spendtap run --central` does: the URL in the environment, never in argv.
        target = start_spendtap(
            upstream, log_dir, extra, name="spendtap-central", env={"SPENDTAP_CENTRAL": dsn},
            runner=runner, event_loop=event_loop,
        )  # fmt: skip
    except BaseException:
        server.destroy()
        raise
    target.cleanups.append(server.destroy)
    target.note = f"SPENDTAP_CENTRAL=postgresql://...:{server.port} " + target.note
    return target


def central_figures(target: Target) -> dict[str, float]:
    """The sidecar's cortex_central_* gauges (backlog, lag, rows shipped), from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{target.metrics_port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("cortex_central_"):
            name, _, value = line.partition(" ")
            out[name.removeprefix("cortex_central_")] = float(value)
    return out


# -- budgets (being built in parallel: detect, never assume) ---------------------------------


def _spendtap_cli() -> list[str]:
    return [PYTHON, "-c", "from spendtap.cli.main import cli; cli()"]


def budget_support(log_dir: Path) -> tuple[bool, str, list[str]]:
    """(supported, note, extra --set options) for the spendtap-budget target."""
    try:
        help_out = subprocess.run(
            [*_spendtap_cli(), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"spendtap --help failed: {e}", []
    has_cmd = any(line.split()[:1] == ["budget"] for line in help_out.splitlines())
    options = ""
    try:
        from spendtap.cli.run import _mitmdump_command, addon_path

        options = subprocess.run(
            [*_mitmdump_command(), "-s", addon_path(), "--options"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(log_dir),
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    has_opt = "spendtap_enforce_budgets" in options
    if not has_cmd and not has_opt:
        return False, "spendtap has no `budget` command nor spendtap_enforce_budgets option", []
    extra = ["spendtap_enforce_budgets=true"] if has_opt else []
    return True, f"budget command: {has_cmd}, enforce option: {has_opt}", extra


def metering_only_sets() -> list[str]:
    """--set options that make the ``spendtap`` target pure metering (budgets off), when
    this spendtap has them; ``spendtap-budget`` measures enforcement separately."""
    try:
        from spendtap.cli.run import _mitmdump_command, addon_path

        options = subprocess.run(
            [*_mitmdump_command(), "-s", addon_path(), "--options"],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["spendtap_enforce_budgets=false"] if "spendtap_enforce_budgets" in options else []


def set_budget(db: Path, log_dir: Path) -> str | None:
    """Give the benchmark's key and account caps no run can reach; None on success."""
    from spendtap.store.ledger import Ledger

    Ledger(db).close()  # create the ledger first
    for who in (["--key", KEY], ["--account", ACCOUNT]):
        r = subprocess.run(
            [*_spendtap_cli(), "budget", "set", "--db", str(db), *who,
             "--cap", str(10**15), "--window", "balance"],
            capture_output=True, text=True, timeout=30, cwd=str(log_dir),
        )  # fmt: skip
        if r.returncode != 0:
            return f"`spendtap budget set {' '.join(who)}` failed: {(r.stderr or r.stdout)[-300:]}"
    return None


def start_spendtap_budget(
    upstream: str,
    log_dir: Path,
    extra: list[str],
    runner: str = "mitmdump",
    event_loop: str | None = None,
) -> Target:
    db = log_dir / "spendtap-budget-ledger.db"
    err = set_budget(db, log_dir)
    if err:
        raise RuntimeError(err)
    return start_spendtap(
        upstream, log_dir, extra, name="spendtap-budget", db=db, runner=runner,
        event_loop=event_loop,
    )  # fmt: skip


# -- LiteLLM ---------------------------------------------------------------------------------


def litellm_config(sim_url: str, controls: dict[str, dict[str, str]]) -> str:
    """A LiteLLM proxy config: one model entry per pacing, all fronting the simulator."""
    lines = ["model_list:"]
    for model, headers in controls.items():
        hdrs = ", ".join(f'"{k}": "{v}"' for k, v in headers.items())
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: {sim_url}/v1",
            "      api_key: sk-upstream-unused",
            f"      extra_headers: {{{hdrs}}}",
        ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "general_settings:",
        f"  master_key: {MASTER_KEY}",
    ]
    return "\n".join(lines) + "\n"


OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # never fetch the cost map
    "LITELLM_TELEMETRY": "False",
    "LITELLM_MASTER_KEY": MASTER_KEY,
    "NO_DOCS": "True",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "HTTP_PROXY": "",
    "HTTPS_PROXY": "",
    "http_proxy": "",
    "https_proxy": "",
    "NO_PROXY": "*",
}


def start_litellm(
    litellm_bin: Path,
    sim_url: str,
    log_dir: Path,
    controls: dict[str, dict[str, str]],
    version: str,
) -> Target:
    port = free_port()
    cfg = log_dir / "litellm.yaml"
    cfg.write_text(litellm_config(sim_url, controls))
    args = [str(litellm_bin), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    p = Proc("litellm", args, log_dir, env=OFFLINE_ENV, cwd=str(log_dir))
    deadline = time.monotonic() + 120
    while True:
        if not p.alive():
            raise RuntimeError("litellm exited during start-up:\n" + p.tail())
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1)
            if health.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            p.stop()
            raise TimeoutError("litellm did not come up in 120 s:\n" + p.tail())
        time.sleep(0.3)
    return Target("litellm", "127.0.0.1", port, [p], note=f"litellm {version}",
                  forwards_headers=False)  # fmt: skip


def budget_charged(db: Path) -> dict:
    """``spendtap budget show --key`` after the load: did enforcement charge anything?"""
    r = subprocess.run(
        [*_spendtap_cli(), "budget", "show", "--key", KEY, "--db", str(db), "-f", "json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-300:]}
    try:
        import json

        doc = json.loads(r.stdout)
    except ValueError:
        return {"raw": r.stdout[-300:]}
    return doc[0] if isinstance(doc, list) and doc else doc
