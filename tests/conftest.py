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
def sidecar(sim, tmp_path_factory):
    """A real mitmdump with the addon in reverse mode in front of the simulator."""
    s = Sidecar(tmp_path_factory.mktemp("sidecar"), sim.url)
    yield s
    s.stop()
