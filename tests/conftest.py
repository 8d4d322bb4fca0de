"""Shared fixtures: real simulator and sidecar processes, one set per test module."""

from __future__ import annotations

import pytest

from tests.proc import Sidecar, Simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The built-in simulated inference server, unpaced, in its own process."""
    s = Simulator(tmp_path_factory.mktemp("sim"), "--ttft-ms", "0", "--tps", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sidecar_upstream(sim) -> str:
    """The URL the module's sidecar proxies to: the simulator, unless the module overrides
    this fixture (a real engine, the corpus replay server)."""
    return sim.url


@pytest.fixture(scope="module")
def sidecar(sidecar_upstream, tmp_path_factory):
    """A real mitmdump with the addon in reverse mode in front of ``sidecar_upstream``."""
    s = Sidecar(tmp_path_factory.mktemp("sidecar"), sidecar_upstream)
    yield s
    s.stop()


@pytest.fixture
def start_sidecar(tmp_path):
    """``start_sidecar(upstream, *sets, **kw)``: a ``Sidecar`` of this test's own (its files
    in ``tmp_path``), stopped when the test ends, whatever it raised. A test may stop one
    itself first (to read what it wrote at shutdown); stopping again is harmless."""
    started: list[Sidecar] = []

    def start(upstream: str | None, *sets: str, **kw) -> Sidecar:
        s = Sidecar(tmp_path, upstream, *sets, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (Debian's postgresql package)."""
    from tests.pg import PostgresServer, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL not installed: scripts/ci-deps.sh installs it (as root)")
    server = PostgresServer()
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh, empty database on the session's PostgreSQL server, as a DSN."""
    return pg_server.create_database()


@pytest.fixture
def clean_env(monkeypatch):
    """No ``SPENDTAP_*`` variable from the shell that ran pytest reaches the code under test."""
    import os

    for key in list(os.environ):
        if key.startswith("SPENDTAP_"):
            monkeypatch.delenv(key)
