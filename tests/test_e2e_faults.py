"""End to end: faults on either side end in exactly one ledger row with the right outcome."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import time
import uuid

import httpx
import pytest

from spendtap.address import free_port
from tests.helpers import principal, read_then_hang_up, strip_ids
from tests.proc import Sidecar, rss_peak_kib

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def _body(stream: bool = True, usage: bool = True, tokens: int | None = None) -> dict:
    body: dict = {
        "model": "sim-chat",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
    }
    if stream and usage:
        body["stream_options"] = {"include_usage": True}
    if tokens:
        body["max_tokens"] = tokens
    return body


def _headers(**sim) -> tuple[str, dict]:
    account, headers = principal()
    headers.update({f"x-sim-{k.replace('_', '-')}": str(v) for k, v in sim.items()})
    return account, headers


def _stream_until_it_breaks(url: str, headers: dict, timeout: float) -> None:
    """Read a streamed chat response to its end, which must be a transport error."""
    with (
        httpx.Client(timeout=timeout) as client,
        pytest.raises(httpx.HTTPError),
        client.stream("POST", url + CHAT, json=_body(), headers=headers) as resp,
    ):
        for _ in resp.iter_raw():
            pass


def _only_row(sidecar, account, timeout=10) -> dict:
    return sidecar.row_for(account, timeout)


def test_client_disconnect_mid_stream(sidecar):
    """A client that hangs up mid-stream leaves one client_disconnected row."""
    account, headers = _headers(tokens=400, tps=50)
    read_then_hang_up(sidecar.url + CHAT, _body(), headers, after_bytes=300)
    row = _only_row(sidecar, account)
    assert row["outcome"] == "client_disconnected"
    assert row["ttft_s"] is not None


def test_upstream_cut_mid_stream(sidecar):
    """An upstream that drops the connection mid-stream gives one upstream_error row."""
    account, headers = _headers(tokens=40, fault="cut")
    _stream_until_it_breaks(sidecar.url, headers, timeout=10)
    row = _only_row(sidecar, account)
    assert row["outcome"] == "upstream_error"
    assert row["usage_source"] in ("none", "estimated")


def test_upstream_down_gives_502_row(start_sidecar):
    """An unreachable upstream yields a clean 502 to the client and an upstream_error row."""
    dead = free_port()
    proxy = start_sidecar(f"http://127.0.0.1:{dead}")
    account, headers = _headers()
    r = httpx.post(proxy.url + CHAT, json=_body(stream=False), headers=headers, timeout=10)
    assert r.status_code == 502
    row = _only_row(proxy, account)
    assert row["outcome"] == "upstream_error" and row["status"] == 502
    assert row["prompt_tokens"] is None


def test_malformed_sse_still_billed(sidecar, sim):
    """Malformed SSE lines are skipped, the stream reaches the client intact and usage counts."""
    account, headers = _headers(tokens=10, fault="malformed")
    direct_headers = {k: v for k, v in headers.items() if k.startswith("x-sim")}
    with httpx.Client(timeout=10) as client:
        through = client.post(sidecar.url + CHAT, json=_body(), headers=headers)
        direct = client.post(sim.url + CHAT, json=_body(), headers=direct_headers)
    assert through.status_code == 200
    assert strip_ids(through.content) == strip_ids(direct.content)
    row = _only_row(sidecar, account)
    assert row["outcome"] == "completed"
    assert row["completion_tokens"] == 10 and row["usage_source"] == "reported"


def test_error_event_in_200_stream(sidecar):
    """An error event inside a 200 stream marks the row upstream_error and keeps the error."""
    account, headers = _headers(tokens=20, fault="error-event")
    with httpx.Client(timeout=10) as client:
        r = client.post(
            sidecar.url + "/v1/messages",
            json={
                "model": "sim-claude",
                "max_tokens": 50,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers=headers,
        )
    assert r.status_code == 200
    row = _only_row(sidecar, account)
    assert row["outcome"] == "upstream_error"
    assert row["error"]
    # message_start reported input tokens before the error: they are billed.
    assert row["prompt_tokens"] is not None


def test_gzip_encoded_stream(sidecar):
    """A gzip-encoded stream reaches the client as sent and is scanned decoded."""
    account, headers = _headers(tokens=15, encoding="gzip")
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", sidecar.url + CHAT, json=_body(), headers=headers) as resp,
    ):
        raw = b"".join(resp.iter_raw())
        assert resp.headers["content-encoding"] == "gzip"
    assert b"[DONE]" in gzip.decompress(raw)
    row = _only_row(sidecar, account)
    assert row["completion_tokens"] == 15 and row["usage_source"] == "reported"


def test_huge_json_body_memory_bounded(sidecar):
    """A 50 MB non-streaming body passes whole, is billed, and the proxy's memory stays bounded."""
    size = 50_000_000
    account, headers = _headers(tokens=3, fault="huge", body_bytes=size)
    before = rss_peak_kib(sidecar.pid)
    received = 0
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", sidecar.url + CHAT, json=_body(stream=False), headers=headers
        ) as resp,
    ):
        assert resp.status_code == 200
        tail = b""
        for chunk in resp.iter_raw():
            received += len(chunk)
            tail = (tail + chunk)[-4096:]
    assert received >= size
    assert b'"usage"' in tail  # the body arrived whole, usage at its end
    after = rss_peak_kib(sidecar.pid)
    assert after - before < 40_000, f"peak RSS grew by {after - before} KiB for a {size} byte body"
    row = _only_row(sidecar, account, timeout=20)
    assert row["completion_tokens"] == 3 and row["usage_source"] == "reported"
    assert row["response_bytes"] >= size


