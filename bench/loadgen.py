"""The load generator: ``python -m bench.loadgen '<json spec>'``, one process per measurement.

Raw asyncio protocols over keep-alive HTTP/1.1 connections (one per concurrent
client), a minimal response parser (status, ``Content-Length`` or chunked framing),
and SSE events counted by their blank-line terminators -- so the generator costs a
few microseconds per event and is never the bottleneck (its own CPU share is
reported with every result).

Modes (``spec["mode"]``):

- ``load``: ``concurrency`` clients send requests back to back (``think_ms``: each waits
  a uniformly random 0..think_ms between a response's end and its next request, so
  clients with identical pacing do not stay in lockstep). After ``warmup_s`` it
  prints ``MARK start``, after ``duration_s`` more ``MARK end`` (the parent samples
  the proxy's CPU between the marks), stops sending, waits for the requests in flight
  (at most ``grace_s``) and prints one JSON line with the figures.
- ``hold``: open ``concurrency`` streams, print ``HELD n`` once every one has received
  its first event, wait for a line on stdin, close them all, print JSON.
- ``fetch``: send one request, read the whole response, print JSON (bytes, seconds).

Per request: time to first byte of the body, time to first *content* event (the
``first_event``-th SSE event: 2 for chat, whose first event is the role preamble
that servers send before the first token), end of response, events, bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time

now = time.perf_counter

_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _LAST_CRLF, _LENGTH, _DONE = range(7)


class Stats:
    __slots__ = ("bytes", "events")

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0


class Client(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends the prebuilt request once."""

    def __init__(self, request: bytes, first_event: int, stats: Stats) -> None:
        self.request_bytes = request
        self.first_event = first_event
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.buf = b""
        self.left = 0
        self.status = 0
        self.events = 0
        self.nbytes = 0
        self.nl = False  # the payload so far ends in a single "\n"
        self.t0 = self.t_body = self.t_first = self.t_end = 0.0
        self.keep = True

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(f"connection lost ({exc or 'closed'})"))

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except Exception as e:  # a response we cannot parse: fail the request
            w = self.waiter
            if w is not None and not w.done():
                w.set_exception(e)
            self.transport.close()

    # -- requests --------------------------------------------------------------------------

    def request(self) -> asyncio.Future:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = now()
        self.transport.write(self.request_bytes)
        return self.waiter

    def _finish(self, t: float) -> None:
        self.t_end = t
        self.state = _DONE
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
        if not self.keep:
            self.transport.close()

    def _payload(self, p: bytes, t: float) -> None:
        n = p.count(b"\n\n")
        if self.nl and p[:1] == b"\n":
            n += 1
        if p:
            self.nl = (
                p[-1:] == b"\n" and p[-2:] != b"\n\n"
                if len(p) > 1
                else (p == b"\n" and not self.nl)
            )
        if not self.t_body:
            self.t_body = t
        self.nbytes += len(p)
        self.stats.bytes += len(p)
        if n:
            self.events += n
            self.stats.events += n
            if not self.t_first and self.events >= self.first_event:
                self.t_first = t

    def _feed(self, data: bytes) -> None:
        t = now()
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while pos < end:
            st = self.state
            if st == _CHUNK_DATA:
                take = min(self.left, end - pos)
                self._payload(buf[pos : pos + take], t)
                pos += take
                self.left -= take
                if not self.left:
                    self.state = _CHUNK_CRLF
            elif st == _CHUNK_SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(buf[pos:i].split(b";", 1)[0], 16)
                pos = i + 2
                if size:
                    self.left = size
                    self.state = _CHUNK_DATA
                else:
                    self.state = _LAST_CRLF
            elif st == _CHUNK_CRLF:
                if end - pos < 2:
                    break
                pos += 2
                self.state = _CHUNK_SIZE
            elif st == _LAST_CRLF:
                i = buf.find(b"\r\n", pos)  # no trailers expected; skip any
                if i < 0:
                    break
                if i == pos:
                    pos += 2
                    self._finish(t)
                else:
                    pos = i + 2
            elif st == _LENGTH:
                take = min(self.left, end - pos)
                self._payload(buf[pos : pos + take], t)
                pos += take
                self.left -= take
                if not self.left:
                    self._finish(t)
            elif st == _HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                self._head(buf[pos:i], t)
                pos = i + 4
            else:  # _DONE: bytes after the response (should not happen)
                pos = end
        self.buf = buf[pos:] if pos < end else b""

    def _head(self, head: bytes, t: float) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        if self.status == 100:
            return
        chunked, length = False, None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length":
                length = int(value.strip())
            elif name == b"connection" and b"close" in value.lower():
                self.keep = False
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.left = length
            self.state = _LENGTH
            if not length:
                self._finish(t)
        else:
            raise ValueError("response without a length (close-delimited) is not supported")


