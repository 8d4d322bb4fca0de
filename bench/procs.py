"""Child processes and what /proc says about them (CPU time, RSS, peak RSS)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Proc:
    """A child process with its output in a log file; always stopped (TERM, then KILL)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict | None = None,
        cwd: str | None = None,
    ):
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            preexec_fn=_raise_nofile,
            start_new_session=True,  # so a Ctrl-C in the terminal reaches only us
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 20) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            # The whole session: LiteLLM or a wrapper may have children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in its session
        self._log.close()
        return self.proc.returncode


# -- /proc ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def task_runtimes(pid: int) -> dict[int, float] | None:
    """Each live thread's CPU time in seconds from ``/proc/PID/task/TID/sched``
    (``se.sum_exec_runtime``, ns-precise), or None where the kernel does not show it."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("se.sum_exec_runtime"):
                out[int(tid)] = float(line.rsplit(":", 1)[1]) / 1000.0  # ms
                break
        else:
            return None
    return out


def cpu_snapshot(pids: list[int]) -> dict[int, tuple[int, dict[int, float] | None]]:
    """For ``cpu_between``: each process's utime+stime ticks and its threads' runtimes."""
    snap = {}
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            snap[pid] = (int(f[11]) + int(f[12]), task_runtimes(pid))
    return snap


def cpu_between(a: dict, b: dict) -> float:
    """CPU seconds the processes of snapshot ``b`` used since snapshot ``a``.

    Per thread at nanosecond precision where the kernel shows it (``utime``/``stime``
    count 10 ms ticks: a process idling between paced events takes a handful of them
    in a measured window); from the ticks for a process one of whose threads ended in
    between (its time is then only in the process's ticks).
    """
    total = 0.0
    for pid, (ticks1, tasks1) in b.items():
        ticks0, tasks0 = a.get(pid, (0, {}))
        if tasks0 is not None and tasks1 is not None and tasks0.keys() <= tasks1.keys():
            total += sum(tasks1.values()) - sum(tasks0.values())
        else:
            total += (ticks1 - ticks0) / CLK_TCK
    return total


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: list[int]) -> int:
    return sum(status_kib(p, "VmRSS") for p in pids)


def hwm_kib(pids: list[int]) -> int:
    """Peak RSS (VmHWM), summed over the processes."""
    return sum(status_kib(p, "VmHWM") for p in pids)


def reset_hwm(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``)."""
    ok = True
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def machine() -> dict:
    info: dict = {"nproc": os.cpu_count(), "kernel": os.uname().release}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_mib"] = int(line.split()[1]) // 1024
    with contextlib.suppress(Exception):
        info["affinity"] = len(os.sched_getaffinity(0))
    return info
