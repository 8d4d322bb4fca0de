"""Listen addresses: as people write them on the command line, and on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` to ``(host, port)``."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [HOST]:PORT, got {value!r}")
    elif ":" in value:
        host, _, port = value.rpartition(":")
    else:
        host, port = "", value
    try:
        port_n = int(port)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host or default_host, port_n


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for local processes the caller starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int,
    proc: subprocess.Popen | None = None,
    timeout: float = 30,
    host: str = "127.0.0.1",
) -> None:
    """Wait until something accepts connections on ``port``.

    Raises ``RuntimeError`` if ``proc`` exits first, ``TimeoutError`` after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout:.0f}s")
