"""Real processes for end-to-end tests: the simulator and mitmdump with the addon."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from spendtap.address import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
ADDON = REPO / "addon" / "spendtap.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")


class Proc:
    """A child process that is always stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, umask: int = -1):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            umask=umask,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Simulator(Proc):
    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "spendtap.sim", "--listen", f"127.0.0.1:{self.port}", *args],
            tmp / f"sim-{self.port}.log",
        )
        wait_for_port(self.port, self.proc)


class Sidecar(Proc):
    """mitmdump -s addon/spendtap.py, as users run it from a checkout (``event_loop``
    "uvloop": the same mitmdump on uvloop's loop, as ``spendtap run`` starts it)."""

    def __init__(
        self,
        tmp: Path,
        upstream: str | None,
        *sets: str,
        mode: str = "reverse",
        db: Path | None = None,
        listen_host: str = "127.0.0.1",
        umask: int = -1,
        quiet: bool = True,
        scripts: Sequence[Path] = (),
        event_loop: str = "asyncio",
    ):
        self.port = free_port(listen_host)
        self.metrics_port = free_port()
        self.db = db or tmp / f"ledger-{self.port}.db"
        self.url = (
            f"http://{'[' + listen_host + ']' if ':' in listen_host else listen_host}:{self.port}"
        )
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        mode_arg = f"reverse:{upstream}" if mode == "reverse" else mode
        program = (
            [str(MITMDUMP)]
            if event_loop == "asyncio"
            else [sys.executable, "-m", "spendtap.proxy.eventloop", event_loop]
        )
        args = [
            *program,
            *(["-q"] if quiet else ["--set", "flow_detail=0"]),
            "--mode",
            mode_arg,
            "--listen-host",
            listen_host,
            "--listen-port",
            str(self.port),
            "-s",
            str(ADDON),
            *(a for script in scripts for a in ("-s", str(script))),
            "--set",
            f"spendtap_db={self.db}",
            "--set",
            f"spendtap_metrics=127.0.0.1:{self.metrics_port}",
            "--set",
            "connection_strategy=lazy",
        ]
        for s in sets:
            args += ["--set", s]
        super().__init__(args, tmp / f"mitmdump-{self.port}.log", umask=umask)
        try:
            wait_for_port(self.port, self.proc, host=listen_host)
            wait_for_port(self.metrics_port, self.proc)
            health = httpx.get(self.metrics_url + "/healthz", timeout=5)
            assert health.status_code == 200, health.text
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode} at start")
        except Exception:
            self.stop()
            raise

    def metrics(self) -> str:
        return httpx.get(self.metrics_url + "/metrics", timeout=5).text

    def row_for(self, account: str, timeout: float = 10, settle: float = 0.2) -> dict:
        """The one ledger row of ``account`` (waits for it; fails on none or a duplicate)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r["account"] == account for r in read_rows(self.db)):
                time.sleep(settle)  # a duplicate would arrive right behind
                rows = [r for r in read_rows(self.db) if r["account"] == account]
                assert len(rows) == 1, rows
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"no ledger row for {account}:\n{self.output()[-3000:]}")

    def rows(self, expect: int | None = None, timeout: float = 10) -> list[dict]:
        """Ledger rows, oldest first; with ``expect``, wait until that many are there."""
        deadline = time.monotonic() + timeout
        while True:
            rows = read_rows(self.db)
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


def read_rows(db: Path) -> list[dict]:
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("select * from requests order by rowid")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")
