"""End to end: every answer spendtap makes itself is one the official SDKs understand.

A failed upstream (unreachable, TLS failure, reset before the response head)
is answered in the API's own JSON error envelope, never mitmproxy's HTML page
with the upstream's address; the SDKs raise their typed ``APIStatusError``
subclasses with spendtap's message, and the ledger has one row per request.
"""

from __future__ import annotations

import socket
import threading

import anthropic
import httpx
import openai
import pytest

from spendtap.address import free_port
from spendtap.proxy.refusals import upstream_failure
from tests.helpers import anthropic_client, openai_client, principal
from tests.proc import Sidecar

pytestmark = pytest.mark.e2e

UNAVAILABLE = "The inference server is unavailable"


def _openai_call(url: str, headers: dict):
    with openai_client(url, headers, api_key="x") as client:
        return client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )


def _anthropic_call(url: str, headers: dict):
    with anthropic_client(url, headers, api_key="x") as client:
        return client.messages.create(
            model="sim-claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )


def _assert_openai_502(proxy: Sidecar, headers: dict, hidden: str) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        _openai_call(proxy.url, headers)
    err = raised.value
    assert err.status_code == 502
    assert err.response.headers["content-type"] == "application/json"
    assert err.body["code"] == "upstream_unavailable" and err.body["type"] == "server_error"
    assert UNAVAILABLE in err.body["message"]
    assert hidden not in err.response.text and "mitmproxy" not in err.response.text.lower()


def _assert_anthropic_502(proxy: Sidecar, headers: dict, hidden: str) -> None:
    with pytest.raises(anthropic.InternalServerError) as raised:
        _anthropic_call(proxy.url, headers)
    err = raised.value
    assert err.status_code == 502
    assert err.body["type"] == "error" and err.body["error"]["type"] == "api_error"
    assert UNAVAILABLE in err.body["error"]["message"]
    assert hidden not in err.response.text


def test_unreachable_upstream_sdks_get_their_error_envelope(start_sidecar):
    """Connection refused: both SDKs raise InternalServerError (502), no address, one row each."""
    dead = free_port()
    proxy = start_sidecar(f"http://127.0.0.1:{dead}")
    account, headers = principal()
    _assert_openai_502(proxy, headers, str(dead))
    row = proxy.row_for(account)
    assert row["outcome"] == "upstream_error" and row["status"] == 502
    assert row["api"] == "openai-chat"
    account, headers = principal()
    _assert_anthropic_502(proxy, headers, str(dead))
    row = proxy.row_for(account)
    assert row["outcome"] == "upstream_error" and row["status"] == 502
    assert row["api"] == "anthropic-messages"
    # The connection stays usable: a second request on one keep-alive client.
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            r = client.post(proxy.url + "/v1/chat/completions", json={"model": "m"})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_reset_before_head_is_an_envelope(sim, start_sidecar):
    """An upstream that resets before its response head: the same typed 502, one row."""
    proxy = start_sidecar(sim.url)
    account, headers = principal()
    _assert_openai_502(proxy, {**headers, "x-sim-fault": "reset"}, str(sim.port))
    assert proxy.row_for(account)["status"] == 502
    account, headers = principal()
    _assert_anthropic_502(proxy, {**headers, "x-sim-fault": "reset"}, str(sim.port))
    assert proxy.row_for(account)["outcome"] == "upstream_error"


@pytest.fixture
def not_tls():
    """A TCP server that answers a TLS ClientHello with plain text and hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_tls_failure_is_an_envelope(not_tls, start_sidecar):
    """TLS to a server that does not speak it: a typed 502 naming a TLS failure, one row."""
    proxy = start_sidecar(f"https://127.0.0.1:{not_tls}")
    account, headers = principal()
    with pytest.raises(openai.InternalServerError) as raised:
        _openai_call(proxy.url, headers)
    assert "TLS" in raised.value.body["message"]
    assert str(not_tls) not in raised.value.response.text
    row = proxy.row_for(account)
    assert row["outcome"] == "upstream_error" and row["status"] == 502


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        ("[Errno 111] Connect call failed ('10.0.0.7', 8000)", 502, "refused the connection"),
        ("TLS handshake failed: certificate verify failed", 502, "TLS"),
        ("Server disconnected.", 502, "closed the connection"),
        ("Connection timed out", 504, "did not answer in time"),
        ("[Errno 110] Connect call failed ('10.0.0.7', 8000)", 504, "did not answer in time"),
        ("[Errno 113] Connect call failed ('10.0.0.7', 8000)", 502, "could not be reached"),
        ("[Errno -2] Name or service not known", 502, "could not be resolved"),
    ],
)
def test_upstream_failure_words(error, status, words):
    """Each kind of failure says what happened, never the address in mitmproxy's message."""
    got, headers, body = upstream_failure("openai-chat", error)
    assert got == status and words in body.decode()
    assert "10.0.0.7" not in body.decode() and headers["content-type"] == "application/json"
