"""End to end: injected usage is billed, and the client's bytes match a direct request."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.helpers import strip_ids

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("client_asks", [False, True])
def test_stream_bytes_match_direct(sidecar, sim, path, client_asks):
    """Through the sidecar the client gets exactly the stream a direct request gets."""
    account = "inject-" + uuid.uuid4().hex[:8]
    body: dict = {"model": "sim", "stream": True, "max_tokens": 9}
    if path.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    sim_headers = {"x-sim-tokens": "9"}
    with httpx.Client(timeout=10) as client:
        through = client.post(
            sidecar.url + path,
            json=body,
            headers={**sim_headers, "x-helexa-account-id": account},
        )
        direct = client.post(sim.url + path, json=body, headers=sim_headers)
    assert through.status_code == direct.status_code == 200
    assert strip_ids(through.content, padding=True) == strip_ids(direct.content, padding=True)
    assert (b'"usage":{' in through.content) is client_asks
    row = sidecar.row_for(account)
    assert row["usage_source"] == "reported"
    assert row["completion_tokens"] == 9