def build_request(spec: dict) -> bytes:
    body = spec["body"].encode()
    host = f"{spec['host']}:{spec['port']}"
    lines = [
        f"POST {spec['path']} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: text/event-stream" if spec.get("stream") else "Accept: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in spec.get("headers", {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(spec: dict, request: bytes, stats: Stats) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: Client(request, spec.get("first_event", 2), stats), spec["host"], spec["port"]
    )
    return client


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run_load(spec: dict) -> dict:
    request = build_request(spec)
    stats = Stats()
    conc = spec["concurrency"]
    timeout = spec.get("request_timeout_s", 60)
    loop = asyncio.get_running_loop()
    t_start = now()
    t_w = t_start + spec["warmup_s"]
    t_e = t_w + spec["duration_s"]
    samples: list[tuple[float, float, float, float, int, int]] = []  # t0, body, first, end
    counts = {"completed": 0, "errors": 0, "bad_status": 0}
    errors: list[str] = []
    stopping = asyncio.Event()
    think_s = spec.get("think_ms", 0) / 1000
    rng = random.Random(spec.get("seed", 0))

    async def worker(k: int) -> None:
        client: Client | None = None
        while not stopping.is_set():
            if think_s:
                await asyncio.sleep(rng.uniform(0, think_s))
            try:
                if client is None or client.closed:
                    client = await connect(spec, request, stats)
                fut = client.request()
                await asyncio.wait_for(fut, timeout)
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                counts["errors"] += 1
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
                if client is not None and client.transport is not None:
                    client.transport.close()
                client = None
                await asyncio.sleep(0.05)
                continue
            c = client
            if c.status != 200:
                counts["bad_status"] += 1
                if len(errors) < 5:
                    errors.append(f"HTTP {c.status}")
            if t_w <= c.t_end <= t_e:
                counts["completed"] += 1
            if c.t0 >= t_w:
                samples.append((c.t0, c.t_body, c.t_first, c.t_end, c.events, c.nbytes))
            if c.closed or not c.keep:
                client = None
        if client is not None and client.transport is not None:
            client.transport.close()

    tasks = [loop.create_task(worker(k)) for k in range(conc)]
    await asyncio.sleep(max(0.0, t_w - now()))
    ev0, by0, cpu0, real0 = stats.events, stats.bytes, _cpu(), now()
    print("MARK start", flush=True)
    await asyncio.sleep(max(0.0, t_e - now()))
    ev1, by1, cpu1, real1 = stats.events, stats.bytes, _cpu(), now()
    print("MARK end", flush=True)
    stopping.set()
    _, pending = await asyncio.wait(tasks, timeout=spec.get("grace_s", 5))
    for t in pending:
        t.cancel()
    window = real1 - real0
    return {
        "window_s": window,
        "completed": counts["completed"],
        "errors": counts["errors"],
        "bad_status": counts["bad_status"],
        "unfinished_at_grace": len(pending),
        "error_samples": errors,
        "events": ev1 - ev0,
        "bytes": by1 - by0,
        "lg_cpu_frac": (cpu1 - cpu0) / window if window > 0 else None,
        # per request: ttfb, ttfc, e2e (seconds), events, bytes, sent (s after start)
        "samples": [
            (
                round(b - t0, 6) if b else None,
                round(f - t0, 6) if f else None,
                round(e - t0, 6),
                n,
                nb,
                round(t0 - t_start, 6),
            )
            for t0, b, f, e, n, nb in samples
        ],
    }


async def run_hold(spec: dict) -> dict:
    request = build_request(spec)
    stats = Stats()
    clients: list[Client] = []
    futs = []
    n = spec["concurrency"]
    t0 = now()
    for i in range(n):
        c = await connect(spec, request, stats)
        c.first_event = 1
        futs.append(c.request())
        clients.append(c)
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    deadline = now() + spec.get("hold_timeout_s", 60)
    while now() < deadline:
        ready = sum(1 for c in clients if c.t_first or c.events >= 1)
        if ready >= n:
            break
        await asyncio.sleep(0.05)
    ready = sum(1 for c in clients if c.t_first or c.events >= 1)
    failed = sum(1 for c in clients if c.closed or (c.status and c.status != 200))
    print(f"HELD {ready}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    for f in futs:
        if f.done():
            f.exception()  # retrieved: no "never retrieved" noise
        else:
            f.cancel()
    return {"held": ready, "failed": failed, "open_s": round(now() - t0, 3)}


async def run_fetch(spec: dict) -> dict:
    stats = Stats()
    c = await connect(spec, build_request(spec), stats)
    await asyncio.wait_for(c.request(), spec.get("request_timeout_s", 120))
    c.transport.close()
    return {"status": c.status, "bytes": c.nbytes, "seconds": round(c.t_end - c.t0, 4)}


def main() -> int:
    spec = json.loads(sys.argv[1])
    runner = {"load": run_load, "hold": run_hold, "fetch": run_fetch}[spec.get("mode", "load")]
    result = asyncio.run(runner(spec))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