def test_sigterm_finalizes_in_flight(sim, tmp_path):
    """SIGTERM while a stream is in flight still leaves that request's row in the ledger."""
    proxy = Sidecar(tmp_path, sim.url)
    account, headers = _headers(tokens=500, tps=20)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    body = json.dumps(_body()).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock.recv(4096)  # headers and the first chunks: the stream is in flight
    time.sleep(0.3)
    code = proxy.stop(signal.SIGTERM)
    sock.close()
    assert code == 0, proxy.output()[-2000:]
    rows = [r for r in proxy.rows() if r["account"] == account]
    assert len(rows) == 1, proxy.output()[-2000:]
    assert rows[0]["outcome"] in ("upstream_error", "client_disconnected")


def test_reset_before_headers(sidecar):
    """An upstream that resets the connection before any header gives a 502 and one row."""
    account, headers = _headers(fault="reset")
    r = httpx.post(sidecar.url + CHAT, json=_body(stream=False), headers=headers, timeout=10)
    assert r.status_code == 502
    row = _only_row(sidecar, account)
    assert row["outcome"] == "upstream_error" and row["status"] == 502


def test_stalled_stream_ends_at_idle_timeout(sim, start_sidecar):
    """A stream that stops sending for longer than the idle timeout ends in one error row."""
    proxy = start_sidecar(sim.url, "tcp_timeout=2")
    account, headers = _headers(tokens=20, fault="stall", stall_ms=8000)
    t0 = time.monotonic()
    _stream_until_it_breaks(proxy.url, headers, timeout=30)
    assert time.monotonic() - t0 < 7
    row = _only_row(proxy, account)
    assert row["outcome"] == "upstream_error", row
    assert row["ttft_s"] is not None


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b'\xff\xfe{"usage": \x80\x81}', "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (
            b'data: {"choices": [{"delta": {"content": "\xc3\x28"}}]}\n\ndata: [DONE]\n\n',
            "text/event-stream",
        ),
        (b"\x00" * 5000, "text/event-stream"),
    ],
    ids=["invalid-utf8-json", "json-array", "invalid-utf8-sse", "nul-bytes"],
)
def test_odd_bodies_pass_through_with_one_row(tmp_path, body, ctype):
    """Bodies no scanner can make sense of reach the client unchanged and leave one row."""
    import base64

    from tests.replay_server import ReplayServer

    with ReplayServer() as replay:
        proxy = Sidecar(tmp_path, replay.url)
        try:
            account = "odd-" + uuid.uuid4().hex[:6]
            headers = {
                "x-replay-raw": base64.b64encode(body).decode(),
                "x-replay-type": ctype,
                "x-helexa-account-id": account,
            }
            r = httpx.post(proxy.url + CHAT, content=b"{}", headers=headers, timeout=10)
            assert r.status_code == 200 and r.content == body
            row = _only_row(proxy, account)
            assert row["outcome"] == "completed"
            assert row["usage_source"] in ("none", "estimated")
        finally:
            proxy.stop()
